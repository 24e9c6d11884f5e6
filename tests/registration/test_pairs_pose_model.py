"""The 2-sigma Gaussian pose model and the initial -> reference offsets it is fitted to."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_pairs_cohort import make_cohort

from kidneyreg.geometry import euler_to_matrix, make_rigid, transform_points
from kidneyreg.io.transforms import write_transforms_json
from kidneyreg.preprocess import initial_alignment
from kidneyreg.registration.pairs import (
    find_cases,
    fit_pose_model,
    load_case,
    reference_offsets,
)
from kidneyreg.registration.pose_model import GaussianPoseModel, initial_to_reference


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_cohort(tmp_path_factory.mktemp("pose") / "cohort", n_cases=2, seed=3)
    # The second case has an initial pose (init.json): a turned grid instead of the default.
    turned = euler_to_matrix([0.1, -0.15, 0.2, 0, 0, 0])[:3, :3]
    pose = make_rigid(turned @ np.array([[0.0, 0, -1], [0, 1, 0], [1, 0, 0]]), [0.0, 0, 0])
    write_transforms_json(root / "case_001" / "init.json", pose)
    return root


def test_reference_offset_moves_initial_alignment_onto_reference(cohort: Path) -> None:
    for folder in find_cases(cohort):
        case = load_case(folder, "tiny")
        c = case.profile.window // 2
        for k in case.valid_frames:
            grid = case.initial_grid(int(k))
            P = case.window_P(int(k))[c]
            m_init = initial_alignment(grid, P)
            # The initial alignment puts the U/S kidney centroid on the CT kidney centroid.
            uv = case.centroids_uv[k]
            centre = transform_points(m_init, [uv[0], uv[1], 0.0])
            np.testing.assert_allclose(centre, case.ct_centroid, atol=1e-9)
            # Applying D_ref to it gives the reference pose: M = G @ D_ref @ P.
            d_ref = case.reference_offset(int(k))
            np.testing.assert_allclose(grid.matrix @ d_ref @ P, case.references[k], atol=1e-9)
            # The reference grid shows the reference plane in its middle slice: D = identity.
            np.testing.assert_allclose(
                case.reference_grid(int(k)).matrix @ P, case.references[k], atol=1e-9
            )
    # init.json turns the grid: its middle x slice is the init pose's plane.
    case = load_case(cohort / "case_001", "tiny")
    assert case.init_poses is not None
    np.testing.assert_allclose(case.initial_grid(0).rotation[:, 2], case.init_poses[0][:3, 0])


def test_offsets_reflect_the_probe_offset(cohort: Path) -> None:
    case = load_case(cohort / "case_000", "tiny")
    params = reference_offsets(case)
    assert params.shape == (case.valid_frames.size, 6)
    # make_case turns the probe by up to 8 degrees per axis: the offsets show a rotation.
    assert 0.0 < np.degrees(np.abs(params[:, :3])).max() < 3 * 8.0
    # The probe does not turn while the kidney breathes: one rotation for every frame.
    np.testing.assert_allclose(np.ptp(params[:, :3], axis=0), 0.0, atol=1e-9)
    # The per-frame centroid alignment follows the kidney, so the offsets' translations vary far
    # less than the breathing motion itself (14 mm peak to peak along S-I).
    assert np.ptp(case.references[:, 2, 3]) > 10.0
    assert np.ptp(params[:, 3:], axis=0).max() < 5.0


def test_initial_to_reference_inverts_composition() -> None:
    rng = np.random.default_rng(0)
    G, D, P = (euler_to_matrix(np.r_[rng.normal(0, 0.3, 3), rng.normal(0, 20, 3)]) for _ in "GDP")
    np.testing.assert_allclose(initial_to_reference(G, P, G @ D @ P), D, atol=1e-12)
    with pytest.raises(ValueError, match="rigid"):
        initial_to_reference(np.diag([2.0, 1, 1, 1]), P, G)


def test_fit_recovers_mean_and_std() -> None:
    rng = np.random.default_rng(1)
    mean = np.array([0.1, -0.2, 0.05, 3.0, -1.0, 2.0])
    std = np.array([0.1, 0.2, 0.15, 4.0, 2.5, 3.0])
    model = GaussianPoseModel.fit(rng.normal(mean, std, (20000, 6)))
    np.testing.assert_allclose(model.mean, mean, atol=0.01 * std.max() + 0.005)
    np.testing.assert_allclose(model.std, std, rtol=0.03)
    assert model.n_samples == 20000


def test_fit_floor_and_group_weights() -> None:
    # Constant offsets: every std is the floor, not zero.
    model = GaussianPoseModel.fit(np.ones((5, 6)), min_std_deg=3.0, min_std_mm=1.5)
    np.testing.assert_allclose(model.std, [math.radians(3.0)] * 3 + [1.5] * 3)
    # A long group and a short one weigh the same.
    rows = np.concatenate([np.zeros((90, 6)), np.full((10, 6), 2.0)])
    groups = ["a"] * 90 + ["b"] * 10
    weighted = GaussianPoseModel.fit(rows, groups=groups, min_std_deg=0, min_std_mm=0)
    np.testing.assert_allclose(weighted.mean, 1.0)
    np.testing.assert_allclose(weighted.std, 1.0)
    assert weighted.n_cases == 2
    with pytest.raises(ValueError, match="shape"):
        GaussianPoseModel.fit(np.ones((4, 5)))
    with pytest.raises(ValueError, match="finite"):
        GaussianPoseModel.fit(np.full((4, 6), np.nan))


def test_sample_is_truncated_at_two_sigma_and_deterministic() -> None:
    model = GaussianPoseModel((0.1, 0, -0.1, 1, 2, 3), (0.05, 0.1, 0.2, 1, 2, 4))
    samples = model.sample(20000, np.random.default_rng(5))
    low, high = model.bounds
    assert np.all(samples >= low) and np.all(samples <= high)
    np.testing.assert_allclose(samples.mean(axis=0), model.mean, atol=0.03 * max(model.std))
    # A normal truncated at +-2 sigma has std 0.8796 sigma.
    np.testing.assert_allclose(samples.std(axis=0) / np.array(model.std), 0.8796, atol=0.02)
    # Both tails are reached (close to the bounds), so it is not clipped to a narrower range.
    assert np.all(samples.max(axis=0) > model.mean + 1.9 * np.array(model.std))
    again = model.sample(20000, np.random.default_rng(5))
    assert np.array_equal(samples, again)
    assert not np.array_equal(samples, model.sample(20000, np.random.default_rng(6)))
    assert model.sample(0, np.random.default_rng(0)).shape == (0, 6)


def test_dict_round_trip_is_plain() -> None:
    model = GaussianPoseModel.fit(np.random.default_rng(2).normal(size=(30, 6)), groups=[0, 1] * 15)
    data = model.to_dict()
    assert GaussianPoseModel.from_dict(json.loads(json.dumps(data))) == model
    with pytest.raises(ValueError, match="pose model"):
        GaussianPoseModel.from_dict({"std": [1] * 6})
    assert "deg" in model.describe()


def test_fit_pose_model_on_cases(cohort: Path) -> None:
    cases = [load_case(folder, "tiny") for folder in find_cases(cohort)]
    model = fit_pose_model(cases, min_std_deg=0.5, min_std_mm=0.5)
    assert model.n_cases == 2
    assert model.n_samples == sum(case.valid_frames.size for case in cases)
    all_params = np.concatenate([reference_offsets(case) for case in cases])
    assert np.all(np.array(model.mean) >= all_params.min(axis=0) - 1e-12)
    assert np.all(np.array(model.mean) <= all_params.max(axis=0) + 1e-12)
    with pytest.raises(ValueError, match="at least one case"):
        fit_pose_model([])

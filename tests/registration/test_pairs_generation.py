"""Generated training pairs: their targets, per-frame targets, determinism, caching, splitting."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from test_pairs_cohort import make_cohort

from kidneyreg.errors import InputError
from kidneyreg.geometry import euler_to_matrix, invert_rigid, matrix_to_euler
from kidneyreg.io.image import read_ct
from kidneyreg.io.transforms import read_transforms_json, write_tfm
from kidneyreg.preprocess import MIRROR, normalize_ct
from kidneyreg.profiles import Profile, get_profile
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.loss import fim_loss
from kidneyreg.registration.pairs import (
    FEATURE_CHANNEL,
    IMAGE_CHANNEL,
    CohortCase,
    TrainingPairs,
    ValidationWindows,
    find_cases,
    load_case,
    split_cases,
)
from kidneyreg.registration.pose_model import GaussianPoseModel

PROFILE = get_profile("tiny")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("pairs") / "cohort", n_cases=2, seed=1)


@pytest.fixture(scope="module")
def cases(cohort: Path) -> list[CohortCase]:
    # The geometry as it is; the mirror image of a left kidney has a test of its own.
    return [load_case(folder, PROFILE, mirror=False) for folder in find_cases(cohort)]


@pytest.fixture(scope="module")
def pairs(cases: list[CohortCase]) -> TrainingPairs:
    # Wide offsets (about 10 deg, 6 mm) so that a wrong target would show.
    model = GaussianPoseModel((0.0,) * 6, (0.15, 0.15, 0.15, 6.0, 6.0, 6.0))
    return TrainingPairs(cases, model, n_pairs=16, seed=7)


def _warp(volume: torch.Tensor, matrices: np.ndarray, profile: Profile) -> torch.Tensor:
    """``out[i](p) = volume(D_i p)`` on the registration grid, written out point by point.

    ``matrices`` is one 4x4 or a stack ``(N, 4, 4)``; returns ``(C, D, H, W)`` or ``(N, C, ...)``.
    """
    stack = np.asarray(matrices, dtype=np.float64).reshape(-1, 4, 4)
    n = np.array(profile.volume_shape)
    s = profile.spacing
    zz, yy, xx = np.meshgrid(*(np.arange(k) for k in n[::-1]), indexing="ij")
    points = (np.stack([xx, yy, zz], axis=-1).reshape(-1, 3) - n // 2) * s
    moved = np.einsum("nij,pj->npi", stack[:, :3, :3], points) + stack[:, None, :3, 3]
    unit = 2.0 * (moved / s + n // 2) / (n - 1) - 1.0
    grid = torch.from_numpy(unit.reshape(len(stack), *n[::-1], 3)).to(torch.float32)
    inputs = volume[None].expand(len(stack), *volume.shape)
    out = F.grid_sample(inputs, grid, align_corners=True)
    return out if np.ndim(matrices) == 3 else out[0]


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


def test_pair_layout(pairs: TrainingPairs) -> None:
    item = pairs[0]
    shape = (2, *PROFILE.volume_shape[::-1])
    assert item["fixed"].shape == shape and item["fixed"].dtype == torch.float32
    assert item["moving"].shape == shape and item["moving"].dtype == torch.float32
    assert item["target"].shape == (PROFILE.window, 6)
    assert item["offset"].shape == (6,)
    assert item["case"] in {"case_000", "case_001"} and item["index"] == 0
    for key in ("fixed", "moving"):
        assert 0.0 <= float(item[key].min()) and float(item[key].max()) <= 1.0
        assert float(item[key][FEATURE_CHANNEL].max()) > 0.5  # the kidney is in view
    # The sampled offset is the middle frame's target.
    assert torch.allclose(item["target"][PROFILE.window // 2], item["offset"], atol=1e-5)
    with pytest.raises(IndexError):
        pairs[len(pairs)]


def test_target_maps_the_perturbed_ct_back_onto_the_reference(
    pairs: TrainingPairs, cases: list[CohortCase]
) -> None:
    inner = (slice(None), slice(6, -6), slice(6, -6), slice(4, -4))
    for index in range(4):
        c, k, offset = pairs.draw(index)
        moving = pairs[index]["moving"]
        # The CT and feature map on the reference grid (the cache itself is checked against a
        # direct SimpleITK resampling below).
        reference = cases[c].moving(cases[c].reference_grid(k).matrix)[inner]

        def error(volume: torch.Tensor, reference: torch.Tensor = reference) -> float:
            return float((volume[inner] - reference).abs().mean())

        back = error(_warp(moving, offset, PROFILE))
        untouched = error(moving)
        inverse = error(_warp(moving, invert_rigid(offset), PROFILE))
        assert back < 0.25 * min(untouched, inverse), (back, untouched, inverse)
        assert back < 0.01


def test_every_frame_target_aligns_its_us_frame(pairs: TrainingPairs) -> None:
    nx, nw = PROFILE.volume_shape[0], PROFILE.window
    better = 0
    for index in range(4):
        item = pairs[index]
        c, k, offset = pairs.draw(index)
        targets = pairs.targets(c, k, offset)
        case = pairs.cases[c]
        # Exact algebra: frame j's result G' @ D_j @ P_c is its reference pose.
        perturbed = case.reference_grid(k).matrix @ invert_rigid(offset)
        P_c = case.window_P(k)[nw // 2]
        np.testing.assert_allclose(
            perturbed @ targets @ P_c, case.references[case.window_frames(k)], atol=1e-9
        )
        warped = _warp(item["moving"], targets, PROFILE)[:, FEATURE_CHANNEL, :, :, nx // 2]
        for j in range(nw):
            fixed = item["fixed"][FEATURE_CHANNEL, :, :, nx // 2 + j - nw // 2]
            own, middle = warped[j], warped[nw // 2]
            assert _dice(own, fixed) > 0.85
            assert _dice(own, fixed) > _dice(middle, fixed) - 0.005
            better += _dice(own, fixed) > _dice(middle, fixed) + 0.01
    # Breathing moves the kidney between frames: the middle frame's target fits them worse.
    assert better >= 4


def test_a_left_kidney_is_given_to_the_network_in_the_mirror_image(
    pairs: TrainingPairs, cases: list[CohortCase]
) -> None:
    # As Registrar does for a left kidney: the CT on G @ MIRROR, the frames in reverse order,
    # and targets that give every frame its reference pose through (G S) D' (S P).
    mirrored = [dataclasses.replace(case, mirror=True) for case in cases]
    twin = TrainingPairs(mirrored, pairs.pose_model, n_pairs=len(pairs), seed=pairs.seed)
    nx, nw = PROFILE.volume_shape[0], PROFILE.window
    config = RegistrationConfig.from_profile(PROFILE)
    for index in range(3):
        item, plain = twin[index], pairs[index]
        frames = slice(nx // 2 - nw // 2, nx // 2 + nw // 2 + 1)
        reflected = plain["fixed"].clone()
        reflected[..., frames] = plain["fixed"][..., frames].flip(-1)
        torch.testing.assert_close(item["fixed"], reflected)
        assert float(item["fixed"].abs().sum()) == pytest.approx(float(plain["fixed"].abs().sum()))
        torch.testing.assert_close(
            item["moving"][..., 1:], plain["moving"][..., 1:].flip(-1), atol=1e-4, rtol=0
        )
        c, k, offset = twin.draw(index)
        case = mirrored[c]
        targets = euler_to_matrix(item["target"].double().numpy())
        perturbed = case.reference_grid(k).matrix @ invert_rigid(offset)
        poses = perturbed @ MIRROR @ targets @ MIRROR @ case.window_P(k)[nw // 2]
        np.testing.assert_allclose(poses[::-1], case.references[case.window_frames(k)], atol=1e-4)
        np.testing.assert_allclose(case.from_network(targets[nw // 2]), offset, atol=1e-5)
        fixed, moving = item["fixed"][None], item["moving"][None]
        losses = [
            fim_loss(torch.from_numpy(m[None]).float(), fixed, moving, config)
            for m in (targets, np.tile(np.eye(4), (nw, 1, 1)))
        ]
        assert float(losses[0].total) < float(losses[1].total)
        # At the starting pose the mirror image scores each frame as the plain pair does.
        plain_start = fim_loss(
            torch.eye(4).expand(1, nw, 4, 4), plain["fixed"][None], plain["moving"][None], config
        )
        torch.testing.assert_close(losses[1].dice, plain_start.dice.flip(-1), atol=1e-4, rtol=0)
    window = ValidationWindows(mirrored[:1], per_case=1)[0]
    case = mirrored[0]
    truth = case.window_targets(window["k"], case.initial_grid(window["k"]).matrix)
    given = euler_to_matrix(window["target"].double().numpy())
    np.testing.assert_allclose(case.from_network(given[::-1]), truth, atol=1e-5)


def test_only_left_kidneys_are_mirrored_by_default(cohort: Path, tmp_path: Path) -> None:
    folder = find_cases(cohort)[0]
    assert not load_case(folder, PROFILE).mirror  # the synthetic kidneys are right ones
    # The same case with the CT reflected about its centre (x -> -x): the kidney is on the left.
    left = tmp_path / "left"
    shutil.copytree(folder, left)
    for name in ("ct.nii.gz", "ct_kidney_mask.nii.gz"):
        image = sitk.ReadImage(str(folder / name))
        flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[..., ::-1].copy())
        flipped.CopyInformation(image)
        sitk.WriteImage(flipped, str(left / name))
    assert load_case(left, PROFILE).mirror
    assert not load_case(left, PROFILE, mirror=False).mirror


def test_same_index_same_pair_whatever_the_workers(pairs: TrainingPairs) -> None:
    def collect(workers: int) -> list[dict[str, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            pairs, batch_size=3, num_workers=workers, sampler=[5, 2, 9, 2, 11, 0]
        )
        return list(loader)

    alone, parallel = collect(0), collect(2)
    for a, b in zip(alone, parallel, strict=True):
        for key in ("fixed", "moving", "target", "offset", "index"):
            assert torch.equal(a[key], b[key]), key
    first, again = pairs[2], pairs[2]
    assert all(torch.equal(first[key], again[key]) for key in ("fixed", "moving", "target"))
    other = TrainingPairs(pairs.cases, pairs.pose_model, n_pairs=16, seed=8)
    assert not torch.equal(other[2]["offset"], first["offset"])


def test_cache_matches_direct_resampling(cases: list[CohortCase]) -> None:
    case = cases[0]
    grid = case.initial_grid(int(case.valid_frames[0]))
    ct = read_ct(case.folder / "ct.nii.gz")
    direct = normalize_ct(grid.resample(ct, default_value=-1000.0, antialias=True))
    cached = case.moving(grid.matrix)[IMAGE_CHANNEL].numpy()
    # The CT voxels are finer than the profile on x only; the cache is resampled once more.
    assert np.abs(cached - direct).mean() < 0.01
    assert np.corrcoef(cached.ravel(), direct.ravel())[0, 1] > 0.98


def test_validation_windows_start_at_the_initial_alignment(cases: list[CohortCase]) -> None:
    windows = ValidationWindows(cases, per_case=3)
    assert len(windows) == 6
    item = windows[4]
    c, k = windows.items[4]
    d_ref = cases[c].reference_offset(k)
    np.testing.assert_allclose(
        item["target"][PROFILE.window // 2].numpy(), matrix_to_euler(d_ref), atol=1e-5
    )
    assert torch.equal(item["moving"], cases[c].moving(cases[c].initial_grid(k).matrix))


def test_split_by_patient_is_deterministic() -> None:
    patients = ["p1", "p1", "p2", "p3", "p3", "p4", "p5"]
    train, val = split_cases(patients, 0.4, seed=3)
    assert split_cases(patients, 0.4, seed=3) == (train, val)
    assert sorted(train + val) == list(range(len(patients)))
    assert {patients[i] for i in train}.isdisjoint({patients[i] for i in val})
    assert len({patients[i] for i in val}) == 2
    assert split_cases(patients, 0.0, seed=3) == (list(range(7)), [])
    # One patient: cases are split instead, never all to validation.
    train, val = split_cases(["a", "a", "a"], 0.5, seed=0)
    assert len(val) >= 1 and len(train) >= 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_cases(patients, 1.0, seed=0)


def test_window_size_follows_the_profile(cohort: Path) -> None:
    profile = Profile("tiny", PROFILE.spacing, PROFILE.volume_shape, PROFILE.us_shape, window=3)
    case = load_case(cohort / "case_000", profile)
    model = GaussianPoseModel((0.0,) * 6, (0.05,) * 3 + (2.0,) * 3)
    item = TrainingPairs([case], model, n_pairs=2, seed=0)[1]
    assert item["target"].shape == (3, 6)
    nonzero = torch.nonzero(item["fixed"][IMAGE_CHANNEL].sum(dim=(0, 1)))[:, 0]
    assert nonzero.tolist() == [15, 16, 17]


def test_case_errors(cohort: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(cohort / "case_000", broken)
    (broken / "ground_truth.json").unlink()
    with pytest.raises(InputError, match="no reference poses"):
        load_case(broken, PROFILE)
    (broken / "us.nii.gz").unlink()
    with pytest.raises(InputError, match=r"us\.nii\.gz"):
        load_case(broken, PROFILE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no case folder"):
        find_cases(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        find_cases(tmp_path / "missing")
    assert find_cases(cohort / "case_000") == [cohort / "case_000"]


def test_targets_minimise_the_fim_loss(pairs: TrainingPairs) -> None:
    config = RegistrationConfig.from_profile(PROFILE)
    for index in range(3):
        item = pairs[index]
        fixed, moving = item["fixed"][None], item["moving"][None]
        target = euler_to_matrix(item["target"].double().numpy())
        candidates = {
            "target": target,
            "identity": np.tile(np.eye(4), (len(target), 1, 1)),
            "inverse": invert_rigid(target),
        }
        loss = {
            name: float(fim_loss(torch.from_numpy(m[None]).float(), fixed, moving, config).total)
            for name, m in candidates.items()
        }
        assert loss["target"] < loss["identity"] < loss["inverse"], loss


def test_pairs_live_in_world_space_whatever_the_ct_layout(cohort: Path, tmp_path: Path) -> None:
    # The same CT stored with flipped axes (as a NIfTI in RAS would be) gives the same inputs.
    flipped = tmp_path / "flipped"
    shutil.copytree(cohort / "case_000", flipped)
    for name in ("ct.nii.gz", "ct_kidney_mask.nii.gz"):
        image = sitk.ReadImage(str(cohort / "case_000" / name))
        sitk.WriteImage(sitk.Flip(image, [True, True, False]), str(flipped / name))
    assert sitk.ReadImage(str(flipped / "ct.nii.gz")).GetDirection()[0] == -1.0
    original, other = load_case(cohort / "case_000", PROFILE), load_case(flipped, PROFILE)
    np.testing.assert_allclose(other.ct_centroid, original.ct_centroid, atol=1e-6)
    for k in (0, 4):
        grid = original.reference_grid(k).matrix
        a, b = original.moving(grid), other.moving(grid)
        assert float((a - b).abs().mean()) < 2.5e-3  # resampling from two layouts
        np.testing.assert_allclose(
            other.reference_offset(k), original.reference_offset(k), atol=1e-6
        )


def test_user_reference_files(cohort: Path, tmp_path: Path) -> None:
    truth = read_transforms_json(cohort / "case_000" / "ground_truth.json").matrices
    as_json = tmp_path / "json_case"
    shutil.copytree(cohort / "case_000", as_json)
    (as_json / "ground_truth.json").rename(as_json / "reference.json")
    np.testing.assert_allclose(load_case(as_json, PROFILE).references, truth)
    # One ITK transform: the same reference plane for every frame.
    as_tfm = tmp_path / "tfm_case"
    shutil.copytree(cohort / "case_000", as_tfm)
    (as_tfm / "ground_truth.json").unlink()
    write_tfm(as_tfm / "reference.tfm", truth[2])
    references = load_case(as_tfm, PROFILE).references
    np.testing.assert_allclose(references, np.broadcast_to(truth[2], truth.shape), atol=1e-9)

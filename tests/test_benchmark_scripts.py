"""The analysis helpers of ``benchmarks/`` whose numbers the documentation quotes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from kidneyreg.evaluation.metrics import translation_error_mm
from kidneyreg.geometry import make_rigid, transform_points
from kidneyreg.io.transforms import read_transforms_json
from kidneyreg.pipeline import RegistrationModel
from kidneyreg.profiles import get_profile
from kidneyreg.registration import RegistrationConfig, RegistrationNet
from kidneyreg.simulate.case import simulate_case

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    """A script of ``benchmarks/`` as a module; the scripts import each other as siblings, as
    they do when run (their folder is then ``sys.path[0]``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def tilt() -> ModuleType:
    return _load("tilt_observability")


def test_tilt_keeps_the_centre_and_turns_the_normal(tilt: ModuleType) -> None:
    rng = np.random.default_rng(0)
    pose = make_rigid(Rotation.random(random_state=1).as_matrix(), rng.normal(size=3) * 50)
    centre = np.array([30.0, 45.0])
    moved = tilt.tilted(pose, centre, 10.0, 0.0)
    point = np.array([[*centre, 0.0]])
    np.testing.assert_allclose(transform_points(moved, point), transform_points(pose, point))
    normal = pose[:3, 2]
    angle = np.degrees(np.arccos(np.clip(moved[:3, 2] @ normal, -1, 1)))
    assert angle == pytest.approx(10.0)
    # A tilt about u keeps the u axis; one about v keeps the v axis.
    np.testing.assert_allclose(moved[:3, 0], pose[:3, 0], atol=1e-12)
    np.testing.assert_allclose(tilt.tilted(pose, centre, 0.0, 7.0)[:3, 1], pose[:3, 1], atol=1e-12)
    # An offset along the normal moves the plane by that much.
    shifted = tilt.tilted(pose, centre, 0.0, 0.0, 3.2)
    np.testing.assert_allclose(shifted[:3, 3] - pose[:3, 3], 3.2 * normal, atol=1e-12)


@pytest.mark.parametrize("shape", [(112, 144), (113, 145)])
@pytest.mark.parametrize("shift", [(0, 0), (2, -3), (-5, 4)])
def test_best_shift_recovers_a_roll(
    tilt: ModuleType, shape: tuple[int, int], shift: tuple[int, int]
) -> None:
    fixed = np.zeros(shape, bool)
    fixed[30:60, 40:90] = True
    fixed[50:75, 60:70] = True
    moving = np.roll(fixed, (-shift[0], -shift[1]), axis=(0, 1))
    found = tilt._best_shift(fixed, moving)
    assert found == shift
    assert (tilt._shift(moving, found) == fixed).all()


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    return simulate_case(root / "case", 4, frames=24, profile="tiny", preview=False)


def test_outline_scores_fall_with_the_tilt(tilt: ModuleType, tiny_case: Path) -> None:
    row = tilt.case_scores(tiny_case, [8.0, 16.0], step=6, with_mind=True)
    assert row["frames"] > 0
    kidney = row["scores"]["kidney"]
    assert kidney[0.0] == pytest.approx(1.0, abs=0.02)  # U/S labels are the CT's on the true plane
    assert kidney[0.0] > kidney[8.0] > kidney[16.0]
    assert all(np.isfinite(v) for v in row["scores"]["mind"].values())
    assert all(np.isfinite(v) for v in row["scores"]["mind fan"].values())
    # The tissue around the kidney also moves with the tilt.
    around = row["scores"]["fan labels"]
    assert around[0.0] > 0.9 and around[0.0] > around[8.0] > around[16.0]


def test_axis_errors_split_a_rotation_along_the_frame_axes() -> None:
    heldout = _load("eval_heldout")
    true = np.stack(
        [make_rigid(Rotation.random(random_state=s).as_matrix(), [0, 0, 0]) for s in (2, 3)]
    )
    tilt_u = make_rigid(Rotation.from_rotvec([np.radians(12), 0, 0]).as_matrix(), [0, 0, 0])
    in_plane = make_rigid(Rotation.from_rotvec([0, 0, np.radians(-5)]).as_matrix(), [0, 0, 0])
    estimated = np.stack([true[0] @ tilt_u, true[1] @ in_plane])
    errors = heldout.axis_errors_deg(estimated, true)
    np.testing.assert_allclose(errors, [[12, 0, 0], [0, 0, 5]], atol=1e-9)


def test_axis_offsets_split_the_centroid_error_along_the_frame_axes() -> None:
    heldout = _load("eval_heldout")
    tilt_observability = _load("tilt_observability")
    true = np.stack(
        [make_rigid(Rotation.random(random_state=s).as_matrix(), [4, -2, 7]) for s in (5, 6)]
    )
    centres = np.array([[30.0, 50.0], [10.0, 80.0]])
    # Frame 0 moved 3 mm along its own normal; frame 1 tilted about its centre point, then
    # shifted 2 mm laterally: the tilt leaves the point where it was.
    shift_w = make_rigid(np.eye(3), [0, 0, 3])
    tilted = tilt_observability.tilted(true[1], centres[1], 9.0, -4.0)
    estimated = np.stack([true[0] @ shift_w, tilted @ make_rigid(np.eye(3), [2, 0, 0])])
    offsets = heldout.axis_offsets_mm(estimated, true, centres)
    np.testing.assert_allclose(offsets[0], [0, 0, 3], atol=1e-9)
    assert abs(offsets[1, 0]) > 1.5 and np.linalg.norm(offsets[1]) == pytest.approx(2.0)
    for k in range(2):
        tre = translation_error_mm(estimated[k], true[k], centres[k])
        assert np.linalg.norm(offsets[k]) == pytest.approx(tre)


@pytest.mark.parametrize("structures", [("kidney",), ("kidney", "sinus")])
def test_one_pass_of_an_identity_model_scores_the_initial_alignment(
    tiny_case: Path, structures: tuple[str, ...]
) -> None:
    windows = _load("eval_windows")
    config = RegistrationConfig.from_profile("tiny", structures=structures)
    net = RegistrationNet(config).eval()  # zero-initialised heads: every D is the identity
    model = RegistrationModel(net, get_profile("tiny"), "<identity>")
    result = windows.evaluate_model(model, [tiny_case], per_case=3)
    assert result["windows"] == 3 and result["structures"] == list(structures)
    for column in windows.COLUMNS:
        assert result["model"][column] == pytest.approx(result["initial"][column], abs=1e-4)
    assert result["initial"]["tre"] > 0.5


@pytest.mark.parametrize("use_sinus", [False, True])
def test_tilt_search_undoes_a_known_tilt_with_exact_maps(tiny_case: Path, use_sinus: bool) -> None:
    search = _load("tilt_search")
    labels = sitk.ReadImage(str(tiny_case / "labels.nii.gz"))
    ct_mask = sitk.ReadImage(str(tiny_case / "ct_kidney_mask.nii.gz"))
    us_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_case / "us_labels.nii.gz")))
    us_kidney = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_case / "us_kidney_mask.nii.gz")))
    pixel = sitk.ReadImage(str(tiny_case / "us.nii.gz")).GetSpacing()[:2]
    truth = read_transforms_json(tiny_case / "ground_truth.json").matrices
    frames = [k for k in range(0, len(truth), 6) if us_kidney[k].sum() >= 20]
    kidney = us_kidney[frames].astype(bool)
    centres = np.array(
        [[np.nonzero(m)[1].mean() * pixel[0], np.nonzero(m)[0].mean() * pixel[1]] for m in kidney]
    )
    start = np.stack(
        [search.tilted(truth[k], c, 8.0, 0.0) for k, c in zip(frames, centres, strict=True)]
    )
    tilt, poses = search.search_tilt(
        start,
        centres,
        kidney,
        np.isin(us_labels[frames], search.SINUS_CODES),
        ct_mask,
        labels,
        pixel,
        np.arange(-12.0, 12.1, 4.0),
        use_sinus=use_sinus,
    )
    assert tilt == (-8.0, 0.0)
    np.testing.assert_allclose(poses, truth[frames], atol=1e-6)


def test_median_centroid_error_is_in_mm_and_skips_empty_frames() -> None:
    us_maps = _load("eval_us_maps")
    predicted = np.zeros((3, 6, 8), bool)
    truth = np.zeros((3, 6, 8), bool)
    predicted[0, 2, 2] = truth[0, 2, 5] = True  # 3 columns apart
    predicted[1, 1, 4] = truth[1, 4, 4] = True  # 3 rows apart
    truth[2, 3, 3] = True  # nothing predicted: left out
    # pixel size (sx, sy) = (columns, rows): 0.5 mm and 2 mm -> errors 1.5 and 6 mm.
    assert us_maps.median_centroid_error(predicted, truth, (0.5, 2.0)) == pytest.approx(3.75)
    assert np.isnan(us_maps.median_centroid_error(predicted[2:], truth[2:], (1.0, 1.0)))


def test_bundling_verdict_applies_both_halves_of_the_rule() -> None:
    us_maps = _load("eval_us_maps")

    def scores(real: float, sim: float, name: str) -> list:
        return [
            us_maps.MapScores(name, "real", 1, real, real, 10.0),
            us_maps.MapScores(name, "sim", 8, sim, sim, 1.0),
        ]

    base = scores(0.70, 0.94, "base")
    ok, line = us_maps.bundling_verdict(base + scores(0.76, 0.935, "new"), "base", "new", "real")
    assert ok and "qualifies" in line
    ok, _ = us_maps.bundling_verdict(base + scores(0.74, 0.95, "new"), "base", "new", "real")
    assert not ok  # real-CT gain 0.04 < 0.05
    ok, _ = us_maps.bundling_verdict(base + scores(0.80, 0.92, "new"), "base", "new", "real")
    assert not ok  # a simulated cohort loses 0.02 > 0.01
    with pytest.raises(ValueError, match="real-CT cohort"):
        us_maps.bundling_verdict(base, "base", "base", "elsewhere")
    # Several real-CT cohorts are pooled over their cases: a loss of 0.09 on one rendering
    # against +0.07 on three others is a gain of 0.03 on the four.
    pooled = [*base, us_maps.MapScores("base", "real3", 3, 0.70, 0.70, 5.0)]
    pooled += [*scores(0.61, 0.94, "new"), us_maps.MapScores("new", "real3", 3, 0.77, 0.77, 5.0)]
    ok, line = us_maps.bundling_verdict(
        pooled, "base", "new", ["real", "real3"], min_real_gain=0.025
    )
    assert ok and "+0.030" in line
    ok, _ = us_maps.bundling_verdict(pooled, "base", "new", "real", min_real_gain=0.025)
    assert not ok  # the one rendering alone: -0.09


def test_pipeline_maps_of_the_bundled_us_model_are_scored(tiny_case: Path) -> None:
    from kidneyreg.features.infer import load_feature_model

    us_maps = _load("eval_us_maps")
    model = load_feature_model(modality="us")
    assert us_maps.named_model("bundled").source == model.source
    assert us_maps.named_model("bundled-flank").source.endswith("features_us_flank_cpu.pt")
    row = us_maps.score_cohort(model, tiny_case, name="bundled")
    assert row.cases == 1 and row.model == "bundled"
    assert 0.0 <= row.raw <= 1.0 and 0.0 <= row.cleaned <= 1.0
    assert row.cleaned > 0.5  # the bundled model finds a simulated kidney
    assert np.isfinite(row.centroid_mm) and row.centroid_mm >= 0.0


def _fold_results(root: Path, rows: list[dict]) -> Path:
    import json

    by_fold: dict[int, list[dict]] = {}
    for row in rows:
        by_fold.setdefault(row["fold"], []).append(row)
    for fold, fold_rows in by_fold.items():
        folder = root / f"fold_{fold}" / "results"
        folder.mkdir(parents=True)
        (folder / "case.json").write_text(json.dumps({"rows": fold_rows}))
    return root


def test_paired_methods_compare_patient_means_over_test_frames(tmp_path: Path) -> None:
    paired = _load("paired_methods")
    rows = []
    for i, case in enumerate(["c0", "c1", "c2", "c3", "c4"]):
        for frame, test in ((0, 0), (1, 1), (2, 1)):
            base = {"fold": i % 2, "case": case, "group": "AB"[i % 2], "frame": frame}
            base |= {"test": test, "mcd_ctct": 1.0, "plane_angle_deg": 2.0}
            # "good" is 1 mm better than "bad" on every test frame; adaptation frames (test 0)
            # carry a large error that must not count.
            rows.append(base | {"method": "good", "tre": 2.0 + i + (50 if not test else 0)})
            rows.append(base | {"method": "bad", "tre": 3.0 + i + frame * 0.1})
    folder = _fold_results(tmp_path / "work", rows)
    read = paired.read_rows(folder)
    assert len(read) == len(rows)
    means = paired.patient_means(read, "tre")
    assert means["good"]["c0"] == pytest.approx(2.0)
    result = paired.compare(means, "good", "bad", "tre")
    assert result.patients == 5 and result.a_wins == 5
    assert result.mean_difference == pytest.approx(-1.15)
    assert result.p_value == pytest.approx(0.0625)  # exact two-sided, 5 of 5 the same sign
    group_a = paired.compare(paired.patient_means(read, "tre", "A"), "good", "bad", "tre")
    assert group_a.patients == 3
    table = paired.paired_table(read, [("good", "bad", "q"), ("good", "absent", "q")])
    assert "| good vs bad | q | TRE | 5 |" in table and "absent" not in table
    with pytest.raises(ValueError, match="no test frames"):
        paired.compare(means, "good", "absent", "tre")
    with pytest.raises(ValueError, match="no fold_"):
        paired.read_rows(tmp_path)


def test_second_refinement_and_frame_step_settings_score_as_their_own_runs(
    tiny_case: Path,
) -> None:
    heldout = _load("eval_heldout")
    net = RegistrationNet(RegistrationConfig.from_profile("tiny")).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # random heads: the passes then move the estimate
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model = RegistrationModel(net, get_profile("tiny"), "<random>")
    both = heldout.evaluate_case(
        tiny_case,
        model,
        adapt=False,
        features="masks",
        refinements=1,
        also_refinements=0,
        also_frame_step=3,
    )
    single = heldout.evaluate_case(tiny_case, model, adapt=False, features="masks", refinements=0)
    default = heldout.evaluate_case(tiny_case, model, adapt=False, features="masks", refinements=1)
    assert both["pretrained_r0"] == pytest.approx(single["pretrained"])
    assert both["pretrained"] == pytest.approx(default["pretrained"])
    assert both["pretrained"] != pytest.approx(both["pretrained_r0"])
    assert both["pretrained_step3"] != pytest.approx(both["pretrained"])


@pytest.mark.parametrize(
    ("features", "ct_mask_given", "us_masks_given"),
    [
        ("masks", True, True),
        ("network", False, False),
        ("ct-network", False, True),
        ("us-network", True, False),
    ],
)
def test_each_side_takes_its_kidney_map_from_the_mask_or_its_network(
    tiny_case: Path,
    monkeypatch: pytest.MonkeyPatch,
    features: str,
    ct_mask_given: bool,
    us_masks_given: bool,
) -> None:
    heldout = _load("eval_heldout")
    seen: dict[str, bool] = {}

    class Captured(Exception):
        pass

    class Recorder:
        def __init__(self, ct: Any, model: Any, **kwargs: Any) -> None:
            seen["ct_mask"] = kwargs["ct_mask"] is not None

        def prepare(self, sequence: Any, masks: Any = None, **kwargs: Any) -> None:
            seen["us_masks"] = masks is not None
            raise Captured

    monkeypatch.setattr(heldout, "Registrar", Recorder)
    with pytest.raises(Captured):
        heldout.evaluate_case(tiny_case, None, adapt=False, features=features, refinements=0)
    assert seen == {"ct_mask": ct_mask_given, "us_masks": us_masks_given}


def test_the_plane_search_row_of_the_pretrained_model(tiny_case: Path) -> None:
    heldout = _load("eval_heldout")
    net = RegistrationNet(RegistrationConfig.from_profile("tiny")).eval()
    model = RegistrationModel(net, get_profile("tiny"), "<random>")
    row = heldout.evaluate_case(
        tiny_case, model, adapt=False, features="masks", refinements=0, sinus="masks"
    )
    assert set(row["plane_search"]) == {"pretrained"}
    assert row["plane_search"]["pretrained"]["seconds"] > 0
    # Scored on the same frames as the model without the search.
    assert row["pretrained_sinus"]["tre"] >= 0 and row["pretrained"]["tre"] >= 0
    assert heldout._is_method(row["pretrained_sinus"])


def test_map_bias_reads_a_dilated_disc_as_its_boundary_offset() -> None:
    bias = _load("eval_map_bias")
    yy, xx = np.mgrid[:80, :80]
    radius = np.hypot(yy - 40, xx - 40)
    truth, larger = radius < 20, radius < 22
    offset = float(larger.sum() - truth.sum()) / bias.boundary_length(truth, 1.0)
    assert offset == pytest.approx(2.0, abs=0.5)  # pixel-counted outline: within a quarter
    assert bias.boundary_length(truth, 0.5) == pytest.approx(0.5 * bias.boundary_length(truth, 1.0))
    precision, recall = bias.precision_recall(larger, truth)
    assert recall == 1.0 and precision == pytest.approx(truth.sum() / larger.sum())
    assert bias.precision_recall(truth, larger)[::-1] == (precision, recall)


def test_tissue_gain_stress_reshades_each_tissue_reproducibly(tmp_path: Path) -> None:
    from kidneyreg.io.us import UltrasoundSequence

    us_maps = _load("eval_us_maps")
    frames = np.full((3, 12, 16), 100.0, np.float32)
    sequence = UltrasoundSequence(frames, (0.5, 0.5))
    assert us_maps.shaded_sequences(sequence, None, 0.0, 3) == [sequence]
    with pytest.raises(ValueError, match="us_labels"):
        us_maps.shaded_sequences(sequence, None, 1.0, 3)
    labels = np.full((3, 12, 16), 5, np.uint8)  # liver
    labels[:, :, 8:] = 9  # renal cortex
    path = tmp_path / "us_labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    shaded = us_maps.shaded_sequences(sequence, path, 1.0, 3)
    again = us_maps.shaded_sequences(sequence, path, 1.0, 3)
    assert len(shaded) == 3
    for one, other in zip(shaded, again, strict=True):
        np.testing.assert_array_equal(one.frames, other.frames)  # fixed seeds
        left, right = one.frames[:, :, 2].mean(), one.frames[:, :, -2].mean()
        assert left != pytest.approx(100.0) or right != pytest.approx(100.0)
        assert left != pytest.approx(right)  # each tissue its own gain
    assert not np.array_equal(shaded[0].frames, shaded[1].frames)

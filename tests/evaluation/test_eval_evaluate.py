"""evaluate_case on a synthetic case folder with exactly known answers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from numpy.typing import NDArray

from kidneyreg.errors import InputError
from kidneyreg.evaluation.contours import mask_points_mm
from kidneyreg.evaluation.evaluate import (
    CTUS_METRICS,
    GROUND_TRUTH_METRICS,
    EvaluationResult,
    evaluate_case,
    evaluate_frames,
)
from kidneyreg.geometry import (
    DEFAULT_POSE_ROTATION,
    euler_to_matrix,
    make_rigid,
    resample_on_frames,
    translation,
)
from kidneyreg.io.image import write_mask
from kidneyreg.io.transforms import (
    CONVENTION,
    TransformSequence,
    read_transforms_json,
    write_transforms_json,
)
from kidneyreg.io.us import UltrasoundSequence, write_us_sequence

CT_SPACING = 2.0
CT_ORIGIN = np.array([-60.0, -20.0, 30.0])
KIDNEY_CENTRE = CT_ORIGIN + 20 * CT_SPACING  # world centre of the ellipsoid
KIDNEY_RADII = np.array([14.0, 18.0, 26.0])  # mm along x (R-L), y (A-P), z (S-I)
PIXEL_SIZE = (0.75, 1.5)  # (sx lateral, sy depth) mm; exact in the float32 NIfTI header
FRAME_SHAPE = (64, 96)  # (rows, cols)
# Offsets of the frames' planes along R-L (mm) and tilts about their depth axis (degrees); the
# last frame lies beside the kidney (no kidney in view).
FRAME_OFFSETS = [0.0, 6.0, -4.0, 40.0]
FRAME_TILTS = [0.0, 0.0, 12.0, 0.0]


def _ct_kidney_mask() -> sitk.Image:
    z, y, x = np.mgrid[:40, :40, :40].astype(np.float64)
    points = np.stack([x, y, z], axis=-1) * CT_SPACING + CT_ORIGIN
    inside = np.sum(((points - KIDNEY_CENTRE) / KIDNEY_RADII) ** 2, axis=-1) <= 1.0
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.SetSpacing((CT_SPACING,) * 3)
    mask.SetOrigin(tuple(CT_ORIGIN))
    return mask


def _true_poses() -> NDArray[np.float64]:
    rows, cols = FRAME_SHAPE
    frame_centre = np.array([cols / 2 * PIXEL_SIZE[0], rows / 2 * PIXEL_SIZE[1], 0.0])
    poses = []
    for offset, tilt in zip(FRAME_OFFSETS, FRAME_TILTS, strict=True):
        # Default sagittal pose (u superior, v posterior), tilted about the frame's v axis.
        rotation = (
            DEFAULT_POSE_ROTATION @ euler_to_matrix([0, np.radians(tilt), 0, 0, 0, 0])[:3, :3]
        )
        centre = KIDNEY_CENTRE + np.array([offset, 0.0, 0.0])
        poses.append(make_rigid(rotation, centre - rotation @ frame_centre))
    return np.stack(poses)


def _write_case(folder: Path) -> Path:
    folder.mkdir(parents=True)
    ct_mask = _ct_kidney_mask()
    true = _true_poses()
    us_mask = resample_on_frames(ct_mask, true, FRAME_SHAPE, PIXEL_SIZE, interpolator="nearest")
    rng = np.random.default_rng(0)
    bmode = rng.integers(0, 60, us_mask.shape) + 120 * us_mask
    write_mask(ct_mask, folder / "ct_kidney_mask.nii.gz")
    write_us_sequence(
        UltrasoundSequence(bmode.astype(np.float32), PIXEL_SIZE), folder / "us.nii.gz"
    )
    write_us_sequence(
        UltrasoundSequence(us_mask.astype(np.float32), PIXEL_SIZE), folder / "us_kidney_mask.nii.gz"
    )
    write_transforms_json(folder / "ground_truth.json", true)
    return folder


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_case(tmp_path_factory.mktemp("eval") / "case_000")


@pytest.fixture(scope="module")
def truth(case: Path) -> TransformSequence:
    return read_transforms_json(case / "ground_truth.json")


@pytest.fixture(scope="module")
def kidney_centres(case: Path) -> NDArray[np.float64]:
    """U/S kidney centroid (u, v) mm of each frame that shows the kidney."""
    true = _true_poses()
    masks = resample_on_frames(
        _ct_kidney_mask(), true, FRAME_SHAPE, PIXEL_SIZE, interpolator="nearest"
    )
    return np.stack([mask_points_mm(m, PIXEL_SIZE).mean(axis=0) for m in masks[:3]])


VALID = slice(0, 3)  # frames with the kidney in view


def test_case_has_the_kidney_in_three_frames(case: Path) -> None:
    result = evaluate_case(case, case / "ground_truth.json")
    assert result.has_ground_truth
    assert result.metrics == [*CTUS_METRICS, *GROUND_TRUTH_METRICS]
    assert result.n_frames == 4
    summary = result.summary()
    for name in ("hd_ctus", "mcd_ctus", "hd_ctct", "mcd_ctct", "tre", "translation_error_mm"):
        assert (summary[name].n, summary[name].n_missing) == (3, 1)
        assert math.isnan(result.values[name][3])
    # Angles do not need the kidney: defined on every frame.
    assert summary["plane_angle_deg"].n == 4


def test_ground_truth_scores_zero(case: Path) -> None:
    result = evaluate_case(case, case / "ground_truth.json")
    for name in ("hd_ctus", "mcd_ctus", "hd_ctct", "mcd_ctct"):
        np.testing.assert_array_equal(result.values[name][VALID], 0.0)
    for name in ("tre", "tre_max", "translation_error_mm"):
        np.testing.assert_allclose(result.values[name][VALID], 0.0, atol=1e-9)
    for name in ("plane_angle_deg", "rotation_error_deg"):
        np.testing.assert_allclose(result.values[name], 0.0, atol=1e-6)


def test_depth_shift_of_3_mm(case: Path, truth: TransformSequence) -> None:
    shifted = truth.matrices @ translation([0.0, 3.0, 0.0])  # along each frame's v (depth) axis
    result = evaluate_case(case, TransformSequence(shifted, truth.indices, source="shifted"))
    for name in ("tre", "tre_max", "translation_error_mm"):
        np.testing.assert_allclose(result.values[name][VALID], 3.0, rtol=1e-12)
    np.testing.assert_allclose(result.values["plane_angle_deg"], 0.0, atol=1e-6)
    np.testing.assert_allclose(result.values["rotation_error_deg"], 0.0, atol=1e-6)
    # 3 mm is exactly 2 rows of 1.5 mm: the resliced contour is the true one moved by 3 mm, and
    # the Hausdorff distance of a contour and its translate is the translation.
    np.testing.assert_allclose(result.values["hd_ctct"][VALID], 3.0, rtol=1e-12)
    mcd = result.values["mcd_ctct"][VALID]
    assert np.all((mcd > 0.5) & (mcd < 3.0))
    # The U/S mask is the true reslice, so CT-US equals CT-CT.
    np.testing.assert_array_equal(result.values["hd_ctus"], result.values["hd_ctct"])
    assert result.summary()["tre"].mean == pytest.approx(3.0)


def test_tilt_about_the_kidney_centre(
    case: Path, truth: TransformSequence, kidney_centres: NDArray[np.float64]
) -> None:
    tilted = truth.matrices.copy()
    for k, (u, v) in enumerate(kidney_centres):
        centre = np.array([u, v, 0.0])
        # 10 degrees about the frame's u (lateral) axis through the kidney centroid.
        tilt = euler_to_matrix([np.radians(10.0), 0, 0, 0, 0, 0])
        tilted[k] = truth.matrices[k] @ translation(centre) @ tilt @ translation(-centre)
    result = evaluate_case(case, TransformSequence(tilted, truth.indices, source="tilted"))
    np.testing.assert_allclose(result.values["plane_angle_deg"][VALID], 10.0, atol=1e-9)
    np.testing.assert_allclose(result.values["rotation_error_deg"][VALID], 10.0, atol=1e-9)
    np.testing.assert_allclose(result.values["translation_error_mm"][VALID], 0.0, atol=1e-9)
    assert np.all(result.values["tre"][VALID] > 0.5)
    assert np.all(result.values["hd_ctct"][VALID] > 0)


def test_in_plane_rotation_keeps_the_plane(
    case: Path, truth: TransformSequence, kidney_centres: NDArray[np.float64]
) -> None:
    turned = truth.matrices.copy()
    for k, (u, v) in enumerate(kidney_centres):
        centre = np.array([u, v, 0.0])
        spin = euler_to_matrix([0, 0, np.radians(7.0), 0, 0, 0])  # about the frame's normal
        turned[k] = truth.matrices[k] @ translation(centre) @ spin @ translation(-centre)
    result = evaluate_case(case, TransformSequence(turned, truth.indices, source="turned"))
    np.testing.assert_allclose(result.values["plane_angle_deg"][VALID], 0.0, atol=1e-9)
    np.testing.assert_allclose(result.values["rotation_error_deg"][VALID], 7.0, atol=1e-9)
    np.testing.assert_allclose(result.values["translation_error_mm"][VALID], 0.0, atol=1e-9)
    # Mean distance to the centroid is a few mm; 7 degrees moves pixels by 2 sin(3.5) r.
    assert np.all(result.values["tre"][VALID] > 0.5)
    assert np.all(result.values["tre_max"][VALID] > result.values["tre"][VALID])


def test_case_without_ground_truth(case: Path, tmp_path: Path, truth: TransformSequence) -> None:
    real = tmp_path / "real_case"
    shutil.copytree(case, real)
    (real / "ground_truth.json").unlink()
    result = evaluate_case(real, case / "ground_truth.json")
    assert not result.has_ground_truth
    assert list(result.to_json()["summary"]) == ["hd_ctus", "mcd_ctus"]
    assert "CT-US metrics only" in result.format_table()
    # The reference may still be given explicitly.
    explicit = evaluate_case(real, case / "ground_truth.json", reference=truth)
    assert explicit.has_ground_truth


def test_json_document(case: Path, truth: TransformSequence, tmp_path: Path) -> None:
    shifted = truth.matrices @ translation([0.0, 3.0, 0.0])
    result = evaluate_case(case, TransformSequence(shifted, truth.indices))
    document = result.to_json()
    assert set(document) == {"summary", "frames"}
    for name in ("hd_ctus", "mcd_ctus", "hd_ctct", "mcd_ctct", "tre", "plane_angle_deg"):
        assert set(document["summary"][name]) == {"mean", "std", "median", "p95"}
    assert document["summary"]["tre"]["mean"] == pytest.approx(3.0)
    assert [f["index"] for f in document["frames"]] == [0, 1, 2, 3]
    assert document["frames"][3]["tre"] is None  # kidney not in view
    assert document["frames"][0]["tre"] == pytest.approx(3.0)
    written = result.write_json(tmp_path / "out" / "metrics.json")
    assert json.loads(written.read_text(encoding="utf-8")) == document


def test_table_counts_frames_without_kidney(case: Path) -> None:
    table = evaluate_case(case, case / "ground_truth.json").format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "mean", "±", "std", "median", "p95", "frames"]
    assert any(line.startswith("hd_ctus (mm)") and line.endswith("3/4") for line in lines)
    assert any(line.startswith("plane_angle_deg (deg)") and line.endswith("4/4") for line in lines)
    assert "1 frame(s) left out" in table


# --------------------------------------------------------------------------------------------
# Predictions that do not fit the case
# --------------------------------------------------------------------------------------------


def test_frame_count_mismatch_names_the_prediction(case: Path, tmp_path: Path) -> None:
    pred = write_transforms_json(tmp_path / "transforms.json", _true_poses()[:3])
    with pytest.raises(InputError, match="has 3 frames, the U/S sequence has 4") as info:
        evaluate_case(case, pred)
    assert str(pred) in str(info.value)
    in_memory = TransformSequence(_true_poses()[:2], [0, 1], source="my_prediction")
    with pytest.raises(InputError, match=r"^my_prediction: has 2 frames"):
        evaluate_case(case, in_memory)


def test_non_rigid_matrix_names_the_prediction(case: Path, tmp_path: Path) -> None:
    poses = _true_poses()
    poses[1, :3, :3] *= 1.1  # a scaling
    path = tmp_path / "scaled.json"
    frames = [{"index": k, "matrix": m.tolist()} for k, m in enumerate(poses)]
    path.write_text(json.dumps({"convention": CONVENTION, "frames": frames}), encoding="utf-8")
    with pytest.raises(InputError, match="frame 1 matrix is not rigid") as info:
        evaluate_case(case, path)
    assert str(path) in str(info.value)
    in_memory = TransformSequence(poses, list(range(4)), source="scaled_memory")
    with pytest.raises(InputError, match=r"^scaled_memory: frame 1 matrix is not a rigid"):
        evaluate_case(case, in_memory)


def test_wrong_schema_names_the_prediction(case: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"poses": []}), encoding="utf-8")
    with pytest.raises(InputError, match="convention is missing") as info:
        evaluate_case(case, path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        evaluate_case(case, tmp_path / "missing.json")


def test_missing_case_files(case: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="case folder does not exist"):
        evaluate_case(tmp_path / "nowhere", case / "ground_truth.json")
    broken = tmp_path / "broken"
    shutil.copytree(case, broken)
    (broken / "us_kidney_mask.nii.gz").unlink()
    with pytest.raises(InputError, match=r"us_kidney_mask\.nii\.gz"):
        evaluate_case(broken, case / "ground_truth.json")


def test_evaluate_frames_checks_shapes() -> None:
    mask = _ct_kidney_mask()
    with pytest.raises(ValueError, match=r"predicted must have shape \(2, 4, 4\)"):
        evaluate_frames(mask, np.zeros((2, 8, 8)), PIXEL_SIZE, np.stack([np.eye(4)] * 3))
    with pytest.raises(TypeError, match="SimpleITK"):
        evaluate_frames(np.zeros((4, 4, 4)), np.zeros((1, 8, 8)), PIXEL_SIZE, np.eye(4)[None])  # type: ignore[arg-type]


def test_result_validates_its_values() -> None:
    with pytest.raises(ValueError, match="one 1D value per frame"):
        EvaluationResult({"tre": np.zeros(3), "hd_ctus": np.zeros(2)}, True)

"""Tests of the anatomy built from a real CT (kidneyreg.simulate.real_anatomy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.errors import InputError
from kidneyreg.simulate.anatomy import SIDE_VALUES, Anatomy
from kidneyreg.simulate.ct import render_ct
from kidneyreg.simulate.real_anatomy import anatomy_from_ct, read_real_anatomy
from kidneyreg.simulate.tissues import Tissue, kidney_labels

pytestmark = pytest.mark.realdata

SPACING = 2.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


def _dice_on_original_grid(anatomy: Anatomy, side: str, original: sitk.Image, value: int) -> float:
    back = sitk.Resample(
        anatomy.kidney_mask(side), original, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    return _dice(sitk.GetArrayFromImage(back) == 1, sitk.GetArrayFromImage(original) == value)


@pytest.fixture(scope="module")
def example(real_ct_dir: Path) -> tuple[sitk.Image, Anatomy]:
    return read_real_anatomy(real_ct_dir, kidney="right", spacing=SPACING)


def test_example_kidneys_match_the_given_labels(
    example: tuple[sitk.Image, Anatomy], real_ct_dir: Path
) -> None:
    _, anatomy = example
    original = sitk.ReadImage(str(real_ct_dir / "kidneys.nii.gz"))
    for side, value in SIDE_VALUES.items():
        assert _dice_on_original_grid(anatomy, side, original, value) > 0.95
        info = anatomy.kidneys[side]
        assert 80.0 < info.length < 160.0
        medial = 1.0 if side == "right" else -1.0
        assert medial * info.hilum_direction[0] > 0.0  # hilum towards the midline
    # LPS: the right kidney has the smaller x.
    assert anatomy.kidneys["right"].centroid_world[0] < anatomy.kidneys["left"].centroid_world[0]
    assert anatomy.source.endswith("ct.nii.gz") and anatomy.seed is None


def test_example_grid_tissues_and_compartments(example: tuple[sitk.Image, Anatomy]) -> None:
    ct, anatomy = example
    assert ct.GetSize() == anatomy.labels.GetSize()
    assert ct.GetOrigin() == anatomy.labels.GetOrigin()
    assert ct.GetPixelID() == sitk.sitkFloat32
    for image in (ct, anatomy.labels, anatomy.kidney_side, anatomy.compartment):
        assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        assert image.GetSpacing() == (SPACING,) * 3
    labels = sitk.GetArrayFromImage(anatomy.labels)
    side = sitk.GetArrayFromImage(anatomy.kidney_side)
    comp = sitk.GetArrayFromImage(anatomy.compartment)
    present = set(np.unique(labels).tolist())
    expected = {Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.BONE, Tissue.LIVER, Tissue.SPLEEN}
    expected |= {Tissue.BOWEL, Tissue.GAS, Tissue.CORTEX, Tissue.MEDULLA, Tissue.ARTERY}
    assert {int(t) for t in expected} <= present
    np.testing.assert_array_equal(np.isin(labels, kidney_labels()), side > 0)
    assert np.all(comp[side > 0] == 1)
    assert np.all(comp[labels == Tissue.BONE] == 0)
    assert np.all(comp[labels == Tissue.AIR] == 0)
    assert np.mean(comp[labels == Tissue.LIVER] == 1) > 0.99
    # HU agree with the tissue classes.
    hu = sitk.GetArrayFromImage(ct)
    assert np.median(hu[labels == Tissue.FAT]) < -60.0
    assert np.median(hu[labels == Tissue.BONE]) > 150.0
    assert np.median(hu[labels == Tissue.AIR]) < -800.0
    # Cortex forms the outer rim of each kidney.
    for value in SIDE_VALUES.values():
        inside = labels[side == value]
        assert np.mean(inside == Tissue.CORTEX) > 0.3


def test_rendered_ct_of_a_real_anatomy(example: tuple[sitk.Image, Anatomy]) -> None:
    _, anatomy = example
    ct = render_ct(anatomy, seed=0, output_spacing=(3.0, 3.0, 4.0))
    point = anatomy.kidneys["right"].centroid_world
    assert ct.GetPixelID() == sitk.sitkFloat32
    assert -200.0 < ct[ct.TransformPhysicalPointToIndex([float(v) for v in point])] < 400.0


def test_missing_kidney_grid_mismatch_and_bad_side(real_ct_dir: Path, tmp_path: Path) -> None:
    ct = sitk.ReadImage(str(real_ct_dir / "ct.nii.gz"))
    kidneys = sitk.ReadImage(str(real_ct_dir / "kidneys.nii.gz"))
    only_right = sitk.Cast(kidneys == 1, sitk.sitkUInt8)
    with pytest.raises(InputError, match="no left kidney label"):
        anatomy_from_ct(ct, only_right, kidney="left", spacing=3.0)
    coarse = sitk.Resample(
        kidneys,
        [61, 51, 56],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        kidneys.GetOrigin(),
        [6.0, 6.0, 6.0],
        kidneys.GetDirection(),
    )
    with pytest.raises(InputError, match="grid differs"):
        anatomy_from_ct(ct, coarse, kidney="right", spacing=3.0)
    with pytest.raises(InputError, match="right' or 'left"):
        anatomy_from_ct(ct, kidneys, kidney="middle", spacing=3.0)
    # Through the file reader: the message names the label file.
    path = tmp_path / "right_only.nii.gz"
    sitk.WriteImage(only_right, str(path))
    with pytest.raises(InputError, match=r"right_only\.nii\.gz: no left kidney label"):
        read_real_anatomy(real_ct_dir / "ct.nii.gz", path, "left", spacing=3.0)
    with pytest.raises(InputError, match="not found"):
        read_real_anatomy(tmp_path / "absent.nii.gz", path, "right")
    with pytest.raises(InputError, match="no case found"):
        read_real_anatomy(tmp_path, kidney="right")


def test_kits_style_folder(real_ct_dir: Path, tmp_path: Path) -> None:
    """KiTS19 layout: imaging/segmentation, 1 kidney 2 tumour, axes permuted (S-I first)."""
    ct = sitk.ReadImage(str(real_ct_dir / "ct.nii.gz"))
    kidneys = sitk.ReadImage(str(real_ct_dir / "kidneys.nii.gz"))
    seg = sitk.GetArrayFromImage(kidneys)
    kits = (seg > 0).astype(np.uint8)
    # A tumour at the border of the left kidney, labelled 2.
    z, y, x = np.argwhere(seg == 2).mean(axis=0).astype(int)
    zz, yy, xx = np.ogrid[: seg.shape[0], : seg.shape[1], : seg.shape[2]]
    ball = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x - 6) ** 2 <= 9
    kits[ball & (seg == 2)] = 2
    seg_img = sitk.GetImageFromArray(kits)
    seg_img.CopyInformation(kidneys)
    case = tmp_path / "case_00042"
    case.mkdir()
    order = [2, 1, 0]  # KiTS19 stores the slice axis first
    sitk.WriteImage(sitk.PermuteAxes(ct, order), str(case / "imaging.nii.gz"))
    sitk.WriteImage(sitk.PermuteAxes(seg_img, order), str(case / "segmentation.nii.gz"))
    ct_out, anatomy = read_real_anatomy(case, kidney="left", spacing=SPACING)
    assert anatomy.metadata["label_scheme"] == "kits"
    assert set(anatomy.kidneys) == {"right", "left"}
    for side, value in SIDE_VALUES.items():
        # Sides recovered from positions; the tumour belongs to its kidney.
        assert _dice_on_original_grid(anatomy, side, kidneys, value) > 0.95
    assert ct_out.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    # A KiTS case with one kidney only: the side comes from the body's midline.
    single = sitk.GetImageFromArray((seg == 1).astype(np.uint8))
    single.CopyInformation(kidneys)
    one = anatomy_from_ct(ct, single, kidney="right", scheme="kits", spacing=3.0)
    assert set(one.kidneys) == {"right"}
    with pytest.raises(InputError, match="no left kidney label"):
        anatomy_from_ct(ct, single, kidney="left", scheme="kits", spacing=3.0)


def test_binary_masks_get_their_sides_from_positions(real_ct_dir: Path, tmp_path: Path) -> None:
    """A 0/1 mask (both kidneys in one mask, or TotalSegmentator's kidney_left.nii.gz) is not
    read as "1 = right": each kidney goes to the side of the body midline it lies on, and a
    kidney labelled in two pieces stays one kidney."""
    ct_path = real_ct_dir / "ct.nii.gz"
    kidneys = sitk.ReadImage(str(real_ct_dir / "kidneys.nii.gz"))
    seg = sitk.GetArrayFromImage(kidneys)

    def write(array: np.ndarray, name: str) -> Path:
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        image.CopyInformation(kidneys)
        path = tmp_path / name
        sitk.WriteImage(image, str(path))
        return path

    both = write(seg > 0, "kidneys_binary.nii.gz")
    _, anatomy = read_real_anatomy(ct_path, both, "left", find_organs=False, spacing=SPACING)
    assert anatomy.metadata["label_scheme"] == "binary"
    assert set(anatomy.kidneys) == {"right", "left"}
    for side, value in SIDE_VALUES.items():
        assert _dice_on_original_grid(anatomy, side, kidneys, value) > 0.95
    # The left kidney alone, cut in two along S-I by a 2-voxel gap: still one left kidney.
    left = seg == 2
    z_mid = int(np.argwhere(left)[:, 0].mean())
    left[z_mid : z_mid + 2] = False
    only_left = write(left, "kidney_left.nii.gz")
    _, alone = read_real_anatomy(ct_path, only_left, "left", find_organs=False, spacing=SPACING)
    assert set(alone.kidneys) == {"left"}
    assert _dice_on_original_grid(alone, "left", kidneys, 2) > 0.9
    with pytest.raises(InputError, match="no right kidney label"):
        read_real_anatomy(ct_path, only_left, "right", find_organs=False, spacing=SPACING)


def test_kidney_layers_follow_the_capsule_and_the_sinus_is_kept(real_ct_dir: Path) -> None:
    """Cortex under the capsule, medulla inside it, sinus in the middle (as on U/S), even though
    the label map leaves the sinus out and the scan has no contrast to show the layers."""
    from scipy import ndimage

    ct, anatomy = read_real_anatomy(real_ct_dir, kidney="right", spacing=SPACING)
    _, with_sinus = read_real_anatomy(
        real_ct_dir, kidney="right", spacing=SPACING, include_sinus=True
    )
    labels = sitk.GetArrayFromImage(with_sinus.labels)
    side = sitk.GetArrayFromImage(with_sinus.kidney_side)
    given = sitk.GetArrayFromImage(anatomy.kidney_side)
    hu = sitk.GetArrayFromImage(ct)
    for value in SIDE_VALUES.values():
        kidney, label_only = side == value, given == value
        assert label_only.sum() < kidney.sum() < 1.3 * label_only.sum()  # the sinus joins
        share = {t: float(np.mean(labels[kidney] == t)) for t in Tissue}
        assert 0.4 < share[Tissue.CORTEX] < 0.8
        assert share[Tissue.MEDULLA] > 0.1 and share[Tissue.SINUS_FAT] > 0.05
        # Depth below the capsule (filled kidney): the cortex is outermost (the sinus opens to
        # the hilum, so it is not deepest on average).
        filled = ndimage.binary_fill_holes(kidney)
        depth = ndimage.distance_transform_edt(filled) * SPACING
        means = [float(depth[kidney & (labels == t)].mean()) for t in (9, 10, 11)]
        assert means[0] + 3.0 < min(means[1], means[2]), means
        # The added sinus is the blurred mixture of fat and soft tissue, not parenchyma.
        assert np.median(hu[kidney & ~label_only]) < 10.0
    np.testing.assert_array_equal(np.isin(labels, kidney_labels()), side > 0)

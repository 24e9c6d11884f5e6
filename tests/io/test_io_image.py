"""Tests of kidneyreg.io.image: CT and mask reading, validation and atomic writing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.io import image as image_io
from kidneyreg.io.image import read_ct, read_image, read_mask, write_image, write_mask

SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-50.0, 20.0, 100.0)


def _rotation(angle_z: float, angle_x: float) -> np.ndarray:
    cz, sz, cx, sx = np.cos(angle_z), np.sin(angle_z), np.cos(angle_x), np.sin(angle_x)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def _ct(size: tuple[int, int, int] = (9, 7, 5), oblique: bool = True) -> sitk.Image:
    """An int16 HU volume with distinct voxels, anisotropic spacing and an oblique direction."""
    values = np.arange(np.prod(size), dtype=np.int16).reshape(size[::-1]) - 1000
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    if oblique:
        image.SetDirection(_rotation(0.3, -0.2).ravel().tolist())
    return image


def _write_dicom_series(image: sitk.Image, folder: Path, series_uid: str = "1.2.826.0.1.1") -> None:
    """One DICOM file per slice, with the geometry tags the GDCM series reader needs."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0008": "DERIVED\\SECONDARY",
            "0020|000d": "1.2.826.0.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": str(image.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}_{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_ct_is_the_same_in_ras_nifti_lps_nrrd_and_dicom_series(tmp_path: Path) -> None:
    original = _ct()
    sitk.WriteImage(original, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(original, str(tmp_path / "ct.nrrd"))
    _write_dicom_series(original, tmp_path / "dicom")

    # The NIfTI file really stores RAS: its qoffset is the LPS origin with x and y negated.
    with gzip.open(tmp_path / "ct.nii.gz", "rb") as handle:
        qoffset = struct.unpack("<3f", handle.read(348)[268:280])
    assert qoffset == pytest.approx((-ORIGIN[0], -ORIGIN[1], ORIGIN[2]), abs=1e-3)
    assert "space: left-posterior-superior" in (tmp_path / "ct.nrrd").read_bytes()[:400].decode(
        "latin-1"
    )

    volumes = [read_ct(tmp_path / name) for name in ("ct.nii.gz", "ct.nrrd", "dicom")]
    corners = [(0, 0, 0), (8, 0, 0), (0, 6, 0), (0, 0, 4), (8, 6, 4), (3, 2, 1)]
    expected_values = sitk.GetArrayFromImage(original).astype(np.float32)
    for volume in volumes:
        assert volume.GetPixelID() == sitk.sitkFloat32
        assert volume.GetSize() == original.GetSize()
        for index in corners:
            assert volume.TransformIndexToPhysicalPoint(index) == pytest.approx(
                original.TransformIndexToPhysicalPoint(index), abs=1e-3
            )
        np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), expected_values)


def test_dicom_folder_with_several_series_reads_the_largest(tmp_path: Path) -> None:
    _write_dicom_series(_ct(size=(6, 5, 3)), tmp_path, series_uid="1.2.826.0.1.2")
    _write_dicom_series(_ct(size=(6, 5, 7)), tmp_path, series_uid="1.2.826.0.1.3")
    assert read_ct(tmp_path).GetSize() == (6, 5, 7)


def test_truncated_dicom_series_is_an_input_error(tmp_path: Path, expect_input_error) -> None:
    _write_dicom_series(_ct(), tmp_path)
    victim = sorted(tmp_path.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-40])
    expect_input_error(lambda: read_ct(tmp_path), victim.name, "damaged DICOM file")


def test_dicom_series_with_a_missing_slice_is_rejected(tmp_path: Path, expect_input_error) -> None:
    # ITK only warns about the gap and would stretch every slice after it.
    _write_dicom_series(_ct(), tmp_path)
    sorted(tmp_path.iterdir())[2].unlink()
    expect_input_error(lambda: read_ct(tmp_path), tmp_path.name, "unevenly spaced")


def test_single_dicom_slice_asks_for_the_folder(tmp_path: Path, expect_input_error) -> None:
    _write_dicom_series(_ct(), tmp_path)
    one = sorted(tmp_path.iterdir())[0]
    expect_input_error(lambda: read_ct(one), one, "2D image .* give the folder")


def test_missing_path_and_folder_without_dicom(tmp_path: Path, expect_input_error) -> None:
    expect_input_error(lambda: read_ct(tmp_path / "nope.nii.gz"), "nope.nii.gz", "does not exist")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    expect_input_error(lambda: read_ct(empty), "empty_folder", "no DICOM series")


def test_unreadable_file_is_a_one_line_error(tmp_path: Path, expect_input_error) -> None:
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image" * 20)
    expect_input_error(lambda: read_ct(junk), junk, "cannot be read as a CT image")
    other = tmp_path / "scan.xyz"
    other.write_bytes(b"\x00" * 100)
    expect_input_error(lambda: read_image(other), other, "cannot be read")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_truncated_nifti_is_rejected(tmp_path: Path, name: str, expect_input_error) -> None:
    # ITK itself silently zero-fills a truncated NIfTI: the reader must notice.
    full = tmp_path / f"full_{name}"
    sitk.WriteImage(sitk.Cast(_ct(size=(20, 20, 10)), sitk.sitkFloat32), str(full))
    data = full.read_bytes()
    truncated = tmp_path / name
    truncated.write_bytes(data[: len(data) * 2 // 3])
    expect_input_error(lambda: read_ct(truncated), name, "truncated")
    assert read_ct(full).GetSize() == (20, 20, 10)


def test_truncated_nrrd_is_rejected(tmp_path: Path, expect_input_error) -> None:
    full = tmp_path / "full.nrrd"
    sitk.WriteImage(_ct(size=(20, 20, 10)), str(full), True)
    truncated = tmp_path / "cut.nrrd"
    truncated.write_bytes(full.read_bytes()[:-200])
    expect_input_error(lambda: read_ct(truncated), truncated, "cannot be read")


def test_ct_must_be_a_scalar_3d_volume(tmp_path: Path, expect_input_error) -> None:
    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7), np.float32)), str(flat))
    expect_input_error(lambda: read_ct(flat), flat, "2D image; a 3D CT volume is needed|is a 2D")

    volume = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    four_d = tmp_path / "ct4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(four_d))
    expect_input_error(lambda: read_ct(four_d), four_d, "4D image")

    rgb = tmp_path / "rgb.nii.gz"
    sitk.WriteImage(sitk.Compose([volume, volume, volume]), str(rgb))
    expect_input_error(lambda: read_ct(rgb), rgb, "3 values per voxel")

    one_time_point = tmp_path / "ct4d_single.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([volume]), str(one_time_point))
    assert read_ct(one_time_point).GetSize() == (6, 5, 4)


@pytest.mark.parametrize(
    ("spacing", "pattern"),
    [
        ((1.0, 1.0, 12.0), r"spacing \(1, 1, 12\) mm is out of range"),
        ((25.0, 1.0, 1.0), r"spacing \(25, 1, 1\) mm is out of range"),
        ((1.0, 0.0, 1.0), r"cannot be read as a CT image \(Zero-valued spacing"),
    ],
)
def test_absurd_ct_spacing_is_rejected(
    tmp_path: Path, spacing: tuple[float, float, float], pattern: str, expect_input_error
) -> None:
    # A hand-written MetaImage header can hold any spacing (ITK refuses to read a zero one and
    # turns a negative one into a flipped direction, so those never reach the check).
    raw = tmp_path / "ct.raw"
    raw.write_bytes(np.zeros((3, 3, 3), np.int16).tobytes())
    header = tmp_path / "ct.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 3 3 3\nElementType = MET_SHORT\n"
        f"ElementSpacing = {spacing[0]} {spacing[1]} {spacing[2]}\nElementDataFile = ct.raw\n"
    )
    expect_input_error(lambda: read_ct(header), header, pattern)


@pytest.mark.parametrize("name", ["nan.nrrd", "nan.nii.gz", "nan.nii", "nan.mha"])
def test_nan_voxels_are_rejected(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, expect_input_error
) -> None:
    # For NIfTI, ITK itself reads NaN/Inf as 0, so this checks the raw-byte scan, with chunks
    # that split voxels (1001 bytes) so that the carry-over between chunks is exercised.
    monkeypatch.setattr(image_io, "_NIFTI_CHUNK_BYTES", 1001)
    values = np.zeros((40, 50, 60), np.float64 if name.endswith(".nii") else np.float32)
    values[1, 2, 3] = np.nan
    values[39, 49, 59] = np.inf
    values[20, 20, 20] = -np.inf
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    expect_input_error(lambda: read_ct(path), path, "3 NaN or infinite voxels")


def _mask_like(reference: sitk.Image, values: np.ndarray) -> sitk.Image:
    mask = sitk.GetImageFromArray(values)
    mask.CopyInformation(reference)
    return mask


def test_mask_is_binarised_and_takes_the_reference_geometry(tmp_path: Path) -> None:
    ct = _ct()
    labels = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.int16)
    labels[1:3, 2:4, 3:6] = 2
    labels[0, 0, 0] = 5
    shifted = _mask_like(ct, labels)
    # Within tolerance: 0.004 mm origin shift and 1e-4 relative spacing difference.
    shifted.SetOrigin(tuple(o + 0.004 for o in ORIGIN))
    shifted.SetSpacing(tuple(s * (1 + 1e-4) for s in SPACING))
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(shifted, str(path))

    mask = read_mask(path, ct)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetOrigin() == ct.GetOrigin() and mask.GetSpacing() == ct.GetSpacing()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), (labels != 0).astype(np.uint8))
    kidney = sitk.GetArrayFromImage(read_mask(path, ct, labels=[2]))
    np.testing.assert_array_equal(kidney, (labels == 2).astype(np.uint8))
    assert read_mask(path).GetOrigin() == pytest.approx(shifted.GetOrigin())


def test_mask_errors(tmp_path: Path, expect_input_error) -> None:
    ct = _ct()
    shape = sitk.GetArrayViewFromImage(ct).shape
    empty = tmp_path / "empty_mask.nii.gz"
    sitk.WriteImage(_mask_like(ct, np.zeros(shape, np.uint8)), str(empty))
    expect_input_error(lambda: read_mask(empty, ct, kind="kidney mask"), empty, "mask is empty")

    ones = np.ones(shape, np.uint8)
    only_one = tmp_path / "label_one.nii.gz"
    sitk.WriteImage(_mask_like(ct, ones), str(only_one))
    expect_input_error(lambda: read_mask(only_one, labels=[2]), only_one, "no label 2 voxels")

    moved = _mask_like(ct, ones)
    moved.SetOrigin(tuple(o + 0.5 for o in ORIGIN))
    moved_path = tmp_path / "moved_mask.nii.gz"
    sitk.WriteImage(moved, str(moved_path))
    expect_input_error(
        lambda: read_mask(moved_path, ct), moved_path, "grid differs from the image: origin"
    )

    small = tmp_path / "small_mask.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 3, 3), np.uint8)), str(small))
    expect_input_error(lambda: read_mask(small, ct), small, "grid differs from the image: size")

    stretched = _mask_like(ct, ones)
    stretched.SetSpacing((0.7, 0.8, 2.6))
    stretched_path = tmp_path / "stretched_mask.nrrd"
    sitk.WriteImage(stretched, str(stretched_path))
    expect_input_error(lambda: read_mask(stretched_path, ct), stretched_path, "spacing")

    turned = _mask_like(ct, ones)
    turned.SetDirection(np.eye(3).ravel().tolist())
    turned_path = tmp_path / "turned_mask.nrrd"
    sitk.WriteImage(turned, str(turned_path))
    expect_input_error(lambda: read_mask(turned_path, ct), turned_path, "direction")

    nan_values = np.ones(shape, np.float32)
    nan_values[0, 0, 0] = np.nan
    nan_path = tmp_path / "nan_mask.nrrd"
    sitk.WriteImage(_mask_like(ct, nan_values), str(nan_path))
    expect_input_error(lambda: read_mask(nan_path, ct), nan_path, "NaN")


def test_writers_compress_binarise_and_round_trip(tmp_path: Path) -> None:
    ct = sitk.Cast(_ct(), sitk.sitkFloat32)
    path = write_image(ct, tmp_path / "out" / "ct.nii.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    back = read_ct(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ct))
    assert back.GetDirection() == pytest.approx(ct.GetDirection(), abs=1e-6)

    labels = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.int16)
    labels[1, 1, 1:4] = 7
    mask_path = write_mask(_mask_like(ct, labels), tmp_path / "mask.nii.gz")
    stored = sitk.ReadImage(str(mask_path))
    assert stored.GetPixelID() == sitk.sitkUInt8
    assert sorted(np.unique(sitk.GetArrayFromImage(stored))) == [0, 1]
    with pytest.raises(TypeError):
        write_image(np.zeros((2, 2, 2)), tmp_path / "x.nii.gz")  # type: ignore[arg-type]


def test_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ct.nii.gz"
    write_image(sitk.Cast(_ct(), sitk.sitkFloat32), target)
    before = target.read_bytes()

    def crash(image: sitk.Image, name: str, *args: object) -> None:
        Path(name).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(image_io.sitk, "WriteImage", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(sitk.Cast(_ct(), sitk.sitkFloat32), target)
    with pytest.raises(RuntimeError, match="disk full"):
        write_mask(_mask_like(_ct(), np.ones((5, 7, 9), np.uint8)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]

"""Tests of kidneyreg.io.us: every U/S input form, its validation, and the sequence writer."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kidneyreg.errors import InputError
from kidneyreg.io import us as us_io
from kidneyreg.io.us import (
    UltrasoundSequence,
    read_us_mask,
    read_us_sequence,
    write_us_sequence,
)

US_MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"
LUMA = np.array([0.299, 0.587, 0.114])


def _frames(n: int = 6, rows: int = 12, cols: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, rows, cols)).astype(np.uint8)


def _region(x1: int, y1: int, units: int, delta_x: float, delta_y: float) -> Dataset:
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0 = 0
    region.RegionLocationMinY0 = 0
    region.RegionLocationMaxX1 = x1
    region.RegionLocationMaxY1 = y1
    region.PhysicalUnitsXDirection = units
    region.PhysicalUnitsYDirection = units
    region.PhysicalDeltaX = delta_x
    region.PhysicalDeltaY = delta_y
    return region


def _write_us_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    **attributes: object,
) -> Path:
    """A minimal Ultrasound Multi-frame Image file (8-bit, native little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_MULTIFRAME_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientID = "test"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    colour = photometric != "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = pixels.shape[:3]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sequence_type_layout_and_validation(expect_input_error) -> None:
    frames = _frames(3, 4, 5)
    seq = UltrasoundSequence(frames, (0.3, 0.2), 20, "scan.nii.gz")
    assert seq.frames.dtype == np.float32 and seq.shape == (3, 4, 5) and seq.n_frames == 3
    assert seq.frame_rate == 20.0
    np.testing.assert_array_equal(seq.frame(1), frames[1])
    np.testing.assert_array_equal(seq.frame(-1), frames[2])
    with pytest.raises(IndexError):
        seq.frame(3)
    image = seq.to_image()
    assert image.GetSize() == (5, 4, 3)  # x lateral, y depth, z frame
    assert image.GetSpacing() == (0.3, 0.2, 1.0)
    assert image.GetOrigin() == (0.0, 0.0, 0.0)
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # Pixel (column i, row j) of frame k is voxel index (i, j, k): u = i * sx, v = j * sy.
    assert image.GetPixel(4, 1, 2) == frames[2, 1, 4]
    assert image.TransformIndexToPhysicalPoint((4, 1, 0)) == pytest.approx((1.2, 0.2, 0.0))

    expect_input_error(lambda: UltrasoundSequence(frames[0], (1, 1), source="a.png"), "a", "shape")
    bad = frames.astype(np.float32)
    bad[0, 0, 0] = np.inf
    expect_input_error(lambda: UltrasoundSequence(bad, (1, 1), source="x.nii"), "x.nii", "NaN")
    expect_input_error(lambda: UltrasoundSequence(frames, (0, 1), source="y.nii"), "y.nii", "0, 1")
    expect_input_error(
        lambda: UltrasoundSequence(frames, (1, 1), frame_rate=0, source="z.nii"), "z.nii", "rate"
    )


def test_nifti_round_trip_keeps_the_design_layout(tmp_path: Path) -> None:
    seq = UltrasoundSequence(_frames(), (0.35, 0.25), None, "memory")
    path = write_us_sequence(seq, tmp_path / "case" / "us.nii.gz")
    stored = sitk.ReadImage(str(path))
    assert stored.GetPixelID() == sitk.sitkUInt8  # integral 0..255 -> uint8
    assert stored.GetSize() == (16, 12, 6)
    assert stored.GetSpacing() == pytest.approx((0.35, 0.25, 1.0))
    assert stored.GetOrigin() == (0.0, 0.0, 0.0)

    back = read_us_sequence(path, min_frames=5)
    np.testing.assert_array_equal(back.frames, seq.frames)
    assert back.pixel_size == pytest.approx((0.35, 0.25))
    assert back.frame_rate is None and back.source == str(path)
    assert read_us_sequence(path, spacing=0.5).pixel_size == (0.5, 0.5)
    assert read_us_sequence(path, spacing=(0.4, 0.6)).pixel_size == (0.4, 0.6)

    smooth = UltrasoundSequence(seq.frames / 255.0, (0.35, 0.25))
    float_path = write_us_sequence(smooth, tmp_path / "us_float.nrrd")
    assert sitk.ReadImage(str(float_path)).GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(read_us_sequence(float_path).frames, smooth.frames)


def test_2d_nifti_is_one_frame_only_when_allowed(tmp_path: Path, expect_input_error) -> None:
    image = sitk.GetImageFromArray(_frames(1)[0])
    image.SetSpacing((0.3, 0.4))
    path = tmp_path / "frame.nii.gz"
    sitk.WriteImage(image, str(path))
    one = read_us_sequence(path)
    assert one.shape == (1, 12, 16) and one.pixel_size == pytest.approx((0.3, 0.4))
    expect_input_error(
        lambda: read_us_sequence(path, min_frames=5), path, "single 2D image; a sequence of at"
    )


def test_dicom_multiframe_with_ultrasound_regions(tmp_path: Path) -> None:
    frames = _frames(5, 20, 24)
    # A small Doppler-like region in seconds (units 4) must be ignored; the big cm region counts.
    path = _write_us_dicom(
        tmp_path / "cine.dcm",
        frames,
        SequenceOfUltrasoundRegions=[_region(6, 4, 4, 0.01, 0.5), _region(23, 19, 3, 0.03, 0.02)],
        PixelSpacing=[0.9, 0.9],  # ignored: the regions win
        FrameTime=40.0,
        FrameIncrementPointer=Tag(0x0018, 0x1063),
    )
    seq = read_us_sequence(path, min_frames=5)
    np.testing.assert_array_equal(seq.frames, frames)
    assert seq.pixel_size == pytest.approx((0.3, 0.2))  # cm -> mm, (sx lateral, sy depth)
    assert seq.frame_rate == pytest.approx(25.0)


def test_dicom_with_pixel_spacing_only_and_without_any(tmp_path: Path, expect_input_error) -> None:
    frames = _frames(3)
    path = _write_us_dicom(tmp_path / "ps.dcm", frames, PixelSpacing=[0.25, 0.4], CineRate=30)
    seq = read_us_sequence(path)
    assert seq.pixel_size == pytest.approx((0.4, 0.25))  # PixelSpacing is [row, column]
    assert seq.frame_rate == pytest.approx(30.0)

    bare = _write_us_dicom(tmp_path / "bare.dcm", frames)
    expect_input_error(lambda: read_us_sequence(bare), bare, "needs --us-spacing")
    assert read_us_sequence(bare, spacing=0.2).pixel_size == (0.2, 0.2)


def test_dicom_colour_frames_become_grey(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (4, 10, 14, 3)).astype(np.uint8)
    path = _write_us_dicom(tmp_path / "rgb.dcm", rgb, "RGB", PixelSpacing=[0.2, 0.2])
    seq = read_us_sequence(path)
    np.testing.assert_allclose(seq.frames, rgb @ LUMA, atol=1e-3)

    # YBR_FULL with neutral chroma: the grey is the luma channel Y itself.
    grey = _frames(4, 10, 14)
    ybr = np.stack([grey, np.full_like(grey, 128), np.full_like(grey, 128)], axis=-1)
    ybr_path = _write_us_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL", PixelSpacing=[0.2, 0.2])
    np.testing.assert_allclose(read_us_sequence(ybr_path).frames, grey, atol=1.01)


def test_folder_of_single_frame_dicom_files(tmp_path: Path) -> None:
    frames = _frames(3, 8, 10)
    for k in range(3):
        # File names in reverse order: the Instance Number decides.
        _write_us_dicom(
            tmp_path / f"img_{9 - k}.dcm",
            frames[k : k + 1],
            PixelSpacing=[0.3, 0.3],
            InstanceNumber=k + 1,
        )
    seq = read_us_sequence(tmp_path)
    np.testing.assert_array_equal(seq.frames, frames)
    assert seq.pixel_size == pytest.approx((0.3, 0.3))


def test_damaged_dicom_is_an_input_error(tmp_path: Path, expect_input_error) -> None:
    path = _write_us_dicom(tmp_path / "cine.dcm", _frames(), PixelSpacing=[0.2, 0.2])
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-100])
    expect_input_error(lambda: read_us_sequence(cut), cut, "DICOM pixel data cannot be decoded")
    header_only = tmp_path / "header_only.dcm"
    header_only.write_bytes(data[:300])
    expect_input_error(lambda: read_us_sequence(header_only), header_only, "no pixel data")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    expect_input_error(lambda: read_us_sequence(garbage), garbage, "DICOM")


def test_mp4_video_needs_spacing_and_keeps_frame_order(tmp_path: Path, expect_input_error) -> None:
    levels = [20, 60, 100, 140, 180, 220]
    grey = np.stack([np.full((48, 64), level, np.uint8) for level in levels])
    grey[:, 10:20, 10:30] = 255  # a bright block that must survive the lossy codec
    colour = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    path = tmp_path / "scan.mp4"
    iio.imwrite(path, colour, plugin="FFMPEG", fps=10)

    expect_input_error(
        lambda: read_us_sequence(path), path, "a video has no pixel size.*--us-spacing"
    )
    seq = read_us_sequence(path, spacing=0.3, min_frames=5)
    assert seq.shape == (6, 48, 64)
    assert seq.frame_rate == pytest.approx(10.0)
    background = seq.frames[:, 30:, 35:].mean(axis=(1, 2))
    np.testing.assert_allclose(background, levels, atol=6)
    assert np.all(seq.frames[:, 12:18, 12:28].mean(axis=(1, 2)) > 235)

    corrupt = tmp_path / "corrupt.avi"
    corrupt.write_bytes(b"RIFF" + b"\x00" * 300)
    expect_input_error(
        lambda: read_us_sequence(corrupt, spacing=0.3), corrupt, "cannot be read as a video"
    )


def test_png_folder_in_natural_order_with_rgb_to_grey(tmp_path: Path, expect_input_error) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "frames"
    folder.mkdir()
    rgb = rng.integers(0, 256, (11, 9, 13, 3)).astype(np.uint8)
    for k in range(11):
        iio.imwrite(folder / f"frame_{k + 1}.png", rgb[k])
    (folder / "notes.txt").write_text("not a frame")

    expect_input_error(lambda: read_us_sequence(folder), folder, "folder of PNG/JPG frames .*")
    seq = read_us_sequence(folder, spacing=(0.2, 0.3), min_frames=5)
    assert seq.shape == (11, 9, 13) and seq.pixel_size == (0.2, 0.3) and seq.frame_rate is None
    # frame_2 comes before frame_10: natural order, not string order.
    np.testing.assert_allclose(seq.frames, rgb @ LUMA, atol=1e-3)

    iio.imwrite(folder / "frame_12.png", rgb[0, :8])
    expect_input_error(
        lambda: read_us_sequence(folder, spacing=0.2), folder, "frames differ in size: frame_12"
    )


def test_single_png_image(tmp_path: Path, expect_input_error) -> None:
    grey = _frames(1, 20, 30)[0]
    path = tmp_path / "frame.png"
    iio.imwrite(path, grey)
    expect_input_error(lambda: read_us_sequence(path), path, "needs --us-spacing")
    seq = read_us_sequence(path, spacing=0.25)
    assert seq.shape == (1, 20, 30)
    np.testing.assert_array_equal(seq.frames[0], grey)
    expect_input_error(lambda: read_us_sequence(path, spacing=0.25, min_frames=5), path, "2D")

    broken = tmp_path / "broken.png"
    broken.write_bytes(path.read_bytes()[:40])
    expect_input_error(
        lambda: read_us_sequence(broken, spacing=0.25), broken, "cannot be read as an image"
    )


def test_too_few_frames_missing_and_unsupported(tmp_path: Path, expect_input_error) -> None:
    path = write_us_sequence(UltrasoundSequence(_frames(3), (0.3, 0.3)), tmp_path / "us.nii.gz")
    expect_input_error(
        lambda: read_us_sequence(path, min_frames=5),
        path,
        "has 3 frames, fewer than the window of 5",
    )
    expect_input_error(lambda: read_us_sequence(tmp_path / "nope.mp4"), "nope.mp4", "not exist")
    other = tmp_path / "scan.xyz"
    other.write_text("hello")
    expect_input_error(lambda: read_us_sequence(other), other, "unsupported U/S format")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_input_error(lambda: read_us_sequence(empty), empty, "no PNG/JPG frames")
    with pytest.raises(ValueError):
        read_us_sequence(path, min_frames=0)


@pytest.mark.parametrize("spacing", [0.0, -0.3, 10.5, (0.3, 12.0), float("nan")])
def test_absurd_spacing_argument(tmp_path: Path, spacing: object, expect_input_error) -> None:
    path = write_us_sequence(UltrasoundSequence(_frames(), (0.3, 0.3)), tmp_path / "us.nii.gz")
    expect_input_error(
        lambda: read_us_sequence(path, spacing=spacing),  # type: ignore[arg-type]
        path,
        r"--us-spacing \(.*\) mm is out of range",
    )


def test_absurd_spacing_or_nan_in_the_file(tmp_path: Path, expect_input_error) -> None:
    image = sitk.GetImageFromArray(_frames().astype(np.float32))
    image.SetSpacing((20.0, 0.3, 1.0))
    coarse = tmp_path / "coarse.nrrd"
    sitk.WriteImage(image, str(coarse))
    expect_input_error(lambda: read_us_sequence(coarse), coarse, "pixel size in the file")
    assert read_us_sequence(coarse, spacing=0.3).pixel_size == (0.3, 0.3)

    values = _frames().astype(np.float32)
    values[2, 3, 4] = np.nan
    nan_nrrd = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(nan_nrrd))
    expect_input_error(lambda: read_us_sequence(nan_nrrd), nan_nrrd, "1 NaN or infinite pixels")
    # ITK turns NaN into 0 when reading NIfTI: the stored bytes are checked instead.
    nan_nifti = tmp_path / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(nan_nifti))
    expect_input_error(lambda: read_us_sequence(nan_nifti), nan_nifti, "1 NaN or infinite")


def test_truncated_nifti_sequence_is_rejected(tmp_path: Path, expect_input_error) -> None:
    seq = UltrasoundSequence(_frames(8, 40, 50) / 3.0, (0.3, 0.3))
    path = write_us_sequence(seq, tmp_path / "us.nii.gz")
    path.write_bytes(path.read_bytes()[:-500])
    expect_input_error(lambda: read_us_sequence(path), path, "truncated")


def test_us_masks(tmp_path: Path, expect_input_error) -> None:
    seq = UltrasoundSequence(_frames(4, 10, 12), (0.3, 0.2))
    labels = np.zeros(seq.shape, np.uint8)
    labels[:, 3:6, 4:9] = 1
    labels[0, 0, 0] = 3
    path = write_us_sequence(UltrasoundSequence(labels, seq.pixel_size), tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(read_us_mask(path, seq), labels != 0)
    np.testing.assert_array_equal(read_us_mask(path, seq, labels=[1]), labels == 1)
    assert read_us_mask(path, seq).dtype == np.uint8

    other_size = UltrasoundSequence(labels, (0.3, 0.25))
    moved = write_us_sequence(other_size, tmp_path / "spacing_mask.nii.gz")
    expect_input_error(
        lambda: read_us_mask(moved, seq), moved, "grid differs from the U/S sequence: pixel size"
    )
    cropped = write_us_sequence(
        UltrasoundSequence(labels[:, :8], seq.pixel_size), tmp_path / "small_mask.nii.gz"
    )
    expect_input_error(lambda: read_us_mask(cropped, seq), cropped, "4 x 8 x 12 vs 4 x 10 x 12")
    empty = write_us_sequence(
        UltrasoundSequence(np.zeros(seq.shape), seq.pixel_size), tmp_path / "empty_mask.nii.gz"
    )
    expect_input_error(lambda: read_us_mask(empty, seq), empty, "U/S mask is empty")
    expect_input_error(lambda: read_us_mask(tmp_path / "no.png", seq), "no.png", "not exist")

    # A PNG mask for a single-image sequence (PNG stores no pixel size: only the shape counts).
    single = UltrasoundSequence(_frames(1, 10, 12), (0.3, 0.2))
    png = tmp_path / "mask.png"
    iio.imwrite(png, (labels[0] * 255).astype(np.uint8))
    np.testing.assert_array_equal(read_us_mask(png, single)[0], labels[0] != 0)


def test_failed_sequence_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = write_us_sequence(UltrasoundSequence(_frames(), (0.3, 0.3)), tmp_path / "us.nii.gz")
    before = target.read_bytes()

    def crash(image: sitk.Image, name: str, *args: object) -> None:
        Path(name).write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(us_io.sitk, "WriteImage", crash)
    with pytest.raises(RuntimeError, match="killed"):
        write_us_sequence(UltrasoundSequence(_frames(seed=5), (0.3, 0.3)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["us.nii.gz"]


def test_input_error_type_is_a_value_error() -> None:
    # Callers building sequences from computed arrays may catch ValueError generically.
    with pytest.raises(ValueError):
        UltrasoundSequence(np.zeros((2, 3)), (1.0, 1.0))
    assert issubclass(InputError, ValueError)

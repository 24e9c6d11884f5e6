"""Ultrasound sequences: one in-memory type and readers for every input form of DESIGN.md section 2.

A sequence is ``frames[k, row, col]`` (rows = depth, columns = lateral), exactly
``sitk.GetArrayFromImage`` of the 3D U/S file (axis 0 lateral, axis 1 depth, axis 2 frame index).
Pixel (column i, row j) has U/S image coordinates ``(i * sx, j * sy, 0)`` mm.

Accepted inputs (:func:`read_us_sequence`):

* NIfTI / NRRD / MHA 3D image: pixel size from the file's spacing[0], spacing[1]. A 2D file is a
  one-frame sequence, so it passes only when ``min_frames <= 1`` (e.g. for ``segment``).
* DICOM multi-frame ultrasound: pixel size from the Sequence of Ultrasound Regions (cm -> mm), else
  Pixel Spacing; frame rate from Cine Rate or Frame Time. A folder of single-frame DICOM images
  (ordered by Instance Number) is read as one sequence.
* mp4 / avi / mov / mkv video, a folder of PNG/JPG frames (natural order: ``frame_2`` before
  ``frame_10``) and a single PNG/JPG image: these carry no pixel size, so ``spacing`` is required.

The origin and direction of a U/S file are ignored: U/S image coordinates come from pixel indices
and pixel size alone (DESIGN.md section 1). An explicit ``spacing`` always overrides the file's
pixel size. Colour frames (RGB, RGBA, YBR, palette) become grey with the ITU-R BT.601 luma
weights; intensities are otherwise kept as stored (MONOCHROME1 DICOM is inverted to bright echoes).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk

from kidneyreg.errors import InputError
from kidneyreg.io.atomic import atomic_path
from kidneyreg.io.image import read_image, short_error_reason

__all__ = [
    "MAX_US_PIXEL_SIZE_MM",
    "UltrasoundSequence",
    "read_us_mask",
    "read_us_sequence",
    "write_us_sequence",
]

#: Largest accepted U/S pixel size in mm.
MAX_US_PIXEL_SIZE_MM = 10.0

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v")
_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_LUMA_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PIXEL_SIZE_RTOL = 1e-3
_DICOM_UNITS_CM = 3  # PhysicalUnitsX/YDirection code for centimetres (DICOM PS3.3 C.8.5.5.1.15)
_SPACING_HINT = "--us-spacing MM"


@dataclass(eq=False)
class UltrasoundSequence:
    """A B-mode ultrasound sequence in memory.

    Attributes:
        frames: float32 array ``(n_frames, rows, cols)``; rows run in depth, columns laterally.
        pixel_size: ``(sx, sy)`` mm: lateral (column) and depth (row) pixel size.
        frame_rate: Frames per second when the source says so, else None.
        source: Where the frames came from (a path), used in error messages.

    Raises:
        InputError: Frames not 3D or empty, NaN/Inf pixels, pixel size outside (0, 10] mm, or a
            frame rate that is not a positive number (named after ``source``).

    Example:
        >>> seq = UltrasoundSequence(np.zeros((5, 64, 80)), (0.3, 0.2))
        >>> seq.shape, seq.to_image().GetSize()
        ((5, 64, 80), (80, 64, 5))
    """

    frames: np.ndarray
    pixel_size: tuple[float, float]
    frame_rate: float | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.source = str(self.source)
        frames = np.ascontiguousarray(self.frames, dtype=np.float32)
        if frames.ndim != 3 or min(frames.shape) < 1:
            raise InputError(
                self.source, f"U/S frames must be (frames, rows, cols), got shape {frames.shape}"
            )
        bad = int(frames.size - np.count_nonzero(np.isfinite(frames)))
        if bad:
            raise InputError(self.source, f"contains {bad} NaN or infinite pixels")
        self.frames = frames
        self.pixel_size = _checked_pixel_size(self.pixel_size, self.source, "pixel size")
        if self.frame_rate is not None:
            rate = float(self.frame_rate)
            if not (math.isfinite(rate) and rate > 0):
                raise InputError(self.source, f"frame rate {rate:g} is not a positive number")
            self.frame_rate = rate

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.frames.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_frames, rows, cols)``."""
        n, rows, cols = self.frames.shape
        return int(n), int(rows), int(cols)

    def frame(self, k: int) -> np.ndarray:
        """Frame ``k`` as a ``(rows, cols)`` float32 view (negative k counts from the end)."""
        if not -self.n_frames <= k < self.n_frames:
            raise IndexError(f"frame {k} out of range for {self.n_frames} frames")
        return self.frames[k]

    def to_image(self) -> sitk.Image:
        """The DESIGN.md 3D layout: x lateral, y depth, z frame; spacing (sx, sy, 1), origin 0.

        Example:
            >>> UltrasoundSequence(np.zeros((2, 3, 4)), (0.5, 0.25)).to_image().GetSpacing()
            (0.5, 0.25, 1.0)
        """
        return _sequence_image(self.frames, self.pixel_size)


def _sequence_image(frames: np.ndarray, pixel_size: tuple[float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(frames)
    image.SetSpacing((float(pixel_size[0]), float(pixel_size[1]), 1.0))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _checked_pixel_size(value: Any, source: str | Path, what: str) -> tuple[float, float]:
    """Return ``(sx, sy)`` from a number or a pair; raise InputError unless each is in (0, 10]."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        pair = (float(value), float(value))
    else:
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise InputError(source, f"{what} {value!r} is not one or two numbers") from None
        if len(values) != 2:
            raise InputError(source, f"{what} needs 1 or 2 values, got {len(values)}")
        pair = (values[0], values[1])
    if not all(math.isfinite(v) and 0.0 < v <= MAX_US_PIXEL_SIZE_MM for v in pair):
        shown = ", ".join(f"{v:g}" for v in pair)
        raise InputError(source, f"{what} ({shown}) mm is out of range; each must be in (0, 10] mm")
    return pair


def _to_grey(pixels: np.ndarray, colour: bool) -> np.ndarray:
    """Float32 grey from grey or colour pixels (channels last when ``colour``); BT.601 luma."""
    if not colour:
        return pixels.astype(np.float32, copy=False)
    channels = pixels.shape[-1]
    if channels in (1, 2):  # grey, grey + alpha
        return pixels[..., 0].astype(np.float32)
    if channels in (3, 4):  # RGB, RGBA: alpha ignored
        return (pixels[..., :3].astype(np.float32) @ _LUMA_BT601).astype(np.float32)
    raise ValueError(f"cannot turn {channels} channels into grey")


def _natural_key(name: str) -> list[Any]:
    """Sort key putting ``frame_2`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def _looks_like_dicom(path: Path) -> bool:
    if _has_suffix(path, _DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


class _Loaded(NamedTuple):
    frames: np.ndarray  # float32 (n, rows, cols)
    pixel_size: tuple[float, float] | None  # from the file, when it has one
    frame_rate: float | None
    was_2d: bool  # a single 2D image rather than a sequence


def _classify(path: Path) -> str:
    """One of: volume, dicom, video, picture, picture-folder, dicom-folder."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        if any(_has_suffix(p, _PICTURE_SUFFIXES) for p in files):
            return "picture-folder"
        if any(_looks_like_dicom(p) for p in files):
            return "dicom-folder"
        raise InputError(path, "folder holds no PNG/JPG frames and no DICOM files")
    if _has_suffix(path, _VOLUME_SUFFIXES):
        return "volume"
    if _has_suffix(path, _VIDEO_SUFFIXES):
        return "video"
    if _has_suffix(path, _PICTURE_SUFFIXES):
        return "picture"
    if _looks_like_dicom(path):
        return "dicom"
    raise InputError(
        path,
        "unsupported U/S format (expected NIfTI/NRRD/MHA, DICOM, mp4/avi video, PNG/JPG image "
        "or a folder of PNG frames)",
    )


_NEEDS_SPACING = {
    "video": "a video",
    "picture": "a PNG/JPG image",
    "picture-folder": "a folder of PNG/JPG frames",
}


def _load_volume(path: Path) -> _Loaded:
    image = read_image(path, kind="U/S")
    dimension = image.GetDimension()
    if dimension not in (2, 3):
        raise InputError(path, f"is a {dimension}D image; a 3D U/S sequence is needed")
    colour = image.GetNumberOfComponentsPerPixel() > 1
    frames = _to_grey(sitk.GetArrayFromImage(image), colour)
    if dimension == 2:
        frames = frames[np.newaxis]
    spacing = image.GetSpacing()
    return _Loaded(frames, (spacing[0], spacing[1]), None, dimension == 2)


def _dicom_pixel_size(dataset: Any) -> tuple[float, float] | None:
    """(sx, sy) mm from the largest centimetre-calibrated U/S region, else Pixel Spacing."""
    best: tuple[float, tuple[float, float]] | None = None
    for region in dataset.get("SequenceOfUltrasoundRegions", None) or []:
        units_x = region.get("PhysicalUnitsXDirection", None)
        units_y = region.get("PhysicalUnitsYDirection", None)
        delta_x = region.get("PhysicalDeltaX", None)
        delta_y = region.get("PhysicalDeltaY", None)
        if units_x != _DICOM_UNITS_CM or units_y != _DICOM_UNITS_CM or not delta_x or not delta_y:
            continue  # Doppler strips (seconds, cm/s) or uncalibrated regions
        width = float(region.get("RegionLocationMaxX1", 0) or 0) - float(
            region.get("RegionLocationMinX0", 0) or 0
        )
        height = float(region.get("RegionLocationMaxY1", 0) or 0) - float(
            region.get("RegionLocationMinY0", 0) or 0
        )
        size = (abs(float(delta_x)) * 10.0, abs(float(delta_y)) * 10.0)  # cm -> mm
        if best is None or width * height > best[0]:
            best = (width * height, size)
    if best is not None:
        return best[1]
    spacing = dataset.get("PixelSpacing", None)
    if spacing is not None and len(spacing) == 2:
        # Pixel Spacing is [between rows, between columns] = [sy, sx].
        return float(spacing[1]), float(spacing[0])
    return None


def _dicom_frame_rate(dataset: Any) -> float | None:
    cine_rate = dataset.get("CineRate", None)
    if cine_rate and float(cine_rate) > 0:
        return float(cine_rate)
    frame_time = dataset.get("FrameTime", None)  # ms between frames
    if frame_time and float(frame_time) > 0:
        return 1000.0 / float(frame_time)
    return None


def _load_dicom(path: Path) -> _Loaded:
    import pydicom
    from pydicom.pixels import apply_color_lut

    try:
        with warnings.catch_warnings():  # damaged files also warn; the InputError says it all
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path)
    except Exception as error:  # pydicom raises many types for damaged files
        raise InputError(
            path, f"is not a readable DICOM file ({short_error_reason(error)})"
        ) from None
    if "PixelData" not in dataset:
        raise InputError(path, "DICOM file holds no pixel data")
    try:
        pixels = np.asarray(dataset.pixel_array)
        photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, dataset)
    except Exception as error:  # truncated data, unsupported codec: decoder-specific types
        raise InputError(
            path, f"DICOM pixel data cannot be decoded ({short_error_reason(error)})"
        ) from None
    # pydicom >= 3 already converts YBR_FULL(_422) to RGB; the luma of that RGB is Y itself.
    colour = int(dataset.get("SamplesPerPixel", 1)) > 1 or photometric == "PALETTE COLOR"
    frames = _to_grey(pixels, colour)
    if photometric == "MONOCHROME1":  # 0 = white: flip so that echoes are bright
        if int(dataset.get("PixelRepresentation", 0)) == 0:
            frames = (2.0 ** int(dataset.get("BitsStored", 8)) - 1.0) - frames
        else:
            frames = -frames
    n_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    single = n_frames == 1 and frames.ndim == 2
    if single:
        frames = frames[np.newaxis]
    if frames.ndim != 3:
        raise InputError(path, f"DICOM pixel data has unexpected shape {pixels.shape}")
    return _Loaded(
        frames.astype(np.float32, copy=False),
        _dicom_pixel_size(dataset),
        _dicom_frame_rate(dataset),
        single,
    )


def _load_dicom_folder(folder: Path) -> _Loaded:
    import pydicom

    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )
    candidates = [p for p in files if _looks_like_dicom(p)]
    if len(candidates) == 1:
        return _load_dicom(candidates[0])
    ordered: list[tuple[int, Path]] = []
    for position, candidate in enumerate(candidates):
        try:
            header = pydicom.dcmread(candidate, stop_before_pixels=True)
        except Exception as error:  # pydicom raises many types for damaged files
            raise InputError(
                candidate, f"is not a readable DICOM file ({short_error_reason(error)})"
            ) from None
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(
                folder, f"holds several DICOM files and {candidate.name} is multi-frame; give one"
            )
        ordered.append((int(header.get("InstanceNumber", position) or position), candidate))
    ordered.sort(key=lambda item: item[0])
    loaded = [_load_dicom(p) for _, p in ordered]
    first = loaded[0]
    for (_, file), item in zip(ordered, loaded, strict=True):
        if item.frames.shape != first.frames.shape:
            raise InputError(folder, f"{file.name} differs in size from the other DICOM frames")
        if (item.pixel_size is None) != (first.pixel_size is None) or (
            item.pixel_size is not None
            and first.pixel_size is not None
            and not np.allclose(item.pixel_size, first.pixel_size, rtol=_PIXEL_SIZE_RTOL)
        ):
            raise InputError(folder, f"{file.name} has another pixel size than the other frames")
    frames = np.concatenate([item.frames for item in loaded])
    return _Loaded(frames, first.pixel_size, first.frame_rate, False)


def _load_video(path: Path) -> _Loaded:
    import imageio.v3 as iio

    frames: list[np.ndarray] = []
    try:
        metadata = iio.immeta(path, plugin="FFMPEG")
        for frame in iio.imiter(path, plugin="FFMPEG"):
            pixels = np.asarray(frame)
            frames.append(_to_grey(pixels, pixels.ndim == 3))
    except Exception as error:  # ffmpeg failures surface as OSError, RuntimeError, IndexError...
        raise InputError(path, f"cannot be read as a video ({short_error_reason(error)})") from None
    if not frames:
        raise InputError(path, "video holds no frames")
    fps = metadata.get("fps")
    rate = float(fps) if isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0 else None
    return _Loaded(np.stack(frames), None, rate, False)


def _read_picture(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    try:
        pixels = np.asarray(iio.imread(path))
    except Exception as error:  # Pillow raises several types for damaged images
        raise InputError(
            path, f"cannot be read as an image ({short_error_reason(error)})"
        ) from None
    if pixels.ndim not in (2, 3):
        raise InputError(path, f"image has unexpected shape {pixels.shape}")
    return _to_grey(pixels, pixels.ndim == 3)


def _load_picture_folder(folder: Path) -> _Loaded:
    files = sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and _has_suffix(p, _PICTURE_SUFFIXES)
        ),
        key=lambda p: _natural_key(p.name),
    )
    frames: list[np.ndarray] = []
    for file in files:
        frame = _read_picture(file)
        if frames and frame.shape != frames[0].shape:
            first, other = frames[0].shape, frame.shape
            raise InputError(
                folder,
                f"frames differ in size: {file.name} is {other[0]}x{other[1]} pixels, "
                f"{files[0].name} is {first[0]}x{first[1]}",
            )
        frames.append(frame)
    return _Loaded(np.stack(frames), None, None, False)


def _load(path: Path, kind: str) -> _Loaded:
    if kind == "volume":
        return _load_volume(path)
    if kind == "dicom":
        return _load_dicom(path)
    if kind == "dicom-folder":
        return _load_dicom_folder(path)
    if kind == "video":
        return _load_video(path)
    if kind == "picture-folder":
        return _load_picture_folder(path)
    return _Loaded(_read_picture(path)[np.newaxis], None, None, True)


def read_us_sequence(
    path: str | Path,
    *,
    spacing: float | tuple[float, float] | None = None,
    min_frames: int = 1,
) -> UltrasoundSequence:
    """Read a U/S sequence from any form of DESIGN.md section 2 (see the module docstring).

    Args:
        path: A NIfTI/NRRD/MHA file, a DICOM file, a folder of single-frame DICOM images, a video,
            a folder of PNG/JPG frames, or a single PNG/JPG image.
        spacing: Pixel size in mm, one value for both axes or ``(sx lateral, sy depth)``. Required
            for video, PNG/JPG input and DICOM without calibration; overrides the file otherwise.
        min_frames: Fewest frames accepted (the registration window, 5 in the paper). A single 2D
            image is a one-frame sequence, so it needs ``min_frames <= 1``.

    Returns:
        The sequence, with ``source`` set to ``str(path)``.

    Raises:
        InputError: Missing path, unsupported or unreadable file, missing pixel size, pixel size
            outside (0, 10] mm, NaN/Inf pixels, frames of mixed size, too few frames.

    Example:
        >>> seq = read_us_sequence("scan.mp4", spacing=0.3, min_frames=5)  # doctest: +SKIP
        >>> seq.pixel_size  # doctest: +SKIP
        (0.3, 0.3)
    """
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    path = Path(path)
    if not path.exists():
        raise InputError(path, "U/S file does not exist")
    user_size = None if spacing is None else _checked_pixel_size(spacing, path, "--us-spacing")
    kind = _classify(path)
    if user_size is None and kind in _NEEDS_SPACING:
        raise InputError(path, f"{_NEEDS_SPACING[kind]} has no pixel size: it needs --us-spacing")
    loaded = _load(path, kind)
    pixel_size = user_size or loaded.pixel_size
    if pixel_size is None:
        raise InputError(
            path,
            "DICOM has no Ultrasound Regions calibration or Pixel Spacing: it needs --us-spacing",
        )
    if user_size is None:
        pixel_size = _checked_pixel_size(pixel_size, path, "pixel size in the file")
    n_frames = loaded.frames.shape[0]
    if n_frames < min_frames:
        if loaded.was_2d:
            raise InputError(
                path, f"is a single 2D image; a sequence of at least {min_frames} frames is needed"
            )
        plural = "frame" if n_frames == 1 else "frames"
        raise InputError(path, f"has {n_frames} {plural}, fewer than the window of {min_frames}")
    return UltrasoundSequence(loaded.frames, pixel_size, loaded.frame_rate, str(path))


def write_us_sequence(sequence: UltrasoundSequence, path: str | Path) -> Path:
    """Write a sequence as the DESIGN.md 3D file, atomically.

    The layout is x lateral, y depth, z frame; spacing ``(sx, sy, 1)``; origin 0; identity
    direction. Pixels are stored as uint8 when every value is an integer in 0..255 (B-mode),
    else as float32.

    Args:
        sequence: The sequence to write.
        path: Destination, normally ``<case>/us.nii.gz``.

    Returns:
        ``path`` as a Path.

    Example:
        >>> write_us_sequence(seq, "case/us.nii.gz")  # doctest: +SKIP
        PosixPath('case/us.nii.gz')
    """
    frames = sequence.frames
    integral = bool(
        frames.min() >= 0 and frames.max() <= 255 and np.array_equal(frames, np.round(frames))
    )
    image = _sequence_image(frames.astype(np.uint8) if integral else frames, sequence.pixel_size)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return Path(path)


def read_us_mask(
    path: str | Path,
    sequence: UltrasoundSequence,
    *,
    labels: Sequence[int] | None = None,
) -> np.ndarray:
    """Read a U/S kidney mask on the grid of ``sequence``.

    Any non-video form of :func:`read_us_sequence` is accepted (a PNG mask for a one-frame
    sequence, a PNG folder, NIfTI...). The mask must have the sequence's shape; when the file
    stores a pixel size it must match within a relative 1e-3.

    Args:
        path: The mask file or folder.
        sequence: The sequence the mask belongs to.
        labels: Values counted as foreground; None means every nonzero pixel.

    Returns:
        uint8 array ``(n_frames, rows, cols)`` with values 0 and 1.

    Raises:
        InputError: Missing or unreadable file, a video, NaN pixels, a grid that differs from the
            sequence, or no foreground pixel at all.

    Example:
        >>> mask = read_us_mask("case/us_kidney_mask.nii.gz", seq)  # doctest: +SKIP
        >>> mask.shape == seq.shape  # doctest: +SKIP
        True
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "U/S mask file does not exist")
    kind = _classify(path)
    if kind == "video":
        raise InputError(path, "a U/S mask cannot be a video (lossy compression alters labels)")
    loaded = _load(path, kind)
    if loaded.frames.shape != sequence.shape:
        shown = " x ".join(str(n) for n in loaded.frames.shape)
        expected = " x ".join(str(n) for n in sequence.shape)
        raise InputError(
            path,
            f"mask grid differs from the U/S sequence: {shown} vs {expected} (frames x rows "
            "x cols)",
        )
    if loaded.pixel_size is not None and not np.allclose(
        loaded.pixel_size, sequence.pixel_size, rtol=_PIXEL_SIZE_RTOL, atol=0.0
    ):
        raise InputError(
            path,
            "mask grid differs from the U/S sequence: pixel size "
            f"({loaded.pixel_size[0]:g}, {loaded.pixel_size[1]:g}) vs "
            f"({sequence.pixel_size[0]:g}, {sequence.pixel_size[1]:g}) mm",
        )
    values = loaded.frames
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputError(path, f"contains {bad} NaN or infinite pixels")
    if labels is None:
        foreground = values != 0
    else:
        foreground = np.isin(values, np.asarray(list(labels), dtype=np.float32))
    if not foreground.any():
        which = "nonzero" if labels is None else "label " + "/".join(str(v) for v in labels)
        raise InputError(path, f"U/S mask is empty (no {which} pixels)")
    return foreground.astype(np.uint8)

"""CT volumes and masks: reading with validation, writing atomically (SimpleITK underneath).

World coordinates are exactly what SimpleITK reads (LPS millimetres, DESIGN.md section 1): a NIfTI
file's RAS storage is converted by SimpleITK itself and never flipped by hand here.

Every problem a user can cause (missing file, corrupt or truncated file, wrong dimensionality,
vector pixels, absurd spacing, NaN voxels, empty mask, mask on another grid) raises
:class:`~kidneyreg.errors.InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from kidneyreg.errors import InputError
from kidneyreg.io.atomic import atomic_path

__all__ = [
    "MAX_CT_SPACING_MM",
    "grid_difference",
    "read_ct",
    "read_image",
    "read_mask",
    "short_error_reason",
    "write_image",
    "write_mask",
]

#: Largest accepted CT voxel size in mm; coarser files are surely mislabelled.
MAX_CT_SPACING_MM = 10.0

# Tolerances for "the mask lies on the image's grid" (see read_mask).
_SPACING_RTOL = 1e-3
_ORIGIN_ATOL_MM = 1e-2
_DIRECTION_ATOL = 1e-4

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_NIFTI_FLOAT_CODES = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32, FLOAT64
_NIFTI_CHUNK_BYTES = 1 << 22  # streaming read size of the NIfTI data check
# Longest reason quoted from a library error; the message must stay one readable line.
_MAX_REASON_CHARS = 160


def short_error_reason(error: BaseException) -> str:
    """Condense a library exception (often a multi-line ITK dump) into a short phrase.

    The ITK banner ("Exception thrown in SimpleITK ...") and source locations are dropped; the
    first informative line is kept, cut to a readable length.

    Args:
        error: The exception raised by SimpleITK, pydicom, imageio...

    Returns:
        One line without newlines, at most about 160 characters.

    Example:
        >>> short_error_reason(RuntimeError("Exception thrown in X: a.cxx:9:\\nsitk::ERROR: bad"))
        'bad'
    """
    lines = []
    for raw in str(error).splitlines():
        line = raw.strip()
        if not line or line.startswith(("Exception thrown in", "=== stderr")):
            continue
        # "ITK ERROR: NrrdImageIO(0x55...): Read: ..." -> "Read: ..."
        line = re.sub(r"^(sitk::ERROR|ITK ERROR):\s*", "", line)
        line = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
        if line:
            lines.append(line)
    reason = lines[0] if lines else type(error).__name__
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[: _MAX_REASON_CHARS - 3] + "..."
    return reason


@contextlib.contextmanager
def _quiet_itk_warnings() -> Iterator[None]:
    """Silence ITK's stderr warnings (e.g. GDCM's "No Series were found") for a short call."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


class _NiftiLayout(NamedTuple):
    data_offset: int  # where the voxels start
    data_bytes: int  # how many bytes of voxels the header announces
    float_dtype: np.dtype | None  # the voxel type when it is floating point


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """Voxel layout from a NIfTI-1 or NIfTI-2 header; None when the header is not parseable."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    n_dims = dims[0]
    if not 1 <= n_dims <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : n_dims + 1]], dtype=np.int64))
    code = _NIFTI_FLOAT_CODES.get(datatype)
    return _NiftiLayout(
        max(offset, 348), voxels * bitpix // 8, None if code is None else np.dtype(endian + code)
    )


def _check_nifti_data(path: Path) -> None:
    """Raise InputError if a NIfTI file is truncated, its gzip stream corrupt, or a voxel NaN/Inf.

    ITK's NIfTI reader silently fills missing voxels with zeros and turns NaN and infinite voxels
    into 0, so both are checked here on the stored bytes, in one streaming pass.
    """
    try:
        with open(path, "rb") as stream:
            compressed = stream.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if compressed else open(path, "rb") as stream:
            header = stream.read(540)
            layout = _nifti_layout(header)
            if layout is None:
                return  # not a header we know: ITK's own reading stands
            begin, end = layout.data_offset, layout.data_offset + layout.data_bytes
            item = 1 if layout.float_dtype is None else layout.float_dtype.itemsize
            position, carry, non_finite = 0, b"", 0
            chunk = header
            while chunk:
                low, high = max(begin - position, 0), min(end - position, len(chunk))
                position += len(chunk)
                if layout.float_dtype is not None and high > low:
                    data = carry + chunk[low:high]
                    usable = len(data) - len(data) % item
                    values = np.frombuffer(data[:usable], layout.float_dtype)
                    non_finite += values.size - int(np.count_nonzero(np.isfinite(values)))
                    carry = data[usable:]
                chunk = stream.read(_NIFTI_CHUNK_BYTES)
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(path, f"is truncated or corrupt ({short_error_reason(error)})") from None
    if position < end:
        raise InputError(
            path, f"is truncated: {position} of {end} bytes of NIfTI header and voxels present"
        )
    if non_finite:
        raise InputError(path, f"contains {non_finite} NaN or infinite voxels")


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _check_orphan_dicom_files(folder: Path, in_series: set[Path]) -> None:
    """Raise InputError for a DICOM file GDCM left out of every series because it is damaged.

    GDCM silently skips a truncated slice while scanning a folder; the series would then be read
    with a slice missing. A DICOM file outside every series that GDCM cannot read on its own is
    therefore reported; readable outsiders (reports, other objects) are ignored.
    """
    for candidate in sorted(folder.iterdir()):
        if (
            not candidate.is_file()
            or candidate.resolve() in in_series
            or candidate.name.upper() == "DICOMDIR"
            or not _has_dicom_preamble(candidate)
        ):
            continue
        try:
            with _quiet_itk_warnings():
                sitk.ReadImage(str(candidate))
        except RuntimeError as error:
            raise InputError(
                candidate, f"is a damaged DICOM file ({short_error_reason(error)})"
            ) from None


def _check_slice_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """Raise InputError when slice positions are not evenly spaced (a slice missing).

    ITK assumes uniform slices and only warns otherwise, which would silently distort the world
    coordinates of every slice after a gap.
    """
    n_slices = image.GetSize()[2]
    if n_slices < 3 or not all(reader.HasMetaDataKey(k, "0020|0032") for k in range(n_slices)):
        return
    try:
        positions = np.array(
            [
                [float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")]
                for k in range(n_slices)
            ]
        )
    except ValueError:
        return  # malformed positions: ITK already placed the slices from the first two
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    steps = np.diff(positions @ normal)
    typical = float(np.median(np.abs(steps)))
    if typical <= 0 or np.max(np.abs(np.abs(steps) - typical)) > 0.1 * typical:
        raise InputError(
            folder,
            f"DICOM slices are unevenly spaced (steps {np.min(np.abs(steps)):.3g} to "
            f"{np.max(np.abs(steps)):.3g} mm): a slice is missing, duplicated or damaged",
        )


def _read_dicom_series(folder: Path, kind: str) -> sitk.Image:
    with _quiet_itk_warnings():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    # Several series in one folder (scout, contrast phases...): take the one with most slices.
    files_per_series = [
        sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
        for series_id in series_ids
    ]
    _check_orphan_dicom_files(
        folder, {Path(name).resolve() for files in files_per_series for name in files}
    )
    if not series_ids:
        raise InputError(folder, f"folder holds no DICOM series (a {kind} file or folder needed)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(max(files_per_series, key=len))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk_warnings():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            folder, f"DICOM series cannot be read ({short_error_reason(error)})"
        ) from None
    _check_slice_spacing(reader, image, folder)
    return image


def read_image(path: str | Path, *, kind: str = "CT") -> sitk.Image:
    """Read an image file (NIfTI, NRRD, MHA...) or a DICOM series folder, as stored.

    No validation beyond "it is a readable, complete image": see :func:`read_ct` and
    :func:`read_mask` for the checks a CT or a mask needs. One exception: ITK turns NaN and
    infinite NIfTI voxels into 0 while reading, so such voxels are detected (and rejected) here,
    on the stored bytes, together with truncation.

    Args:
        path: An image file, or a folder holding a DICOM series (the series with most files is
            read when there are several).
        kind: What the file is meant to be ("CT", "mask", "U/S"), used in error messages.

    Returns:
        The image with its pixel type, spacing, origin and direction as SimpleITK reads them.

    Raises:
        InputError: Missing path, folder without DICOM series (or with a damaged or missing
            slice), unreadable, corrupt or truncated file, NaN/Inf voxels in a NIfTI file.

    Example:
        >>> image = read_image("case/ct.nii.gz")  # doctest: +SKIP
        >>> image.GetDimension()  # doctest: +SKIP
        3
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{kind} file does not exist")
    if path.is_dir():
        return _read_dicom_series(path, kind)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = short_error_reason(error)
        if "Unable to determine ImageIO reader" in reason:
            reason = "unknown format or corrupt header"
        raise InputError(path, f"cannot be read as a {kind} image ({reason})") from None
    if _is_nifti(path):
        _check_nifti_data(path)
    return image


def _size_text(image: sitk.Image) -> str:
    return " x ".join(str(n) for n in image.GetSize())


def _as_volume(image: sitk.Image, path: Path, kind: str) -> sitk.Image:
    """Check a scalar 3D image with sane spacing; a 4D file with one time point is squeezed."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        size = list(image.GetSize())
        image = sitk.Extract(
            image,
            [*size[:3], 0],
            [0, 0, 0, 0],
            sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX,
        )
    dimension = image.GetDimension()
    if dimension != 3:
        raise InputError(
            path, f"is a {dimension}D image (size {_size_text(image)}); a 3D {kind} is needed"
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            path, f"has {components} values per voxel (RGB or vector); a scalar {kind} is needed"
        )
    if min(image.GetSize()) < 2:
        hint = "; give the folder holding the whole series" if path.suffix == ".dcm" else ""
        raise InputError(
            path, f"is a 2D image (size {_size_text(image)}); a 3D {kind} is needed{hint}"
        )
    spacing = image.GetSpacing()
    if not all(0.0 < s <= MAX_CT_SPACING_MM for s in spacing):
        shown = ", ".join(f"{s:g}" for s in spacing)
        raise InputError(
            path, f"voxel spacing ({shown}) mm is out of range; each must be in (0, 10] mm"
        )
    return image


def _check_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(path, f"contains {bad} NaN or infinite voxels")


def read_ct(path: str | Path) -> sitk.Image:
    """Read and validate a CT volume in Hounsfield units.

    Checks: the path exists and is readable and complete; the image is 3D (a 4D file with a single
    time point is accepted as 3D), scalar, at least 2 voxels along each axis, spacing in
    (0, 10] mm, and every voxel finite.

    Args:
        path: NIfTI / NRRD / MHA file or a DICOM series folder.

    Returns:
        The CT as float32 (HU) with the file's geometry (LPS world, as SimpleITK reads it).

    Raises:
        InputError: Any failed check, as one line naming the file.

    Example:
        >>> ct = read_ct("case/ct.nii.gz")  # doctest: +SKIP
        >>> ct.GetPixelID() == sitk.sitkFloat32  # doctest: +SKIP
        True
    """
    path = Path(path)
    image = _as_volume(read_image(path, kind="CT"), path, "CT volume")
    image = sitk.Cast(image, sitk.sitkFloat32)
    _check_finite(sitk.GetArrayViewFromImage(image), path)
    return image


def grid_difference(image: sitk.Image, reference: sitk.Image) -> str | None:
    """Describe how ``image``'s grid differs from ``reference``'s, or None when it matches.

    Size exactly; spacing, origin and direction within the tolerances :func:`read_mask` accepts.
    """

    def show(values: Sequence[float] | np.ndarray) -> str:
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

    if image.GetSize() != reference.GetSize():
        return f"size {_size_text(image)} vs {_size_text(reference)}"
    spacing, ref_spacing = np.array(image.GetSpacing()), np.array(reference.GetSpacing())
    if np.any(np.abs(spacing - ref_spacing) > _SPACING_RTOL * np.abs(ref_spacing)):
        return f"spacing {show(spacing)} vs {show(ref_spacing)} mm"
    origin, ref_origin = np.array(image.GetOrigin()), np.array(reference.GetOrigin())
    if np.any(np.abs(origin - ref_origin) > _ORIGIN_ATOL_MM):
        return f"origin {show(origin)} vs {show(ref_origin)} mm"
    direction = np.array(image.GetDirection())
    if np.any(np.abs(direction - np.array(reference.GetDirection())) > _DIRECTION_ATOL):
        return "direction cosines differ"
    return None


def read_mask(
    path: str | Path,
    reference: sitk.Image | None = None,
    *,
    kind: str = "mask",
    labels: Sequence[int] | None = None,
) -> sitk.Image:
    """Read a binary mask or a label map as a uint8 0/1 mask, optionally on a reference grid.

    Args:
        path: NIfTI / NRRD / MHA file or DICOM series folder.
        reference: The image the mask belongs to. When given, the mask must have the same size
            and the same spacing (relative 1e-3), origin (1e-2 mm) and direction (1e-4); the
            returned mask then carries exactly the reference's geometry.
        kind: What the mask is ("kidney mask"...), used in error messages.
        labels: Label values counted as foreground; None means every nonzero voxel.

    Returns:
        A uint8 image with values 0 and 1.

    Raises:
        InputError: Unreadable file, not a scalar 3D volume, NaN voxels, no foreground voxel, or
            a grid that differs from the reference.

    Example:
        >>> ct = read_ct("case/ct.nii.gz")  # doctest: +SKIP
        >>> mask = read_mask("case/ct_kidney_mask.nii.gz", ct, kind="kidney mask")  # doctest: +SKIP
    """
    path = Path(path)
    image = _as_volume(read_image(path, kind=kind), path, kind)
    if reference is not None:
        difference = grid_difference(image, reference)
        if difference is not None:
            raise InputError(path, f"{kind} grid differs from the image: {difference}")
    values = sitk.GetArrayViewFromImage(image)
    _check_finite(values, path)
    if labels is None:
        foreground = values != 0
    else:
        foreground = np.isin(values, np.asarray(list(labels)))
    if not foreground.any():
        which = "nonzero" if labels is None else "label " + "/".join(str(v) for v in labels)
        raise InputError(path, f"{kind} is empty (no {which} voxels)")
    mask = sitk.GetImageFromArray(foreground.astype(np.uint8))
    mask.CopyInformation(image if reference is None else reference)
    return mask


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image atomically (temporary sibling, then rename), compressed where supported.

    The format follows the suffix (``.nii.gz`` is gzip-compressed). A failure leaves any previous
    file at ``path`` untouched.

    Args:
        image: Any SimpleITK image.
        path: Destination file.

    Returns:
        ``path`` as a Path.

    Example:
        >>> write_image(ct, "out/ct.nii.gz")  # doctest: +SKIP
        PosixPath('out/ct.nii.gz')
    """
    if not isinstance(image, sitk.Image):
        raise TypeError(f"write_image needs a SimpleITK image, got {type(image).__name__}")
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return Path(path)


def write_mask(mask: sitk.Image, path: str | Path) -> Path:
    """Write a mask as uint8 0/1 (every nonzero voxel becomes 1), atomically.

    Args:
        mask: A SimpleITK image of any scalar pixel type.
        path: Destination file, e.g. ``case/ct_kidney_mask.nii.gz``.

    Returns:
        ``path`` as a Path.

    Example:
        >>> write_mask(mask, "case/ct_kidney_mask.nii.gz")  # doctest: +SKIP
        PosixPath('case/ct_kidney_mask.nii.gz')
    """
    if not isinstance(mask, sitk.Image):
        raise TypeError(f"write_mask needs a SimpleITK image, got {type(mask).__name__}")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("write_mask needs a scalar image, got a vector image")
    binary = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(mask) != 0).astype(np.uint8))
    binary.CopyInformation(mask)
    return write_image(binary, path)

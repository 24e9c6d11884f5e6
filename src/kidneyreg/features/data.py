"""Feature-net training data: case discovery, preprocessing, in-memory cache, patch sampling.

Accepted layouts (every case is one sub-folder of the data folder, or the data folder itself):

* simulated / DESIGN.md case folders: ``ct.nii.gz`` + ``ct_kidney_mask.nii.gz`` (CT),
  ``us.nii.gz`` + ``us_kidney_mask.nii.gz`` (U/S). For CT, when the simulator's tissue label map
  ``labels.nii.gz`` lies on the CT grid, the target is *every* kidney in it (both kidneys, as in
  KiTS and the real labels), not only the scanned one that ``ct_kidney_mask`` marks: the network
  must not learn to ignore a kidney.
* KiTS19: ``case_*/imaging.nii.gz`` + ``segmentation.nii.gz``, labels 1 (kidney) and 2 (tumour)
  both counted as kidney.

Preprocessing (done once, the result cached in memory):

* CT: reoriented to identity direction (:func:`kidneyreg.preprocess.reorient_rai`), resampled to
  the profile's isotropic spacing with anti-aliasing, normalised with the fixed window of
  :func:`kidneyreg.preprocess.normalize_ct` (-200..400 HU -> 0..1, clipped: fat, soft tissue and
  enhanced parenchyma keep their contrast in every phase). To bound memory on whole-body scans the
  volume is cropped to the kidneys' bounding box plus one patch on every side, which still leaves
  plenty of non-kidney context (liver, spleen, bowel, spine) for the negative patches.
* U/S: frames resampled to the profile's pixel size
  (:func:`kidneyreg.preprocess.resample_us_frames`) and divided by 255 (B-mode uint8 -> [0, 1],
  clipped).

Images are cached as float16 (the normalised range needs no more), masks as uint8.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import SimpleITK as sitk
import torch
from numpy.typing import NDArray

from kidneyreg.errors import InputError
from kidneyreg.features.augment import (
    RandomTissueContrast,
    RandomTissueGain,
    apply_tissue_contrast,
    apply_tissue_gain,
)
from kidneyreg.features.config import FeatureNetConfig
from kidneyreg.io.cases import patient_id
from kidneyreg.io.image import grid_difference, read_ct, read_mask
from kidneyreg.io.us import UltrasoundSequence, read_us_mask, read_us_sequence
from kidneyreg.preprocess import (
    CT_AIR_HU,
    normalize_ct,
    reorient_rai,
    resample_isotropic,
    resample_us_frames,
    window_indices,
)
from kidneyreg.simulate.tissues import kidney_labels, sinus_labels

__all__ = [
    "CaseData",
    "CaseFiles",
    "PatchSampler",
    "find_cases",
    "load_case",
    "load_cases",
    "normalize_us",
    "prepare_ct_volume",
    "read_ct_target",
    "split_by_patient",
]

# File names of the two layouts.
_SIM_CT = ("ct.nii.gz", "ct_kidney_mask.nii.gz")
_KITS_CT = ("imaging.nii.gz", "segmentation.nii.gz")
_SIM_US = ("us.nii.gz", "us_kidney_mask.nii.gz")
_SIM_LABELS = "labels.nii.gz"
_SIM_US_LABELS = "us_labels.nii.gz"

_Scalar = TypeVar("_Scalar", bound=np.generic)
# How deep find_cases looks for case folders (cohorts of cohorts of cases at most).
_SEARCH_DEPTH = 3


@dataclass(frozen=True)
class CaseFiles:
    """The files of one training case.

    Attributes:
        name: Case name (its folder's name).
        patient: Patient key used for the train/validation split (cases of one patient never
            straddle it): the simulated anatomy (source and seed in ``case.json``) when known,
            else the case folder.
        image: CT volume or U/S sequence file.
        mask: Kidney mask or label map on the image's grid.
        labels: Label values counted as kidney in ``mask`` (None: every nonzero value).
        tissue_labels: A simulator tissue label map holding both kidneys (CT only), or None.
    """

    name: str
    patient: str
    image: Path
    mask: Path
    labels: tuple[int, ...] | None = None
    tissue_labels: Path | None = None


def _case_files(folder: Path, name: str, modality: str) -> CaseFiles | None:
    # A simulated case: image, kidney mask and (when written) the tissue label map.
    files, labels_name = (_SIM_US, _SIM_US_LABELS) if modality == "us" else (_SIM_CT, _SIM_LABELS)
    image, mask = (folder / file for file in files)
    if image.is_file() and mask.is_file():
        labels = folder / labels_name
        return CaseFiles(
            name,
            patient_id(folder, name),
            image,
            mask,
            tissue_labels=labels if labels.is_file() else None,
        )
    if modality == "us":
        return None
    image, mask = (folder / file for file in _KITS_CT)
    if image.is_file() and mask.is_file():
        return CaseFiles(name, name, image, mask, labels=(1, 2))
    return None


def _case_folders(root: Path, depth: int) -> list[Path]:
    """Sub-folders of ``root`` down to ``depth`` levels (symbolic links followed), sorted."""
    found: list[Path] = []
    if depth <= 0:
        return found
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.append(child)
        found.extend(_case_folders(child, depth - 1))
    return found


def find_cases(data_dir: str | Path, modality: str) -> list[CaseFiles]:
    """The training cases of ``modality`` in ``data_dir``, sorted by name.

    Case folders are searched up to three levels deep (symbolic links followed), so one data
    folder can gather several cohorts (e.g. one per CT phase); a case's name is its path
    relative to ``data_dir`` (``plain/case_003``).

    Args:
        data_dir: A folder of case folders, a folder of cohorts, or one case folder.
        modality: ``"ct"`` or ``"us"``.

    Raises:
        InputError: Missing folder, or no case of the modality in it.

    Example:
        >>> [c.name for c in find_cases("cohort", "ct")]  # doctest: +SKIP
        ['case_000', 'case_001']
    """
    if modality not in ("ct", "us"):
        raise ValueError(f"modality must be 'ct' or 'us', got {modality!r}")
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(root, "data folder does not exist")
    own = _case_files(root, root.name, modality)
    if own is not None:
        return [own]
    cases = [
        found
        for folder in _case_folders(root, _SEARCH_DEPTH)
        if (found := _case_files(folder, folder.relative_to(root).as_posix(), modality)) is not None
    ]
    if not cases:
        expected = (
            "us.nii.gz + us_kidney_mask.nii.gz"
            if modality == "us"
            else "ct.nii.gz + ct_kidney_mask.nii.gz, or KiTS19 imaging.nii.gz + segmentation.nii.gz"
        )
        raise InputError(
            root, f"no {modality.upper()} training case found (case folders with {expected})"
        )
    return cases


def split_by_patient(
    cases: Sequence[CaseFiles], val_fraction: float, seed: int
) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """Split cases into training and validation sets by patient, reproducibly.

    At least one patient goes to validation when there are two or more patients and
    ``val_fraction > 0``; a single patient gives no validation set.

    Example:
        >>> cs = [CaseFiles(f"c{i}", f"p{i}", Path("x"), Path("y")) for i in range(5)]
        >>> train, val = split_by_patient(cs, 0.2, seed=0)
        >>> len(train), len(val)
        (4, 1)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    patients = sorted({c.patient for c in cases})
    order = torch.randperm(len(patients), generator=torch.Generator().manual_seed(int(seed)))
    n_val = 0
    if len(patients) >= 2 and val_fraction > 0:
        n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
    val_patients = {patients[int(i)] for i in order[:n_val]}
    train = [c for c in cases if c.patient not in val_patients]
    val = [c for c in cases if c.patient in val_patients]
    return train, val


@dataclass(eq=False)
class CaseData:
    """One preprocessed case in memory.

    Attributes:
        name: Case name.
        image: float16 ``(D, H, W)`` normalised CT, or ``(n_frames, rows, cols)`` U/S frames.
        mask: uint8 0/1, same shape.
        kidney_voxels: int32 ``(K, 3)`` indices of the kidney voxels (patch centres).
        tissues: uint8 simulator tissue labels on the image grid (CT or U/S frames of a
            simulated case), used by the tissue-contrast augmentation; None for other data.
    """

    name: str
    image: NDArray[np.float16]
    mask: NDArray[np.uint8]
    kidney_voxels: NDArray[np.int32]
    tissues: NDArray[np.uint8] | None = None

    @classmethod
    def from_arrays(
        cls,
        name: str,
        image: NDArray[np.floating],
        mask: NDArray[np.integer],
        tissues: NDArray[np.integer] | None = None,
    ) -> CaseData:
        """Build a case from normalised arrays (e.g. synthetic data in tests)."""
        image = np.asarray(image)
        mask = np.asarray(mask)
        if image.ndim != 3 or image.shape != mask.shape:
            raise ValueError(
                f"image and mask must be 3D of the same shape, got {image.shape} and {mask.shape}"
            )
        if tissues is not None and np.shape(tissues) != image.shape:
            raise ValueError(
                f"tissues must have the image's shape {image.shape}, got {np.shape(tissues)}"
            )
        binary = (mask != 0).astype(np.uint8)
        return cls(
            name,
            image.astype(np.float16),
            binary,
            np.argwhere(binary).astype(np.int32),
            None if tissues is None else np.asarray(tissues).astype(np.uint8),
        )


def normalize_us(frames: NDArray[np.floating] | NDArray[np.integer]) -> NDArray[np.float32]:
    """B-mode intensities (0..255) to [0, 1], clipped.

    Example:
        >>> normalize_us(np.array([0, 51, 255, 300]))
        array([0. , 0.2, 1. , 1. ], dtype=float32)
    """
    return np.clip(np.asarray(frames, dtype=np.float32) / 255.0, 0.0, 1.0)


def prepare_ct_volume(ct: sitk.Image, spacing: float) -> sitk.Image:
    """CT (HU) reoriented to identity direction and resampled isotropically (anti-aliased).

    This is the grid the CT feature network sees; :func:`kidneyreg.preprocess.normalize_ct` of its
    voxels is the network input.

    Example:
        >>> img = sitk.Image(10, 10, 4, sitk.sitkFloat32)
        >>> img.SetSpacing((1.0, 1.0, 2.5))
        >>> prepare_ct_volume(img, 2.0).GetSize()
        (5, 5, 5)
    """
    oriented = reorient_rai(ct, default_value=CT_AIR_HU)
    return resample_isotropic(oriented, spacing, default_value=CT_AIR_HU, antialias=True)


def _mask_on(mask: sitk.Image, reference: sitk.Image) -> NDArray[np.uint8]:
    """A 0/1 mask resampled onto ``reference``: linear interpolation of the fraction, >= 0.5."""
    fraction = sitk.Resample(
        sitk.Cast(mask, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0
    )
    return (sitk.GetArrayFromImage(fraction) >= 0.5).astype(np.uint8)


def read_ct_target(files: CaseFiles, ct: sitk.Image) -> sitk.Image:
    """The CT training/evaluation target of a case: a 0/1 kidney mask on the CT's grid.

    Every kidney of the simulator's tissue label map when it lies on the CT grid, else the
    mask file (KiTS: labels 1 and 2).
    """
    if files.tissue_labels is not None:
        try:
            return read_mask(files.tissue_labels, ct, kind="label map", labels=kidney_labels())
        except InputError:
            pass  # another grid or no kidney label: the mask file is the target
    return read_mask(files.mask, ct, kind="kidney mask", labels=files.labels)


def _bounding_box(mask: NDArray[np.uint8], margin: Sequence[int]) -> tuple[slice, ...]:
    """The mask's bounding box grown by ``margin`` voxels on every side (within the array)."""
    where = np.argwhere(mask)
    lo = np.maximum(where.min(axis=0) - np.asarray(margin), 0)
    hi = np.minimum(where.max(axis=0) + 1 + np.asarray(margin), mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _tissues_on(files: CaseFiles, ct: sitk.Image, prepared: sitk.Image) -> NDArray[np.uint8] | None:
    """The simulator's tissue labels on the prepared CT grid, or None (other data, other grid)."""
    if files.tissue_labels is None:
        return None
    labels = sitk.ReadImage(str(files.tissue_labels))
    if grid_difference(labels, ct) is not None:
        return None
    labels.CopyInformation(ct)  # equal within tolerance: take the CT's exact numbers
    oriented = reorient_rai(sitk.Cast(labels, sitk.sitkUInt8), interpolator="nearest")
    on_grid = sitk.Resample(oriented, prepared, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(on_grid).astype(np.uint8)


def _us_tissues_on(
    files: CaseFiles, sequence: UltrasoundSequence, spacing: float
) -> NDArray[np.uint8] | None:
    """The simulator's U/S tissue labels on the resampled frames, or None (other data)."""
    if files.tissue_labels is None:
        return None
    try:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(files.tissue_labels)))
    except RuntimeError as error:
        raise InputError(files.tissue_labels, "unreadable U/S tissue label map") from error
    if labels.shape != sequence.shape:
        return None  # not this sequence's labels: train without them
    resampled, _ = resample_us_frames(
        labels.astype(np.uint8), sequence.pixel_size, spacing, interpolator="nearest"
    )
    return np.asarray(resampled, dtype=np.uint8)


def _pad_to(array: NDArray[_Scalar], shape: Sequence[int], value: float) -> NDArray[_Scalar]:
    """Pad symmetrically so that every axis is at least ``shape``."""
    missing = [max(0, int(n) - s) for n, s in zip(shape, array.shape, strict=True)]
    if not any(missing):
        return array
    pads = [(m // 2, m - m // 2) for m in missing]
    padded: NDArray[_Scalar] = np.pad(array, pads, mode="constant", constant_values=value)
    return padded


def load_case(files: CaseFiles, config: FeatureNetConfig) -> CaseData:
    """Read and preprocess one case for ``config``'s network (see the module docstring).

    Raises:
        InputError: Unreadable files, a mask on another grid, an empty mask.
    """
    patch = config.patch_size
    sinus = config.structure == "sinus"
    if sinus and files.tissue_labels is None:
        raise InputError(
            files.image.parent, "a sinus network needs the simulator's tissue label maps"
        )
    if config.modality == "ct":
        ct = read_ct(files.image)
        target = read_ct_target(files, ct)
        prepared = prepare_ct_volume(ct, config.spacing)
        mask = _mask_on(reorient_rai(target, interpolator="nearest"), prepared)
        if not mask.any():
            raise InputError(files.mask, f"kidney mask vanishes at {config.spacing} mm")
        image = normalize_ct(sitk.GetArrayViewFromImage(prepared))
        tissues = _tissues_on(files, ct, prepared)
        if sinus:
            if tissues is None or not np.isin(tissues, sinus_labels()).any():
                raise InputError(files.tissue_labels or files.mask, "no renal sinus on the CT grid")
            mask = np.isin(tissues, sinus_labels()).astype(np.uint8)
        box = _bounding_box(mask, patch)
        # Normalised air is 0; pad small volumes so that a whole patch always fits.
        image = _pad_to(image[box], patch, 0.0)
        mask = _pad_to(mask[box], patch, 0)
        if tissues is not None:
            tissues = _pad_to(tissues[box], patch, 0)
        return CaseData.from_arrays(files.name, image, mask, tissues)
    else:
        sequence = read_us_sequence(files.image, min_frames=1)
        us_mask = read_us_mask(files.mask, sequence)
        frames, _ = resample_us_frames(sequence.frames, sequence.pixel_size, config.spacing)
        fraction, _ = resample_us_frames(
            us_mask.astype(np.float32), sequence.pixel_size, config.spacing, antialias=False
        )
        image = normalize_us(frames)
        mask = (fraction >= 0.5).astype(np.uint8)
        frame_shape = (image.shape[0], *patch[1:])
        image = _pad_to(image, frame_shape, 0.0)
        mask = _pad_to(mask, frame_shape, 0)
        if not mask.any():
            raise InputError(files.mask, f"U/S kidney mask vanishes at {config.spacing} mm")
        us_tissues = _us_tissues_on(files, sequence, config.spacing)
        if us_tissues is not None:
            us_tissues = _pad_to(us_tissues, frame_shape, 0)
        if sinus:
            if us_tissues is None or not np.isin(us_tissues, sinus_labels()).any():
                raise InputError(files.tissue_labels or files.mask, "no renal sinus in the frames")
            mask = np.isin(us_tissues, sinus_labels()).astype(np.uint8)
        return CaseData.from_arrays(files.name, image, mask, us_tissues)


def load_cases(
    cases: Sequence[CaseFiles],
    config: FeatureNetConfig,
    progress: Callable[[int, CaseFiles], None] | None = None,
) -> list[CaseData]:
    """:func:`load_case` for every case, calling ``progress(i, case)`` after each."""
    loaded = []
    for index, files in enumerate(cases):
        loaded.append(load_case(files, config))
        if progress is not None:
            progress(index, files)
    return loaded


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[0, high)`` (``high >= 1``)."""
    return int(torch.randint(0, max(1, int(high)), (), generator=generator).item())


class PatchSampler:
    """Random training patches, a fixed fraction of them containing kidney.

    A kidney patch is placed so that a randomly chosen kidney voxel falls at a random position
    inside it (so the kidney is seen at every position of the patch); the others are placed
    uniformly. U/S patches are windows of ``Nw`` consecutive frames (edge frames repeated, as at
    inference) cropped in the frame plane; the kidney voxel is chosen in the middle frame.

    Args:
        cases: Preprocessed cases (every axis at least the patch size, frames excepted).
        config: Network configuration (patch size, modality).
        kidney_fraction: Probability that a patch is centred on kidney.
        tissue_contrast: Recolour the tissues of patches whose case has a tissue label map: CT
            with :class:`~kidneyreg.features.augment.RandomTissueContrast`, U/S with
            :class:`~kidneyreg.features.augment.RandomTissueGain`; None leaves them as read.

    Example:
        >>> sampler = PatchSampler([case], feature_config("ct", "tiny"))  # doctest: +SKIP
        >>> image, mask = sampler.sample(torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> image.shape  # doctest: +SKIP
        torch.Size([1, 16, 48, 48])
    """

    def __init__(
        self,
        cases: Sequence[CaseData],
        config: FeatureNetConfig,
        kidney_fraction: float = 2.0 / 3.0,
        tissue_contrast: RandomTissueContrast | RandomTissueGain | None = None,
    ) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        if not 0.0 <= kidney_fraction <= 1.0:
            raise ValueError(f"kidney_fraction must be in [0, 1], got {kidney_fraction}")
        self.cases = list(cases)
        self.config = config
        self.kidney_fraction = float(kidney_fraction)
        self.tissue_contrast = tissue_contrast
        us = config.modality == "us"
        needed = config.patch_size[1:] if us else config.patch_size
        for case in self.cases:
            have = case.image.shape[1:] if us else case.image.shape
            if any(h < n for h, n in zip(have, needed, strict=True)):
                raise ValueError(
                    f"case {case.name} of shape {case.image.shape} is smaller than the patch "
                    f"{config.patch_size}"
                )

    @functools.cached_property
    def largest_patch(self) -> tuple[int, int, int]:
        """The largest patch every case holds (per axis, the smallest case's size; U/S: the
        window length on the time axis)."""
        us = self.config.modality == "us"
        shapes = np.array([c.image.shape[1:] if us else c.image.shape for c in self.cases])
        smallest = tuple(int(n) for n in shapes.min(axis=0))
        if us:
            return (self.config.patch_size[0], smallest[0], smallest[1])
        return (smallest[0], smallest[1], smallest[2])

    def _start(self, size: int, patch: int, anchor: int | None, generator: torch.Generator) -> int:
        if anchor is None:
            return _randint(size - patch + 1, generator)
        offset = _randint(patch, generator)
        return int(np.clip(anchor - offset, 0, size - patch))

    def sample(
        self, generator: torch.Generator, patch_size: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One patch: image ``(1, *patch)`` float32 and mask ``(1, *patch)`` float32.

        Args:
            generator: Source of every random choice.
            patch_size: Patch ``(D, H, W)``; None: the configuration's. It must fit in every
                case (:attr:`largest_patch`); for U/S its first entry must be the window.
        """
        patch = self.config.patch_size if patch_size is None else tuple(int(n) for n in patch_size)
        if patch_size is not None:
            us = self.config.modality == "us"
            if len(patch) != 3 or (us and patch[0] != self.config.patch_size[0]):
                raise ValueError(
                    f"patch_size {patch} does not match the {self.config.modality} network"
                )
            if any(n < 1 or n > m for n, m in zip(patch, self.largest_patch, strict=True)):
                raise ValueError(
                    f"patch_size {patch} does not fit every case (largest {self.largest_patch})"
                )
        case = self.cases[_randint(len(self.cases), generator)]
        want_kidney = float(torch.rand((), generator=generator).item()) < self.kidney_fraction
        anchor: NDArray[np.int32] | None = None
        if want_kidney and len(case.kidney_voxels):
            anchor = case.kidney_voxels[_randint(len(case.kidney_voxels), generator)]
        if self.config.modality == "ct":
            starts = [
                self._start(n, p, None if anchor is None else int(anchor[axis]), generator)
                for axis, (n, p) in enumerate(zip(case.image.shape, patch, strict=True))
            ]
            box = tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
            image, mask = case.image[box], case.mask[box]
            if isinstance(self.tissue_contrast, RandomTissueContrast):
                # Drawn for every patch, so the generator's sequence does not depend on the data.
                offsets = self.tissue_contrast.sample(generator)
                if offsets is not None and case.tissues is not None:
                    recoloured = apply_tissue_contrast(
                        torch.from_numpy(image.astype(np.float32))[None],
                        torch.from_numpy(case.tissues[box]),
                        offsets,
                    )
                    image = recoloured[0].numpy()
        else:
            n_frames = case.image.shape[0]
            centre = int(anchor[0]) if anchor is not None else _randint(n_frames, generator)
            frames = window_indices(n_frames, centre, patch[0])
            starts = [
                self._start(n, p, None if anchor is None else int(anchor[axis + 1]), generator)
                for axis, (n, p) in enumerate(zip(case.image.shape[1:], patch[1:], strict=True))
            ]
            rows = slice(starts[0], starts[0] + patch[1])
            cols = slice(starts[1], starts[1] + patch[2])
            image, mask = case.image[frames, rows, cols], case.mask[frames, rows, cols]
            if isinstance(self.tissue_contrast, RandomTissueGain):
                gains = self.tissue_contrast.sample(generator)  # drawn for every patch
                if gains is not None and case.tissues is not None:
                    image = apply_tissue_gain(
                        torch.from_numpy(image.astype(np.float32))[None],
                        torch.from_numpy(case.tissues[frames, rows, cols]),
                        gains,
                    )[0].numpy()
        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).unsqueeze(0)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)).unsqueeze(0)
        return image_t, mask_t

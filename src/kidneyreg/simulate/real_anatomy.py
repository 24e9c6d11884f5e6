"""A simulator anatomy from a real CT and its kidney labels (TotalSegmentator or KiTS19 style).

The CT and its label maps are resampled onto an isotropic, identity-direction grid covering the
CT (cropped to the kidneys +- 15 cm along S-I). Tissues come from the organ labels where a
multi-organ map is given (TotalSegmentator v1 class values by default) and from Hounsfield
units elsewhere:

* outside the body (the largest connected object above -500 HU, holes filled slice by slice):
  AIR; inside: gas below -400 HU (LUNG for large gas volumes above the kidneys or where the
  organ map says lung), FAT from -400 to -30 HU, soft tissue (MUSCLE in the body wall,
  SOFT_TISSUE inside) up to 200 HU;
* bright (> 200 HU) connected structures are BONE when they contain cortical bone (> 600 HU
  after light smoothing) and contrast-filled vessels (ARTERY) otherwise, so that an enhanced
  aorta does not cast an acoustic shadow.

Each kidney is split into its inner structure from HU and the depth below its capsule (the
kidney's convex hull): renal sinus (fat HU deeper than 4 mm, and with ``include_sinus`` the deep
hull voxels outside the label, where label maps leave the sinus out: fat, vessels and collecting
system, which thick slices blur to between fat and water HU; on U/S the bright central echo
complex), collecting system (fluid clearly darker than the parenchyma next to the sinus in
enhanced scans; without contrast only a sizeable water-HU cavity outside the parenchyma, a dilated
pelvis), cortex (the outer ~7 mm under the capsule, plus the bright class of an Otsu split in a
corticomedullary scan: columns of Bertin) and medulla (the rest of the parenchyma: the pyramids,
which face the sinus).

The compartment that moves with breathing is the body minus its wall: the outer 20 mm shell,
bone and 10 mm around it, and labelled back and psoas muscles; organs, kidneys and 10 mm
around the kidneys always move.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

from kidneyreg.errors import InputError
from kidneyreg.preprocess import (
    ENHANCED_PARENCHYMA_HU,
    PARENCHYMA_MIN_HU,
    SINUS_DEPTH_MM,
    SINUS_FAT_HU,
    SINUS_HU_RANGE,
    body_midline_x,
    convex_hull_mask,
    distance_inside,
)
from kidneyreg.simulate.anatomy import (
    SIDE_VALUES,
    SIDES,
    Anatomy,
    KidneyInfo,
    kidney_info_from_mask,
)
from kidneyreg.simulate.tissues import Tissue

__all__ = [
    "LABEL_SCHEMES",
    "TOTALSEGMENTATOR_V1_TISSUES",
    "anatomy_from_ct",
    "read_real_anatomy",
]

#: How a kidney label map is read: ``sided`` 1 right / 2 left kidney (the shared example's
#: ``kidneys.nii.gz``); ``kits`` 1 kidney, 2 tumour, 3 cyst, without sides (KiTS19/21);
#: ``totalsegmentator`` the TotalSegmentator v1 multi-organ map (2 right, 3 left kidney);
#: ``binary`` any nonzero voxel is kidney, one or both, sides found as for KiTS.
LABEL_SCHEMES = ("sided", "kits", "totalsegmentator", "binary")

_TS_KIDNEYS = {"right": 2, "left": 3}

#: TotalSegmentator v1 ("total" task) class values -> simulator tissue.
TOTALSEGMENTATOR_V1_TISSUES: dict[int, Tissue] = {
    1: Tissue.SPLEEN,
    4: Tissue.FLUID,  # gallbladder
    5: Tissue.LIVER,
    6: Tissue.BOWEL,  # stomach
    7: Tissue.ARTERY,  # aorta
    8: Tissue.VEIN,  # inferior vena cava
    9: Tissue.VEIN,  # portal and splenic vein
    10: Tissue.SOFT_TISSUE,  # pancreas
    11: Tissue.SOFT_TISSUE,  # right adrenal
    12: Tissue.SOFT_TISSUE,  # left adrenal
    **{v: Tissue.LUNG for v in range(13, 18)},  # lung lobes
    **{v: Tissue.BONE for v in range(18, 42)},  # vertebrae L5..C1
    42: Tissue.BOWEL,  # oesophagus
    43: Tissue.GAS,  # trachea
    **{v: Tissue.SOFT_TISSUE for v in range(44, 50)},  # heart chambers, pulmonary artery
    51: Tissue.ARTERY,  # iliac arteries
    52: Tissue.ARTERY,
    53: Tissue.VEIN,  # iliac veins
    54: Tissue.VEIN,
    55: Tissue.BOWEL,  # small bowel
    56: Tissue.BOWEL,  # duodenum
    57: Tissue.BOWEL,  # colon
    **{v: Tissue.BONE for v in range(58, 93)},  # ribs, humeri, scapulae, clavicles, femora,
    # hips, sacrum
    **{v: Tissue.MUSCLE for v in range(94, 104)},  # gluteal, autochthon, iliopsoas muscles
    104: Tissue.FLUID,  # urinary bladder
}

_AIR_HU = -500.0
_GAS_HU = -400.0
_FAT_HU = -30.0
_BRIGHT_HU = 200.0
_CORTICAL_HU = 600.0
_WALL_MM = 20.0
_BONE_NEIGHBOURHOOD_MM = 10.0
_CORTEX_MM = 7.0
#: Components of an unsided kidney mask smaller than this share of the largest are left out.
_MIN_COMPONENT_SHARE = 0.2


def _fail(source: str | Path | None, problem: str) -> InputError:
    return InputError(source, problem)


def _check_side(kidney: str, source: str | Path | None) -> None:
    if kidney not in SIDES:
        raise _fail(source, f"kidney must be 'right' or 'left', not {kidney!r}")


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    tol = 1e-3 * max(a.GetSpacing())
    return bool(
        np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, 1e-3))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
    )


def _kidney_masks(
    labels: NDArray[Any], scheme: str, ct: sitk.Image
) -> dict[str, NDArray[np.bool_]]:
    """Boolean masks (original grid) per side present in the label map."""
    if scheme == "sided":
        masks = {"right": labels == 1, "left": labels == 2}
    elif scheme == "totalsegmentator":
        masks = {side: labels == value for side, value in _TS_KIDNEYS.items()}
    else:
        masks = _split_unsided(labels > 0, ct)
    return {side: m for side, m in masks.items() if m.any()}


def _split_unsided(mask: NDArray[np.bool_], ct: sitk.Image) -> dict[str, NDArray[np.bool_]]:
    """Split a kidney mask without sides (KiTS, binary maps) by the body's midline.

    Every connected component of at least :data:`_MIN_COMPONENT_SHARE` of the largest one goes
    to the side of the midline its centroid lies on, so a kidney labelled in two pieces stays
    one kidney, and one kidney alone gets its side from its position.
    """
    components, n = ndimage.label(mask)
    if n == 0:
        return {}
    sizes = ndimage.sum_labels(mask, components, index=np.arange(1, n + 1))
    centroids = ndimage.center_of_mass(mask, components, index=np.arange(1, n + 1))
    midline = body_midline_x(ct)
    sides: dict[str, list[int]] = {"right": [], "left": []}
    for value, (size, centroid) in enumerate(zip(sizes, centroids, strict=True), start=1):
        if size < _MIN_COMPONENT_SHARE * sizes.max():
            continue
        # (z, y, x) array index -> world (LPS: larger x = the patient's left).
        world = ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in centroid[::-1]])
        sides["right" if world[0] < midline else "left"].append(value)
    return {side: np.isin(components, values) for side, values in sides.items() if values}


def _output_grid(ct: sitk.Image, spacing: float, z_range: tuple[float, float] | None) -> sitk.Image:
    """Identity-direction isotropic grid over the CT's physical bounding box."""
    size = np.asarray(ct.GetSize())
    corners = []
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                index = (np.array([i, j, k]) * (size - 1)).astype(float)
                corners.append(ct.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    pts = np.asarray(corners)
    half = np.abs(np.asarray(ct.GetDirection()).reshape(3, 3)) @ (np.asarray(ct.GetSpacing()) / 2)
    lo = pts.min(axis=0) - half
    hi = pts.max(axis=0) + half
    if z_range is not None:
        # Crop on the uncropped grid's voxel boundaries, so voxel centres stay where they were.
        lo[2] += max(0.0, np.floor((z_range[0] - lo[2]) / spacing) * spacing)
        hi[2] = min(hi[2], lo[2] + np.ceil((z_range[1] - lo[2]) / spacing) * spacing)
    n = np.maximum(1, np.floor((hi - lo) / spacing)).astype(int)
    ref = sitk.Image([int(v) for v in n], sitk.sitkUInt8)
    ref.SetSpacing((spacing,) * 3)
    ref.SetOrigin((lo + spacing / 2).tolist())
    return ref


def _resample(image: sitk.Image, ref: sitk.Image, interp: int, default: float, pixel: int) -> Any:
    out = sitk.Resample(image, ref, sitk.Transform(), interp, default, pixel)
    return sitk.GetArrayFromImage(out)


def _body_mask(hu: NDArray[np.float32], spacing: float) -> NDArray[np.bool_]:
    """The patient: largest object above -500 HU (table cut off), holes filled per slice."""
    solid = hu > _AIR_HU
    radius = max(1, round(2.0 / spacing))
    opened = ndimage.binary_opening(solid, iterations=radius)
    components, n = ndimage.label(opened)
    if n == 0:
        return np.zeros(hu.shape, bool)
    sizes = ndimage.sum_labels(opened, components, index=np.arange(1, n + 1))
    body = components == (int(np.argmax(sizes)) + 1)
    body = ndimage.binary_dilation(body, iterations=radius) & solid
    # Fill gas inside (bowel, lungs) slice by slice: the body is open at the top and bottom.
    return np.asarray(ndimage.binary_fill_holes(body, structure=np.ones((1, 3, 3), bool)))


def _bright_structures(
    hu: NDArray[np.float32], body: NDArray[np.bool_]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(bone, enhanced vessel) masks among the bright (> 200 HU) voxels of the body."""
    bright = body & (hu > _BRIGHT_HU)
    components, n = ndimage.label(bright)
    if n == 0:
        empty = np.zeros(hu.shape, bool)
        return empty, empty
    # A structure is bone when it holds cortical bone somewhere (light smoothing ignores noise).
    cortical = bright & (ndimage.uniform_filter(hu, size=2) > _CORTICAL_HU)
    is_bone = np.zeros(n + 1, bool)
    is_bone[np.unique(components[cortical])] = True
    is_bone[0] = False
    bone = is_bone[components]
    return bone, bright & ~bone


def _otsu(values: NDArray[np.float32]) -> float:
    """Otsu threshold of a 1D sample (256-bin histogram)."""
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def _split_kidney(
    organ: NDArray[np.bool_], hu: NDArray[np.float32], spacing: float, include_sinus: bool
) -> tuple[NDArray[np.bool_], NDArray[np.uint8], NDArray[np.bool_], dict[str, Any]]:
    """Inner structure of one kidney, on the kidney's bounding box.

    Depths are measured from the capsule, approximated by the kidney's convex hull: the
    parenchyma facing the sinus is medulla (the pyramids point there), not a second cortex.

    Returns:
        (whole organ, tissue labels, hilum region = hull minus label, statistics).
    """
    hull = convex_hull_mask(organ)
    capsule_depth = distance_inside(hull, spacing)
    deep = capsule_depth > SINUS_DEPTH_MM
    whole = organ
    if include_sinus:
        # The deep part of the hull outside the label is the hilum and sinus; fat or fluid
        # there belongs to the kidney (label maps often leave the sinus out).
        # preprocess.fill_renal_sinus adds the same voxels to a user's parenchyma-only mask.
        extra = hull & ~organ & deep & (hu > SINUS_HU_RANGE[0]) & (hu < SINUS_HU_RANGE[1])
        whole = organ | extra
    parenchyma = organ & (hu > PARENCHYMA_MIN_HU) & (distance_inside(organ, spacing) > spacing)
    median = float(np.median(hu[parenchyma])) if parenchyma.any() else 30.0
    enhanced = median > ENHANCED_PARENCHYMA_HU
    hilum = hull & ~organ
    # The sinus: fat deep in the kidney, and everything of the kidney outside the organ label
    # (fat, vessels and the collapsed collecting system, read between fat and water HU on thick
    # slices); on U/S it is the bright central echo complex.
    sinus = whole & deep & ((hu < SINUS_FAT_HU) | ~organ)
    collecting = np.zeros_like(organ)
    if enhanced:
        # Only contrast tells urine (and unenhanced vessels) from the mixture of sinus fat and
        # soft tissue: fluid clearly darker than the enhanced parenchyma, next to the sinus.
        near_sinus = ndimage.binary_dilation(sinus | hilum, iterations=max(1, round(6.0 / spacing)))
        fluid = (hu >= -20.0) & (hu < min(30.0, median - 40.0))
        collecting = whole & fluid & near_sinus & deep
    else:
        # Without contrast, urine reads like that mixture: only a sizeable cavity of water HU
        # outside the parenchyma (a dilated pelvis) is taken as collecting system.
        water = whole & deep & ~organ & (hu >= -5.0) & (hu < 25.0)
        collecting = ndimage.binary_opening(water, iterations=max(1, round(4.0 / spacing)))
    sinus &= ~collecting
    labels = np.zeros(organ.shape, np.uint8)
    labels[whole] = Tissue.MEDULLA
    cortex = organ & (capsule_depth < _CORTEX_MM)
    split = None
    if enhanced and parenchyma.sum() > 50:
        split = _otsu(hu[parenchyma])
        low = hu[parenchyma & (hu < split)]
        high = hu[parenchyma & (hu >= split)]
        if low.size and high.size and float(high.mean() - low.mean()) > 40.0:
            cortex |= organ & (hu >= split)
        else:
            split = None
    labels[cortex] = Tissue.CORTEX
    labels[sinus & ~cortex] = Tissue.SINUS_FAT
    labels[collecting & ~cortex] = Tissue.COLLECTING
    stats = {"parenchyma_median_hu": median, "enhanced": bool(enhanced), "otsu_hu": split}
    return whole, labels, hilum, stats


def anatomy_from_ct(
    ct: sitk.Image,
    labels: sitk.Image,
    *,
    kidney: str,
    organs: sitk.Image | None = None,
    organ_labels: Mapping[int, Tissue] | None = None,
    scheme: str = "sided",
    spacing: float = 1.5,
    si_margin_mm: float | None = 150.0,
    include_sinus: bool = False,
    source: str | None = None,
    labels_source: str | None = None,
) -> Anatomy:
    """Build a simulator :class:`~kidneyreg.simulate.anatomy.Anatomy` from a real CT.

    Args:
        ct: CT in HU (any orientation; resampled to identity direction).
        labels: Kidney label map on the CT's grid, read as ``scheme`` says.
        kidney: The kidney to be scanned (``"right"`` or ``"left"``); it must be labelled.
            The other kidney is included when labelled.
        organs: Optional multi-organ label map on the CT's grid (kidneys in it are ignored).
            With ``scheme="totalsegmentator"`` the ``labels`` map itself serves as ``organs``.
        organ_labels: Organ label value -> tissue; defaults to
            :data:`TOTALSEGMENTATOR_V1_TISSUES`.
        scheme: One of :data:`LABEL_SCHEMES`.
        spacing: Isotropic voxel size of the result (mm).
        si_margin_mm: Keep this much CT above and below the kidneys (None keeps everything).
        include_sinus: Add the fat and fluid deep in the hilum (inside the kidney's convex hull
            but outside its label) to the kidney, as renal sinus. Off by default so that the
            kidney mask stays the given label; on, the shared example's kidneys grow by ~15 %.
        source: Name of the CT for messages and ``Anatomy.source``.
        labels_source: Name of the label map for messages.

    Returns:
        The anatomy (``seed`` None, ``source`` the CT's name); ``metadata`` holds the label
        scheme and per-kidney HU statistics.

    Raises:
        InputError: Wrong side, label grid differing from the CT's, requested kidney absent,
            an image that is not 3D.
        ValueError: Unknown scheme or non-positive spacing (programming errors).

    Example:
        >>> anatomy = anatomy_from_ct(ct, kidneys, kidney="right")  # doctest: +SKIP
        >>> anatomy.kidneys["right"].length  # doctest: +SKIP
        117.0
    """
    ct_name = source or "CT"
    lab_name = labels_source or "labels"
    _check_side(kidney, lab_name)
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; expected one of {LABEL_SCHEMES}")
    if not (spacing > 0 and np.isfinite(spacing)):
        raise ValueError(f"spacing must be a positive number of mm, got {spacing!r}")
    for image, name in ((ct, ct_name), (labels, lab_name)):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise _fail(name, "expected a 3D single-channel image")
    if not _same_grid(ct, labels):
        raise _fail(lab_name, f"grid differs from the CT's ({labels.GetSize()} vs {ct.GetSize()})")
    if scheme == "totalsegmentator" and organs is None:
        organs = labels
    if organs is not None and not _same_grid(ct, organs):
        raise _fail("organ labels", "grid differs from the CT's")

    label_array = sitk.GetArrayFromImage(labels)
    masks = _kidney_masks(label_array, scheme, ct)
    if kidney not in masks:
        raise _fail(lab_name, f"no {kidney} kidney label")

    # Grid: identity direction, isotropic, cropped along S-I around the kidneys.
    ref0 = _output_grid(ct, spacing, None)
    z_range = None
    if si_margin_mm is not None:
        zs = []
        for m in masks.values():
            idx = np.argwhere(m)
            for row in (idx.min(axis=0), idx.max(axis=0)):
                point = ct.TransformIndexToPhysicalPoint([int(v) for v in row[::-1]])
                zs.append(point[2])
        z_range = (min(zs) - si_margin_mm, max(zs) + si_margin_mm)
    ref = _output_grid(ct, spacing, z_range) if z_range is not None else ref0

    hu = _resample(ct, ref, sitk.sitkLinear, -1024.0, sitk.sitkFloat32).astype(np.float32)
    kidney_masks: dict[str, NDArray[np.bool_]] = {}
    for side, m in masks.items():
        image = sitk.GetImageFromArray(m.astype(np.float32))
        image.CopyInformation(labels)
        kidney_masks[side] = _resample(image, ref, sitk.sitkLinear, 0.0, sitk.sitkFloat32) > 0.5
    organ_array = None
    if organs is not None:
        organ_array = _resample(organs, ref, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)

    out = _label_tissues(hu, spacing, organ_array, organ_labels, scheme)
    tissue, comp = out

    side_array = np.zeros(hu.shape, np.uint8)
    origin = np.asarray(ref.GetOrigin())
    kidneys: dict[str, KidneyInfo] = {}
    stats: dict[str, Any] = {}
    for side, mask in kidney_masks.items():
        if not mask.any():
            if side == kidney:
                raise _fail(lab_name, f"no {kidney} kidney label left after resampling")
            continue
        box = _bbox(mask, pad=max(2, round(12.0 / spacing)))
        whole, sub_labels, hilum, kstats = _split_kidney(mask[box], hu[box], spacing, include_sinus)
        region = tissue[box]
        region[whole] = sub_labels[whole]
        side_array[box][whole] = SIDE_VALUES[side]
        # The kidney and the fat around it move with breathing.
        near = ndimage.binary_dilation(whole, iterations=max(1, round(10.0 / spacing)))
        comp[box][near & (region != Tissue.BONE) & (region != Tissue.AIR)] = 1
        full = np.zeros(hu.shape, bool)
        full[box] = whole
        hilum_point = None
        if hilum.any():
            hidx = np.argwhere(hilum).mean(axis=0) + np.array([s.start for s in box])
            hilum_point = origin + hidx[::-1] * spacing
        kidneys[side] = kidney_info_from_mask(full, origin, spacing, side, hilum_point=hilum_point)
        stats[side] = kstats

    images = []
    for array in (tissue, side_array, comp):
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        image.SetOrigin(ref.GetOrigin())
        image.SetSpacing((spacing,) * 3)
        images.append(image)
    metadata = {
        "label_scheme": scheme,
        "organ_labels": organs is not None,
        "kidney": kidney,
        "include_sinus": include_sinus,
        "original_spacing": [float(v) for v in ct.GetSpacing()],
        "kidney_hu": stats,
    }
    return Anatomy(
        labels=images[0],
        kidney_side=images[1],
        compartment=images[2],
        kidneys=kidneys,
        seed=None,
        source=ct_name,
        metadata=metadata,
    )


def _bbox(mask: NDArray[np.bool_], pad: int) -> tuple[slice, slice, slice]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, mask.shape)
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))


def _label_tissues(
    hu: NDArray[np.float32],
    spacing: float,
    organs: NDArray[Any] | None,
    organ_labels: Mapping[int, Tissue] | None,
    scheme: str,
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Tissue labels and compartment of everything but the kidneys."""
    body = _body_mask(hu, spacing)
    tissue = np.full(hu.shape, np.uint8(Tissue.AIR))
    soft = body & (hu >= _FAT_HU)
    tissue[body & (hu < _FAT_HU)] = Tissue.FAT
    tissue[soft] = Tissue.SOFT_TISSUE
    gas = body & (hu < _GAS_HU)
    tissue[gas] = Tissue.GAS
    bone, vessel = _bright_structures(hu, body)
    tissue[vessel] = Tissue.ARTERY
    tissue[bone] = Tissue.BONE

    mapping = dict(organ_labels) if organ_labels is not None else TOTALSEGMENTATOR_V1_TISSUES
    lung_from_organs = False
    wall_muscle = np.zeros(hu.shape, bool)
    visceral = np.zeros(hu.shape, bool)
    if organs is not None:
        for value, t in mapping.items():
            m = organs == value
            if not m.any():
                continue
            m &= body
            if t == Tissue.LUNG:
                lung_from_organs = True
                tissue[m & (hu < -200.0)] = Tissue.LUNG
            elif t in (Tissue.BOWEL, Tissue.GAS):
                tissue[m & (hu >= _GAS_HU)] = t
                tissue[m & (hu < _GAS_HU)] = Tissue.GAS
            elif t == Tissue.MUSCLE:
                # Intramuscular fat stays fat.
                tissue[m & (hu >= _FAT_HU)] = Tissue.MUSCLE
            else:
                tissue[m] = t
            if t in (Tissue.MUSCLE, Tissue.BONE):
                wall_muscle |= m
            else:
                visceral |= m
    if not lung_from_organs:
        _lungs_from_gas(tissue, gas, spacing)

    # Body wall: the outer shell, bone and its surroundings, labelled wall muscles.
    depth = distance_inside(body, spacing)
    bone_img = sitk.GetImageFromArray(bone.astype(np.uint8))
    bone_img.SetSpacing((spacing,) * 3)
    near_bone = np.zeros(hu.shape, bool)
    if bone.any():
        bone_dist = sitk.GetArrayFromImage(
            sitk.SignedMaurerDistanceMap(
                bone_img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
            )
        )
        near_bone = bone_dist < _BONE_NEIGHBOURHOOD_MM
    wall = body & ((depth < _WALL_MM) | near_bone | wall_muscle)
    comp = (body & ~wall).astype(np.uint8)
    comp[visceral & (tissue != Tissue.BONE)] = 1
    comp[tissue == Tissue.BONE] = 0
    comp[tissue == Tissue.LUNG] = 1
    # Soft tissue of the wall is muscle.
    tissue[(tissue == Tissue.SOFT_TISSUE) & (comp == 0)] = Tissue.MUSCLE
    return tissue, comp


def _lungs_from_gas(tissue: NDArray[np.uint8], gas: NDArray[np.bool_], spacing: float) -> None:
    """Without organ labels: large gas volumes reaching the top of the field of view are lung."""
    components, n = ndimage.label(gas)
    if n == 0:
        return
    voxel_ml = spacing**3 / 1000.0
    sizes = ndimage.sum_labels(gas, components, index=np.arange(1, n + 1)) * voxel_ml
    top = components.shape[0] - 1
    top_labels = set(np.unique(components[top][components[top] > 0]).tolist())
    for value in range(1, n + 1):
        if sizes[value - 1] > 50.0 and value in top_labels:
            tissue[components == value] = Tissue.LUNG


def _read(path: Path, what: str) -> sitk.Image:
    if not path.exists():
        raise _fail(path, f"{what} not found")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise _fail(path, f"no {what} image or DICOM series in this folder")
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise _fail(path, f"cannot read {what} ({first[:120]})") from exc


def _guess_scheme(labels_path: Path, labels: sitk.Image) -> str:
    if labels_path.name.lower().startswith("segmentation"):
        return "kits"
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    if values.max() > 3:
        return "totalsegmentator"
    # One value only (a binary mask, e.g. TotalSegmentator's kidney_left.nii.gz or both
    # kidneys in one mask): read 1 as "right" and a left kidney or both kidneys end on one side.
    return "binary" if set(values.tolist()) <= {0, 1} else "sided"


def read_real_anatomy(
    ct_path: str | Path,
    labels_path: str | Path | None = None,
    kidney: str = "right",
    *,
    organs_path: str | Path | None = None,
    find_organs: bool = True,
    scheme: str = "auto",
    spacing: float = 1.5,
    si_margin_mm: float | None = 150.0,
    include_sinus: bool = False,
) -> tuple[sitk.Image, Anatomy]:
    """Read a real CT with kidney labels and build its anatomy.

    Accepted layouts:

    * a folder with ``ct.nii.gz`` and ``kidneys.nii.gz`` (1 right, 2 left) and optionally
      ``organs.nii.gz`` (TotalSegmentator v1 classes) -- the shared example;
    * a KiTS19/21 case folder with ``imaging.nii.gz`` and ``segmentation.nii.gz`` (1 kidney,
      2 tumour, 3 cyst; sides found by connected components);
    * explicit files (any SimpleITK format, or a DICOM series folder for the CT); the label
      scheme is guessed from the labels (``segmentation*`` -> KiTS, values above 3 ->
      TotalSegmentator multi-organ, 1 the only value -> binary, one or both kidneys, sides
      by position; else 1 right / 2 left). An ``organs.nii.gz`` beside the
      labels is used when ``find_organs`` is set.

    Args:
        ct_path: CT file, or a case folder as above.
        labels_path: Kidney label file (None: taken from the folder).
        kidney: ``"right"`` or ``"left"``.
        organs_path: Multi-organ label map (TotalSegmentator v1 values).
        find_organs: Look for ``organs.nii.gz`` beside the labels when ``organs_path`` is None.
        scheme: ``"auto"`` or one of :data:`LABEL_SCHEMES`.
        spacing: Isotropic voxel size of the result (mm).
        si_margin_mm: CT kept above and below the kidneys (None: all).
        include_sinus: See :func:`anatomy_from_ct`.

    Returns:
        (CT in HU resampled on the anatomy's grid as float32, the anatomy).

    Raises:
        InputError: Missing or unreadable files, unknown layout, bad side, grids that differ,
            the requested kidney not labelled.

    Example:
        >>> ct, anatomy = read_real_anatomy("../shared/data/totalsegmentator-example",
        ...                                 kidney="left")  # doctest: +SKIP
    """
    ct_path = Path(ct_path)
    _check_side(kidney, labels_path or ct_path)
    if scheme != "auto" and scheme not in LABEL_SCHEMES:
        raise _fail(
            str(scheme), f"unknown label scheme; expected auto or {', '.join(LABEL_SCHEMES)}"
        )
    if ct_path.is_dir() and labels_path is None:
        if (ct_path / "imaging.nii.gz").exists():
            labels_path = ct_path / "segmentation.nii.gz"
            ct_path = ct_path / "imaging.nii.gz"
            scheme = "kits" if scheme == "auto" else scheme
        elif (ct_path / "ct.nii.gz").exists():
            labels_path = ct_path / "kidneys.nii.gz"
            ct_path = ct_path / "ct.nii.gz"
        else:
            raise _fail(
                ct_path,
                "no case found (expected imaging.nii.gz + segmentation.nii.gz, or ct.nii.gz "
                "+ kidneys.nii.gz)",
            )
    if labels_path is None:
        raise _fail(ct_path, "a kidney label map is needed (labels_path)")
    labels_path = Path(labels_path)
    ct = _read(ct_path, "CT")
    labels = _read(labels_path, "kidney labels")
    if scheme == "auto":
        scheme = _guess_scheme(labels_path, labels)
    organs = None
    if organs_path is None and find_organs and scheme != "totalsegmentator":
        candidate = labels_path.parent / "organs.nii.gz"
        if candidate.exists() and candidate != labels_path:
            organs_path = candidate
    if organs_path is not None:
        organs = _read(Path(organs_path), "organ labels")
    if ct.GetDimension() == 3 and labels.GetDimension() == 3 and not _same_grid(ct, labels):
        # Labels written with float rounding in the header: accept tiny differences only.
        raise _fail(
            labels_path, f"grid differs from the CT's ({labels.GetSize()} vs {ct.GetSize()})"
        )
    anatomy = anatomy_from_ct(
        sitk.Cast(ct, sitk.sitkFloat32),
        labels,
        kidney=kidney,
        organs=organs,
        scheme=scheme,
        spacing=spacing,
        si_margin_mm=si_margin_mm,
        include_sinus=include_sinus,
        source=str(ct_path),
        labels_source=str(labels_path),
    )
    ref = sitk.Image(anatomy.labels.GetSize(), sitk.sitkFloat32)
    ref.CopyInformation(anatomy.labels)
    ct_out = sitk.Resample(
        sitk.Cast(ct, sitk.sitkFloat32),
        ref,
        sitk.Transform(),
        sitk.sitkLinear,
        -1024.0,
        sitk.sitkFloat32,
    )
    return ct_out, anatomy

"""Simulated cases: one patient, one probe placement, one breathing U/S sequence, exact truth.

:func:`simulate_case_data` builds a case in memory; :func:`write_case` writes it as a case folder
exactly as DESIGN.md section 2 says, plus the simulator's extras::

    <case>/ct.nii.gz               CT in HU (int16)
    <case>/ct_kidney_mask.nii.gz   same grid, 1 = the scanned kidney
    <case>/us.nii.gz               B-mode sequence, uint8, (lateral, depth, frame), origin 0
    <case>/us_kidney_mask.nii.gz   same grid as us, 1 = kidney
    <case>/ground_truth.json       true M_k (U/S image mm -> CT world LPS mm) per frame
    <case>/init.json               coarse initial pose for ``register --init`` (one frame for all)
    <case>/labels.nii.gz           the tissue label map the images were rendered from
    <case>/us_labels.nii.gz        the tissue label each U/S pixel shows (same grid as us)
    <case>/breathing.json          breathing signal, displacements, cycle starts, frame rate
    <case>/case.json               seed, group, approach, sampled offset, probe, profile, phase,
                                   version
    <case>/preview.png             CT planes with the U/S plane, U/S frames with the kidney

A case folder is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written case, and an existing case is only replaced once the new one is complete.

The true pose of frame ``k`` is ``M_k = inverse(B_k) @ M_probe``: ``M_probe`` is where the probe
images at end-expiration (the CT's breath-hold state), ``B_k`` the kidney's breathing
displacement in CT world. The kidney mask of frame ``k`` is the written CT kidney mask resampled
with ``M_k`` (nearest neighbour), inside the fan.

Approach. ``approach`` picks the nominal view the group offset acts on
(:func:`~kidneyreg.simulate.probe.approach_rotation`): ``"sagittal"`` (the default pose; the
probe on the anterior abdomen) or ``"flank"`` (the probe on the posterolateral flank, a
coronal-oblique longitudinal view). ``init.json`` is the nominal view without the group offset:
``inverse(O) @ M_probe`` with ``O`` the offset (:meth:`~kidneyreg.simulate.probe.ProbeOffset.matrix`
about the kidney centroid), i.e. where the tracked probe would image before the sonographer's fine
adjustment. Its rotation is exactly the approach's nominal rotation, and the true end-expiration
pose is ``O @ init``: the initial pose is off by the case's sampled offset (group A about 10
degrees, B about 25 degrees, a few mm), what ``register --init`` is meant to correct.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from kidneyreg import __version__
from kidneyreg.errors import InputError
from kidneyreg.geometry import invert_rigid, make_rigid, resample_on_frame, resample_on_frames
from kidneyreg.io.atomic import atomic_path, atomic_write_text
from kidneyreg.io.image import write_image, write_mask
from kidneyreg.io.transforms import write_transforms_json
from kidneyreg.io.us import UltrasoundSequence, write_us_sequence
from kidneyreg.profiles import Profile, get_profile
from kidneyreg.simulate.anatomy import Anatomy, generate_anatomy
from kidneyreg.simulate.breathing import BreathingMotion, RandomBreathing
from kidneyreg.simulate.ct import render_ct
from kidneyreg.simulate.probe import (
    APPROACHES,
    ProbePlacement,
    RandomProbeGeometry,
    RandomProbeOffset,
    approach_rotation,
    place_probe_in_window,
)
from kidneyreg.simulate.real_anatomy import read_real_anatomy
from kidneyreg.simulate.tissues import PHASES, sinus_labels
from kidneyreg.simulate.ultrasound import RandomAcoustics, UltrasoundRenderer

__all__ = [
    "MIN_VISIBLE_KIDNEY",
    "SIMULATOR_VERSION",
    "PoorAcousticWindowWarning",
    "SimulatedCase",
    "case_seed",
    "check_options",
    "simulate_case",
    "simulate_case_data",
    "simulate_cohort",
    "sinus_mask_array",
    "sinus_mask_image",
    "write_case",
]

#: Version of the simulator's output; bump when the same seed would give different images.
SIMULATOR_VERSION = "1.1"

GROUPS = ("A", "B", "mixed")
KIDNEYS = ("right", "left")

# Candidate views tried when looking for an acoustic window (see place_probe_in_window): in
# batches, until most of the kidney is unshadowed.
_N_CANDIDATES = 48
_CANDIDATE_BATCH = 16
_LATERAL_SHIFT_MM = 20.0
#: Below this visible fraction of the kidney (unshadowed by bone, gas and lung) in the best
#: candidate view, a sonographer would not record the scan: the case is still written (it was
#: asked for), with a :class:`PoorAcousticWindowWarning`. The anterior view of the left kidney of
#: the real CT in ``../shared/data`` can show as little as 17 % of it behind bowel gas, while
#: its flank view shows 77-97 %; none of the ~500 other cases simulated so far fell below 0.42.
MIN_VISIBLE_KIDNEY = 0.5
# Probability of scanning the right kidney in a "mixed" cohort (the liver is its window).
_P_RIGHT_MIXED = 0.75
# A CT must hold at least this fraction of the fan for the simulation to make sense.
_MIN_FAN_INSIDE = 0.7
# Anatomy grid spacing (mm) per profile: finer than the U/S pixel is wasted on the label map.
_ANATOMY_SPACING = {"paper": 1.0, "cpu": 1.6, "tiny": 3.2}
# Preview frames: fractions of the first breathing cycle.
_PREVIEW_PHASES = (0.0, 0.2, 0.4, 0.6, 0.8)

# Independent random streams of one case, derived from its seed.
_STREAM_PROBE, _STREAM_BREATHING, _STREAM_ACOUSTICS, _STREAM_SIDE = 11, 12, 13, 14


class PoorAcousticWindowWarning(UserWarning):
    """The best view found shows less than :data:`MIN_VISIBLE_KIDNEY` of the kidney unshadowed."""


def _anatomy_spacing(profile: Profile) -> float:
    return _ANATOMY_SPACING.get(profile.name, max(1.0, profile.spacing))


def case_seed(cohort_seed: int, index: int) -> int:
    """The seed of case ``index`` of a cohort (a pure function of both numbers).

    Example:
        >>> case_seed(0, 1) == case_seed(0, 1) != case_seed(0, 2)
        True
    """
    state = np.random.SeedSequence([int(cohort_seed), int(index)]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


@dataclass
class SimulatedCase:
    """A simulated case in memory (what :func:`write_case` writes).

    Attributes:
        ct: CT in HU.
        ct_kidney_mask: uint8 mask of the scanned kidney on the CT grid.
        labels: Tissue label map.
        frames: uint8 B-mode frames ``(n, rows, cols)``.
        us_kidney_mask: uint8 kidney masks ``(n, rows, cols)``.
        us_labels: uint8 tissue labels each pixel shows ``(n, rows, cols)`` (0 outside the fan).
        matrices: True poses ``M_k`` ``(n, 4, 4)``.
        pixel_size: U/S pixel size (mm).
        frame_rate: Frames per second.
        breathing: The breathing record written to ``breathing.json``.
        initial_pose: The coarse initial pose written to ``init.json`` (4x4, the approach's
            nominal view without the group offset; see the module docstring).
        info: The description written to ``case.json``.
    """

    ct: sitk.Image
    ct_kidney_mask: sitk.Image
    labels: sitk.Image
    frames: NDArray[np.uint8]
    us_kidney_mask: NDArray[np.uint8]
    us_labels: NDArray[np.uint8]
    matrices: NDArray[np.float64]
    pixel_size: float
    frame_rate: float
    breathing: dict[str, Any]
    initial_pose: NDArray[np.float64]
    info: dict[str, Any] = field(default_factory=dict)

    def sinus_masks(self) -> tuple[sitk.Image, NDArray[np.uint8]]:
        """Renal-sinus masks from the label maps: the CT's (both kidneys) and the U/S frames'.

        Example:
            >>> case = simulate_case_data(0, profile="tiny")  # doctest: +SKIP
            >>> ct_sinus, us_sinus = case.sinus_masks()  # doctest: +SKIP
        """
        return sinus_mask_image(self.labels), sinus_mask_array(self.us_labels)


def sinus_mask_array(labels: NDArray[np.integer]) -> NDArray[np.uint8]:
    """uint8 mask of the renal-sinus labels (:func:`~kidneyreg.simulate.tissues.sinus_labels`)."""
    return np.isin(labels, sinus_labels()).astype(np.uint8)


def sinus_mask_image(labels: sitk.Image) -> sitk.Image:
    """uint8 renal-sinus mask of a label map (a CT's or a U/S sequence's), on its grid.

    The renal sinus (sinus fat and collecting system) is the second structure the plane search
    scores; the simulator's label maps give it exactly.

    Example:
        >>> labels = sitk.GetImageFromArray(np.array([[[0, 11, 12, 9]]], np.uint8))
        >>> sitk.GetArrayFromImage(sinus_mask_image(labels)).tolist()
        [[[0, 1, 1, 0]]]
    """
    mask = sitk.GetImageFromArray(sinus_mask_array(sitk.GetArrayViewFromImage(labels)))
    mask.CopyInformation(labels)
    return mask


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise InputError(what, f"must be one of {', '.join(allowed)}, got {value!r}")


def _load_anatomy(
    seed: int,
    profile: Profile,
    phase: str,
    from_ct: str | Path | None,
    labels: str | Path | None,
    kidney: str,
) -> tuple[sitk.Image, Anatomy, str]:
    """The CT and anatomy of a case (procedural or real) and a name for messages."""
    spacing = _anatomy_spacing(profile)
    if from_ct is None:
        anatomy = generate_anatomy(seed, spacing=spacing)
        output_spacing = None if profile.name != "paper" else (0.8, 0.8, 2.0)
        ct = render_ct(anatomy, phase=phase, seed=seed, output_spacing=output_spacing)
        return ct, anatomy, "procedural anatomy"
    # Keep the whole CT along S-I: the fan reaches ~12 cm above and below the kidney. The sinus
    # joins the kidney as in the procedural anatomy: the U/S kidney outline is the capsule, and
    # the sinus must render as the bright central echo complex, not as perirenal fat.
    ct, anatomy = read_real_anatomy(
        from_ct, labels, kidney, spacing=max(spacing, 1.0), si_margin_mm=None, include_sinus=True
    )
    return ct, anatomy, str(labels if labels is not None else from_ct)


def _kidney_points(anatomy: Anatomy, side: str) -> NDArray[np.float64]:
    mask = sitk.GetArrayFromImage(anatomy.kidney_mask(side))
    kz, ky, kx = np.nonzero(mask)
    index = np.stack([kx, ky, kz], axis=1).astype(np.float64)
    origin = np.asarray(anatomy.labels.GetOrigin())
    direction = np.asarray(anatomy.labels.GetDirection()).reshape(3, 3)
    spacing = np.asarray(anatomy.labels.GetSpacing())
    return origin + (index * spacing) @ direction.T


def _mask_on_grid(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    if (
        mask.GetSize() == reference.GetSize()
        and np.allclose(mask.GetSpacing(), reference.GetSpacing())
        and np.allclose(mask.GetOrigin(), reference.GetOrigin())
        and np.allclose(mask.GetDirection(), reference.GetDirection())
    ):
        out = sitk.Cast(mask, sitk.sitkUInt8)
        out.CopyInformation(reference)
        return out
    return sitk.Resample(
        mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )


def _hu_int16(ct: sitk.Image) -> sitk.Image:
    array = np.clip(np.rint(sitk.GetArrayViewFromImage(ct)), -1024, 3071).astype(np.int16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(ct)
    return out


def _ct_support(ct: sitk.Image) -> sitk.Image:
    """Ones on the CT's grid: what lies inside the CT, for :func:`_fan_inside_fraction`."""
    ones = sitk.Image(ct.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(ct)
    return ones


def _fan_inside_fraction(
    support: sitk.Image, placement: ProbePlacement, fan: NDArray[np.bool_]
) -> float:
    """Fraction of the fan's pixels inside the CT's grid at end-expiration.

    ``support`` is :func:`_ct_support` of the CT, built once for all candidate views.
    """
    geo = placement.geometry
    inside = resample_on_frames(
        support,
        placement.matrix[None],
        geo.frame_shape,
        (geo.pixel_size, geo.pixel_size),
        interpolator="nearest",
        default_value=0,
    )[0]
    return float(inside[fan].mean()) if fan.any() else 0.0


def check_options(
    *,
    frames: int | None = None,
    group: str = "mixed",
    profile: str | Profile = "cpu",
    phase: str = "corticomedullary",
    from_ct: str | Path | None = None,
    labels: str | Path | None = None,
    kidney: str | None = None,
    approach: str = "sagittal",
) -> Profile:
    """Validate simulation options before any work; returns the profile.

    Raises:
        InputError: One line naming the bad option.

    Example:
        >>> check_options(group="A", profile="tiny").name
        'tiny'
    """
    _check_choice(group, GROUPS, "--group")
    _check_choice(phase, PHASES, "--phase")
    _check_choice(approach, APPROACHES, "--approach")
    try:
        prof = get_profile(profile)
    except ValueError as error:
        raise InputError("--profile", str(error)) from None
    if frames is not None and frames < 1:
        raise InputError("--frames", f"must be at least 1, got {frames}")
    if from_ct is None and labels is not None:
        raise InputError("--labels", "only used with --from-ct")
    if from_ct is not None and not Path(from_ct).exists():
        raise InputError(from_ct, "not found")
    if labels is not None and not Path(labels).exists():
        raise InputError(labels, "not found")
    if kidney is not None:
        _check_choice(kidney, KIDNEYS, "--kidney")
    return prof


def simulate_case_data(
    seed: int,
    *,
    frames: int | None = None,
    group: str = "mixed",
    profile: str | Profile = "cpu",
    phase: str = "corticomedullary",
    from_ct: str | Path | None = None,
    labels: str | Path | None = None,
    kidney: str | None = None,
    approach: str = "sagittal",
) -> SimulatedCase:
    """Simulate one case in memory.

    Args:
        seed: Case seed; the same seed gives identical arrays and matrices.
        frames: Number of U/S frames (None: two full breathing cycles plus one frame).
        group: Pose-offset group ``"A"``, ``"B"`` or ``"mixed"`` (either, by seed).
        profile: Resolution profile (U/S pixel size, anatomy grid).
        phase: CT contrast phase (procedural anatomy only).
        from_ct: A real CT (file or case folder) instead of the procedural anatomy.
        labels: Its kidney label map (see
            :func:`~kidneyreg.simulate.real_anatomy.read_real_anatomy`).
        kidney: ``"right"`` or ``"left"``; None: right, or by seed (75 % right) for ``"mixed"``.
        approach: Probe approach, ``"sagittal"`` or ``"flank"`` (see the module docstring).

    Raises:
        InputError: Bad group, profile, phase, kidney, approach or frame count; a label map
            without the requested kidney; a CT too small to hold the probe's field of view.

    Example:
        >>> case = simulate_case_data(3, frames=4, profile="tiny")  # doctest: +SKIP
        >>> case.frames.shape[0]  # doctest: +SKIP
        4
    """
    started = time.perf_counter()
    prof = check_options(
        frames=frames,
        group=group,
        profile=profile,
        phase=phase,
        from_ct=from_ct,
        labels=labels,
        kidney=kidney,
        approach=approach,
    )
    if kidney is None:
        side_rng = np.random.default_rng([seed, _STREAM_SIDE])
        right = group != "mixed" or from_ct is not None or side_rng.uniform() < _P_RIGHT_MIXED
        kidney = "right" if right else "left"
    _check_choice(kidney, KIDNEYS, "--kidney")

    ct, anatomy, source = _load_anatomy(seed, prof, phase, from_ct, labels, kidney)
    timings = {"anatomy_and_ct_s": time.perf_counter() - started}
    if kidney not in anatomy.kidneys:
        raise InputError(source, f"the label map has no {kidney} kidney")
    info_kidney = anatomy.kidneys[kidney]
    centre = np.asarray(info_kidney.centroid_world, dtype=np.float64)
    points = _kidney_points(anatomy, kidney)

    # Probe: group offset about the approach's nominal view, curvilinear geometry, placement in
    # an acoustic window.
    base_rotation = approach_rotation(approach, kidney)
    rng = np.random.default_rng([seed, _STREAM_PROBE])
    offsets = RandomProbeOffset(group).sample_candidates(rng, _N_CANDIDATES)  # type: ignore[arg-type]
    geometry = RandomProbeGeometry().sample(rng, pixel_size=prof.spacing)
    shifts = rng.uniform(-_LATERAL_SHIFT_MM, _LATERAL_SHIFT_MM, len(offsets))

    support = _ct_support(ct)

    def outside_ct(candidate: ProbePlacement) -> str | None:
        # A view whose fan leaves the CT would image made-up tissue: another view is chosen.
        fan = candidate.geometry.fan_mask().astype(bool)
        inside = _fan_inside_fraction(support, candidate, fan)
        if inside >= _MIN_FAN_INSIDE:
            return None
        return (
            f"CT too small to hold the probe's field of view (only {100 * inside:.0f} % of the "
            "fan lies inside the CT)"
        )

    placement, offset, visible = place_probe_in_window(
        anatomy.labels,
        points,
        centre,
        [(o, float(s)) for o, s in zip(offsets, shifts, strict=True)],
        geometry,
        batch=_CANDIDATE_BATCH,
        base_rotation=base_rotation,
        source=source,
        reject=outside_ct,
    )
    if visible < MIN_VISIBLE_KIDNEY:
        hint = " (try --approach flank)" if approach == "sagittal" else ""
        warnings.warn(
            f"{source}: seed {seed}: only {100 * visible:.0f} % of the {kidney} kidney is free of "
            f"bone, gas and lung shadows in the best of {_N_CANDIDATES} {approach} views; a "
            f"sonographer would not record this scan{hint}",
            PoorAcousticWindowWarning,
            stacklevel=2,
        )
    # The nominal view without the group offset, where the probe images at end-expiration. Its
    # rotation is the nominal one up to rounding: set it exactly, so every case of an approach
    # shares one initial rotation.
    initial_pose = make_rigid(
        base_rotation, (invert_rigid(offset.matrix(centre)) @ placement.matrix)[:3, 3]
    )
    geo = placement.geometry
    fan = geo.fan_mask().astype(bool)

    timings["probe_s"] = time.perf_counter() - started - sum(timings.values())
    # Breathing.
    motion = BreathingMotion(
        RandomBreathing().sample(np.random.default_rng([seed, _STREAM_BREATHING]), centre=centre)
    )
    n_frames = frames if frames is not None else motion.frames_for_cycles(2)
    times = motion.frame_times(n_frames)
    displacements = motion.displacements(times)
    matrices = np.stack([invert_rigid(b) @ placement.matrix for b in displacements])

    # Images.
    mark = time.perf_counter()
    acoustics = RandomAcoustics().sample(np.random.default_rng([seed, _STREAM_ACOUSTICS]))
    renderer = UltrasoundRenderer(
        anatomy.labels, geo, placement.matrix, acoustics, compartment=anatomy.compartment
    )
    us = renderer.render(matrices)
    timings["render_s"] = time.perf_counter() - mark
    us_labels = renderer.tissue_frames(matrices)
    ct_mask = _mask_on_grid(anatomy.kidney_mask(kidney), ct)
    pixel = (geo.pixel_size, geo.pixel_size)
    us_mask = resample_on_frames(
        ct_mask, matrices, geo.frame_shape, pixel, interpolator="nearest", default_value=0
    ).astype(np.uint8)
    us_mask *= fan[None].astype(np.uint8)
    in_view = us_mask.reshape(n_frames, -1).any(axis=1)
    if not in_view.any():
        raise InputError(source, "the kidney is not in the probe's view")

    cycle_starts = motion.cycle_starts(n_frames)
    signal = motion.signal(times)
    breathing = {
        "frame_rate": motion.params.frame_rate,
        "n_frames": n_frames,
        "cycle_starts": cycle_starts,
        "times_s": times.tolist(),
        "signal": signal.tolist(),
        "displacements": displacements.tolist(),
        "translations_mm": motion.translations(times).tolist(),
        "parameters": motion.params.to_dict(),
        "convention": "B_k maps a CT (end-expiration) point of the kidney to its position at "
        "frame k, CT world LPS mm; M_k = inverse(B_k) @ M_probe",
    }
    info: dict[str, Any] = {
        "simulator_version": SIMULATOR_VERSION,
        "kidneyreg_version": __version__,
        "seed": int(seed),
        "group": offset.group,
        "group_requested": group,
        "approach": approach,
        "nominal_rotation": base_rotation.tolist(),
        "offset": offset.to_dict(),
        "kidney": kidney,
        "kidney_info": info_kidney.to_dict(),
        "profile": prof.name,
        "pixel_size_mm": geo.pixel_size,
        "phase": phase if from_ct is None else "real CT",
        "anatomy_source": anatomy.source,
        "anatomy_seed": anatomy.seed,
        "probe": placement.to_dict(),
        "default_pose_through_centroid": "u -> superior, v -> posterior, origin chosen so the "
        "kidney centroid is on the fan axis",
        "visible_kidney_fraction": visible,
        "fan_inside_ct_fraction": _fan_inside_fraction(support, placement, fan),
        "n_frames": n_frames,
        "frame_shape": list(geo.frame_shape),
        "frame_rate": motion.params.frame_rate,
        "cycle_starts": cycle_starts,
        "frames_with_kidney": int(in_view.sum()),
        "acoustics": acoustics.to_dict(),
        "seconds": time.perf_counter() - started,
        "timings": timings,
    }
    return SimulatedCase(
        ct=_hu_int16(ct),
        ct_kidney_mask=ct_mask,
        labels=anatomy.labels,
        frames=us,
        us_kidney_mask=us_mask,
        us_labels=us_labels,
        matrices=matrices,
        pixel_size=geo.pixel_size,
        frame_rate=motion.params.frame_rate,
        breathing=breathing,
        initial_pose=initial_pose,
        info=info,
    )


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _preview(case: SimulatedCase, path: Path) -> None:
    """CT planes through the kidney with the U/S fan drawn, and U/S frames with the kidney."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kidneyreg.geometry import transform_points

    ct = sitk.GetArrayViewFromImage(case.ct)
    mask = sitk.GetArrayViewFromImage(case.ct_kidney_mask)
    centre = np.asarray(case.info["kidney_info"]["centroid_world"])
    ci = np.rint(case.ct.TransformPhysicalPointToContinuousIndex(tuple(centre))).astype(int)
    ci = np.clip(ci, 0, np.asarray(case.ct.GetSize()) - 1)
    spacing = np.asarray(case.ct.GetSpacing())
    # Fan pixels of frame 0 in CT index space (the U/S plane at end-expiration).
    fan_rows, fan_cols = np.nonzero(case.frames[0] > 0)
    step = max(1, len(fan_rows) // 40000)
    uv = np.stack(
        [
            fan_cols[::step] * case.pixel_size,
            fan_rows[::step] * case.pixel_size,
            np.zeros(len(fan_rows[::step])),
        ],
        axis=1,
    )
    world = transform_points(case.matrices[0], uv)
    index = np.array(
        [
            case.ct.TransformPhysicalPointToContinuousIndex(tuple(p))
            for p in world[:: max(1, len(world) // 8000)]
        ]
    )

    fig = plt.figure(figsize=(15.0, 6.6), dpi=64)
    views = [
        ("axial", ct[ci[2]], mask[ci[2]], (0, 1), 2, spacing[1] / spacing[0]),
        ("coronal", ct[:, ci[1], :], mask[:, ci[1], :], (0, 2), 1, spacing[2] / spacing[0]),
        ("sagittal", ct[:, :, ci[0]], mask[:, :, ci[0]], (1, 2), 0, spacing[2] / spacing[1]),
    ]
    for k, (name, image, kmask, axes, normal, aspect) in enumerate(views):
        ax = fig.add_subplot(2, 5, k + 1)
        origin: Literal["upper", "lower"] = "upper" if name == "axial" else "lower"
        ax.imshow(image, cmap="gray", vmin=-160, vmax=240, aspect=aspect, origin=origin)
        # contour() without origin puts element [0, 0] at (0, 0), as imshow does.
        ax.contour(kmask, levels=[0.5], colors="lime", linewidths=0.8)
        size = np.asarray(case.ct.GetSize())
        inside = np.all((index >= 0) & (index <= size - 1), axis=1)
        near = inside & (np.abs(index[:, normal] - ci[normal]) <= 1.0)
        if near.any():
            ax.plot(index[near, axes[0]], index[near, axes[1]], ",", color="orange", alpha=0.5)
        ax.set_title(f"CT {name} (orange: U/S plane)", fontsize=9)
        ax.axis("off")
    # The CT cut by the true plane of frame 0: what the U/S frame should match.
    geo_shape = case.frames.shape[1:]
    pixel = (case.pixel_size, case.pixel_size)
    cut = resample_on_frame(case.ct, case.matrices[0], geo_shape, pixel, default_value=-1000.0)
    cut = np.where(case.frames[0] > 0, cut, -1000.0)
    ax = fig.add_subplot(2, 5, 4)
    ax.imshow(cut, cmap="gray", vmin=-160, vmax=240)
    if case.us_kidney_mask[0].any():
        ax.contour(case.us_kidney_mask[0], levels=[0.5], colors="lime", linewidths=0.6)
    ax.set_title("CT on the U/S plane of frame 0", fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(2, 5, 5)
    signal = np.asarray(case.breathing["signal"])
    times = np.asarray(case.breathing["times_s"])
    ax.plot(times, signal, color="tab:blue", linewidth=1)
    for start in case.breathing["cycle_starts"]:
        ax.axvline(times[start], color="gray", linewidth=0.6, linestyle="--")
    ax.set_xlabel("time (s); dashed: cycle starts", fontsize=8)
    ax.set_title("breathing signal (0 = end-expiration)", fontsize=9)
    ax.tick_params(labelsize=7)
    starts = case.breathing["cycle_starts"]
    cycle = (starts[1] if len(starts) > 1 else len(case.frames)) - starts[0]
    picks = sorted({min(len(case.frames) - 1, starts[0] + int(f * cycle)) for f in _PREVIEW_PHASES})
    for k, frame_index in enumerate(picks[:5]):
        ax = fig.add_subplot(2, 5, 6 + k)
        # Pixel coordinates for both: rows down, columns right (square pixels).
        ax.imshow(case.frames[frame_index], cmap="gray", vmin=0, vmax=255)
        if case.us_kidney_mask[frame_index].any():
            ax.contour(
                case.us_kidney_mask[frame_index], levels=[0.5], colors="lime", linewidths=0.6
            )
        ax.set_title(f"U/S frame {frame_index} (signal {signal[frame_index]:.2f})", fontsize=9)
        ax.axis("off")
    info = case.info
    fig.suptitle(
        f"seed {info['seed']}  group {info['group']}  {info['kidney']} kidney  "
        f"{info.get('approach', 'sagittal')} approach  "
        f"offset {info['offset']['rotation_norm_deg']:.1f} deg / "
        f"{info['offset']['translation_norm_mm']:.1f} mm  profile {info['profile']}",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_contents(case: SimulatedCase, folder: Path, *, preview: bool) -> None:
    write_image(case.ct, folder / "ct.nii.gz")
    write_mask(case.ct_kidney_mask, folder / "ct_kidney_mask.nii.gz")
    write_image(case.labels, folder / "labels.nii.gz")
    pixel = (case.pixel_size, case.pixel_size)
    write_us_sequence(
        UltrasoundSequence(case.frames, pixel, case.frame_rate, str(folder / "us.nii.gz")),
        folder / "us.nii.gz",
    )
    write_mask(
        UltrasoundSequence(case.us_kidney_mask, pixel, case.frame_rate).to_image(),
        folder / "us_kidney_mask.nii.gz",
    )
    labels_image = UltrasoundSequence(case.us_labels, pixel, case.frame_rate).to_image()
    write_image(sitk.Cast(labels_image, sitk.sitkUInt8), folder / "us_labels.nii.gz")
    signal = case.breathing["signal"]
    in_view = np.asarray(case.us_kidney_mask.reshape(len(case.frames), -1).any(axis=1))
    write_transforms_json(
        folder / "ground_truth.json",
        case.matrices,
        frame_extras=[
            {
                "time_s": case.breathing["times_s"][k],
                "breathing_signal": signal[k],
                "kidney_in_view": bool(in_view[k]),
            }
            for k in range(len(case.frames))
        ],
        extras={
            "source": "kidneyreg simulate (ground truth)",
            "simulator_version": SIMULATOR_VERSION,
            "seed": case.info["seed"],
            "frame_rate": case.frame_rate,
            "pixel_size_mm": [case.pixel_size, case.pixel_size],
            "cycle_starts": case.breathing["cycle_starts"],
        },
    )
    write_transforms_json(
        folder / "init.json",
        case.initial_pose[None],
        extras={
            "source": "kidneyreg simulate (coarse initial pose: nominal view without the offset)",
            "simulator_version": SIMULATOR_VERSION,
            "seed": case.info["seed"],
            "approach": case.info["approach"],
            "kidney": case.info["kidney"],
            "note": "one pose for every frame; the true end-expiration pose is O @ init with O "
            "the case's offset about the kidney centroid (case.json 'offset')",
            "offset_to_truth": case.info["offset"],
        },
    )
    atomic_write_text(folder / "breathing.json", json.dumps(case.breathing, indent=1) + "\n")
    atomic_write_text(folder / "case.json", json.dumps(case.info, indent=2) + "\n")
    if preview:
        _preview(case, folder / "preview.png")


def write_case(case: SimulatedCase, out_dir: str | Path, *, preview: bool = True) -> Path:
    """Write a case folder atomically (temporary sibling folder, then rename).

    An existing folder at ``out_dir`` is replaced only after the new case is complete: it is
    renamed aside, the new folder renamed into place, then the old one deleted.

    Args:
        case: The simulated case.
        out_dir: The case folder to create.
        preview: Also draw ``preview.png``.

    Returns:
        ``out_dir`` as a Path.
    """
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    # mkdtemp makes a private folder; the case folder gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        _write_contents(case, tmp, preview=preview)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return final


def simulate_case(
    out_dir: str | Path,
    seed: int,
    *,
    frames: int | None = None,
    group: str = "mixed",
    profile: str | Profile = "cpu",
    phase: str = "corticomedullary",
    from_ct: str | Path | None = None,
    labels: str | Path | None = None,
    kidney: str | None = None,
    approach: str = "sagittal",
    preview: bool = True,
) -> Path:
    """Simulate one case and write its folder (see the module docstring for the layout).

    Args:
        out_dir: Case folder to write.
        seed: Case seed.
        frames, group, profile, phase, from_ct, labels, kidney, approach: As
            :func:`simulate_case_data`.
        preview: Also draw ``preview.png``.

    Returns:
        The case folder.

    Example:
        >>> simulate_case("cases/case_000", 0, frames=10, profile="tiny")  # doctest: +SKIP
        PosixPath('cases/case_000')
    """
    case = simulate_case_data(
        seed,
        frames=frames,
        group=group,
        profile=profile,
        phase=phase,
        from_ct=from_ct,
        labels=labels,
        kidney=kidney,
        approach=approach,
    )
    return write_case(case, out_dir, preview=preview)


def simulate_cohort(
    out: str | Path,
    cases: int,
    seed: int,
    *,
    frames: int | None = None,
    group: str = "mixed",
    profile: str | Profile = "cpu",
    phase: str = "corticomedullary",
    from_ct: str | Path | None = None,
    labels: str | Path | None = None,
    kidney: str | None = None,
    approach: str = "sagittal",
    preview: bool = True,
    progress: Callable[[int, Path], None] | None = None,
) -> list[Path]:
    """Simulate ``cases`` cases into ``out/case_000``, ``out/case_001``...

    Case ``i`` uses the seed :func:`case_seed` ``(seed, i)``; ``out/cohort.json`` lists them.

    Args:
        out: Cohort folder.
        cases: Number of cases (>= 1).
        seed: Cohort seed.
        progress: Called after each case with its index and folder.
        frames, group, profile, phase, from_ct, labels, kidney, approach, preview: As
            :func:`simulate_case`.

    Returns:
        The case folders.

    Raises:
        InputError: ``cases`` < 1 or any input problem of :func:`simulate_case_data`.

    Example:
        >>> simulate_cohort("cohort", 3, seed=0, profile="tiny", frames=8)  # doctest: +SKIP
    """
    if cases < 1:
        raise InputError("--cases", f"must be at least 1, got {cases}")
    check_options(
        frames=frames,
        group=group,
        profile=profile,
        phase=phase,
        from_ct=from_ct,
        labels=labels,
        kidney=kidney,
        approach=approach,
    )
    root = Path(out)
    width = max(3, len(str(cases - 1)))
    folders: list[Path] = []
    entries: list[dict[str, Any]] = []
    for i in range(cases):
        s = case_seed(seed, i)
        folder = root / f"case_{i:0{width}d}"
        simulate_case(
            folder,
            s,
            frames=frames,
            group=group,
            profile=profile,
            phase=phase,
            from_ct=from_ct,
            labels=labels,
            kidney=kidney,
            approach=approach,
            preview=preview,
        )
        meta = json.loads((folder / "case.json").read_text(encoding="utf-8"))
        entries.append(
            {
                "folder": folder.name,
                "seed": s,
                "group": meta["group"],
                "kidney": meta["kidney"],
                "approach": meta["approach"],
                "n_frames": meta["n_frames"],
                "rotation_norm_deg": meta["offset"]["rotation_norm_deg"],
                "translation_norm_mm": meta["offset"]["translation_norm_mm"],
            }
        )
        folders.append(folder)
        if progress is not None:
            progress(i, folder)
    cohort = {
        "simulator_version": SIMULATOR_VERSION,
        "seed": int(seed),
        "cases": entries,
        "group": group,
        "approach": approach,
        "profile": get_profile(profile).name,
        "frames": frames,
    }
    atomic_write_text(root / "cohort.json", json.dumps(cohort, indent=2) + "\n")
    return folders

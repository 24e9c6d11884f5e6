"""The onsite pipeline: CT + U/S breathing sequence -> one pose per frame (the paper's second step).

:class:`Registrar` is the one path that ``kidneyreg register``, ``kidneyreg adapt``, the demo and
the benchmarks use. It prepares the CT side once (kidney map, kidney choice, registration grid,
resampled CT and CT feature map), then per sequence the U/S side (feature maps, kidney centroids,
breathing cycles), optionally adapts the model on the first breathing cycle
(:mod:`kidneyreg.adapt`) and registers every frame::

    registrar = Registrar(ct, "model.pt", ct_mask=mask, profile="cpu")
    result = registrar.run(sequence, masks=us_masks)          # adapt on one cycle, register all
    frame = registrar.register_frame(window, pixel_size=(0.3, 0.3))  # streaming, one window

Per frame ``k`` (``docs/architecture.md``): the window of ``Nw`` frames whose middle is ``k``
(edge frames repeated at the ends of the sequence, so the first and last frames get their own
estimate) is cropped around the U/S kidney centroid (the median centroid of the window's frames,
robust to a frame where the segmentation fails) and placed on the grid slices ``P_k``; the CT is
resampled on the grid ``G`` centred on the CT kidney centroid, so ``G @ P_k`` is the paper's
initial alignment "U/S kidney centroid on CT kidney centroid". The network returns ``D_k`` and the
result is ``M_k = G @ D_k @ P_k``. Each frame's confidence is its FIM loss terms.

Inputs are built exactly as in pretraining (:mod:`kidneyreg.registration.pairs`): feature maps
are the kidney masks smoothed by half a voxel (with ``--ct-mask`` / ``--us-mask``) or the feature
networks' probabilities, images are normalised CT and B-mode / 255, and the moving CT is sampled
on ``G`` from an axis-aligned cache at the profile's spacing.

Initial pose. Without ``init`` the U/S plane starts as the CT's sagittal plane
(:data:`~kidneyreg.geometry.DEFAULT_POSE_ROTATION`). ``init`` (one 4x4 for every frame or one per
frame, e.g. ``--init``) gives another coarse pose: the grid of frame ``k`` is built around its
plane (:meth:`RegistrationGrid.from_initial_pose`), so the network and the adaptation windows
work in that frame; only the rotation of ``init`` is used, the kidney-centroid matching sets the
translation.

Kidney choice (``kidney``). The CT kidney map (the mask, or the CT feature map >= 0.5) is split
into connected components; those of at least 20 % of the largest one's volume are kidney
candidates, each on the patient's right or left of the body midline (the x of the centroid of the
voxels above -500 HU; right = smaller x in LPS). ``"right"`` / ``"left"`` take that side (an error
when no candidate lies there); ``"auto"`` takes the side of the candidate nearest to the probe
position given by ``init`` (the mean origin of its poses) and, without ``init``, the right kidney
when there is one (the paper's and the simulator's default), else the left. The kidney is the
union of the candidates on the chosen side, so a kidney the threshold splits stays whole.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from kidneyreg.adapt import (
    DEFAULT_ADAPT_LR,
    DEFAULT_ANCHOR_WEIGHT,
    MASKS_ANCHOR_WEIGHT,
    AdaptationRecord,
    adaptation_frames,
    check_strategy,
    default_epochs,
    fine_tune,
)
from kidneyreg.checkpoint import load_checkpoint
from kidneyreg.cycles import CycleDetection, breathing_signal, detect_cycles, first_cycle_frames
from kidneyreg.errors import InputError
from kidneyreg.features.data import normalize_us
from kidneyreg.geometry import (
    DEFAULT_POSE_ROTATION,
    interpolate_rigid,
    invert_rigid,
    make_rigid,
    rotation_angle_deg,
)
from kidneyreg.io.transforms import TransformSequence
from kidneyreg.io.us import UltrasoundSequence
from kidneyreg.preprocess import (
    CT_AIR_HU,
    MIRROR,
    RegistrationGrid,
    antialias_frames,
    body_midline_x,
    build_us_window,
    convex_hull_mask,
    fill_renal_sinus,
    kidney_centroid,
    normalize_ct,
    renal_sinus,
    trim_perirenal_fat,
    window_indices,
    window_transforms,
)
from kidneyreg.profiles import PROFILES, Profile, get_profile
from kidneyreg.registration.config import RegistrationConfig
from kidneyreg.registration.loss import fim_loss, motion_loss
from kidneyreg.registration.network import RegistrationNet
from kidneyreg.registration.pairs import sample_grid, smooth_ct_feature, smooth_us_features
from kidneyreg.registration.plane_search import PlaneSearchResult, search_plane_offset
from kidneyreg.registration.transformer import embed_window
from kidneyreg.results import RegistrationResult

if TYPE_CHECKING:
    from kidneyreg.features.infer import FeatureModel

__all__ = [
    "ADAPTED_REFINEMENTS",
    "FEATURE_THRESHOLD",
    "KIDNEY_CHOICES",
    "MAX_FRAME_STEP",
    "PLANE_SEARCH_FRAMES",
    "PRETRAINED_REFINEMENTS",
    "US_NETWORK_MAX_VIEW_DEG",
    "FrameRegistration",
    "KidneyChoice",
    "PreparedSequence",
    "Registrar",
    "RegistrationModel",
    "UntrainedViewWarning",
    "bundled_registration_path",
    "choose_kidney",
    "convex_regions",
    "largest_region_per_frame",
    "load_registration_model",
    "persistent_region",
    "us_view_angles",
]

#: Probability at or above which a feature-map voxel (pixel) counts as kidney.
FEATURE_THRESHOLD = 0.5
#: Angle (degrees) between an ``init`` plane and the nominal view a bundled U/S feature network
#: was trained on (:data:`~kidneyreg.features.infer.US_VIEWS`) beyond which its maps are not
#: trusted: the networks saw offsets from their view up to about 30 degrees (group B, 2 sigma),
#: and the sagittal and flank views are about 60 degrees apart.
US_NETWORK_MAX_VIEW_DEG = 40.0


class UntrainedViewWarning(UserWarning):
    """The U/S kidney maps come from a bundled network, on a view it was not trained on."""


def us_view_angles(rotations: ArrayLike) -> dict[str, float]:
    """Angle (degrees) between the planes of ``rotations`` and each view of the bundled U/S models.

    A plane's angle to a view is the angle between their normals (the rotations' third
    columns, sign ignored), the median over the given rotations; a flank view is the nearer of
    the right and the left kidney's (:func:`kidneyreg.simulate.probe.approach_rotation`).

    Args:
        rotations: One 3x3 rotation (U/S image axes -> LPS, columns u, v, normal) or
            ``(n, 3, 3)``.

    Returns:
        ``{view: degrees}`` for every view in :data:`~kidneyreg.features.infer.US_VIEWS`.

    Raises:
        ValueError: Not (3, 3) or (n, 3, 3).

    Example:
        >>> angles = us_view_angles(DEFAULT_POSE_ROTATION)
        >>> round(angles["sagittal"], 6), angles["flank"] > 40
        (0.0, True)
    """
    from kidneyreg.features.infer import US_VIEWS
    from kidneyreg.simulate.probe import approach_rotation

    matrices = np.asarray(rotations, dtype=np.float64)
    if matrices.shape == (3, 3):
        matrices = matrices[None]
    if matrices.ndim != 3 or matrices.shape[1:] != (3, 3):
        raise ValueError(f"rotations must be (3, 3) or (n, 3, 3), got shape {matrices.shape}")
    normals = matrices[:, :, 2]
    angles = {}
    for view in US_VIEWS:
        # The views are the simulator's approaches; the network saw both kidneys' views.
        view_normals = [approach_rotation(view, side)[:, 2] for side in ("right", "left")]
        cosines = np.max([np.abs(normals @ normal) for normal in view_normals], axis=0)
        angles[view] = float(np.degrees(np.arccos(np.clip(np.median(cosines), 0.0, 1.0))))
    return angles


#: Values of the ``kidney`` option.
KIDNEY_CHOICES: tuple[str, ...] = ("auto", "right", "left")

# Components smaller than this fraction of the largest one are not kidney candidates.
_MIN_COMPONENT_FRACTION = 0.2
# Windows per network call when registering. On 2 CPU threads at the cpu profile, batches of
# 2-4 windows run at ~50-56 ms per frame against ~70 ms one by one (benchmarks/bench_pipeline.py);
# a GPU wants larger batches.
_CPU_BATCH = 2
_GPU_BATCH = 16
# Moving volumes kept in memory at once (one per distinct initial-pose rotation).
_MOVING_CACHE = 8
# Margin (voxels) of the CT cache around the grids it serves (trilinear reads one voxel beyond).
_CACHE_MARGIN_VOXELS = 2
# Rotation entries are compared at this precision when grouping frames by initial pose.
_ROTATION_DECIMALS = 9
_REGISTRATION_KIND = "registration-net"
#: Extra network passes per frame by default (see Registrar), before and after the model is
#: adapted to the sequence. On 16 held-out simulated patients (ground-truth masks, the same
#: adaptation for both settings; README "Speed") a refinement pass brought the pretrained model's
#: outlines closer (MCD CT-CT -0.21 mm, 12 of 16 patients, Wilcoxon p = 0.002) but made no
#: difference once the model was adapted (TRE -0.05 mm, p = 0.38; MCD +0.00 mm; with the feature
#: networks' maps TRE +0.00 mm, MCD -0.09 mm, p = 0.30), where the single pass runs twice as fast
#: (the issue's 20 fps on two CPU cores). After adaptation with the pure FIM loss a refinement
#: even harms (TRE +0.88 mm, p = 0.005): it feeds the network grids it was not adapted on.
PRETRAINED_REFINEMENTS = 1
ADAPTED_REFINEMENTS = 0
#: Largest :attr:`Registrar.frame_step`: 10 frames are half a second at 20 fps, a small part of
#: a breathing cycle (3-5 s), over which the kidney's motion between two registered frames is
#: close to linear. Measured at 3 (README "Speed").
MAX_FRAME_STEP = 10
# A registration pass whose estimate stays this close to the grid it ran on needs no refinement,
# and a refinement reuses a CT volume already sampled on a grid this close to the one it wants.
# The network corrects offsets of 10-25 degrees and many mm, so a grid within 2 mm and 2 degrees
# of the estimate is as good an input; breathing moves the kidney well under 1 mm per frame, so
# consecutive frames share one resampled volume (a full-volume resample costs about a third of a
# refined frame).
REFINEMENT_REUSE_MM = 2.0
REFINEMENT_REUSE_DEG = 2.0
# Refinement volumes kept for reuse (the most recent are searched first).
_REFINED_CACHE = 4
#: Most frames of the adaptation cycle the plane search scores (evenly spread over the cycle):
#: its cost grows with them, and a breathing cycle's frames show nearly the same sections.
PLANE_SEARCH_FRAMES = 24
# Margin (mm) around the chosen kidney's bounding box within which the CT sinus mask is kept (a
# mask of both kidneys' sinuses keeps the scanned one's).
_SINUS_MARGIN_MM = 10.0
_PLANE_SEARCH_NEEDS = (
    "the plane search needs renal-sinus masks of the U/S frames (prepare(sinus_masks=...)) and "
    "of the CT (Registrar(ct_sinus_mask=...), or read from its HU when not given)"
)


# ----------------------------------------------------------------------------------------------
# Registration model
# ----------------------------------------------------------------------------------------------


def bundled_registration_path(profile: str = "cpu") -> Path:
    """Where the package keeps its bundled registration model for ``profile`` (may not exist).

    Example:
        >>> bundled_registration_path("cpu").name
        'registration_cpu.pt'
    """
    root = importlib.resources.files("kidneyreg") / "models" / f"registration_{profile}.pt"
    return Path(str(root))


@dataclass(eq=False)
class RegistrationModel:
    """A registration network with the profile it works at.

    Attributes:
        net: The network (evaluation mode).
        profile: Its resolution profile (window size taken from the network's configuration).
        source: Checkpoint path or a description.
        training: The checkpoint's pretraining settings (``features``, cases...), may be empty.
    """

    net: RegistrationNet
    profile: Profile
    source: str
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> RegistrationConfig:
        """The network's configuration."""
        return self.net.config


def _profile_for_config(config: RegistrationConfig, name: str | Profile | None) -> Profile:
    """The profile whose grid the configuration was built for (window from the configuration)."""
    if name is None:
        matches = [
            p
            for p in PROFILES.values()
            if tuple(p.volume_shape) == tuple(config.volume_shape)
            and math.isclose(p.spacing, config.spacing)
        ]
        if not matches:
            raise ValueError(
                f"no profile has the network's grid {config.volume_shape} at {config.spacing} mm"
            )
        base = matches[0]
    else:
        base = get_profile(name)
    if tuple(base.volume_shape) != tuple(config.volume_shape) or not math.isclose(
        base.spacing, config.spacing
    ):
        raise ValueError(
            f"profile {base.name} ({base.volume_shape} at {base.spacing} mm) does not match the "
            f"network ({config.volume_shape} at {config.spacing} mm)"
        )
    return replace(base, window=int(config.window))


def _checkpoint_state(payload: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The weights to use: the best validation epoch's when it was scored, else the last."""
    best = payload.get("best")
    if isinstance(best, dict) and isinstance(best.get("model"), dict):
        score = best.get("val_mcd_mm")
        if isinstance(score, int | float) and math.isfinite(score):
            return dict(best["model"])
    state = payload.get("model")
    if not isinstance(state, dict):
        raise InputError(path, "registration checkpoint has no model weights")
    return dict(state)


def load_registration_model(
    path: str | Path | None = None,
    *,
    profile: str | None = None,
    device: str | torch.device = "cpu",
) -> RegistrationModel:
    """Load a registration network from a checkpoint, or the bundled one of ``profile``.

    A pretraining checkpoint (``kidneyreg pretrain``) gives its best validation epoch's weights
    when validation scored them, else its last epoch's; an adapted one (``kidneyreg adapt``)
    gives its adapted weights.

    Args:
        path: Checkpoint; None for the bundled model of ``profile`` (default ``cpu``).
        profile: Required profile; None accepts the checkpoint's own.
        device: Torch device.

    Raises:
        InputError: Missing, unreadable or foreign checkpoint, a checkpoint of another kind or
            profile, weights that do not fit, no bundled model.

    Example:
        >>> model = load_registration_model("model.pt")  # doctest: +SKIP
        >>> model.profile.name  # doctest: +SKIP
        'cpu'
    """
    if path is None:
        name = profile or "cpu"
        file = bundled_registration_path(name)
        if not file.is_file():
            raise InputError(
                "--model",
                f"no bundled registration model for profile {name!r}: train one with "
                f"`kidneyreg pretrain --cohort DIR --out model.pt --profile {name}` and pass it "
                "with --model",
            )
    else:
        file = Path(path)
    payload = load_checkpoint(file, kind=_REGISTRATION_KIND)
    try:
        config = RegistrationConfig.from_dict(dict(payload["config"]))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(
            file, f"registration checkpoint has no valid configuration ({error})"
        ) from None
    saved_profile = payload.get("profile")
    if profile is not None and saved_profile is not None and saved_profile != profile:
        raise InputError(
            file, f"was trained for profile {saved_profile!r}, not {profile!r} (--profile)"
        )
    try:
        prof = _profile_for_config(config, saved_profile if profile is None else profile)
    except ValueError as error:
        raise InputError(file, str(error)) from None
    net = RegistrationNet(config)
    try:
        net.load_state_dict(_checkpoint_state(payload, file))
    except (RuntimeError, TypeError) as error:
        text = str(error).splitlines()[0][:120]
        raise InputError(file, f"weights do not fit the registration network ({text})") from None
    net.to(torch.device(device)).eval()
    training = payload.get("training")
    return RegistrationModel(
        net, prof, str(file), dict(training) if isinstance(training, dict) else {}
    )


# ----------------------------------------------------------------------------------------------
# Kidney choice on the CT
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KidneyChoice:
    """The CT kidney the registration aligns to.

    Attributes:
        mask: uint8 0/1 mask of the chosen kidney on the CT grid.
        side: ``"right"`` or ``"left"`` (patient side).
        centroid: World position (LPS mm) of the mask's centroid, the grid origin.
        candidates: Number of kidney candidates found (components of the map).
        reason: How the side was chosen.
    """

    mask: sitk.Image
    side: str
    centroid: NDArray[np.float64]
    candidates: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain description for ``transforms.json``."""
        return {
            "side": self.side,
            "centroid_mm": [float(v) for v in self.centroid],
            "candidates": self.candidates,
            "choice": self.reason,
        }


def choose_kidney(
    kidney_map: sitk.Image,
    ct: sitk.Image,
    kidney: str = "auto",
    *,
    near: ArrayLike | None = None,
    source: str = "CT",
    what: str = "kidney mask",
    empty: str = "the kidney mask is empty",
) -> KidneyChoice:
    """Pick the scanned kidney out of a binary kidney map (see the module docstring).

    Args:
        kidney_map: Binary (nonzero = kidney) map on the CT grid.
        ct: The CT in HU (for the body midline).
        kidney: ``"auto"``, ``"right"`` or ``"left"``.
        near: World point (LPS mm) of the probe for ``"auto"``, or None.
        source: File named in errors.
        what: What the map is, for errors.
        empty: Why there is no kidney when the map is empty, for errors.

    Raises:
        InputError: No kidney in the map, or none on the requested side.
        ValueError: Unknown ``kidney`` value.

    Example:
        >>> choice = choose_kidney(mask, ct, "right")  # doctest: +SKIP
        >>> choice.side  # doctest: +SKIP
        'right'
    """
    if kidney not in KIDNEY_CHOICES:
        raise ValueError(f"kidney must be one of {KIDNEY_CHOICES}, got {kidney!r}")
    binary = sitk.Cast(kidney_map != 0, sitk.sitkUInt8)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(binary, True), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    labels = sorted(stats.GetLabels())
    if not labels:
        raise InputError(source, f"no kidney found in the CT ({empty})")
    largest = stats.GetPhysicalSize(labels[0])
    kept = [
        lab for lab in labels if stats.GetPhysicalSize(lab) >= _MIN_COMPONENT_FRACTION * largest
    ]
    midline = body_midline_x(ct)
    centroids = {lab: np.array(stats.GetCentroid(lab), dtype=np.float64) for lab in kept}
    sides = {lab: "right" if centroids[lab][0] < midline else "left" for lab in kept}
    found = sorted(set(sides.values()))
    if kidney in ("right", "left"):
        side, reason = kidney, "requested"
        if kidney not in found:
            raise InputError(
                source,
                f"no {kidney} kidney found in the CT (the {what} has {len(kept)} kidney "
                f"candidate(s), on the {' and '.join(found)})",
            )
    elif near is not None:
        point = np.asarray(near, dtype=np.float64)
        nearest = min(kept, key=lambda lab: float(np.linalg.norm(centroids[lab] - point)))
        side, reason = sides[nearest], "nearest to the initial pose"
    elif found == ["left"]:
        side, reason = "left", "the only side found"
    else:
        side, reason = "right", "default (right when present)"
    chosen = [lab for lab in kept if sides[lab] == side]
    array = np.isin(sitk.GetArrayViewFromImage(components), chosen).astype(np.uint8)
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(kidney_map)
    return KidneyChoice(mask, side, kidney_centroid(mask, source=source), len(kept), reason)


# ----------------------------------------------------------------------------------------------
# U/S side
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PreparedSequence:
    """A U/S sequence ready for registration (computed once, shared by adaptation and registration).

    Attributes:
        frames: float32 ``(n, rows, cols)`` B-mode in [0, 1].
        features: float32 ``(n, rows, cols)`` kidney feature maps in [0, 1].
        masks: uint8 ``(n, rows, cols)`` kidney masks given by the user, or None.
        centroids: ``(n, 2)`` U/S kidney centroid ``(u, v)`` mm of each frame, interpolated over
            frames without kidney.
        visible: ``(n,)`` whether the kidney was found in each frame.
        pixel_size: ``(sx, sy)`` mm.
        frame_rate: Frames per second, or None.
        feature_source: ``"masks"`` or ``"network"``.
        cycles: Breathing cycles, or None when not detected (streaming windows).
        seconds: Preparation time.
        sinus: uint8 ``(n, rows, cols)`` renal-sinus masks (given, or from the U/S sinus
            network), or None.
        sinus_source: ``"masks"``, ``"network"`` or None (no sinus maps).
        warnings: Warnings raised while preparing (breathing not detected...).
        source: Where the frames came from.
    """

    frames: NDArray[np.float32]
    features: NDArray[np.float32]
    masks: NDArray[np.uint8] | None
    centroids: NDArray[np.float64]
    visible: NDArray[np.bool_]
    pixel_size: tuple[float, float]
    frame_rate: float | None
    feature_source: str
    cycles: CycleDetection | None
    seconds: float
    warnings: list[str] = field(default_factory=list)
    source: str = "<memory>"
    sinus: NDArray[np.uint8] | None = None
    sinus_source: str | None = None
    _filtered: dict[float, tuple[NDArray[np.float32], NDArray[np.float32]]] = field(
        default_factory=dict, repr=False
    )

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.frames.shape[0])

    def filtered(self, profile: Profile) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Feature maps and frames anti-aliased for the profile's spacing (computed once).

        See :func:`kidneyreg.preprocess.antialias_frames`: windows are then built without
        filtering the same frame again for each window it belongs to.
        """
        key = float(profile.spacing)
        if key not in self._filtered:
            self._filtered[key] = (
                antialias_frames(self.features, self.pixel_size, profile),
                antialias_frames(self.frames, self.pixel_size, profile),
            )
        return self._filtered[key]

    def kidney_masks(self) -> NDArray[np.uint8]:
        """The masks, or the feature maps thresholded at :data:`FEATURE_THRESHOLD`."""
        if self.masks is not None:
            return self.masks
        return (self.features >= FEATURE_THRESHOLD).astype(np.uint8)

    def window_centroid(self, centre: int, window: int) -> NDArray[np.float64]:
        """Median kidney centroid of the window's frames that show the kidney (mm).

        Falls back to the interpolated centroid of ``centre`` when none of them does.
        """
        picked = window_indices(self.n_frames, centre, window)
        seen = picked[self.visible[picked]]
        if seen.size == 0:
            return np.asarray(self.centroids[centre], dtype=np.float64)
        return np.asarray(np.median(self.centroids[seen], axis=0), dtype=np.float64)


# In-plane 4-neighbourhood of (frames, rows, cols) masks: dilation never crosses frames.
_IN_PLANE_CROSS = ndimage.generate_binary_structure(2, 1)[None]


def largest_region_per_frame(binary: ArrayLike) -> NDArray[np.bool_]:
    """Keep only the largest 8-connected region of every frame of ``(n, rows, cols)`` masks.

    Example:
        >>> frames = np.zeros((1, 4, 6), bool); frames[0, :, :2] = True; frames[0, 0, 5] = True
        >>> largest_region_per_frame(frames)[0].astype(int)
        array([[1, 1, 0, 0, 0, 0],
               [1, 1, 0, 0, 0, 0],
               [1, 1, 0, 0, 0, 0],
               [1, 1, 0, 0, 0, 0]])
    """
    frames = np.asarray(binary, dtype=bool)
    if frames.ndim != 3:
        raise ValueError(f"binary must be (frames, rows, cols), got shape {frames.shape}")
    out = np.zeros_like(frames)
    connectivity = np.ones((3, 3), dtype=bool)
    for k, frame in enumerate(frames):
        labels, n = ndimage.label(frame, structure=connectivity)
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            out[k] = labels == 1 + int(np.argmax(sizes))
    return out


def persistent_region(binary: ArrayLike) -> NDArray[np.bool_]:
    """Keep, in every frame of ``(n, rows, cols)`` masks, the sequence's most persistent region.

    Regions that touch from frame to frame (8-connected in the plane, 26-connected through
    time) form one structure; the structure with the most pixels over the whole sequence is
    taken as the kidney, and each frame keeps the largest region of it. Choosing frame by frame
    instead lets the choice flip between two structures of similar size (the kidney and the
    gallbladder, say) and the centroid jump by their distance. A frame without that structure
    keeps its largest region that overlaps the structure's footprint (the kidney coming back
    after a gap), else stays empty (its centroid is then interpolated from the other frames).

    Example:
        >>> frames = np.zeros((3, 4, 7), bool)
        >>> frames[:, :2, :2] = True  # a 2 x 2 region in every frame
        >>> frames[1, :, 4:] = True  # a larger region in one frame only
        >>> persistent_region(frames)[1].astype(int)
        array([[1, 1, 0, 0, 0, 0, 0],
               [1, 1, 0, 0, 0, 0, 0],
               [0, 0, 0, 0, 0, 0, 0],
               [0, 0, 0, 0, 0, 0, 0]])
    """
    frames = np.asarray(binary, dtype=bool)
    if frames.ndim != 3:
        raise ValueError(f"binary must be (frames, rows, cols), got shape {frames.shape}")
    labels, n = ndimage.label(frames, structure=np.ones((3, 3, 3), dtype=bool))
    if not n:
        return np.zeros_like(frames)
    sizes = np.bincount(labels.ravel())[1:]
    kept = largest_region_per_frame(labels == 1 + int(np.argmax(sizes)))
    # Where the structure is missing (it left the view, or the map lost it for a while), a region
    # that overlaps its footprint in the other frames is the kidney coming back.
    footprint: NDArray[np.bool_] = np.asarray(kept.any(axis=0))
    for k in np.flatnonzero(~kept.any(axis=(1, 2))):
        back = frames[k] & ~_far_from(footprint, frames[k])
        if back.any():
            kept[k] = largest_region_per_frame(back[None])[0]
    return kept


def convex_regions(binary: ArrayLike) -> NDArray[np.bool_]:
    """Each frame's kidney region ``(n, rows, cols)`` replaced by its convex hull.

    A long- or short-axis section of the kidney on U/S is its capsule outline, convex but for
    the hilum, with the renal sinus (the bright central echo complex) inside; the CT masks it
    is matched against hold the sinus too (:func:`~kidneyreg.preprocess.fill_renal_sinus`).
    The U/S network sometimes leaves the sinus out and outlines a C: on B-mode rendered from the
    real CT the hull raised the kidney map's Dice from 0.75 to 0.86 and brought its median
    centroid error from 13.0 to 6.4 mm, while 8 held-out simulated sequences kept 0.945.

    Example:
        >>> frames = np.zeros((1, 5, 5), bool)
        >>> frames[0, 1:4, 1:4] = True; frames[0, 1:3, 2] = False  # a C open at the top
        >>> convex_regions(frames)[0, 1:3, 2].tolist()
        [True, True]
    """
    frames = np.asarray(binary, dtype=bool)
    if frames.ndim != 3:
        raise ValueError(f"binary must be (frames, rows, cols), got shape {frames.shape}")
    return np.stack([convex_hull_mask(frame) if frame.any() else frame for frame in frames])


def _far_from(footprint: NDArray[np.bool_], frame: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The regions of ``frame`` (8-connected) that do not overlap ``footprint``."""
    labels, _ = ndimage.label(frame, structure=np.ones((3, 3), dtype=bool))
    touching = np.unique(labels[footprint & frame])
    return frame & ~np.isin(labels, touching[touching > 0])


def _frame_masks(masks: ArrayLike, sequence: UltrasoundSequence, source: str) -> NDArray[np.uint8]:
    """``masks`` as uint8 0/1, checked to lie on the sequence's frames."""
    binary = (np.asarray(masks) != 0).astype(np.uint8)
    if binary.shape != sequence.shape:
        raise InputError(
            source,
            f"mask grid differs from the U/S sequence: {binary.shape} vs {sequence.shape} "
            "(frames, rows, cols)",
        )
    return binary


def _frame_centroids(
    binary: NDArray[Any], pixel_size: tuple[float, float]
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Per-frame pixel-mean centroids (u, v) mm, NaN-free (interpolated), and visibility."""
    n = binary.shape[0]
    centroids = np.full((n, 2), np.nan)
    for k in range(n):
        rows, cols = np.nonzero(binary[k])
        if rows.size:
            centroids[k] = (cols.mean() * pixel_size[0], rows.mean() * pixel_size[1])
    visible = np.isfinite(centroids[:, 0])
    if visible.any() and not visible.all():
        index = np.arange(n)
        for axis in range(2):
            centroids[:, axis] = np.interp(index, index[visible], centroids[visible, axis])
    return centroids, visible


@dataclass(frozen=True)
class FrameRegistration:
    """The result for one window (streaming).

    Attributes:
        matrix: ``M`` (4x4) of the window's middle frame, U/S image mm -> CT world mm.
        initial_matrix: The initial alignment ``G @ P`` of that frame.
        loss_terms: The frame's FIM loss terms (its confidence).
        seconds: Processing time of the window.
    """

    matrix: NDArray[np.float64]
    initial_matrix: NDArray[np.float64]
    loss_terms: dict[str, float]
    seconds: float


@dataclass
class _WindowBatch:
    fixed: torch.Tensor
    moving: torch.Tensor
    grids: NDArray[np.float64]  # (B, 4, 4) G of each window
    P_mid: NDArray[np.float64]  # (B, 4, 4)


def _take(batch: _WindowBatch, index: NDArray[np.int64]) -> _WindowBatch:
    """The windows ``index`` of a batch."""
    return _WindowBatch(
        batch.fixed[index], batch.moving[index], batch.grids[index], batch.P_mid[index]
    )


def _grids_close(a: NDArray[np.float64], b: NDArray[np.float64]) -> bool:
    """Whether two grid matrices are within the refinement reuse tolerance of each other."""
    relative = invert_rigid(a) @ b
    return bool(
        np.linalg.norm(relative[:3, 3]) <= REFINEMENT_REUSE_MM
        and rotation_angle_deg(relative) <= REFINEMENT_REUSE_DEG
    )


# ----------------------------------------------------------------------------------------------
# The registrar
# ----------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device) -> torch.device:
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise InputError("--device", f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "CUDA was requested but no CUDA device is available")
    return resolved


def _init_sequence(init: ArrayLike | TransformSequence | None) -> TransformSequence | None:
    if init is None or isinstance(init, TransformSequence):
        return init
    matrices = np.asarray(init, dtype=np.float64)
    if matrices.shape == (4, 4):
        matrices = matrices[None]
    if matrices.ndim != 3 or matrices.shape[1:] != (4, 4):
        raise ValueError(f"init must be (4, 4) or (n, 4, 4), got shape {matrices.shape}")
    return TransformSequence(matrices, list(range(len(matrices))), source="initial pose")


class Registrar:
    """CT-to-U/S registration of breathing sequences with one model (see the module docstring).

    Args:
        ct: CT in HU (world = the file's LPS space).
        model: A loaded :class:`RegistrationModel`, a :class:`RegistrationNet`, a checkpoint path,
            or None for the bundled model of ``profile``. The network is copied: adaptation
            never changes the caller's object.
        ct_mask: Kidney mask on the CT grid; None uses the CT feature network.
        ct_sinus_mask: Renal-sinus mask (sinus fat and collecting system) on the CT grid, or None.
            With U/S sinus masks given to :meth:`prepare`, :meth:`adapt` ends with a search of
            one plane correction that makes the kidney and sinus sections overlap the U/S maps
            best (:meth:`search_plane`): the sinus pins down the plane's out-of-plane position,
            which the kidney outline cannot.
        ct_features: CT feature network (loaded model or checkpoint) when ``ct_mask`` is None;
            None: the bundled one.
        trim_ct_fat: Cut the CT feature network's map back to the kidney's capsule by the CT's
            HU (:func:`trim_perirenal_fat`), for sequences registered with exact U/S outlines
            (masks): the network's map spills into the fat around the kidney, and against exact
            outlines that costs the adaptation 1.4 mm of TRE (8 held-out patients: 3.08 mm
            untrimmed, 1.71 trimmed, 1.23 with the CT mask). Against the U/S network's maps,
            which spill over as well, the untrimmed map does better (docs/models.md, "One side
            at a time"). ``register`` sets it when given ``--us-mask`` without ``--ct-mask``.
        us_features: U/S feature network for sequences given without masks; None: the bundled
            one (loaded when first needed).
        profile: Resolution profile; None: the model's.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        init: Initial pose(s): one 4x4 for every frame or ``(n, 4, 4)``, or a
            :class:`TransformSequence` (``--init``); None: the default sagittal pose.
        kidney: ``"auto"``, ``"right"`` or ``"left"`` (module docstring).
        batch_size: Windows per network call when registering; None: 2 on CPU, 16 on a GPU.
        refinements: Extra network passes per frame when registering: pass ``r + 1`` resamples
            the CT on the grid moved by pass ``r``'s estimate of the window's middle frame and
            composes the new estimate with it (0: the paper's single pass). Each pass costs one
            more network call and CT resampling per frame. None (the default):
            :data:`PRETRAINED_REFINEMENTS` until the model is adapted, then
            :data:`ADAPTED_REFINEMENTS` (see :attr:`refinements`).
        frame_step: :meth:`register` registers every ``frame_step``-th frame (and the last)
            with its own window, as the paper does every frame, and interpolates the poses of
            the frames between (:func:`~kidneyreg.geometry.interpolate_rigid`): ``1 /
            frame_step`` of the network calls. 1 (the default): every frame. Streaming
            (:meth:`register_frame`) registers every window it is given.
        ct_source: Name of the CT (file) in messages.
        ct_mask_source: Name of the CT mask (file) in messages.
        ct_sinus_mask_source: Name of the CT sinus mask (file) in messages.
        sinus_networks: Renal-sinus maps from feature networks where no sinus mask is given
            (the CT's here, the sequence's in :meth:`prepare`), so that adaptation ends with the
            plane search without any sinus mask. Implied by ``ct_sinus_features`` or
            ``us_sinus_features``.
        ct_sinus_features: CT sinus feature network (loaded model or checkpoint); None: the
            sinus is read from the CT's HU inside the kidney map (:func:`renal_sinus`: fat and
            fluid deep inside the capsule; a contrast-enhanced CT), also when only the
            sequence's sinus masks are given.
        us_sinus_features: U/S sinus feature network; None: the bundled one.
        log: Called with one-line progress messages.
        mirror: Run the network in the L-R mirror image of the registration grid (the CT
            sampled on ``G @ S``, ``S`` the reflection of the internal x axis, and the window's
            frames in reverse order; the output ``D'`` gives ``M = G @ S @ D' @ S @ P``, a proper
            rigid pose). A left kidney then looks like a right one, which is what the bundled
            model mostly learned from (3 in 4 of its training kidneys were right ones; mirrored
            right kidneys register worse, README "Left kidneys"). None (the default): for a
            left kidney.

    Raises:
        InputError: No kidney in the CT (or on the requested side), a bad or missing model.

    Example:
        >>> registrar = Registrar(ct, "model.pt", ct_mask=mask)  # doctest: +SKIP
        >>> result = registrar.run(sequence, masks=us_masks)  # doctest: +SKIP
        >>> result.matrices.shape  # doctest: +SKIP
        (120, 4, 4)
    """

    def __init__(
        self,
        ct: sitk.Image,
        model: RegistrationModel | RegistrationNet | str | Path | None = None,
        *,
        ct_mask: sitk.Image | None = None,
        ct_features: FeatureModel | str | Path | None = None,
        trim_ct_fat: bool = False,
        us_features: FeatureModel | str | Path | None = None,
        profile: str | Profile | None = None,
        device: str | torch.device = "auto",
        init: ArrayLike | TransformSequence | None = None,
        kidney: str = "auto",
        batch_size: int | None = None,
        refinements: int | None = None,
        frame_step: int = 1,
        ct_source: str = "CT",
        ct_mask_source: str = "CT kidney mask",
        ct_sinus_mask: sitk.Image | None = None,
        ct_sinus_mask_source: str = "CT sinus mask",
        sinus_networks: bool = False,
        ct_sinus_features: FeatureModel | str | Path | None = None,
        us_sinus_features: FeatureModel | str | Path | None = None,
        log: Callable[[str], None] | None = None,
        mirror: bool | None = None,
    ) -> None:
        started = time.perf_counter()
        if not isinstance(ct, sitk.Image) or ct.GetDimension() != 3:
            raise TypeError("ct must be a 3D SimpleITK image")
        if kidney not in KIDNEY_CHOICES:
            raise InputError("--kidney", f"must be one of {', '.join(KIDNEY_CHOICES)}")
        self.device = _resolve_device(device)
        self._log = log or (lambda _message: None)
        self.model = self._load_model(model, profile)
        if self.model.net.config.structures != ("kidney",):
            # Such models are trained on simulated label maps (pretrain --sinus); registration
            # has no feature network for the other structures yet.
            raise InputError(
                self.model.source,
                "needs feature maps of "
                + ", ".join(self.model.net.config.structures[1:])
                + " besides the kidney, which registration cannot compute yet",
            )
        self.net: RegistrationNet = copy.deepcopy(self.model.net).to(self.device).eval()
        self._pretrained_state = copy.deepcopy(self.net.state_dict())
        self.profile = self.model.profile
        self.config = self.net.config
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = (
            int(batch_size)
            if batch_size
            else (_GPU_BATCH if self.device.type == "cuda" else _CPU_BATCH)
        )
        self.adaptation: AdaptationRecord | None = None
        self.refinements = refinements  # None: automatic (the property)
        self.frame_step = frame_step
        self.init = _init_sequence(init)
        self.ct = ct
        self.ct_source = ct_source
        self._us_features_arg = us_features
        self._us_model: FeatureModel | None = None

        # CT kidney map: the mask, or the CT feature network's probabilities.
        #: Whether the CT feature network's map is cut back to the capsule (``trim_ct_fat``).
        self.trim_ct_fat = bool(trim_ct_fat) and ct_mask is None
        #: Fat (ml) taken out of the CT feature network's kidney map (``trim_ct_fat``).
        self.ct_map_fat_trimmed_ml = 0.0
        if ct_mask is not None:
            self.feature_source_ct = "masks"
            kidney_map = ct_mask
            binary = ct_mask
            map_source, what, empty = ct_mask_source, "kidney mask", "the kidney mask is empty"
        else:
            self.feature_source_ct = "network"
            self._log("CT kidney feature map (feature network)")
            ct_model = self._feature_model(ct_features, "ct")
            from kidneyreg.features.infer import predict_ct

            kidney_map = predict_ct(ct_model, ct)
            if self.trim_ct_fat:
                kidney_map, trimmed = trim_perirenal_fat(kidney_map, ct, FEATURE_THRESHOLD)
                self.ct_map_fat_trimmed_ml = trimmed * float(np.prod(ct.GetSpacing())) / 1000.0
                self._log(
                    f"CT kidney feature map: {self.ct_map_fat_trimmed_ml:.1f} ml of perirenal "
                    "fat taken out"
                )
            binary = kidney_map >= FEATURE_THRESHOLD
            map_source, what = ct_source, "CT feature map"
            empty = f"the CT feature map is below {FEATURE_THRESHOLD} everywhere"
        self.kidney = choose_kidney(
            binary,
            ct,
            kidney,
            near=self._probe_position(),
            source=map_source,
            what=what,
            empty=empty,
        )
        #: Renal sinus (ml) added to the given CT kidney mask (:func:`fill_renal_sinus`).
        self.ct_mask_sinus_filled_ml = 0.0
        if self.feature_source_ct == "masks":
            # The U/S outline is the capsule: a parenchyma-only mask (TotalSegmentator's) gets
            # its sinus, or the adaptation fits the C-shaped section (the real-CT case with
            # TotalSegmentator's label: adapted TRE 6.7 mm with it, 1.0 mm filled).
            filled, added = fill_renal_sinus(self.kidney.mask, ct)
            if added:
                self.ct_mask_sinus_filled_ml = added * float(np.prod(ct.GetSpacing())) / 1000.0
                self.kidney = dataclasses.replace(
                    self.kidney, mask=filled, centroid=kidney_centroid(filled)
                )
                self._log(
                    f"CT kidney mask: renal sinus filled in ({self.ct_mask_sinus_filled_ml:.1f} ml)"
                )
        self.ct_kidney_mask = self.kidney.mask
        self.sinus_networks = bool(
            sinus_networks or ct_sinus_features is not None or us_sinus_features is not None
        )
        self._us_sinus_arg = us_sinus_features
        self._us_sinus_model: FeatureModel | None = None
        #: The chosen kidney's sinus on the CT grid (uint8), or None.
        self.ct_sinus_mask: sitk.Image | None = None
        #: Where the CT sinus came from: ``"masks"``, ``"network"``, ``"hu"`` (the CT's HU inside
        #: the kidney map, :func:`renal_sinus`) or None (no sinus).
        self.sinus_source_ct: str | None = None
        if ct_sinus_mask is not None:
            self.ct_sinus_mask = self._kidney_sinus(ct_sinus_mask, ct, ct_sinus_mask_source)
            self.sinus_source_ct = "masks"
        elif self.sinus_networks and ct_sinus_features is None:
            self._hu_sinus()
        elif self.sinus_networks:
            from kidneyreg.features.infer import predict_ct

            self._log("CT sinus feature map (feature network)")
            sinus_model = self._feature_model(ct_sinus_features, "ct", "sinus")
            binary_sinus = sitk.Cast(
                # Not cleaned as a kidney: the sinus is small; _kidney_sinus keeps the near one.
                predict_ct(sinus_model, ct, clean=False) >= FEATURE_THRESHOLD,
                sitk.sitkUInt8,
            )
            try:
                self.ct_sinus_mask = self._kidney_sinus(binary_sinus, ct, sinus_model.source)
                self.sinus_source_ct = "network"
            except InputError as error:
                warnings.warn(f"no plane search: {error}", stacklevel=2)
        #: The plane correction found after adaptation (:meth:`search_plane`), applied to every
        #: registered frame; None: none.
        self.plane_search: PlaneSearchResult | None = None
        self._log(
            f"CT kidney: {self.kidney.side} ({self.kidney.reason}), centroid "
            + ", ".join(f"{v:.1f}" for v in self.kidney.centroid)
            + " mm"
        )

        # Registration grids: one per distinct initial rotation (one without --init).
        rotations = self._init_rotations()
        keys = [tuple(np.round(r, _ROTATION_DECIMALS).ravel()) for r in rotations]
        unique: dict[tuple[float, ...], int] = {}
        self._frame_grid = np.array([unique.setdefault(k, len(unique)) for k in keys], np.int64)
        first = {g: i for i, g in reversed(list(enumerate(self._frame_grid)))}
        self.grids = [
            RegistrationGrid.from_initial_pose(
                make_rigid(rotations[first[g]], np.zeros(3)), self.kidney.centroid, self.profile
            )
            for g in range(len(unique))
        ]
        #: Whether the network works in the L-R mirror image of the registration grid.
        self.mirror = self.kidney.side == "left" if mirror is None else bool(mirror)
        feature_image = (
            sitk.Cast(self.kidney.mask, sitk.sitkFloat32)
            if self.feature_source_ct == "masks"
            else sitk.Cast(kidney_map, sitk.sitkFloat32)
        )
        self._build_cache(feature_image)
        self._moving: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._refined: list[tuple[NDArray[np.float64], torch.Tensor]] = []
        #: CT volumes sampled for refinement passes since the last :meth:`register`.
        self.refinement_volumes = 0
        self.ct_seconds = time.perf_counter() - started

    # -- set-up ---------------------------------------------------------------------------------

    def _load_model(
        self, model: RegistrationModel | RegistrationNet | str | Path | None, profile: Any
    ) -> RegistrationModel:
        name = None if profile is None else get_profile(profile).name
        if isinstance(model, RegistrationModel):
            if name is not None and model.profile.name != name:
                raise InputError(
                    model.source, f"works at profile {model.profile.name!r}, not {name!r}"
                )
            return model
        if isinstance(model, RegistrationNet):
            return RegistrationModel(model, _profile_for_config(model.config, profile), "<memory>")
        return load_registration_model(model, profile=name, device="cpu")

    def _feature_model(
        self,
        model: FeatureModel | str | Path | None,
        modality: str,
        structure: str = "kidney",
        view: str = "sagittal",
    ) -> FeatureModel:
        from kidneyreg.features.infer import FeatureModel, bundled_model_path, load_feature_model

        if isinstance(model, FeatureModel):
            if model.modality != modality:
                raise InputError(model.source, f"is not a {modality.upper()} feature model")
            if model.config.structure != structure:
                raise InputError(model.source, f"is not a {structure} feature model")
            return model
        kind = "" if structure == "kidney" else f"{structure}-"
        option = f"--{modality}-{kind}features"
        mask_option = f"--{modality}-{kind}mask"
        if (
            model is None
            and not bundled_model_path(modality, self.profile.name, structure, view).is_file()
        ):
            raise InputError(
                option,
                f"no bundled {modality.upper()} {structure} feature model for profile "
                f"{self.profile.name!r}: train one with `kidneyreg train-features --modality "
                f"{modality} --structure {structure} --data DIR --out {modality}.pt --profile "
                f"{self.profile.name}` and pass it with {option}, or give {mask_option}",
            )
        return load_feature_model(
            model,
            modality=modality,
            profile=self.profile.name,
            device=self.device,
            structure=structure,
            view=view,
        )

    def _probe_position(self) -> NDArray[np.float64] | None:
        if self.init is None:
            return None
        return np.asarray(self.init.matrices[:, :3, 3].mean(axis=0), dtype=np.float64)

    def _init_rotations(self) -> NDArray[np.float64]:
        if self.init is None:
            return np.asarray(DEFAULT_POSE_ROTATION)[None]
        return np.asarray(self.init.matrices[:, :3, :3], dtype=np.float64)

    def _build_cache(self, feature_image: sitk.Image) -> None:
        """Feature map and normalised CT on an axis-aligned grid covering every registration grid.

        Pretraining samples the moving CT from such a cache (float16, profile spacing, trilinear
        ``sample_grid``); doing the same gives the network the same inputs.
        """
        s = float(self.profile.spacing)
        corners = []
        for grid in self.grids:
            box = np.array(np.meshgrid(*[[0.0, float(n - 1)] for n in grid.shape])).reshape(3, -1)
            corners.append(grid.index_to_world(box.T))
        points = np.concatenate(corners)
        size = np.array(self.ct.GetSize(), dtype=np.float64)
        ct_box = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in size])).reshape(3, -1).T
        ct_world = np.array(
            [self.ct.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in ct_box]
        )
        margin = _CACHE_MARGIN_VOXELS * s
        lo = np.maximum(points.min(axis=0) - margin, ct_world.min(axis=0))
        hi = np.minimum(points.max(axis=0) + margin, ct_world.max(axis=0))
        shape = np.maximum(np.ceil((hi - lo) / s).astype(int) + 1, 2)
        box_profile = Profile(
            f"{self.profile.name}-cache",
            s,
            (int(shape[0]), int(shape[1]), int(shape[2])),
            (1, 1),
            1,
        )
        cache_grid = RegistrationGrid.around(lo + (shape // 2) * s, box_profile)
        ct_array = normalize_ct(
            cache_grid.resample(self.ct, default_value=CT_AIR_HU, antialias=True)
        )
        feature = cache_grid.resample(feature_image, antialias=True).astype(np.float32)
        if self.feature_source_ct == "masks":
            feature = smooth_ct_feature(feature)
        self._cache = torch.from_numpy(np.stack([np.clip(feature, 0.0, 1.0), ct_array])).to(
            torch.float16
        )
        self._cache_origin = cache_grid.index_to_world(np.zeros(3))

    def _sample_moving(self, grid_matrix: NDArray[np.float64]) -> torch.Tensor:
        """The CT feature map and normalised CT sampled on a grid, ``(2, D, H, W)`` on device."""
        volume = sample_grid(
            self._cache, self._cache_origin, self.profile.spacing, grid_matrix, self.profile
        ).clamp_(0.0, 1.0)
        return volume.to(self.device)

    def _grid_matrix(self, grid_id: int) -> NDArray[np.float64]:
        """``G`` of grid ``grid_id`` as the network sees it (``G @ S`` when mirrored)."""
        matrix = self.grids[grid_id].matrix
        return matrix @ MIRROR if self.mirror else matrix

    def moving_volume(self, grid_id: int) -> torch.Tensor:
        """The CT feature map and normalised CT on grid ``grid_id``: ``(2, D, H, W)`` on device."""
        if grid_id in self._moving:
            self._moving.move_to_end(grid_id)
            return self._moving[grid_id]
        volume = self._sample_moving(self._grid_matrix(grid_id))
        self._moving[grid_id] = volume
        if len(self._moving) > _MOVING_CACHE:
            self._moving.popitem(last=False)
        return volume

    @property
    def refinements(self) -> int:
        """Extra network passes per frame: the number set, or by default
        :data:`PRETRAINED_REFINEMENTS` before :meth:`adapt` (or after one it undid) and
        :data:`ADAPTED_REFINEMENTS` after.

        Example:
            >>> registrar.refinements, registrar.adapt(prepared).steps > 0  # doctest: +SKIP
            (1, True)
            >>> registrar.refinements  # doctest: +SKIP
            0
        """
        if self._refinements is not None:
            return self._refinements
        pretrained = self.adaptation is None or self.adaptation.undone
        return PRETRAINED_REFINEMENTS if pretrained else ADAPTED_REFINEMENTS

    @refinements.setter
    def refinements(self, value: int | None) -> None:
        if value is not None and int(value) < 0:
            raise ValueError(f"refinements must be >= 0, got {value}")
        self._refinements = None if value is None else int(value)

    @property
    def frame_step(self) -> int:
        """Frames between two frames that :meth:`register` runs the network on (1: every one).

        Example:
            >>> registrar.frame_step = 3  # doctest: +SKIP
        """
        return self._frame_step

    @frame_step.setter
    def frame_step(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"frame_step must be an integer, got {type(value).__name__}")
        if not 1 <= int(value) <= MAX_FRAME_STEP:
            raise ValueError(f"frame_step must be in 1..{MAX_FRAME_STEP}, got {value}")
        self._frame_step = int(value)

    def reset(self) -> None:
        """Restore the pretrained weights (undo :meth:`adapt` and its plane search)."""
        self.net.load_state_dict(self._pretrained_state)
        self.net.eval()
        self.adaptation = None
        self.plane_search = None

    def _hu_sinus(self) -> None:
        """The chosen kidney's sinus from the CT's HU inside its map (:func:`renal_sinus`)."""
        sinus = renal_sinus(self.kidney.mask, self.ct)
        try:
            self.ct_sinus_mask = self._kidney_sinus(sinus, self.ct, f"{self.ct_source} (sinus HU)")
        except InputError as error:
            warnings.warn(f"no plane search: {error}", stacklevel=3)
            return
        self.sinus_source_ct = "hu"
        voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(self.ct_sinus_mask)))
        ml = voxels * float(np.prod(self.ct.GetSpacing())) / 1000.0
        self._log(f"CT sinus from HU inside the kidney map ({ml:.1f} ml)")

    def _kidney_sinus(self, mask: sitk.Image, ct: sitk.Image, source: str) -> sitk.Image:
        """The sinus mask on the CT grid, kept near the chosen kidney, as uint8."""
        if not isinstance(mask, sitk.Image) or mask.GetDimension() != 3:
            raise TypeError("ct_sinus_mask must be a 3D SimpleITK image")
        if mask.GetSize() != ct.GetSize():
            raise InputError(
                source, f"mask grid differs from the CT: {mask.GetSize()} vs {ct.GetSize()}"
            )
        values = sitk.GetArrayFromImage(mask) != 0
        kidney = sitk.GetArrayViewFromImage(self.kidney.mask) != 0
        margin = np.ceil(_SINUS_MARGIN_MM / np.asarray(ct.GetSpacing())[::-1]).astype(int)
        near = np.zeros_like(values)
        where = np.argwhere(kidney)
        low = np.maximum(where.min(axis=0) - margin, 0)
        high = where.max(axis=0) + margin + 1
        near[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = True
        values &= near
        if not values.any():
            raise InputError(source, f"the sinus mask is empty near the {self.kidney.side} kidney")
        out = sitk.GetImageFromArray(values.astype(np.uint8))
        out.CopyInformation(ct)
        return out

    # -- U/S side -------------------------------------------------------------------------------

    def _us_sinus(
        self, sequence: UltrasoundSequence, kidney: NDArray[Any]
    ) -> NDArray[np.uint8] | None:
        """The U/S sinus network's masks, kept inside the kidney (the sinus is part of it)."""
        from kidneyreg.features.infer import predict_us

        if self._us_sinus_model is None:
            self._log("U/S sinus feature maps (feature network)")
            self._us_sinus_model = self._feature_model(self._us_sinus_arg, "us", "sinus")
        model = self._us_sinus_model
        probabilities = predict_us(model, sequence, stride=int(model.config.window))
        inside = ndimage.binary_dilation(kidney != 0, structure=_IN_PLANE_CROSS, iterations=2)
        sinus = ((probabilities >= FEATURE_THRESHOLD) & inside).astype(np.uint8)
        if not sinus.any():
            warnings.warn(
                f"no plane search: the U/S sinus map is empty in every frame of {sequence.source}",
                stacklevel=3,
            )
            return None
        return sinus

    def us_view(self) -> tuple[str, float]:
        """The bundled U/S model that maps this registrar's sequences, and how far off its view.

        The view (:data:`~kidneyreg.features.infer.US_VIEWS`) nearest to the ``init`` planes
        among those with a bundled model for the profile (the sagittal one without ``init``),
        and the angle (degrees) between the planes and that view (:func:`us_view_angles`).
        Unused when a U/S network (``us_features``) or masks are given.
        """
        from kidneyreg.features.infer import bundled_model_path

        if self.init is None:
            return "sagittal", 0.0
        angles = us_view_angles(self._init_rotations())
        bundled = [
            view
            for view in angles
            if view == "sagittal"
            or bundled_model_path("us", self.profile.name, view=view).is_file()
        ]
        view = min(bundled, key=angles.__getitem__)
        return view, angles[view]

    def _warn_untrained_view(self, sequence: UltrasoundSequence) -> str | None:
        """Warn (and return the message) when a bundled U/S network is to map a view far from
        the one it was trained on."""
        if self.init is None or self._us_features_arg is not None:
            return None
        view, angle = self.us_view()
        if angle <= US_NETWORK_MAX_VIEW_DEG:
            return None
        # Measured on 8 simulated flank cases (README, Flank approach): TRE 16 and 29 mm after
        # adaptation with the sagittal U/S network, 2 and 5 mm with U/S masks.
        message = (
            f"{sequence.source}: the --init plane is {angle:.0f} degrees from the {view} views "
            "the nearest bundled U/S feature network was trained on; its kidney maps of such "
            "views are unreliable: give --us-mask"
        )
        warnings.warn(message, UntrainedViewWarning, stacklevel=3)
        return message

    def _us_model_loaded(self) -> FeatureModel:
        if self._us_model is None:
            if self._us_features_arg is not None:
                view, which = "sagittal", "feature network"  # the view is unused
            else:
                view = self.us_view()[0]
                which = f"bundled feature network for {view} views"
            self._log(f"U/S kidney feature maps ({which})")
            self._us_model = self._feature_model(self._us_features_arg, "us", view=view)
        return self._us_model

    def prepare(
        self,
        sequence: UltrasoundSequence,
        masks: ArrayLike | None = None,
        *,
        detect: bool = True,
        mask_source: str = "U/S kidney mask",
        sinus_masks: ArrayLike | None = None,
        sinus_source: str = "U/S sinus mask",
    ) -> PreparedSequence:
        """Feature maps, kidney centroids and breathing cycles of a sequence.

        Args:
            sequence: The U/S sequence (at least one window of frames).
            masks: ``(n, rows, cols)`` kidney masks; None uses the U/S feature network.
            detect: Detect breathing cycles (a :class:`BreathingNotDetectedWarning` falls back to
                fixed-length cycles); False for short streaming windows.
            mask_source: Name of the masks in messages.
            sinus_masks: ``(n, rows, cols)`` renal-sinus masks (for :meth:`search_plane`), or
                None.
            sinus_source: Name of the sinus masks in messages.

        Raises:
            InputError: Fewer frames than the window, masks of another shape, no kidney in any
                frame, or a per-frame ``init`` of another length.

        Example:
            >>> prepared = registrar.prepare(sequence, masks)  # doctest: +SKIP
        """
        started = time.perf_counter()
        if not isinstance(sequence, UltrasoundSequence):
            raise TypeError(
                f"sequence must be an UltrasoundSequence, got {type(sequence).__name__}"
            )
        n, nw = sequence.n_frames, int(self.profile.window)
        if n < nw:
            raise InputError(
                sequence.source,
                f"has {n} frame{'s' if n != 1 else ''}, fewer than the registration window of {nw}",
            )
        if self.init is not None and self.init.n_frames not in (1, n):
            self.init.broadcast_to(n)  # raises the InputError naming the init file
        pixel_size = (float(sequence.pixel_size[0]), float(sequence.pixel_size[1]))
        frames = normalize_us(sequence.frames)
        user_masks = None
        view_warning = None
        if masks is not None:
            user_masks = _frame_masks(masks, sequence, mask_source)
            features = smooth_us_features(user_masks, pixel_size, self.profile.spacing)
            binary: NDArray[Any] = user_masks
            source = "masks"
        else:
            from kidneyreg.features.infer import predict_us

            view_warning = self._warn_untrained_view(sequence)
            model = self._us_model_loaded()
            # Disjoint windows of Nw frames, each frame taking its window's output at its own
            # position: on 6 held-out simulated sequences Dice 0.9142, against 0.9117 with windows
            # every third frame and 0.9116 with one window per frame, at a fifth of the latter's
            # cost (27 against 44 and 123 ms per frame on one core). A streaming window is then a
            # single network call with real frames on both sides of its middle.
            stride = int(model.config.window)
            features = np.clip(predict_us(model, sequence, stride=stride), 0.0, 1.0)
            # The kidney is one region of a U/S frame: the map keeps only one (with its soft
            # fringe), so that a false response (gas, a vessel, the gallbladder) cannot pull the
            # centroid or the Dice term. Keeping each frame's largest region took Dice on 8
            # held-out sequences from 0.9157 to 0.9385 and, on a case with such a response, the
            # median centroid error from 17.1 to 8.1 mm (worst frame 102 -> 17 mm). Taking the
            # region of the sequence's most persistent structure instead changes nothing on 12
            # held-out simulated sequences, and on B-mode rendered from the real CT (where the
            # gallbladder and the kidney take turns at being the largest) Dice 0.29 -> 0.58 and
            # the median centroid error 81 -> 27 mm.
            kept = persistent_region(features >= FEATURE_THRESHOLD)
            binary = convex_regions(kept)
            fringe = ndimage.binary_dilation(binary, structure=_IN_PLANE_CROSS, iterations=2)
            features = np.where(binary & ~kept, 1.0, features * fringe).astype(np.float32)
            source = "network"
        sinus = None
        if sinus_masks is not None:
            sinus = _frame_masks(sinus_masks, sequence, sinus_source)
            if not sinus.any():
                raise InputError(sinus_source, "the sinus mask is empty in every frame")
            if self.ct_sinus_mask is None:
                self._hu_sinus()
        elif self.sinus_networks and self.ct_sinus_mask is not None and detect:
            # Whole sequences only: the search runs once, on the adaptation cycle; a streaming
            # window (detect=False) only applies the correction found then.
            sinus = self._us_sinus(sequence, binary)
        centroids, visible = _frame_centroids(binary, pixel_size)
        if not visible.any():
            where = mask_source if user_masks is not None else sequence.source
            detail = (
                "the mask is empty"
                if user_masks is not None
                else (f"the U/S feature map is below {FEATURE_THRESHOLD}")
            )
            raise InputError(where, f"no kidney found in any U/S frame ({detail})")
        caught: list[str] = [view_warning] if view_warning is not None else []
        cycles = None
        if detect:
            with warnings.catch_warnings(record=True) as records:
                warnings.simplefilter("always")
                signal = breathing_signal(
                    frames,
                    masks=user_masks if user_masks is not None else features,
                    pixel_size=pixel_size,
                )
                cycles = detect_cycles(signal, frame_rate=sequence.frame_rate)
            for record in records:
                caught.append(str(record.message))
                warnings.warn(record.message, stacklevel=2)
        return PreparedSequence(
            frames=frames,
            features=np.asarray(features, dtype=np.float32),
            masks=user_masks,
            centroids=centroids,
            visible=visible,
            pixel_size=pixel_size,
            frame_rate=sequence.frame_rate,
            feature_source=source,
            cycles=cycles,
            seconds=time.perf_counter() - started,
            warnings=caught,
            source=sequence.source,
            sinus=sinus,
            sinus_source=None
            if sinus is None
            else ("masks" if sinus_masks is not None else "network"),
        )

    def _prepared(
        self, sequence: UltrasoundSequence | PreparedSequence, masks: ArrayLike | None
    ) -> PreparedSequence:
        if isinstance(sequence, PreparedSequence):
            if masks is not None:
                raise ValueError("masks belong to prepare(); this sequence is already prepared")
            return sequence
        return self.prepare(sequence, masks)

    def _grid_of_frame(self, frame: int, n_frames: int) -> int:
        if len(self.grids) == 1:
            return 0
        if len(self._frame_grid) != n_frames:
            raise ValueError(
                f"the initial poses give {len(self._frame_grid)} frames, the sequence has "
                f"{n_frames}"
            )
        return int(self._frame_grid[frame])

    # -- windows --------------------------------------------------------------------------------

    def _window(
        self, prepared: PreparedSequence, centre: int
    ) -> tuple[torch.Tensor, NDArray[np.float64]]:
        """Compact fixed window ``(2, D, H, Nw)`` (feature map, image) and ``P`` of its middle."""
        nw = int(self.profile.window)
        uv = prepared.window_centroid(centre, nw)
        nx = int(self.profile.volume_shape[0])
        x0 = nx // 2 - nw // 2
        layers = [
            build_us_window(
                values, prepared.pixel_size, centre, uv, self.profile, antialias=False
            ).volume[..., x0 : x0 + nw]
            for values in prepared.filtered(self.profile)
        ]
        compact = torch.from_numpy(np.clip(np.stack(layers), 0.0, 1.0))
        P_mid = window_transforms(uv, self.profile)[nw // 2]
        if self.mirror:
            return compact.flip(-1), MIRROR @ P_mid
        return compact, P_mid

    def _batch(
        self,
        prepared: PreparedSequence,
        centres: Sequence[int],
        compact: Sequence[torch.Tensor] | None = None,
        P_mid: Sequence[NDArray[np.float64]] | None = None,
    ) -> _WindowBatch:
        """Network inputs of the windows centred on ``centres`` (precomputed windows optional)."""
        if compact is None or P_mid is None:
            built = [self._window(prepared, int(c)) for c in centres]
            compact = [b[0] for b in built]
            P_mid = [b[1] for b in built]
        nx = int(self.profile.volume_shape[0])
        fixed = embed_window(torch.stack(list(compact)), nx).to(self.device)
        grid_ids = [self._grid_of_frame(int(c), prepared.n_frames) for c in centres]
        moving = torch.stack([self.moving_volume(g) for g in grid_ids])
        grids = np.stack([self._grid_matrix(g) for g in grid_ids])
        return _WindowBatch(fixed, moving, grids, np.stack(list(P_mid)))

    def _forward(self, batch: _WindowBatch) -> tuple[NDArray[np.float64], torch.Tensor]:
        """``M`` of each window's middle frame and the network's ``(B, Nw, 4, 4)`` output."""
        mid = int(self.config.window) // 2
        with torch.inference_mode():
            output = self.net(batch.fixed, batch.moving).matrices
        D = output[:, mid].detach().to(torch.float64).cpu().numpy()
        return np.asarray(batch.grids @ D @ batch.P_mid, dtype=np.float64), output

    def _terms(self, batch: _WindowBatch, output: torch.Tensor) -> dict[str, NDArray[Any]]:
        """Per-window loss terms of the network output ``output`` on ``batch``."""
        mid = int(self.config.window) // 2
        with torch.inference_mode():
            terms = fim_loss(output, batch.fixed, batch.moving, self.config)
            motion, _, _ = motion_loss(
                output,
                self.config.motion_identity_weight,
                self.config.motion_smoothness_weight,
            )
        return {
            "loss": terms.per_sample.detach().double().cpu().numpy(),
            "dice": terms.dice[:, mid].detach().double().cpu().numpy(),
            "mind": terms.mind_difference.detach().double().cpu().numpy(),
            "motion": motion.detach().double().cpu().numpy(),
        }

    def _infer(self, batch: _WindowBatch) -> tuple[NDArray[np.float64], dict[str, NDArray[Any]]]:
        """``M`` of each window's middle frame and its loss terms (one pass, no gradients)."""
        matrices, output = self._forward(batch)
        return matrices, self._terms(batch, output)

    def _refined_volume(
        self, grid: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], torch.Tensor]:
        """A cached refinement grid near ``grid`` and its CT volume, or ``grid`` freshly sampled.

        The grid returned becomes the most recently used one (the last to be evicted).
        """
        for index in range(len(self._refined) - 1, -1, -1):
            cached, volume = self._refined[index]
            if _grids_close(cached, grid):
                self._refined.append(self._refined.pop(index))
                return cached, volume
        volume = self._sample_moving(grid)
        self.refinement_volumes += 1
        self._refined.append((grid, volume))
        if len(self._refined) > _REFINED_CACHE:
            self._refined.pop(0)
        return grid, volume

    def _infer_refined(
        self, batch: _WindowBatch
    ) -> tuple[NDArray[np.float64], dict[str, NDArray[Any]]]:
        """Registration with up to :attr:`refinements` extra passes on grids moved by the estimate.

        A pass on grid ``G`` gives ``M = G @ D @ P``; when ``G' = M @ P^-1`` (the grid moved by
        the estimate) is not within :data:`REFINEMENT_REUSE_MM` / :data:`REFINEMENT_REUSE_DEG`
        of ``G``, the CT is sampled on ``G'`` (or on a recently sampled grid close to it) and the
        window passes again, ``M' = G' @ D' @ P``. The loss terms are those of each window's last
        pass.
        """
        if self.refinements == 0:
            return self._infer(batch)
        # Every window starts on its initial grid. Starting on the previous frame's refined grid
        # instead saves most first passes, but after one-cycle adaptation the estimates fed back
        # from frame to frame drifted (a held-out group B case: TRE 8.2 -> 19.5 mm).
        n = len(batch.grids)
        current = batch
        matrices = np.empty((n, 4, 4))
        values: dict[str, NDArray[Any]] = {}
        pending = np.arange(n)
        for index in range(self.refinements + 1):
            estimate, output = self._forward(current)
            wanted = estimate @ np.linalg.inv(current.P_mid)
            last = index == self.refinements
            finished = np.array(
                [last or _grids_close(g, w) for g, w in zip(current.grids, wanted, strict=True)]
            )
            done = np.flatnonzero(finished)
            if len(done):
                matrices[pending[done]] = estimate[done]
                for name, value in self._terms(_take(current, done), output[done]).items():
                    values.setdefault(name, np.empty(n))[pending[done]] = value
            rest = np.flatnonzero(~finished)
            if not len(rest):
                break
            chosen = [self._refined_volume(w) for w in wanted[rest]]
            current = _WindowBatch(
                current.fixed[rest],
                torch.stack([volume for _, volume in chosen]),
                np.stack([grid for grid, _ in chosen]),
                current.P_mid[rest],
            )
            pending = pending[rest]
        return matrices, values

    def initial_alignment(self, prepared: PreparedSequence) -> NDArray[np.float64]:
        """``(n, 4, 4)`` initial poses ``G @ P`` (U/S kidney centroid on CT kidney centroid).

        Example:
            >>> registrar.initial_alignment(registrar.prepare(seq, masks)).shape  # doctest: +SKIP
            (60, 4, 4)
        """
        nw = int(self.profile.window)
        out = np.empty((prepared.n_frames, 4, 4))
        for k in range(prepared.n_frames):
            P = window_transforms(prepared.window_centroid(k, nw), self.profile)[nw // 2]
            grid = self.grids[self._grid_of_frame(k, prepared.n_frames)]
            out[k] = grid.to_world_matrix(P)
        return out

    def evaluate_windows(
        self, sequence: UltrasoundSequence | PreparedSequence, centres: Sequence[int]
    ) -> NDArray[np.float64]:
        """FIM loss of the current model on the windows centred on ``centres`` (no update).

        Example:
            >>> registrar.evaluate_windows(prepared, [0, 1, 2]).shape  # doctest: +SKIP
            (3,)
        """
        prepared = self._prepared(sequence, None)
        losses = []
        for first in range(0, len(centres), self.batch_size):
            batch = self._batch(
                prepared, [int(c) for c in centres[first : first + self.batch_size]]
            )
            losses.append(self._infer(batch)[1]["loss"])
        return np.concatenate(losses) if losses else np.zeros(0)

    # -- adaptation -----------------------------------------------------------------------------

    def adapt(
        self,
        sequence: UltrasoundSequence | PreparedSequence,
        masks: ArrayLike | None = None,
        *,
        frames_idx: Sequence[int] | None = None,
        strategy: str = "one-cycle",
        epochs: int | None = None,
        lr: float = DEFAULT_ADAPT_LR,
        batch_size: int = 1,
        seed: int = 0,
        anchor_weight: float | None = None,
        progress: Callable[[int, int, float], None] | None = None,
        plane_search: bool | None = None,
    ) -> AdaptationRecord:
        """Fine-tune the model on windows of the sequence's first breathing cycle (unsupervised).

        Args:
            sequence: The sequence (or a :meth:`prepare` result).
            masks: U/S kidney masks when ``sequence`` is not prepared.
            frames_idx: Window centres to adapt on; None: chosen by ``strategy`` from the first
                detected breathing cycle (:func:`kidneyreg.adapt.adaptation_frames`).
            strategy: ``"one-cycle"``, ``"one-shot"`` or ``"five-shot"``.
            epochs: Passes over the windows; None: 2 for one-cycle, 5 for the shots.
            lr: Adam learning rate.
            batch_size: Windows per step.
            seed: Seed of the window order.
            anchor_weight: Pull towards the model's estimates before adaptation
                (:func:`kidneyreg.adapt.fine_tune`; 0: the paper's pure FIM loss). None:
                :data:`~kidneyreg.adapt.MASKS_ANCHOR_WEIGHT` when the CT and the U/S kidney
                maps are both given masks (or the U/S maps are masks and the CT network's map
                is cut back to the capsule, ``trim_ct_fat``),
                :data:`~kidneyreg.adapt.DEFAULT_ANCHOR_WEIGHT` when a feature network made
                either otherwise.
            progress: Called after every step with ``(step, total, loss)``.
            plane_search: Also search one plane correction (:meth:`search_plane`) for the
                weights before and after the adaptation, on the same frames, and keep the
                weights whose corrected estimates overlap kidney and sinus better (the record's
                ``search_scores`` and ``undone``). None: when the CT and the sequence have sinus
                maps (given masks or the sinus networks' maps).

        Returns:
            The record (also kept as :attr:`adaptation`).

        Raises:
            InputError: Frame indices outside the sequence.

        Example:
            >>> record = registrar.adapt(sequence, masks)  # doctest: +SKIP
            >>> record.steps  # doctest: +SKIP
            116
        """
        started = time.perf_counter()
        check_strategy(strategy)
        prepared = self._prepared(sequence, masks)
        with_sinus = self.ct_sinus_mask is not None and prepared.sinus is not None
        if plane_search and not with_sinus:
            raise ValueError(_PLANE_SEARCH_NEEDS)
        # A correction found for the previous weights does not belong to the adapted ones.
        self.plane_search = None
        n = prepared.n_frames
        cycle: tuple[int, int] | None = None
        if frames_idx is None:
            cycles = prepared.cycles
            if cycles is None:
                raise ValueError("adaptation needs the breathing cycles: prepare with detect=True")
            in_cycle = first_cycle_frames(cycles, n)
            cycle = (int(in_cycle[0]), int(in_cycle[-1]) + 1)
            centres = adaptation_frames(strategy, in_cycle)
        else:
            centres = np.asarray(list(frames_idx), dtype=np.int64)
            if centres.size == 0 or centres.min() < 0 or centres.max() >= n:
                raise InputError(
                    "adaptation frames", f"must be frame indices within 0..{n - 1}, got {centres}"
                )
        if anchor_weight is None:
            # Exact outlines on both sides (a CT network's map cut back to the capsule counts:
            # against U/S masks it adapts as the CT mask does) take the paper's pure loss.
            exact_ct = self.feature_source_ct == "masks" or self.trim_ct_fat
            with_masks = exact_ct and prepared.feature_source == "masks"
            anchor_weight = MASKS_ANCHOR_WEIGHT if with_masks else DEFAULT_ANCHOR_WEIGHT
        n_epochs = default_epochs(strategy) if epochs is None else int(epochs)
        self._log(
            f"adapting ({strategy}, {n_epochs} epoch(s)) on {len(centres)} window(s), frames "
            f"{int(centres.min())}..{int(centres.max())}"
        )
        # Until this adaptation ends the weights register as unadapted ones: the plane search
        # below scores them so, and an adaptation it undoes registers them the same way.
        self.adaptation = None
        run_search = with_sinus if plane_search is None else plane_search
        before: PlaneSearchResult | None = None
        before_state: dict[str, torch.Tensor] = {}
        search_frames = (np.arange(*cycle) if cycle is not None else centres).tolist()
        search_s = 0.0  # both searches, the estimates they start from included

        def timed_search() -> PlaneSearchResult:
            nonlocal search_s
            search_started = time.perf_counter()
            result = self.search_plane(prepared, frames_idx=search_frames)
            search_s += time.perf_counter() - search_started
            return result

        if run_search:
            # The weights before adaptation get their own correction, on the frames the adapted
            # ones will be searched on: the better overlap of the two is kept (below).
            before_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            before = timed_search()
            self.plane_search = None
        windows = [self._window(prepared, int(c)) for c in centres]

        def inputs(indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
            batch = self._batch(
                prepared,
                [int(centres[i]) for i in indices],
                [windows[i][0] for i in indices],
                [windows[i][1] for i in indices],
            )
            return batch.fixed, batch.moving

        log = fine_tune(
            self.net,
            inputs,
            len(centres),
            epochs=n_epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            anchor_weight=anchor_weight,
            progress=progress,
        )
        self.adaptation = AdaptationRecord(
            strategy=strategy,
            epochs=n_epochs,
            steps=log.steps,
            frames=tuple(int(c) for c in centres),
            cycle=cycle,
            lr=float(lr),
            batch_size=int(batch_size),
            seconds=time.perf_counter() - started - search_s,
            loss_history=log.loss_history,
            epoch_losses=log.epoch_losses,
            anchor_weight=float(anchor_weight),
        )
        if before is not None:
            after = timed_search()
            record = self.adaptation
            record.search_scores = (before.score_after, after.score_after)
            kept = after
            # The pure FIM loss can fit the outline with planes the sinus shows to be wrong
            # (on 8 held-out group-B patients it moved one from 2.9 to 9.7 mm after the search):
            # the kidney + sinus overlap, scored on the same frames, decides.
            if before.score_after > after.score_after:
                self.net.load_state_dict(before_state)
                self.net.eval()
                record.undone = True
                kept = before
                self._log(
                    f"adaptation undone: the weights before it overlap kidney and sinus better "
                    f"after their plane search ({before.score_after:.3f} against "
                    f"{after.score_after:.3f})"
                )
            # Its time is that of both searches.
            self.plane_search = replace(kept, seconds=search_s)
        return self.adaptation

    def search_plane(
        self,
        sequence: UltrasoundSequence | PreparedSequence,
        masks: ArrayLike | None = None,
        *,
        frames_idx: Sequence[int] | None = None,
    ) -> PlaneSearchResult:
        """Search one plane correction, common to every frame, on kidney and sinus overlap.

        The current model registers the frames (at most :data:`PLANE_SEARCH_FRAMES`, spread
        evenly over them); then :func:`~kidneyreg.registration.plane_search.search_plane_offset`
        finds the tilts, in-plane rotation, normal offset and in-plane shift (in each frame's
        axes, about its U/S kidney centroid) that make the CT kidney and sinus sections overlap
        the U/S masks best.
        :meth:`register` and :meth:`register_frame` then apply it to every frame, until the next
        :meth:`adapt` or :meth:`reset`.

        Args:
            sequence: The sequence (or a :meth:`prepare` result, with sinus masks).
            masks: U/S kidney masks when ``sequence`` is not prepared.
            frames_idx: Frames to score; None: the adaptation's cycle (or its frames), else the
                first detected breathing cycle.

        Returns:
            The search result (also kept as :attr:`plane_search`).

        Raises:
            ValueError: No sinus masks for the CT or the sequence, or no breathing cycles.
            InputError: Frame indices outside the sequence or no kidney in those frames.

        Example:
            >>> prepared = registrar.prepare(seq, masks, sinus_masks=sinus)  # doctest: +SKIP
            >>> registrar.search_plane(prepared).offset.normal_mm  # doctest: +SKIP
            -6.0
        """
        prepared = self._prepared(sequence, masks)
        if self.ct_sinus_mask is None or prepared.sinus is None:
            raise ValueError(_PLANE_SEARCH_NEEDS)
        n = prepared.n_frames
        record = self.adaptation
        if frames_idx is not None:
            frames = np.asarray(list(frames_idx), dtype=np.int64)
            if frames.size == 0 or frames.min() < 0 or frames.max() >= n:
                raise InputError(
                    "plane search frames", f"must be frame indices within 0..{n - 1}, got {frames}"
                )
        elif record is not None and record.cycle is not None and record.cycle[1] <= n:
            frames = np.arange(*record.cycle)
        elif record is not None and max(record.frames) < n:
            frames = np.asarray(record.frames, dtype=np.int64)
        else:
            if prepared.cycles is None:
                raise ValueError(
                    "the plane search needs the breathing cycles: prepare with detect=True"
                )
            frames = first_cycle_frames(prepared.cycles, n)
        frames = frames[prepared.visible[frames]]
        if frames.size == 0:
            raise InputError(prepared.source, "no kidney in the frames of the plane search")
        if frames.size > PLANE_SEARCH_FRAMES:
            spread = np.linspace(0, frames.size - 1, PLANE_SEARCH_FRAMES).round().astype(int)
            frames = frames[spread]
        self.plane_search = None  # score the model's own estimates
        self._refined.clear()
        estimates = np.concatenate(
            [
                self._infer_refined(
                    self._batch(prepared, frames[i : i + self.batch_size].tolist())
                )[0]
                for i in range(0, frames.size, self.batch_size)
            ]
        )
        result = search_plane_offset(
            [self.ct_kidney_mask, self.ct_sinus_mask],
            [prepared.kidney_masks()[frames], prepared.sinus[frames]],
            estimates,
            prepared.centroids[frames],
            prepared.pixel_size,
            frames=frames.tolist(),
            structures=("kidney", "sinus"),
        )
        offset = result.offset
        self._log(
            f"plane search on {frames.size} frames: tilt {offset.tilt_u_deg:+.1f} / "
            f"{offset.tilt_v_deg:+.1f} deg, in plane {offset.in_plane_deg:+.1f} deg, normal "
            f"{offset.normal_mm:+.1f} mm, shift "
            f"{offset.shift_u_mm:+.1f} / {offset.shift_v_mm:+.1f} mm (overlap "
            f"{result.score_before:.3f} -> {result.score_after:.3f})"
        )
        self.plane_search = result
        return result

    # -- registration ---------------------------------------------------------------------------

    def register(
        self,
        sequence: UltrasoundSequence | PreparedSequence,
        masks: ArrayLike | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> RegistrationResult:
        """Register every frame with the current (adapted or pretrained) model.

        Frame ``k`` gets the estimate of the window whose middle it is (edge frames repeated at
        the ends). Windows are batched (``batch_size``). With :attr:`frame_step` ``m > 1`` only
        every ``m``-th frame and the last are registered so; the frames between get poses
        interpolated between their two registered neighbours, and the loss terms (and
        ``window_centres`` entry) of the nearer one.

        Args:
            sequence: The sequence (or a :meth:`prepare` result).
            masks: U/S kidney masks when ``sequence`` is not prepared.
            progress: Called after every batch with ``(frames done, n_frames)``.

        Returns:
            The poses with initial alignment, per-frame loss terms, cycle starts and timing
            (``ms_per_frame`` covers the U/S preparation and the registration, not file I/O).

        Example:
            >>> result = registrar.register(sequence, masks)  # doctest: +SKIP
            >>> result.n_frames == sequence.n_frames  # doctest: +SKIP
            True
        """
        prepared = self._prepared(sequence, masks)
        started = time.perf_counter()
        # Refinement grids are shared between nearby frames: start afresh so that registering the
        # same sequence twice gives the same poses (streaming keeps them between frames).
        self._refined.clear()
        self.refinement_volumes = 0
        n = prepared.n_frames
        step = self.frame_step
        registered = np.union1d(np.arange(0, n, step), [n - 1]).astype(np.int64)
        matrices = np.empty((len(registered), 4, 4))
        terms: dict[str, list[NDArray[Any]]] = {}
        for first in range(0, len(registered), self.batch_size):
            centres = registered[first : first + self.batch_size]
            batch = self._batch(prepared, centres.tolist())
            matrices[first : first + len(centres)], values = self._infer_refined(batch)
            for name, value in values.items():
                terms.setdefault(name, []).append(value)
            if progress is not None:
                progress(int(min(n, centres[-1] + 1)), n)
        # Each frame's nearest registered frame (the earlier one on a tie).
        after = np.searchsorted(registered, np.arange(n))
        before = np.maximum(after - 1, 0)
        nearer_before = np.arange(n) - registered[before] <= registered[after] - np.arange(n)
        nearest = np.where(nearer_before, before, after)
        if len(registered) < n:
            matrices = interpolate_rigid(registered, matrices, np.arange(n))
        if self.plane_search is not None:
            matrices = self.plane_search.offset.apply(matrices, prepared.centroids)
        seconds = time.perf_counter() - started
        record = self.adaptation
        timing = {
            "ct_preparation_s": self.ct_seconds,
            "us_preparation_s": prepared.seconds,
            "adaptation_s": 0.0 if record is None else record.seconds,
            "plane_search_s": 0.0 if self.plane_search is None else self.plane_search.seconds,
            "registration_s": seconds,
            "ms_per_frame": 1000.0 * (prepared.seconds + seconds) / n,
            "network_ms_per_frame": 1000.0 * seconds / n,
        }
        extras: dict[str, Any] = {
            "kidney": self.kidney.to_dict(),
            "feature_source": {"ct": self.feature_source_ct, "us": prepared.feature_source},
            "us_feature_model": (
                self._us_model.source
                if prepared.feature_source == "network" and self._us_model is not None
                else None
            ),
            "initial_pose": "default sagittal" if self.init is None else self.init.source,
            "batch_size": self.batch_size,
            "refinements": self.refinements,
            "frame_step": step,
            "mirrored": self.mirror,
            "ct_mask_sinus_filled_ml": self.ct_mask_sinus_filled_ml,
            "ct_map_fat_trimmed_ml": self.ct_map_fat_trimmed_ml,
            "refinement_volumes": self.refinement_volumes,
        }
        if prepared.cycles is not None:
            extras["cycles"] = prepared.cycles.to_dict()
        if record is not None:
            extras["adaptation_record"] = record.to_dict()
        if self.plane_search is not None:
            extras["plane_search"] = {
                **self.plane_search.to_dict(),
                "sinus_source": {"ct": self.sinus_source_ct, "us": prepared.sinus_source},
            }
        return RegistrationResult(
            matrices=matrices,
            initial_matrices=self.initial_alignment(prepared),
            loss_terms={name: np.concatenate(parts)[nearest] for name, parts in terms.items()},
            window_centres=registered[nearest],
            cycle_starts=[] if prepared.cycles is None else list(prepared.cycles.boundaries),
            adaptation="none" if record is None else record.strategy,
            # None when the model was adapted on another (longer) sequence.
            adaptation_frames=(
                record.frame_range if record is not None and record.frame_range[1] <= n else None
            ),
            timing=timing,
            profile=self.profile.name,
            model_id=self.model.source,
            device=str(self.device),
            extras=extras,
            warnings=list(prepared.warnings),
        )

    def register_frame(
        self,
        window: UltrasoundSequence | ArrayLike,
        *,
        pixel_size: Sequence[float] | None = None,
        masks: ArrayLike | None = None,
        frame_index: int | None = None,
    ) -> FrameRegistration:
        """Register the middle frame of one window of ``Nw`` frames (streaming).

        Args:
            window: ``Nw`` consecutive frames ``(Nw, rows, cols)`` (B-mode 0..255) or a sequence
                of ``Nw`` frames; its middle frame is the target.
            pixel_size: ``(sx, sy)`` mm when ``window`` is an array.
            masks: The window's kidney masks, or None for the U/S feature network.
            frame_index: Index of the target frame in the whole sequence; needed with one initial
                pose per frame.

        Returns:
            The target frame's pose, initial alignment and loss terms.

        Example:
            >>> frame = registrar.register_frame(frames[k - 2 : k + 3], pixel_size=(0.3, 0.3),
            ...                                  frame_index=k)  # doctest: +SKIP
        """
        started = time.perf_counter()
        nw = int(self.profile.window)
        if isinstance(window, UltrasoundSequence):
            sequence = window
        else:
            if pixel_size is None:
                raise ValueError("pixel_size is needed when the window is an array")
            sequence = UltrasoundSequence(np.asarray(window), (pixel_size[0], pixel_size[1]))
        if sequence.n_frames != nw:
            raise InputError(
                sequence.source, f"a streaming window has {nw} frames, got {sequence.n_frames}"
            )
        prepared = self.prepare(sequence, masks, detect=False)
        grid_id = 0
        if len(self.grids) > 1:
            if frame_index is None:
                raise ValueError("frame_index is needed with one initial pose per frame")
            grid_id = int(self._frame_grid[int(frame_index)])
        compact, P = self._window(prepared, nw // 2)
        nx = int(self.profile.volume_shape[0])
        batch = _WindowBatch(
            embed_window(compact[None], nx).to(self.device),
            self.moving_volume(grid_id)[None],
            self._grid_matrix(grid_id)[None],
            P[None],
        )
        matrices, values = self._infer_refined(batch)
        if self.plane_search is not None:
            matrices = self.plane_search.offset.apply(matrices, prepared.centroids[nw // 2][None])
        return FrameRegistration(
            matrix=matrices[0],
            initial_matrix=self._grid_matrix(grid_id) @ P,  # G @ P, mirrored or not
            loss_terms={name: float(v[0]) for name, v in values.items()},
            seconds=time.perf_counter() - started,
        )

    # -- everything -----------------------------------------------------------------------------

    def run(
        self,
        sequence: UltrasoundSequence | PreparedSequence,
        masks: ArrayLike | None = None,
        *,
        strategy: str | None = "one-cycle",
        epochs: int | None = None,
        lr: float = DEFAULT_ADAPT_LR,
        batch_size: int = 1,
        seed: int = 0,
        adapt_progress: Callable[[int, int, float], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> RegistrationResult:
        """Prepare the sequence, adapt on its first breathing cycle, register every frame.

        Args:
            sequence: The U/S sequence (or a :meth:`prepare` result).
            masks: Its kidney masks (None: the U/S feature network) when not prepared.
            strategy: Adaptation strategy, or None for none (``--no-adapt``).
            epochs, lr, batch_size, seed: Adaptation settings (:meth:`adapt`).
            adapt_progress: Adaptation progress callback.
            progress: Registration progress callback.

        Example:
            >>> result = Registrar(ct, "model.pt", ct_mask=m).run(seq, masks)  # doctest: +SKIP
        """
        prepared = self._prepared(sequence, masks)
        if strategy is not None:
            self.adapt(
                prepared,
                strategy=strategy,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                progress=adapt_progress,
            )
        self._log(f"registering {prepared.n_frames} frames")
        return self.register(prepared, progress=progress)

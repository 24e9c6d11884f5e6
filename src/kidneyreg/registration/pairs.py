"""Training pairs for pretraining, generated on the fly (Methods, "Training Data Generation").

The paper models the offsets "initial alignment -> verified reference plane" of a training cohort
with 2-sigma Gaussians (:mod:`kidneyreg.registration.pose_model`), samples Nt offsets and applies
their inverses to the reference alignment, giving Nt CT-U/S pairs whose correct answer is known.

Here, for a case and a window centred on frame ``k`` with reference poses ``M_j`` (U/S image mm ->
CT world mm, one per window frame ``j``; ``c = Nw // 2`` is the middle one):

* ``P_j`` = :func:`~kidneyreg.preprocess.window_transforms` of the U/S kidney centroid of frame
  ``k`` (U/S image mm -> internal mm; ``P_c`` puts frame ``k`` on the x = 0 slice).
* The reference grid ``G_ref = M_c @ P_c^-1`` is ``RegistrationGrid.from_initial_pose(M_c,
  M_c @ centroid)``: its middle x slice is the reference plane of frame ``k`` and the U/S kidney
  centroid lands on its origin, so on it the network's correct output for the middle frame is the
  identity.
* An offset ``D`` is drawn from the pose model and the CT is resampled (once, one interpolation)
  on the perturbed grid ``G' = G_ref @ D^-1``. Since ``G' @ D @ P_c = M_c``, the correct output
  for the middle frame is ``D``.
* Frame ``j`` of the window is compared with the warped CT's middle slice ``x = 0``
  (:mod:`kidneyreg.registration.transformer`), so its pixels sit at internal ``P_c @ (u, v, 0)``
  like the middle frame's and its result is ``M_j = G @ D_j @ P_c``. It moves with breathing: its
  reference offset on ``G_ref`` is ``E_j = G_ref^-1 @ M_j @ P_c^-1`` (``E_c = I``), and on ``G'``
  its correct output is ``D_j = G'^-1 @ M_j @ P_c^-1 = D @ E_j``, the sampled offset composed with
  the frame's breathing motion relative to the middle frame.

Every pair is a pure function of ``(seed, pair index)``: the same index gives the same pair in
any DataLoader worker, whatever the number of workers. Per case the CT (normalised) and its kidney
feature map are cached once at the profile's spacing on an axis-aligned box around the kidney
(float16), so a pair costs one trilinear ``grid_sample`` of a crop of that cache plus the
resampling of the ``Nw`` U/S frames.

Case folders (DESIGN.md section 2): ``ct.nii.gz``, ``ct_kidney_mask.nii.gz``, ``us.nii.gz``,
``us_kidney_mask.nii.gz`` and the reference poses in one of ``ground_truth.json`` (simulated),
``reference.json`` (a user's verified reference planes, transforms schema) or ``reference.tfm``
(one ITK transform for every frame). An optional ``init.json`` (transforms schema, one pose for
all frames or one per frame) replaces the default initial pose, as ``--init`` does for
``register``. An optional ``case.json`` key ``"patient"`` groups cases of one patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from scipy import ndimage
from torch.utils.data import Dataset

from kidneyreg.errors import InputError
from kidneyreg.features.data import normalize_us
from kidneyreg.geometry import euler_to_matrix, invert_rigid, matrix_to_euler
from kidneyreg.io.cases import patient_id
from kidneyreg.io.image import read_ct, read_mask
from kidneyreg.io.transforms import TransformSequence, read_tfm, read_transforms_json
from kidneyreg.io.us import UltrasoundSequence, read_us_mask, read_us_sequence
from kidneyreg.preprocess import (
    MIRROR,
    RegistrationGrid,
    build_us_window,
    fill_renal_sinus,
    kidney_centroid,
    kidney_side,
    normalize_ct,
    us_kidney_centroid,
    window_indices,
    window_transforms,
)
from kidneyreg.profiles import Profile, get_profile
from kidneyreg.registration.pose_model import GaussianPoseModel, initial_to_reference
from kidneyreg.simulate.tissues import Tissue

if TYPE_CHECKING:
    from kidneyreg.features.infer import FeatureModel

__all__ = [
    "CASE_FILES",
    "FEATURE_CHANNEL",
    "IMAGE_CHANNEL",
    "REFERENCE_FILES",
    "CohortCase",
    "FeatureModels",
    "FeatureSource",
    "TrainingPairs",
    "ValidationWindows",
    "find_cases",
    "fit_pose_model",
    "load_case",
    "pair_rng",
    "reference_offsets",
    "sample_grid",
    "smooth_ct_feature",
    "smooth_us_features",
    "split_cases",
]

FeatureSource = Literal["masks", "network"]


class FeatureModels(NamedTuple):
    """The CT and U/S feature networks used with ``features="network"``."""

    ct: FeatureModel
    us: FeatureModel


#: Channel of the kidney feature map in ``fixed`` / ``moving`` (the loss's convention).
FEATURE_CHANNEL = 0
#: Channel of the image (U/S B-mode in [0, 1], normalised CT) in ``fixed`` / ``moving``.
IMAGE_CHANNEL = 1

#: Files every case folder needs.
CASE_FILES: dict[str, str] = {
    "ct": "ct.nii.gz",
    "ct_mask": "ct_kidney_mask.nii.gz",
    "us": "us.nii.gz",
    "us_mask": "us_kidney_mask.nii.gz",
}
#: Reference pose files, in order of preference.
REFERENCE_FILES = ("ground_truth.json", "reference.json", "reference.tfm")
#: Optional initial pose file of a case.
INIT_FILE = "init.json"
#: Label maps (simulator tissue codes) that give the maps of structures other than the kidney:
#: the CT's on the CT grid, the U/S sequence's on its grid.
LABEL_FILES: dict[str, str] = {"ct": "labels.nii.gz", "us": "us_labels.nii.gz"}
#: Tissue codes (:class:`kidneyreg.simulate.tissues.Tissue`) of each structure but the kidney.
STRUCTURE_LABELS: dict[str, tuple[int, ...]] = {
    "sinus": (int(Tissue.SINUS_FAT), int(Tissue.COLLECTING)),
}

# Smoothing of the ground-truth masks used as feature maps, in profile voxels (sigma): enough to
# give the Dice loss a gradient across the boundary, small enough to keep it where it is.
_FEATURE_SIGMA_VOXELS = 0.5
# Structures other than the kidney (its sinus) are kept within this distance (mm) of its mask.
_NEAR_KIDNEY_MM = 5.0
# Margin (mm) of the cached CT box beyond the registration grid's half diagonal: covers the
# distance from the CT kidney centroid to a reference grid's origin (a point of the kidney on the
# reference plane, moved by breathing) plus the sampled translations.
_CACHE_MARGIN_MM = 60.0
# Random stream of pair generation (independent of anything else seeded with the same seed).
_PAIR_STREAM = 0x9A125


def pair_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of pair ``index`` (a pure function of ``seed`` and ``index``).

    Example:
        >>> bool(pair_rng(0, 3).integers(100) == pair_rng(0, 3).integers(100))
        True
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), _PAIR_STREAM, int(index)]))


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CohortCase:
    """One case of a training cohort, cached for fast pair generation.

    Attributes:
        case_id: Folder name.
        folder: The case folder.
        patient: Grouping key for the train/validation split.
        profile: Resolution profile of the cache.
        ct_centroid: CT kidney centroid (LPS mm).
        cache: float16 ``(2 + S, Z, Y, X)``: CT kidney feature map, normalised CT and the
            other structures' CT maps on an axis-aligned grid of spacing ``profile.spacing``
            around the kidney.
        cache_origin: World position (LPS mm) of cache voxel ``(0, 0, 0)``.
        us_frames: float32 ``(n, rows, cols)`` B-mode in [0, 1].
        us_features: float32 ``(n, rows, cols)`` U/S kidney feature maps in [0, 1].
        us_mask: uint8 ``(n, rows, cols)`` U/S kidney masks.
        us_structures: float32 ``(S, n, rows, cols)`` U/S feature maps of the structures after
            the kidney (``structures[1:]`` of :func:`load_case`; ``S = 0`` by default). Their CT
            maps follow the CT image in :attr:`cache`.
        pixel_size: U/S ``(sx, sy)`` mm.
        references: ``(n, 4, 4)`` reference poses ``M_ref`` (U/S image mm -> CT world mm).
        init_poses: ``(n, 4, 4)`` initial poses from ``init.json``, or None (default pose).
        centroids_uv: ``(n, 2)`` U/S kidney centroids (mm), NaN where the mask is empty.
        ct_mask: The CT kidney mask (uint8, cropped around the kidney) for validation metrics.
        us_structures: U/S maps of the structures after the kidney ``(S, n, rows, cols)``.
        mirror: The network sees this case in the L-R mirror image of its grids (a left kidney,
            as :class:`~kidneyreg.pipeline.Registrar` registers one): :meth:`moving` samples
            ``G @ MIRROR``, :meth:`fixed` reverses the window's frames, and
            :meth:`to_network` / :meth:`from_network` convert the outputs.
    """

    case_id: str
    folder: Path
    patient: str
    profile: Profile
    ct_centroid: NDArray[np.float64]
    cache: torch.Tensor
    cache_origin: NDArray[np.float64]
    us_frames: NDArray[np.float32]
    us_features: NDArray[np.float32]
    us_mask: NDArray[np.uint8]
    pixel_size: tuple[float, float]
    references: NDArray[np.float64]
    init_poses: NDArray[np.float64] | None
    centroids_uv: NDArray[np.float64]
    ct_mask: sitk.Image
    us_structures: NDArray[np.float32] = field(
        default_factory=lambda: np.zeros((0, 0, 0, 0), np.float32)
    )
    mirror: bool = False

    @property
    def n_frames(self) -> int:
        """Number of U/S frames."""
        return int(self.us_frames.shape[0])

    @property
    def valid_frames(self) -> NDArray[np.int64]:
        """Frames whose kidney mask is not empty (they can be window centres)."""
        return np.flatnonzero(np.isfinite(self.centroids_uv[:, 0])).astype(np.int64)

    def window_P(self, k: int) -> NDArray[np.float64]:
        """``(Nw, 4, 4)`` U/S image mm -> internal mm of the window centred on frame ``k``."""
        return window_transforms(self._centroid(k), self.profile)

    def window_frames(self, k: int) -> NDArray[np.int64]:
        """Frame indices of the window centred on ``k`` (edges repeat the first/last frame)."""
        return window_indices(self.n_frames, k, self.profile.window)

    def window_targets(self, k: int, grid_matrix: NDArray[np.float64]) -> NDArray[np.float64]:
        """``(Nw, 4, 4)`` correct outputs ``G^-1 @ M_j @ P_c^-1`` on a grid, window centred on k.

        ``M_j`` are the reference poses of the window's frames and ``P_c`` the middle frame's
        U/S image mm -> internal mm map: every frame is compared on the plane ``x = 0``.
        """
        P_c = self.window_P(k)[self.profile.window // 2]
        M = self.references[self.window_frames(k)]
        return np.asarray(invert_rigid(grid_matrix) @ M @ invert_rigid(P_c), dtype=np.float64)

    def initial_grid(self, k: int) -> RegistrationGrid:
        """The registration grid of the initial alignment for target frame ``k``.

        Centred on the CT kidney centroid; default orientation, or the plane of the frame's
        ``init.json`` pose.
        """
        if self.init_poses is None:
            return RegistrationGrid.around(self.ct_centroid, self.profile)
        return RegistrationGrid.from_initial_pose(
            self.init_poses[k], self.ct_centroid, self.profile
        )

    def reference_grid(self, k: int) -> RegistrationGrid:
        """The grid whose middle x slice is frame ``k``'s reference plane, kidney on the origin.

        ``G_ref @ P_c == M_ref[k]``: the U/S kidney centroid of frame ``k`` maps to the origin.
        """
        uv = self._centroid(k)
        centre = self.references[k] @ np.array([uv[0], uv[1], 0.0, 1.0])
        return RegistrationGrid.from_initial_pose(self.references[k], centre[:3], self.profile)

    def reference_offset(self, k: int) -> NDArray[np.float64]:
        """``D_ref`` (4x4, internal mm): initial alignment -> reference pose of frame ``k``."""
        P = self.window_P(k)[self.profile.window // 2]
        return initial_to_reference(self.initial_grid(k).matrix, P, self.references[k])

    def _centroid(self, k: int) -> NDArray[np.float64]:
        uv = self.centroids_uv[int(k)]
        if not np.all(np.isfinite(uv)):
            raise InputError(
                self.folder / CASE_FILES["us_mask"], f"kidney mask is empty in frame {k}"
            )
        return np.asarray(uv, dtype=np.float64)

    def to_network(self, targets: NDArray[np.float64]) -> NDArray[np.float64]:
        """``(Nw, 4, 4)`` outputs on a grid as the network gives them (mirrored: reflected, and
        in the reversed frame order of :meth:`fixed`)."""
        if not self.mirror:
            return np.asarray(targets, dtype=np.float64)
        return np.asarray(MIRROR @ np.asarray(targets)[::-1] @ MIRROR, dtype=np.float64)

    def from_network(self, output: NDArray[np.float64]) -> NDArray[np.float64]:
        """The network's output for one frame ``(4, 4)`` (or a window's ``(Nw, 4, 4)``, frames
        in its order) as the offset ``D`` on the grid, ``M = G @ D @ P``."""
        if not self.mirror:
            return np.asarray(output, dtype=np.float64)
        return np.asarray(MIRROR @ np.asarray(output) @ MIRROR, dtype=np.float64)

    def moving(self, grid_matrix: NDArray[np.float64]) -> torch.Tensor:
        """The cached maps and CT sampled on the grid ``grid_matrix``: ``(2 + S, D, H, W)``
        (on ``grid_matrix @ MIRROR`` for a mirrored case)."""
        matrix = np.asarray(grid_matrix, dtype=np.float64)
        if self.mirror:
            matrix = matrix @ MIRROR
        volume = sample_grid(
            self.cache, self.cache_origin, self.profile.spacing, matrix, self.profile
        )
        # Both channels lie in [0, 1]; trilinear weights can overshoot by a rounding error.
        return volume.clamp_(0.0, 1.0)

    def fixed(self, k: int) -> torch.Tensor:
        """The U/S window's feature maps and images, centred on frame ``k``: ``(2 + S, D, H, W)``
        (kidney map, image, other structures' maps)."""
        uv = self._centroid(k)
        sources = [self.us_features, self.us_frames, *self.us_structures]
        volumes = [
            build_us_window(frames, self.pixel_size, k, uv, self.profile).volume
            for frames in sources
        ]
        # Linear interpolation in float32 can overshoot [0, 1] by a rounding error.
        window = torch.from_numpy(np.clip(np.stack(volumes), 0.0, 1.0))
        if self.mirror:
            # Frame j to the slice of frame Nw - 1 - j: a reflection about the middle slice
            # nx // 2, not a flip of the whole (even-sized) x axis.
            x0 = self.profile.volume_shape[0] // 2 - self.profile.window // 2
            frames = slice(x0, x0 + self.profile.window)
            window[..., frames] = window[..., frames].flip(-1)
        return window


def _cache_grid(ct: sitk.Image, centre: NDArray[np.float64], profile: Profile) -> RegistrationGrid:
    """Axis-aligned grid at the profile spacing: the CT's extent within reach of any pair grid."""
    s = float(profile.spacing)
    reach = 0.5 * float(np.linalg.norm(profile.field_of_view_mm)) + _CACHE_MARGIN_MM
    size = np.array(ct.GetSize(), dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in size])).reshape(3, -1).T
    world = np.array([ct.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in corners])
    lo = np.maximum(world.min(axis=0), centre - reach)
    hi = np.minimum(world.max(axis=0), centre + reach)
    if np.any(hi <= lo):
        raise ValueError("the kidney centroid lies outside the CT")
    shape = np.maximum(np.ceil((hi - lo) / s).astype(int) + 1, 2)
    box = Profile(
        f"{profile.name}-cache", s, (int(shape[0]), int(shape[1]), int(shape[2])), (1, 1), 1
    )
    middle = lo + (shape // 2) * s
    return RegistrationGrid.around(middle, box)


def smooth_ct_feature(fraction: NDArray[np.float32]) -> NDArray[np.float32]:
    """A CT kidney mask (or kidney fraction) on the registration grid as a soft feature map.

    Training pairs and registration both turn given masks into feature maps this way, so that a
    model trained on masks sees the same maps at inference.
    """
    return np.asarray(
        ndimage.gaussian_filter(fraction, _FEATURE_SIGMA_VOXELS, mode="constant"), dtype=np.float32
    )


def smooth_us_features(
    mask: NDArray[Any], pixel_size: tuple[float, float], spacing: float
) -> NDArray[np.float32]:
    """U/S kidney masks ``(frames, rows, cols)`` as soft feature maps, blurred in-plane only.

    The blur is the CT map's (:func:`smooth_ct_feature`) expressed in mm at the registration
    ``spacing``, converted to the frames' own ``pixel_size`` ``(sx, sy)``.
    """
    sigma_mm = _FEATURE_SIGMA_VOXELS * spacing
    sigma = (0.0, sigma_mm / pixel_size[1], sigma_mm / pixel_size[0])  # frames, rows, cols
    return np.asarray(
        ndimage.gaussian_filter(mask.astype(np.float32), sigma, mode="constant"), dtype=np.float32
    )


def _read_references(folder: Path, n_frames: int) -> TransformSequence:
    for name in REFERENCE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".tfm":
            return TransformSequence(read_tfm(path)[None], [0], source=str(path)).broadcast_to(
                n_frames
            )
        return read_transforms_json(path).broadcast_to(n_frames)
    raise InputError(folder, f"has no reference poses ({', '.join(REFERENCE_FILES)})")


def _network_features(
    ct: sitk.Image, sequence: UltrasoundSequence, models: FeatureModels | None
) -> tuple[sitk.Image, NDArray[np.float32]]:
    """CT and U/S kidney probability maps from the feature networks, on their own grids."""
    if models is None:
        raise ValueError("features='network' needs feature_models")
    from kidneyreg.features.infer import predict_ct, predict_us

    return predict_ct(models.ct, ct), predict_us(models.us, sequence)


def load_case(
    folder: str | Path,
    profile: Profile | str,
    *,
    features: FeatureSource = "masks",
    feature_models: FeatureModels | None = None,
    structures: Sequence[str] = ("kidney",),
    mirror: bool | None = None,
) -> CohortCase:
    """Read a case folder and cache what pair generation and validation need.

    Args:
        folder: Case folder (see the module docstring).
        profile: Resolution profile of the cache and the pairs.
        features: ``"masks"``: feature maps are the ground-truth kidney masks, slightly smoothed
            (half a profile voxel); ``"network"``: the feature networks' probability maps. The
            window placement (U/S kidney centroid) always comes from the U/S mask.
        feature_models: The CT and U/S feature models, needed for ``"network"``.
        structures: Structures with feature maps, ``"kidney"`` first (see
            :class:`~kidneyreg.registration.config.RegistrationConfig`); the maps of those after
            the kidney come from the case's label maps (:data:`LABEL_FILES`, smoothed like the
            masks), so they need ``features="masks"``.
        mirror: Give the network the case in the mirror image (:class:`CohortCase`); None: for
            a left kidney (the side of the body midline its centroid lies on), as ``register``
            does.

    Raises:
        InputError: A missing or invalid file, empty masks, no frame showing the kidney.

    Example:
        >>> case = load_case("cohort/case_000", "tiny")  # doctest: +SKIP
        >>> case.cache.shape[0]  # doctest: +SKIP
        2
    """
    root = Path(folder)
    prof = get_profile(profile)
    if not root.is_dir():
        raise InputError(root, "case folder does not exist")
    for key, name in CASE_FILES.items():
        if not (root / name).is_file():
            raise InputError(root / name, f"missing in the case folder ({key})")
    extra = list(structures)[1:]
    if not structures or structures[0] != "kidney" or set(extra) - set(STRUCTURE_LABELS):
        raise ValueError(f"structures must be 'kidney' then any of {list(STRUCTURE_LABELS)}")
    if extra and features != "masks":
        raise ValueError("maps of structures other than the kidney need features='masks'")
    for key, name in LABEL_FILES.items() if extra else ():
        if not (root / name).is_file():
            raise InputError(root / name, f"missing: the {', '.join(extra)} map needs it ({key})")
    ct = read_ct(root / CASE_FILES["ct"])
    mask = read_mask(root / CASE_FILES["ct_mask"], ct, kind="kidney mask")
    # As at registration: a parenchyma-only mask gets its renal sinus (the U/S outline holds it).
    mask, _ = fill_renal_sinus(mask, ct)
    sequence = read_us_sequence(root / CASE_FILES["us"])
    us_mask = read_us_mask(root / CASE_FILES["us_mask"], sequence).astype(np.uint8)
    references = _read_references(root, sequence.n_frames).matrices
    init_poses = None
    if (root / INIT_FILE).is_file():
        init_poses = read_transforms_json(root / INIT_FILE).broadcast_to(sequence.n_frames).matrices

    centre = kidney_centroid(mask, source=str(root / CASE_FILES["ct_mask"]))
    pixel_size = (float(sequence.pixel_size[0]), float(sequence.pixel_size[1]))
    frames = normalize_us(sequence.frames)
    if features == "masks":
        ct_feature_source = sitk.Cast(mask, sitk.sitkFloat32)
        us_features = smooth_us_features(us_mask, pixel_size, prof.spacing)
    elif features == "network":
        ct_feature_source, us_features = _network_features(ct, sequence, feature_models)
    else:
        raise ValueError(f"features must be 'masks' or 'network', got {features!r}")

    grid = _cache_grid(ct, centre, prof)
    ct_array = normalize_ct(grid.resample(ct, default_value=-1000.0, antialias=True))
    feature = grid.resample(ct_feature_source, antialias=True).astype(np.float32)
    if features == "masks":
        feature = smooth_ct_feature(feature)
    channels = [np.clip(feature, 0.0, 1.0), ct_array]
    us_structures = np.zeros((0, *us_mask.shape), np.float32)
    if extra:
        # The label maps show both kidneys; keep what lies within _NEAR_KIDNEY_MM of this one.
        radius = [max(1, round(_NEAR_KIDNEY_MM / d)) for d in ct.GetSpacing()]
        near_ct_kidney = sitk.BinaryDilate(mask, radius)
        near_us_kidney = ndimage.binary_dilation(
            us_mask.astype(bool),
            np.ones((1, 3, 3), bool),
            iterations=max(1, round(_NEAR_KIDNEY_MM / min(pixel_size))),
        )
        maps = []
        for name in extra:
            codes = STRUCTURE_LABELS[name]
            kind = f"{name} label map"
            structure = read_mask(root / LABEL_FILES["ct"], ct, kind=kind, labels=codes)
            structure = sitk.And(structure, near_ct_kidney)  # not the other kidney's
            resampled = grid.resample(sitk.Cast(structure, sitk.sitkFloat32), antialias=True)
            channels.append(np.clip(smooth_ct_feature(resampled.astype(np.float32)), 0.0, 1.0))
            us_structure = read_us_mask(root / LABEL_FILES["us"], sequence, labels=codes)
            us_structure &= near_us_kidney
            maps.append(smooth_us_features(us_structure, pixel_size, prof.spacing))
        us_structures = np.stack(maps)
    cache = torch.from_numpy(np.stack(channels)).to(torch.float16)

    centroids = np.full((sequence.n_frames, 2), np.nan)
    for k in range(sequence.n_frames):
        if us_mask[k].any():
            centroids[k] = us_kidney_centroid(us_mask[k], pixel_size)
    if not np.any(np.isfinite(centroids[:, 0])):
        raise InputError(root / CASE_FILES["us_mask"], "kidney mask is empty in every frame")
    return CohortCase(
        case_id=root.name,
        folder=root,
        patient=patient_id(root),
        profile=prof,
        ct_centroid=centre,
        cache=cache,
        cache_origin=grid.index_to_world(np.zeros(3)),
        us_frames=frames,
        us_features=us_features,
        us_mask=us_mask,
        pixel_size=pixel_size,
        references=references,
        init_poses=init_poses,
        centroids_uv=centroids,
        ct_mask=_crop_mask(mask),
        us_structures=us_structures,
        mirror=kidney_side(centre, ct) == "left" if mirror is None else bool(mirror),
    )


def _crop_mask(mask: sitk.Image, margin: int = 3) -> sitk.Image:
    """The mask cut to its non-zero bounding box plus ``margin`` voxels (same world positions)."""
    nonzero = np.nonzero(sitk.GetArrayViewFromImage(mask))
    lo = [max(int(a.min()) - margin, 0) for a in nonzero[::-1]]
    size = mask.GetSize()
    hi = [min(int(a.max()) + margin + 1, n) for a, n in zip(nonzero[::-1], size, strict=True)]
    return mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]


def find_cases(cohort: str | Path) -> list[Path]:
    """Case folders of a cohort: its subfolders holding ``ct.nii.gz`` (sorted), or itself.

    Raises:
        InputError: The folder does not exist or holds no case.

    Example:
        >>> find_cases("cohort")  # doctest: +SKIP
        [PosixPath('cohort/case_000'), PosixPath('cohort/case_001')]
    """
    root = Path(cohort)
    if not root.is_dir():
        raise InputError(root, "cohort folder does not exist")
    if (root / CASE_FILES["ct"]).is_file():
        return [root]
    cases = sorted(p for p in root.iterdir() if p.is_dir() and (p / CASE_FILES["ct"]).is_file())
    if not cases:
        raise InputError(root, f"holds no case folder (subfolders with {CASE_FILES['ct']})")
    return cases


def split_cases(
    patients: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split by patient: ``(train indices, validation indices)``.

    Patients are shuffled with ``seed`` and ``round(val_fraction * n_patients)`` of them (at least
    one when ``val_fraction > 0``, never all) go to validation with all their cases. With a single
    patient every case is its own group (a cohort simulated from one CT).

    Example:
        >>> split_cases(["a", "a", "b", "c"], 0.34, seed=0)[1] in ([0, 1], [2], [3])
        True
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = list(patients)
    if len(set(keys)) < 2:
        keys = [str(i) for i in range(len(keys))]
    groups = sorted(set(keys))
    if val_fraction == 0.0 or len(groups) < 2:
        return list(range(len(keys))), []
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5911])).permutation(
        len(groups)
    )
    n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
    val_groups = {groups[i] for i in order[:n_val]}
    train = [i for i, key in enumerate(keys) if key not in val_groups]
    val = [i for i, key in enumerate(keys) if key in val_groups]
    return train, val


# ----------------------------------------------------------------------------------------------
# Pose model from a cohort
# ----------------------------------------------------------------------------------------------


def reference_offsets(case: CohortCase) -> NDArray[np.float64]:
    """Parameters ``(n_valid, 6)`` of ``D_ref`` (initial -> reference) for every valid frame.

    Example:
        >>> reference_offsets(case).shape  # doctest: +SKIP
        (40, 6)
    """
    return np.stack([matrix_to_euler(case.reference_offset(int(k))) for k in case.valid_frames])


def fit_pose_model(
    cases: Sequence[CohortCase],
    *,
    min_std_deg: float | None = None,
    min_std_mm: float | None = None,
) -> GaussianPoseModel:
    """The 2-sigma Gaussian model of the cases' initial -> reference offsets (each case weighs 1).

    Args:
        cases: Training cases (never the validation ones).
        min_std_deg: Rotation std floor (degrees); None: the model's default.
        min_std_mm: Translation std floor (mm); None: the model's default.

    Example:
        >>> fit_pose_model(train_cases).n_cases  # doctest: +SKIP
        8
    """
    if not cases:
        raise ValueError("fit_pose_model needs at least one case")
    rows = [reference_offsets(case) for case in cases]
    groups = [i for i, r in enumerate(rows) for _ in range(len(r))]
    floors: dict[str, float] = {}
    if min_std_deg is not None:
        floors["min_std_deg"] = float(min_std_deg)
    if min_std_mm is not None:
        floors["min_std_mm"] = float(min_std_mm)
    return GaussianPoseModel.fit(np.concatenate(rows), groups=groups, **floors)


# ----------------------------------------------------------------------------------------------
# Sampling the cache
# ----------------------------------------------------------------------------------------------


def sample_grid(
    cache: torch.Tensor,
    cache_origin: NDArray[np.float64],
    cache_spacing: float,
    grid_matrix: NDArray[np.float64],
    profile: Profile,
) -> torch.Tensor:
    """Trilinear sample of an axis-aligned cache ``(C, Z, Y, X)`` on a registration grid.

    Voxel ``o`` (x, y, z) of the output sits at internal mm ``(o - n // 2) * s`` and world
    ``G @ p``; the cache voxel ``i`` sits at world ``cache_origin + i * cache_spacing``. Only the
    crop of the cache under the grid is converted to float32; outside the cache the result is 0
    (air for the normalised CT, background for feature maps).

    Args:
        cache: ``(C, Z, Y, X)`` tensor (any float dtype).
        cache_origin: World position of cache voxel 0.
        cache_spacing: Cache voxel size (mm).
        grid_matrix: ``G`` (internal mm -> world mm), 4x4 rigid.
        profile: Output shape and spacing.

    Returns:
        float32 ``(C, D, H, W)`` with ``(W, H, D) = profile.volume_shape``.

    Example:
        >>> cache = torch.ones(1, 40, 40, 40)
        >>> sample_grid(cache, np.zeros(3), 3.2, np.eye(4), get_profile("tiny")).shape
        torch.Size([1, 72, 56, 32])
    """
    n = np.array(profile.volume_shape, dtype=np.int64)
    s = float(profile.spacing)
    # output index -> cache continuous index (x, y, z), an affine map A.
    index_to_internal = np.diag([s, s, s, 1.0])
    index_to_internal[:3, 3] = -(n // 2) * s
    world_to_cache = np.diag([1.0 / cache_spacing] * 3 + [1.0])
    world_to_cache[:3, 3] = -np.asarray(cache_origin, dtype=np.float64) / cache_spacing
    A = world_to_cache @ np.asarray(grid_matrix, dtype=np.float64) @ index_to_internal
    corners = np.array(np.meshgrid(*[[0.0, float(m - 1)] for m in n])).reshape(3, -1).T
    mapped = corners @ A[:3, :3].T + A[:3, 3]
    full = np.array(cache.shape[1:][::-1], dtype=np.int64)  # (X, Y, Z)
    lo = np.maximum(np.floor(mapped.min(axis=0)).astype(np.int64) - 1, 0)
    hi = np.minimum(np.ceil(mapped.max(axis=0)).astype(np.int64) + 2, full)
    channels = int(cache.shape[0])
    out_shape = (1, channels, int(n[2]), int(n[1]), int(n[0]))
    if np.any(hi - lo < 2):
        return torch.zeros(out_shape[1:], dtype=torch.float32)
    crop = cache[:, lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]].to(torch.float32)
    size = hi - lo
    # crop index -> normalised [-1, 1] (align_corners=True), and normalised output -> index.
    to_unit = np.diag(np.append(2.0 / (size - 1), 1.0))
    to_unit[:3, 3] = -1.0 - 2.0 * lo / (size - 1)
    from_unit = np.diag(np.append((n - 1) / 2.0, 1.0))
    from_unit[:3, 3] = (n - 1) / 2.0
    theta = (to_unit @ A @ from_unit)[:3]
    sampling = F.affine_grid(
        torch.from_numpy(theta[None]).to(torch.float32), list(out_shape), align_corners=True
    )
    out = F.grid_sample(
        crop[None], sampling, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out[0]


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class TrainingPairs(Dataset[dict[str, Any]]):
    """``n_pairs`` generated pairs: pair ``i`` is a pure function of ``(seed, i)``.

    Pair ``i`` picks a case (uniformly), a window centre among its frames showing the kidney
    (uniformly) and an offset ``D`` from the pose model, then builds the inputs as the module
    docstring says.

    Each item is a dict: ``fixed`` float32 ``(2, D, H, W)`` (U/S feature maps, U/S window),
    ``moving`` float32 ``(2, D, H, W)`` (CT feature map, normalised CT, on the perturbed grid),
    ``target`` float32 ``(Nw, 6)`` (the correct ``D_j`` parameters, for validation metrics only:
    training is unsupervised), ``offset`` float32 ``(6,)`` (the sampled ``D``), ``case`` (id),
    ``k`` (centre frame) and ``index``.

    Example:
        >>> pairs = TrainingPairs(cases, model, n_pairs=12000, seed=0)  # doctest: +SKIP
        >>> pairs[5]["fixed"].shape  # doctest: +SKIP
        torch.Size([2, 144, 112, 64])
    """

    def __init__(
        self,
        cases: Sequence[CohortCase],
        pose_model: GaussianPoseModel,
        *,
        n_pairs: int,
        seed: int,
    ) -> None:
        if not cases:
            raise ValueError("TrainingPairs needs at least one case")
        if int(n_pairs) < 1:
            raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
        profiles = {case.profile for case in cases}
        if len(profiles) != 1:
            raise ValueError("all cases must be cached at the same profile")
        self.cases = list(cases)
        self.pose_model = pose_model
        self.n_pairs = int(n_pairs)
        self.seed = int(seed)
        self.profile = self.cases[0].profile

    def __len__(self) -> int:
        return self.n_pairs

    def draw(self, index: int) -> tuple[int, int, NDArray[np.float64]]:
        """``(case position, centre frame, D as 4x4)`` of pair ``index``."""
        if not 0 <= int(index) < self.n_pairs:
            raise IndexError(f"pair {index} out of range for {self.n_pairs} pairs")
        rng = pair_rng(self.seed, index)
        c = int(rng.integers(len(self.cases)))
        valid = self.cases[c].valid_frames
        k = int(valid[rng.integers(len(valid))])
        offset = euler_to_matrix(self.pose_model.sample(1, rng)[0])
        return c, k, offset

    def targets(self, c: int, k: int, offset: NDArray[np.float64]) -> NDArray[np.float64]:
        """``(Nw, 4, 4)`` correct outputs ``D_j = D @ G_ref^-1 @ M_j @ P_c^-1`` of a window."""
        case = self.cases[c]
        return np.asarray(offset @ case.window_targets(k, case.reference_grid(k).matrix))

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, k, offset = self.draw(index)
        case = self.cases[c]
        perturbed = case.reference_grid(k).matrix @ invert_rigid(offset)
        targets = self.targets(c, k, offset)
        return {
            "fixed": case.fixed(k),
            "moving": case.moving(perturbed),
            "target": torch.from_numpy(
                matrix_to_euler(case.to_network(targets)).astype(np.float32)
            ),
            "offset": torch.from_numpy(
                matrix_to_euler(case.from_network(offset)).astype(np.float32)
            ),
            "case": case.case_id,
            "k": k,
            "index": int(index),
        }


class ValidationWindows(Dataset[dict[str, Any]]):
    """Windows of validation cases at their real initial alignment (no generated offset).

    Up to ``per_case`` centre frames per case, evenly spread over its frames showing the kidney.
    Items: ``fixed``, ``moving`` (the CT on the initial grid), ``target`` (``(Nw, 6)`` reference
    offsets), ``case`` (position in ``cases``), ``k``.

    Example:
        >>> windows = ValidationWindows(val_cases, per_case=8)  # doctest: +SKIP
    """

    def __init__(self, cases: Sequence[CohortCase], *, per_case: int = 8) -> None:
        if int(per_case) < 1:
            raise ValueError(f"per_case must be >= 1, got {per_case}")
        self.cases = list(cases)
        self.items: list[tuple[int, int]] = []
        for c, case in enumerate(self.cases):
            valid = case.valid_frames
            picks = np.unique(np.round(np.linspace(0, len(valid) - 1, min(per_case, len(valid)))))
            self.items.extend((c, int(valid[int(i)])) for i in picks)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, k = self.items[index]
        case = self.cases[c]
        grid = case.initial_grid(k).matrix
        targets = case.to_network(case.window_targets(k, grid))
        return {
            "fixed": case.fixed(k),
            "moving": case.moving(grid),
            "target": torch.from_numpy(matrix_to_euler(targets).astype(np.float32)),
            "case": c,
            "k": k,
        }

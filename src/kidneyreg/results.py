"""Registration result folders: everything ``kidneyreg register`` writes besides the report.

:func:`write_registration_outputs` writes, for a :class:`RegistrationResult`::

    <out>/transforms.json               M_k per frame (DESIGN.md schema) with per-frame
                                        confidence (loss terms), rigid parameters, window centre;
                                        top level: cycle starts, adaptation, timing, profile,
                                        model, version
    <out>/tfm/frame_0000.tfm ...        M_k as an ITK transform per frame (io.write_tfm)
    <out>/parameters.csv                Euler parameters of each M_k (degrees, mm)
    <out>/ct_planes.nii.gz              the CT resliced on every frame, in the U/S 3D layout of
                                        DESIGN.md (same grid as the U/S input: it overlays it)
    <out>/ct_kidney_mask_planes.nii.gz  with a CT kidney map: the kidney resliced likewise (0/1)
    <out>/overlays/montage.png          up to 24 frames with the CT kidney contour (orange) and
                                        the U/S kidney mask contour (cyan)
    <out>/overlays/overlay.mp4          every frame with the same contours and a timeline
    <out>/timing.json                   adaptation seconds, milliseconds per frame...

Atomicity: everything is first written into a temporary sibling folder of ``<out>``; only when
all of it is complete are the files moved into ``<out>`` (renames on one file system). An
exception midway leaves ``<out>`` exactly as it was and removes the temporary folder. Files of
``<out>`` that are not outputs of this module (a report, the user's notes) are never touched;
the ``tfm/`` folder is replaced as a whole (so no frame files of a longer earlier run survive),
and optional outputs of an earlier run that this run does not produce (overlays, mask planes)
are removed, since they would describe other transforms.

:func:`read_registration_result` reads ``transforms.json`` back into a
:class:`RegistrationResult`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

from kidneyreg import __version__
from kidneyreg.errors import InputError
from kidneyreg.geometry import is_rigid, matrix_to_euler, resample_on_frames
from kidneyreg.io.atomic import atomic_write_text, current_umask, replace_folder
from kidneyreg.io.image import write_image
from kidneyreg.io.transforms import (
    PARAMETER_CSV_HEADER,
    read_transforms_json,
    write_parameters_csv,
    write_tfm,
    write_transforms_json,
)
from kidneyreg.io.us import UltrasoundSequence

__all__ = [
    "CT_CONTOUR_COLOUR",
    "OUTPUT_FILES",
    "US_CONTOUR_COLOUR",
    "RegistrationResult",
    "json_ready",
    "read_registration_result",
    "write_registration_outputs",
]

#: Output names (relative to the output folder) by key of the returned dictionary.
OUTPUT_FILES: dict[str, str] = {
    "transforms": "transforms.json",
    "tfm": "tfm",
    "parameters": "parameters.csv",
    "ct_planes": "ct_planes.nii.gz",
    "ct_kidney_mask_planes": "ct_kidney_mask_planes.nii.gz",
    "montage": "overlays/montage.png",
    "video": "overlays/overlay.mp4",
    "timing": "timing.json",
}
#: Contour colour of the CT kidney resliced by the result (orange) in overlays.
CT_CONTOUR_COLOUR: tuple[int, int, int] = (255, 140, 0)
#: Contour colour of the U/S kidney mask (cyan) in overlays.
US_CONTOUR_COLOUR: tuple[int, int, int] = (0, 220, 255)

# CT value outside the CT volume on a resliced plane: air.
_OUTSIDE_HU = -1024.0
# Frame keys of transforms.json derived from the matrices or the adaptation range: recomputed on
# writing, so they are not read back as extras.
_DERIVED_FRAME_KEYS = ("rigid_params", "in_adaptation_cycle")
_FRAME_KEYS = ("confidence", "window_centre", "initial_matrix", *_DERIVED_FRAME_KEYS)
# Top-level keys written by this module (the rest of a file's top level is the result's extras).
_TOP_KEYS = (
    "source",
    "kidneyreg_version",
    "created",
    "n_frames",
    "frame_shape",
    "pixel_size_mm",
    "frame_rate",
    "profile",
    "model",
    "device",
    "adaptation",
    "cycle_starts",
    "timing",
    "warnings",
    "rigid_params_convention",
    "confidence_note",
)
_PARAMS_CONVENTION = (
    "rigid_params: Euler angles (deg) of R = Rz @ Ry @ Rx and translation (mm) of M_k itself "
    "(SimpleITK Euler3DTransform, ComputeZYX, centre 0)"
)
_CONFIDENCE_NOTE = (
    "confidence: the registration loss terms of the frame at its result (lower = better "
    "agreement of CT and U/S features); null where not computed"
)
_MONTAGE_FRAMES = 24


def _finite_number(value: Any, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


@dataclass(eq=False)
class RegistrationResult:
    """Per-frame poses of a registered U/S sequence and what produced them.

    Attributes:
        matrices: ``(n, 4, 4)`` rigid poses ``M_k`` (U/S image mm -> CT world LPS mm).
        initial_matrices: The coarse starting poses, ``(n, 4, 4)`` or one ``(4, 4)`` for all
            (broadcast), or None.
        loss_terms: Name -> ``(n,)`` loss terms of each frame at its result, the per-frame
            "confidence" (NaN where not computed), e.g. ``{"loss": ..., "mind": ...}``.
        window_centres: ``(n,)`` index of the middle frame of the window whose estimate frame k
            received (k itself except near the ends of the sequence), or None.
        cycle_starts: Frames where breathing cycles start (detected on the U/S).
        adaptation: How the model was adapted: ``"one-cycle"``, ``"one-shot"``,
            ``"five-shot"``, ``"none"``...
        adaptation_frames: Frames ``[start, stop)`` used for adaptation, or None.
        timing: Name -> seconds or milliseconds, e.g. ``{"adaptation_s": 41.2,
            "ms_per_frame": 23.5}``; the unit is the name's suffix.
        profile: Processing profile name (``cpu``, ``paper``...).
        model_id: Identifier of the model (checkpoint file name, hash...).
        device: ``"cpu"``, ``"cuda"``...
        frame_extras: Optional per-frame dictionaries of further keys for transforms.json.
        extras: Further top-level keys for transforms.json (inputs, options...).
        warnings: Warnings raised while registering (also written to transforms.json).

    Raises:
        ValueError: Shapes that do not match, matrices that are not rigid, indices out of range,
            non-finite timings.

    Example:
        >>> result = RegistrationResult(np.stack([np.eye(4)] * 3), cycle_starts=[0, 2])
        >>> result.n_frames, result.rigid_params().shape
        (3, (3, 6))
    """

    matrices: NDArray[np.float64]
    initial_matrices: NDArray[np.float64] | None = None
    loss_terms: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    window_centres: NDArray[np.int64] | None = None
    cycle_starts: list[int] = field(default_factory=list)
    adaptation: str = "none"
    adaptation_frames: tuple[int, int] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    profile: str | None = None
    model_id: str | None = None
    device: str | None = None
    frame_extras: list[dict[str, Any]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        mats = np.asarray(self.matrices, dtype=np.float64)
        if mats.ndim != 3 or mats.shape[1:] != (4, 4) or len(mats) == 0:
            raise ValueError(f"matrices must have shape (n, 4, 4) with n >= 1, got {mats.shape}")
        if not is_rigid(mats):
            raise ValueError("matrices must be rigid 4x4 transforms")
        self.matrices = mats
        n = len(mats)
        if self.initial_matrices is not None:
            initial = np.asarray(self.initial_matrices, dtype=np.float64)
            if initial.shape == (4, 4):
                initial = np.repeat(initial[None], n, axis=0)
            if initial.shape != (n, 4, 4) or not is_rigid(initial):
                raise ValueError(
                    f"initial_matrices must be one rigid (4, 4) or ({n}, 4, 4), got "
                    f"shape {initial.shape}"
                )
            self.initial_matrices = initial
        terms: dict[str, NDArray[np.float64]] = {}
        for name, values in self.loss_terms.items():
            array = np.asarray(values, dtype=np.float64)
            if array.shape != (n,):
                raise ValueError(f"loss term {name!r} must have shape ({n},), got {array.shape}")
            terms[str(name)] = array
        self.loss_terms = terms
        if self.window_centres is not None:
            centres = np.asarray(self.window_centres)
            if centres.shape != (n,) or not np.issubdtype(centres.dtype, np.integer):
                raise ValueError(f"window_centres must be {n} integers")
            if centres.min() < 0 or centres.max() >= n:
                raise ValueError(f"window_centres must lie in 0..{n - 1}")
            self.window_centres = centres.astype(np.int64)
        starts = [int(s) for s in self.cycle_starts]
        if starts != sorted(set(starts)) or any(not 0 <= s < n for s in starts):
            raise ValueError(f"cycle_starts must be increasing frame indices in 0..{n - 1}")
        self.cycle_starts = starts
        if self.adaptation_frames is not None:
            start, stop = (int(v) for v in self.adaptation_frames)
            if not 0 <= start < stop <= n:
                raise ValueError(f"adaptation_frames must be [start, stop) within 0..{n}")
            self.adaptation_frames = (start, stop)
        self.timing = {str(k): _finite_number(v, f"timing[{k!r}]") for k, v in self.timing.items()}
        if self.frame_extras is not None:
            if len(self.frame_extras) != n:
                raise ValueError(f"{len(self.frame_extras)} frame_extras for {n} frames")
            self.frame_extras = [dict(e) for e in self.frame_extras]
            reserved = {"index", "matrix", *_FRAME_KEYS}
            used = {key for extra in self.frame_extras for key in extra} & reserved
            if used:
                raise ValueError(f"frame_extras may not use the keys {sorted(used)}")
        self.extras = dict(self.extras)
        self.warnings = [str(w) for w in self.warnings]

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.matrices.shape[0])

    def rigid_params(self) -> NDArray[np.float64]:
        """The 6 rigid parameters ``(rx, ry, rz, tx, ty, tz)`` (radians, mm) of each ``M_k``.

        Example:
            >>> RegistrationResult(np.eye(4)[None]).rigid_params().shape
            (1, 6)
        """
        return matrix_to_euler(self.matrices)

    def frame_records(self) -> list[dict[str, Any]]:
        """The per-frame extra keys written to transforms.json (besides index and matrix).

        ``rigid_params`` (degrees and mm, as the CSV), ``confidence`` (the loss terms),
        ``window_centre``, ``in_adaptation_cycle`` and ``initial_matrix`` when known, then
        ``frame_extras``.

        Example:
            >>> RegistrationResult(np.eye(4)[None]).frame_records()[0]["rigid_params"]["tx_mm"]
            0.0
        """
        params = self.rigid_params()
        records: list[dict[str, Any]] = []
        for k in range(self.n_frames):
            shown = np.concatenate([np.degrees(params[k, :3]), params[k, 3:]])
            record: dict[str, Any] = {
                "rigid_params": dict(
                    zip(PARAMETER_CSV_HEADER[1:], (float(v) for v in shown), strict=True)
                )
            }
            if self.loss_terms:
                record["confidence"] = {
                    name: float(values[k]) for name, values in self.loss_terms.items()
                }
            if self.window_centres is not None:
                record["window_centre"] = int(self.window_centres[k])
            if self.adaptation_frames is not None:
                start, stop = self.adaptation_frames
                record["in_adaptation_cycle"] = start <= k < stop
            if self.initial_matrices is not None:
                record["initial_matrix"] = self.initial_matrices[k].tolist()
            if self.frame_extras is not None:
                record.update(self.frame_extras[k])
            records.append(record)
        return records


def _created() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _top_level(result: RegistrationResult, us: UltrasoundSequence, created: str) -> dict[str, Any]:
    top: dict[str, Any] = {
        "source": "kidneyreg register",
        "kidneyreg_version": __version__,
        "created": created,
        "n_frames": result.n_frames,
        "frame_shape": list(us.shape[1:]),
        "pixel_size_mm": list(us.pixel_size),
        "frame_rate": us.frame_rate,
        "profile": result.profile,
        "model": result.model_id,
        "device": result.device,
        "adaptation": {
            "mode": result.adaptation,
            "frames": None if result.adaptation_frames is None else list(result.adaptation_frames),
        },
        "cycle_starts": list(result.cycle_starts),
        "timing": dict(result.timing),
        "warnings": list(result.warnings),
        "rigid_params_convention": _PARAMS_CONVENTION,
        "confidence_note": _CONFIDENCE_NOTE,
    }
    clash = set(result.extras) & {*top, "convention", "frames"}
    if clash:
        raise ValueError(f"extras may not use the keys {sorted(clash)}")
    top.update(result.extras)
    return top


def _timing_document(result: RegistrationResult, created: str, outputs_s: float) -> dict[str, Any]:
    document: dict[str, Any] = dict(result.timing)
    ms = result.timing.get("ms_per_frame")
    if ms is not None and ms > 0:
        document["frames_per_second"] = 1000.0 / ms
    document.update(
        {
            "outputs_s": outputs_s,
            "n_frames": result.n_frames,
            "profile": result.profile,
            "device": result.device,
            "model": result.model_id,
            "adaptation": result.adaptation,
            "kidneyreg_version": __version__,
            "created": created,
        }
    )
    return document


def _sequence_image(stack: NDArray[Any], pixel_size: tuple[float, float]) -> sitk.Image:
    """A ``(n, rows, cols)`` stack in the DESIGN.md U/S 3D layout (origin 0, identity)."""
    image = sitk.GetImageFromArray(stack)
    image.SetSpacing((float(pixel_size[0]), float(pixel_size[1]), 1.0))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _ct_planes(
    ct: sitk.Image, matrices: NDArray[np.float64], us: UltrasoundSequence
) -> NDArray[Any]:
    """The CT resliced on every frame (linear, air outside), as int16 HU when it fits."""
    planes = resample_on_frames(
        ct, matrices, us.shape[1:], us.pixel_size, default_value=_OUTSIDE_HU
    )
    # HU are integers to begin with: rounding loses < 0.5 HU and halves the file. A CT whose
    # values do not fit int16 (not HU) keeps float32.
    rounded = np.rint(planes)
    if rounded.min() >= np.iinfo(np.int16).min and rounded.max() <= np.iinfo(np.int16).max:
        return rounded.astype(np.int16)
    return planes.astype(np.float32)


def _kidney_planes(
    kidney: sitk.Image, matrices: NDArray[np.float64], us: UltrasoundSequence
) -> NDArray[np.uint8]:
    """The CT kidney map resliced on every frame as 0/1.

    A binary mask is resliced by nearest neighbour (the evaluation's definition of the CT-US
    contour); a soft map (float, e.g. a feature network's probability) linearly, then >= 0.5.
    """
    if np.issubdtype(sitk.GetArrayViewFromImage(kidney).dtype, np.floating):
        soft = resample_on_frames(kidney, matrices, us.shape[1:], us.pixel_size)
        return (soft >= 0.5).astype(np.uint8)
    hard = resample_on_frames(kidney, matrices, us.shape[1:], us.pixel_size, interpolator="nearest")
    return (hard != 0).astype(np.uint8)


def _check_inputs(
    result: RegistrationResult,
    ct: sitk.Image,
    us: UltrasoundSequence,
    ct_kidney_mask: sitk.Image | None,
    us_masks: ArrayLike | None,
) -> NDArray[np.bool_] | None:
    if not isinstance(result, RegistrationResult):
        raise TypeError(f"result must be a RegistrationResult, got {type(result).__name__}")
    if not isinstance(us, UltrasoundSequence):
        raise TypeError(f"us must be an UltrasoundSequence, got {type(us).__name__}")
    for name, image in (("ct", ct), ("ct_kidney_mask", ct_kidney_mask)):
        if image is None:
            continue
        if not isinstance(image, sitk.Image):
            raise TypeError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{name} must be a scalar 3D image")
    if result.n_frames != us.n_frames:
        raise ValueError(f"the result has {result.n_frames} frames, the U/S sequence {us.n_frames}")
    if us_masks is None:
        return None
    masks = np.asarray(us_masks)
    if masks.shape != us.shape:
        raise ValueError(f"us_masks must have the U/S shape {us.shape}, got {masks.shape}")
    return np.asarray(masks != 0)


def _overlay_layers(
    kidney_planes: NDArray[np.uint8] | None, us_masks: NDArray[np.bool_] | None
) -> list[Any]:
    from kidneyreg.visualize import ContourLayer

    layers = []
    if kidney_planes is not None:
        layers.append(ContourLayer(kidney_planes, CT_CONTOUR_COLOUR, "CT kidney (resliced by M_k)"))
    if us_masks is not None:
        layers.append(ContourLayer(us_masks, US_CONTOUR_COLOUR, "U/S kidney mask"))
    return layers


def _write_staged(
    staging: Path,
    result: RegistrationResult,
    ct: sitk.Image,
    us: UltrasoundSequence,
    ct_kidney_mask: sitk.Image | None,
    us_masks: NDArray[np.bool_] | None,
    *,
    overlays: bool,
    video: bool,
    progress: Callable[[str], None],
) -> dict[str, str]:
    """Write every output into ``staging``; return key -> relative path of what was written."""
    started = time.perf_counter()
    created = _created()
    written: dict[str, str] = {}

    def target(key: str) -> Path:
        written[key] = OUTPUT_FILES[key]
        return staging / OUTPUT_FILES[key]

    progress("transforms")
    write_transforms_json(
        target("transforms"),
        result.matrices,
        frame_extras=result.frame_records(),
        extras=_top_level(result, us, created),
    )
    tfm_dir = target("tfm")
    tfm_dir.mkdir()
    for k, matrix in enumerate(result.matrices):
        write_tfm(tfm_dir / f"frame_{k:04d}.tfm", matrix)
    write_parameters_csv(target("parameters"), result.rigid_params())

    progress("ct planes")
    planes = _ct_planes(ct, result.matrices, us)
    write_image(_sequence_image(planes, us.pixel_size), target("ct_planes"))
    kidney = None
    if ct_kidney_mask is not None:
        kidney = _kidney_planes(ct_kidney_mask, result.matrices, us)
        write_image(_sequence_image(kidney, us.pixel_size), target("ct_kidney_mask_planes"))

    if overlays or video:
        from kidneyreg.visualize import figure_overlay_montage, write_overlay_video

        layers = _overlay_layers(kidney, us_masks)
        highlight = range(*result.adaptation_frames) if result.adaptation_frames else range(0)
        if overlays:
            progress("montage")
            title = "CT kidney contour on the U/S frames"
            if kidney is None:
                title = "U/S frames (no CT kidney map given: no CT contour)"
            figure_overlay_montage(
                us.frames,
                layers,
                target("montage"),
                max_frames=_MONTAGE_FRAMES,
                highlight=highlight,
                highlight_label="adaptation",
                pixel_size=us.pixel_size,
                frame_rate=us.frame_rate,
                title=title,
            )
        if video:
            progress("video")
            write_overlay_video(
                us.frames,
                layers,
                target("video"),
                fps=us.frame_rate or 20.0,
                cycle_starts=result.cycle_starts,
                highlight=highlight,
            )
    document = _timing_document(result, created, time.perf_counter() - started)
    atomic_write_text(target("timing"), json.dumps(json_ready(document), indent=2) + "\n")
    return written


def json_ready(value: Any) -> Any:
    """Plain JSON values: NumPy scalars as Python ones, paths as text, NaN and infinities as None.

    Example:
        >>> json_ready({"a": (np.float32(1.5), float("nan")), "b": Path("x")})
        {'a': [1.5, None], 'b': 'x'}
    """
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _publish(staging: Path, final: Path, written: Mapping[str, str]) -> None:
    """Move the staged outputs into ``final`` (transforms.json last) and drop stale ones."""
    umask = current_umask()
    # Temporary files are private (mode 0600); results get the usual permissions.
    for path in staging.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    final.mkdir(parents=True, exist_ok=True)
    for key, rel in written.items():
        if key == "transforms":
            continue
        source, destination = staging / rel, final / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            replace_folder(source, destination)
        else:
            os.replace(source, destination)
    for key, rel in OUTPUT_FILES.items():
        if key not in written:
            stale = final / rel
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    # transforms.json is the result itself: it appears once everything it refers to is there.
    os.replace(staging / written["transforms"], final / written["transforms"])


def write_registration_outputs(
    out_dir: str | Path,
    result: RegistrationResult,
    ct: sitk.Image,
    us: UltrasoundSequence,
    *,
    ct_kidney_mask: sitk.Image | None = None,
    us_masks: ArrayLike | None = None,
    overlays: bool = True,
    video: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write a registration result folder (see the module docstring), all or nothing.

    Args:
        out_dir: The output folder (created when missing; unrelated files in it are kept).
        result: The per-frame poses and their metadata.
        ct: The CT the poses refer to (world = this image's physical space), HU.
        us: The registered U/S sequence (its grid is the grid of ``ct_planes.nii.gz``).
        ct_kidney_mask: The CT kidney mask (uint8 0/1) or a soft kidney map (float, e.g. the
            CT feature network's output, thresholded at 0.5), on any grid in the CT's world
            space. Gives the orange contour of the overlays and ``ct_kidney_mask_planes.nii.gz``.
        us_masks: ``(n, rows, cols)`` U/S kidney masks (cyan contour), or None.
        overlays: Write ``overlays/montage.png``.
        video: Write ``overlays/overlay.mp4``.
        progress: Called with the name of each step ("transforms", "ct planes", "montage",
            "video") as it starts.

    Returns:
        Key -> final path of every output written, keys from :data:`OUTPUT_FILES`
        (``"tfm"`` is the folder of per-frame transforms).

    Raises:
        InputError: ``out_dir`` exists and is not a folder.
        ValueError: Frame count or mask shape not matching the U/S sequence; bad extras.
        TypeError: Arguments of the wrong type.

    Example:
        >>> timing = {"adaptation_s": 40.0, "ms_per_frame": 25.0}
        >>> result = RegistrationResult(matrices, timing=timing)  # doctest: +SKIP
        >>> paths = write_registration_outputs("out", result, ct, us)  # doctest: +SKIP
        >>> paths["transforms"]  # doctest: +SKIP
        PosixPath('out/transforms.json')
    """
    masks = _check_inputs(result, ct, us, ct_kidney_mask, us_masks)
    final = Path(out_dir)
    if final.exists() and not final.is_dir():
        raise InputError(final, "output path exists and is not a folder")
    parent = final.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    try:
        written = _write_staged(
            staging,
            result,
            ct,
            us,
            ct_kidney_mask,
            masks,
            overlays=overlays,
            video=video,
            progress=progress or (lambda _step: None),
        )
        _publish(staging, final, written)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
    return {key: final / rel for key, rel in written.items()}


def _number_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def read_registration_result(path: str | Path) -> RegistrationResult:
    """Read a result folder's ``transforms.json`` (or the file itself) back.

    Derived keys (``rigid_params``, ``in_adaptation_cycle``) are recomputed rather than read;
    keys this module does not know are returned in ``frame_extras`` / ``extras``.

    Args:
        path: The output folder or its ``transforms.json``.

    Returns:
        The result; ``loss_terms`` hold NaN where the file has null.

    Raises:
        InputError: Missing or invalid transforms file (see
            :func:`kidneyreg.io.read_transforms_json`).

    Example:
        >>> read_registration_result("out").n_frames  # doctest: +SKIP
        97
    """
    source = Path(path)
    if source.is_dir():
        source = source / OUTPUT_FILES["transforms"]
    sequence = read_transforms_json(source)
    frames = sequence.frame_extras
    names: list[str] = []
    for k, entry in enumerate(frames):
        confidence = entry.get("confidence")
        if not isinstance(confidence, (dict, type(None))):
            raise InputError(source, f"frame {k} 'confidence' is not an object")
        for name in confidence or {}:
            if name not in names:
                names.append(name)
    try:
        loss_terms = {
            name: np.array([_number_or_nan((e.get("confidence") or {}).get(name)) for e in frames])
            for name in names
        }
    except (TypeError, ValueError):
        raise InputError(source, "a 'confidence' value is not a number") from None
    centres = [e.get("window_centre") for e in frames]
    initial = [e.get("initial_matrix") for e in frames]
    extras_per_frame = [{k: v for k, v in e.items() if k not in _FRAME_KEYS} for e in frames]
    top = sequence.extras
    try:
        adaptation = top.get("adaptation") or {}
        span = adaptation.get("frames")
        return RegistrationResult(
            matrices=sequence.matrices,
            initial_matrices=None if any(m is None for m in initial) else np.asarray(initial),
            loss_terms=loss_terms,
            window_centres=None
            if any(c is None for c in centres)
            else np.asarray(centres, dtype=np.int64),
            cycle_starts=list(top.get("cycle_starts") or []),
            adaptation=str(adaptation.get("mode", "none")),
            adaptation_frames=None if not span else (int(span[0]), int(span[1])),
            timing={k: float(v) for k, v in (top.get("timing") or {}).items() if v is not None},
            profile=top.get("profile"),
            model_id=top.get("model"),
            device=top.get("device"),
            frame_extras=extras_per_frame if any(extras_per_frame) else None,
            extras={k: v for k, v in top.items() if k not in _TOP_KEYS},
            warnings=list(top.get("warnings") or []),
        )
    except (AttributeError, IndexError, TypeError, ValueError) as error:
        raise InputError(source, f"invalid registration metadata ({error})") from None

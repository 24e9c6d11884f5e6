"""Inference of the feature networks: kidney probability maps on the input's own grid.

* CT: the volume is reoriented to identity direction and resampled to the profile's isotropic
  spacing (:func:`kidneyreg.features.data.prepare_ct_volume`), normalised with the fixed HU window,
  segmented by overlapping sliding windows of the training patch size with Gaussian blending
  (MONAI ``sliding_window_inference``), and the probabilities are resampled back onto the original
  grid (linear, nearest-value extrapolation at the border).
* U/S sequence: frames resampled to the profile's pixel size, then for every frame ``k`` the window
  of ``Nw`` frames whose middle is ``k`` (edge frames repeated at the ends,
  :func:`kidneyreg.preprocess.window_indices`) is segmented, by sliding windows in the frame plane
  when the frame is larger than the network's window; frame ``k``'s map is the window's middle
  frame. Maps are resampled back to the original pixel grid: one map per frame.
* A single U/S image (PNG, with its pixel size) is a one-frame sequence.

:func:`segment_file` is ``kidneyreg segment``: it writes the mask (or the probabilities) on the
input's grid, in the input's kind of file (NIfTI/NRRD/MHA volume, or a PNG of the same size with
kidney = 255), atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from numpy.typing import NDArray

from kidneyreg.checkpoint import load_checkpoint
from kidneyreg.errors import InputError
from kidneyreg.features.config import MODALITIES, FeatureNetConfig
from kidneyreg.features.data import normalize_us, prepare_ct_volume
from kidneyreg.features.ulbnet import (
    CHECKPOINT_KIND,
    ULBNet,
    inference_scale_of,
    inference_window,
    network_from_payload,
)
from kidneyreg.io.atomic import atomic_path
from kidneyreg.io.image import read_ct, write_image, write_mask
from kidneyreg.io.us import UltrasoundSequence, read_us_sequence
from kidneyreg.preprocess import normalize_ct, resample_us_frames, window_indices

__all__ = [
    "KIDNEY_COMPONENTS",
    "KIDNEY_MIN_FRACTION",
    "US_VIEWS",
    "FeatureModel",
    "SegmentResult",
    "bundled_model_path",
    "keep_kidney_components",
    "load_feature_model",
    "predict_ct",
    "predict_ct_array",
    "predict_us",
    "predict_us_frames",
    "resolve_device",
    "segment_file",
]

_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_PICTURE_SUFFIXES = (".png",)
# Sliding-window settings: a quarter overlap with Gaussian weights hides the patch borders.
_OVERLAP = 0.25
_SW_BATCH = 2  # >= 2 lets PyTorch use its fast CPU convolution (see features.train)
_FRAMES_PER_BATCH = 4


#: Kidney components a CT map keeps (two kidneys), and the smallest kept one's volume relative to
#: the largest (a look-alike blob is far smaller than a kidney).
KIDNEY_COMPONENTS = 2
KIDNEY_MIN_FRACTION = 0.25

#: Views a bundled U/S kidney model is made for: ``"sagittal"`` (the default, the paper's
#: anterior sagittal view) and ``"flank"`` (a coronal-oblique view from the posterolateral flank,
#: :func:`kidneyreg.simulate.probe.approach_rotation`), whose B-mode differs (the kidney near the
#: probe, its hilum and renal pelvis in view).
US_VIEWS: tuple[str, ...] = ("sagittal", "flank")


def bundled_model_path(
    modality: str, profile: str = "cpu", structure: str = "kidney", view: str = "sagittal"
) -> Path:
    """Where the package keeps its bundled ``modality`` model for ``profile`` (may not exist).

    Args:
        modality: ``"ct"`` or ``"us"``.
        profile: Resolution profile name.
        structure: ``"kidney"`` or ``"sinus"``.
        view: One of :data:`US_VIEWS`; views other than ``"sagittal"`` exist for U/S only.

    Raises:
        ValueError: An unknown view, or a view for the CT.

    Example:
        >>> bundled_model_path("ct", "cpu").name
        'features_ct_cpu.pt'
        >>> bundled_model_path("us", "cpu", "sinus").name
        'features_us_sinus_cpu.pt'
        >>> bundled_model_path("us", "cpu", view="flank").name
        'features_us_flank_cpu.pt'
    """
    if view not in US_VIEWS:
        raise ValueError(f"view must be one of {', '.join(US_VIEWS)}, got {view!r}")
    if view != "sagittal" and modality != "us":
        raise ValueError(f"only U/S models are made per view, not {modality!r} ones")
    kind = "" if structure == "kidney" else f"_{structure}"
    seen = "" if view == "sagittal" else f"_{view}"
    return _MODELS_DIR / f"features_{modality}{kind}{seen}_{profile}.pt"


@dataclass(eq=False)
class FeatureModel:
    """A loaded feature network, in evaluation mode, with its configuration.

    Attributes:
        net: The network.
        config: Its configuration (modality, spacing, patch size).
        source: The checkpoint it came from.
        device: Where it runs.
        window: Sliding-window size ``(D, H, W)``; None: the training patch size. Networks
            trained on patches of varied size (``train-features --patch-scale``) store a larger
            one (:func:`~kidneyreg.features.ulbnet.inference_window`).
    """

    net: ULBNet
    config: FeatureNetConfig
    source: str
    device: torch.device
    window: tuple[int, int, int] | None = None

    @property
    def inference_window(self) -> tuple[int, int, int]:
        """The sliding-window size inference uses."""
        return self.window if self.window is not None else self.config.patch_size

    @property
    def modality(self) -> str:
        """``"ct"`` or ``"us"``."""
        return self.config.modality


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a CUDA request without CUDA is an input error.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "CUDA was requested but no CUDA device is available")
    return resolved


def load_feature_model(
    path: str | Path | None = None,
    *,
    modality: str | None = None,
    profile: str = "cpu",
    device: str | torch.device = "cpu",
    structure: str | None = None,
    view: str = "sagittal",
) -> FeatureModel:
    """Load a feature network from a checkpoint, or the bundled one of ``modality`` / ``profile``.

    Any feature-net checkpoint works: a training run's latest or ``.best.pt`` file, or an exported
    (float16) copy. Loading is ``weights_only`` (:func:`kidneyreg.checkpoint.load_checkpoint`).

    Args:
        path: Checkpoint file; None for the bundled model.
        modality: Required modality (``"ct"``/``"us"``); a checkpoint of the other one is refused.
            Needed when ``path`` is None.
        profile: Profile of the bundled model (ignored with ``path``: the checkpoint knows its own).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        structure: Required structure (``"kidney"``/``"sinus"``); a network segmenting another
            one is refused. None: any (the bundled kidney model when ``path`` is None).
        view: The view of the bundled U/S model (:data:`US_VIEWS`; ignored with ``path``).

    Raises:
        InputError: Missing, unreadable or foreign checkpoint, a checkpoint of the other
            modality or structure, no bundled model for the profile.

    Example:
        >>> model = load_feature_model(modality="ct")  # doctest: +SKIP
        >>> model.config.spacing  # doctest: +SKIP
        1.6
    """
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if path is None:
        if modality is None:
            raise ValueError("load_feature_model needs a path or a modality")
        path = bundled_model_path(modality, profile, structure or "kidney", view)
        if not path.is_file():
            which = "" if view == "sagittal" else f" {view}-view"
            raise InputError(
                "--model",
                f"no bundled{which} {modality.upper()} feature model for profile {profile!r}: "
                "train one with `kidneyreg train-features` and pass it with --model",
            )
    payload = load_checkpoint(path, kind=CHECKPOINT_KIND)
    net = network_from_payload(payload, path)
    config = net.config
    window = inference_window(config, inference_scale_of(payload, path))
    if modality is not None and config.modality != modality:
        raise InputError(
            path,
            f"is a {config.modality.upper()} feature model, a {modality.upper()} one is needed",
        )
    if structure is not None and config.structure != structure:
        raise InputError(
            path, f"segments the {config.structure}, a {structure} feature model is needed"
        )
    dev = resolve_device(device)
    net.to(dev).eval()
    return FeatureModel(net, config, str(path), dev, window)


def _sliding(model: FeatureModel, inputs: torch.Tensor) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        out = sliding_window_inference(
            inputs.to(model.device),
            roi_size=model.inference_window,
            sw_batch_size=_SW_BATCH,
            predictor=model.net,
            overlap=_OVERLAP,
            mode="gaussian",
        )
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"sliding-window inference returned {type(out).__name__}")
    return torch.as_tensor(out).float().cpu()


def predict_ct_array(model: FeatureModel, volume: NDArray[np.floating]) -> NDArray[np.float32]:
    """Kidney probabilities of a normalised CT array ``(D, H, W)`` at the model's spacing.

    Example:
        >>> probs = predict_ct_array(model, np.zeros((40, 60, 60), np.float32))  # doctest: +SKIP
    """
    if model.modality != "ct":
        raise ValueError("predict_ct_array needs a CT feature model")
    array = np.asarray(volume, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"volume must be (D, H, W), got shape {array.shape}")
    inputs = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    return np.asarray(_sliding(model, inputs)[0, 0].numpy(), dtype=np.float32)


def keep_kidney_components(
    probs: NDArray[np.floating],
    *,
    threshold: float = 0.5,
    max_components: int = KIDNEY_COMPONENTS,
    min_fraction: float = KIDNEY_MIN_FRACTION,
    margin: int = 2,
) -> NDArray[np.float32]:
    """Zero a CT probability map outside its kidney-like connected components.

    A whole abdomen holds two kidneys, while a patch-trained network also fires on scattered
    look-alikes (bowel, spleen, the edges of the scan). The map keeps only the ``max_components``
    largest components of ``probs >= threshold`` whose volume is at least ``min_fraction`` of the
    largest (one kidney is kept alone when the second candidate is much smaller), dilated by
    ``margin`` voxels so their soft borders stay.

    Example:
        >>> probs = np.zeros((1, 1, 12), np.float32)
        >>> probs[0, 0, :4] = 0.9; probs[0, 0, 6:9] = 0.8; probs[0, 0, 11] = 0.7
        >>> (keep_kidney_components(probs, margin=0)[0, 0] > 0).astype(int).tolist()
        [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    """
    from scipy import ndimage

    values = np.asarray(probs, dtype=np.float32)
    labels, count = ndimage.label(values >= threshold)
    if count == 0:
        return values.copy()
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:max_components]
    kept = [int(i) + 1 for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    region = np.isin(labels, kept)
    if margin > 0:
        region = ndimage.binary_dilation(region, iterations=margin)
    return np.where(region, values, np.float32(0.0)).astype(np.float32)


def predict_ct(model: FeatureModel, ct: sitk.Image, *, clean: bool = True) -> sitk.Image:
    """Kidney probability map (float32, 0..1) of a CT in HU, on the CT's own grid.

    Args:
        model: A CT feature model.
        ct: CT in HU.
        clean: Keep only the kidney-like components (:func:`keep_kidney_components`).

    Example:
        >>> model = load_feature_model(modality="ct")  # doctest: +SKIP
        >>> probs = predict_ct(model, read_ct("ct.nii.gz"))  # doctest: +SKIP
    """
    prepared = prepare_ct_volume(ct, model.config.spacing)
    probs = predict_ct_array(model, normalize_ct(sitk.GetArrayViewFromImage(prepared)))
    if clean:
        probs = keep_kidney_components(probs)
    image = sitk.GetImageFromArray(probs)
    image.CopyInformation(prepared)
    back = sitk.Resample(
        image,
        ct,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
        True,  # nearest-value extrapolation: the resampled grid may end half a voxel early
    )
    return back


def predict_us_frames(
    model: FeatureModel, frames: NDArray[np.floating], *, stride: int = 1
) -> NDArray[np.float32]:
    """Per-frame kidney probabilities of normalised U/S frames at the model's pixel size.

    Windows of ``Nw`` frames are centred every ``stride`` frames; frame ``k``'s map is the
    output frame of the window it is nearest the middle of (``stride=1``: frame ``k``'s own
    window, its middle output frame). Any stride up to ``Nw`` keeps every frame inside its
    window (at most ``stride // 2`` frames from the middle) and costs ``1 / stride`` of the
    network time; ``stride = Nw`` tiles the sequence with disjoint windows.

    Args:
        model: A U/S feature model.
        frames: ``(n, rows, cols)`` in [0, 1], pixel size ``model.config.spacing``.
        stride: Frames between consecutive window centres.

    Returns:
        float32 ``(n, rows, cols)``.
    """
    if model.modality != "us":
        raise ValueError("predict_us_frames needs a U/S feature model")
    array = np.asarray(frames, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"frames must be (n, rows, cols), got shape {array.shape}")
    n = array.shape[0]
    window = model.config.window
    middle = window // 2
    if not 1 <= int(stride) <= window:
        raise ValueError(f"stride must be in 1..{window} for a window of {window}, got {stride}")
    stride = int(stride)
    # Window j is centred on frame j * stride + stride // 2 (the last one clipped to the end)
    # and serves frames j * stride .. j * stride + stride - 1.
    n_windows = -(-n // stride)
    centres = np.minimum(np.arange(n_windows) * stride + stride // 2, n - 1)
    out = np.empty(array.shape, dtype=np.float32)
    for first in range(0, n_windows, _FRAMES_PER_BATCH):
        chosen = centres[first : first + _FRAMES_PER_BATCH]
        batch = np.stack([array[window_indices(n, int(c), window)] for c in chosen])
        probs = _sliding(model, torch.from_numpy(batch)[:, None])[:, 0].numpy()
        for j, centre in enumerate(chosen, start=first):
            for k in range(j * stride, min(n, (j + 1) * stride)):
                out[k] = probs[j - first, middle + k - int(centre)]
    return out


def _frames_image(values: NDArray[Any], spacing: tuple[float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    image.SetSpacing((float(spacing[0]), float(spacing[1]), 1.0))
    return image


def predict_us(
    model: FeatureModel, sequence: UltrasoundSequence, *, stride: int = 1
) -> NDArray[np.float32]:
    """Kidney probabilities ``(n, rows, cols)`` of a U/S sequence on its own pixel grid.

    ``stride``: as :func:`predict_us_frames`.

    Example:
        >>> seq = read_us_sequence("us.nii.gz")  # doctest: +SKIP
        >>> predict_us(load_feature_model(modality="us"), seq).shape == seq.shape  # doctest: +SKIP
        True
    """
    spacing = model.config.spacing
    resampled, _ = resample_us_frames(sequence.frames, sequence.pixel_size, spacing)
    probs = predict_us_frames(model, normalize_us(resampled), stride=stride)
    # Back to the original pixels: both grids start at U/S image mm (0, 0).
    reference = _frames_image(np.zeros(sequence.shape, np.float32), sequence.pixel_size)
    back = sitk.Resample(
        _frames_image(probs, (spacing, spacing)),
        reference,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
        True,
    )
    return np.asarray(sitk.GetArrayFromImage(back), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Files (kidneyreg segment)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_file` wrote.

    Attributes:
        path: The output file.
        kidney_voxels: Voxels (pixels) at or above the threshold.
        total_voxels: Voxels (pixels) of the input.
        model: The checkpoint used.
    """

    path: Path
    kidney_voxels: int
    total_voxels: int
    model: str


def _suffix_of(path: Path) -> str:
    name = path.name.lower()
    for suffix in (*_VOLUME_SUFFIXES, *_PICTURE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _output_kind(out: Path, modality: str) -> str:
    suffix = _suffix_of(out)
    if suffix in _VOLUME_SUFFIXES:
        return "volume"
    if suffix in _PICTURE_SUFFIXES and modality == "us":
        return "png"
    allowed = ".nii.gz, .nii, .nrrd, .mha" + (" or .png" if modality == "us" else "")
    raise InputError(out, f"unsupported output file type {suffix or '(none)'!r}: use {allowed}")


def _volume_header(path: Path) -> sitk.ImageFileReader | None:
    """The image header of a NIfTI/NRRD/MHA input, or None for other inputs."""
    if path.is_dir() or _suffix_of(path) not in _VOLUME_SUFFIXES:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _us_output_image(
    values: NDArray[Any], sequence: UltrasoundSequence, source: Path
) -> sitk.Image:
    """``values (n, rows, cols)`` as an image on the input file's grid (or the sequence layout)."""
    n = values.shape[0]
    header = _volume_header(source)
    if header is not None and header.GetDimension() == 2 and n == 1:
        image = sitk.GetImageFromArray(values[0])
    else:
        image = sitk.GetImageFromArray(values)
        image.SetSpacing((sequence.pixel_size[0], sequence.pixel_size[1], 1.0))
    if header is not None and tuple(header.GetSize()) == image.GetSize():
        image.SetOrigin(header.GetOrigin())
        image.SetSpacing(header.GetSpacing())
        image.SetDirection(header.GetDirection())
    return image


def _write_png(values: NDArray[np.uint8], out: Path) -> None:
    import imageio.v3 as iio

    with atomic_path(out) as tmp:
        iio.imwrite(tmp, values, extension=".png")


def segment_file(
    modality: str,
    input_path: str | Path,
    out: str | Path,
    *,
    spacing: float | None = None,
    probabilities: bool = False,
    model: str | Path | None = None,
    profile: str = "cpu",
    device: str | torch.device = "cpu",
    threshold: float = 0.5,
    view: str = "sagittal",
) -> SegmentResult:
    """Segment the kidney in a CT volume, a U/S sequence or a U/S image and write the result.

    Args:
        modality: ``"ct"`` or ``"us"``.
        input_path: CT (NIfTI/NRRD/MHA/DICOM folder) or U/S input (any form of
            :func:`kidneyreg.io.us.read_us_sequence`, including one PNG image).
        out: Output file on the input's grid: a volume (``.nii.gz``...) with kidney = 1, or for
            a single U/S image a PNG of the same size with kidney = 255.
        spacing: U/S pixel size in mm for inputs that do not carry one (PNG, video).
        probabilities: Write the probability map (float32 volume, or 0..255 PNG) instead.
        model: Checkpoint; None uses the bundled model of ``profile``.
        profile: Profile of the bundled model.
        device: Torch device.
        threshold: Probability at or above which a voxel is kidney.
        view: The view of the bundled U/S model (:data:`US_VIEWS`): ``"flank"`` for
            coronal-oblique views from the flank.

    Returns:
        The output path and the kidney size.

    Raises:
        InputError: Bad input, output type or model; ``--spacing`` or ``--view`` with a CT, an
            unknown view.

    Example:
        >>> segment_file("us", "frame.png", "mask.png", spacing=0.3)  # doctest: +SKIP
    """
    if modality not in MODALITIES:
        raise InputError("--modality", f"must be ct or us, got {modality!r}")
    source = Path(input_path)
    destination = Path(out)
    kind = _output_kind(destination, modality)
    if modality == "ct" and spacing is not None:
        raise InputError(
            "--spacing", "is for U/S images without a pixel size; a CT carries its own"
        )
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if view not in US_VIEWS:
        raise InputError("--view", f"must be one of {', '.join(US_VIEWS)}, got {view!r}")
    if modality == "ct" and view != "sagittal":
        raise InputError("--view", "chooses among the bundled U/S models; a CT has one")
    if modality == "ct":
        ct = read_ct(source)
        feature_model = load_feature_model(model, modality="ct", profile=profile, device=device)
        probs_image = predict_ct(feature_model, ct)
        values = sitk.GetArrayViewFromImage(probs_image)
        kidney = int(np.count_nonzero(values >= threshold))
        if probabilities:
            write_image(probs_image, destination)
        else:
            mask = sitk.GetImageFromArray((values >= threshold).astype(np.uint8))
            mask.CopyInformation(ct)
            write_mask(mask, destination)
        return SegmentResult(destination, kidney, int(values.size), feature_model.source)
    try:
        sequence = read_us_sequence(source, spacing=spacing, min_frames=1)
    except InputError as error:
        # The reader names register's option; this command's option is --spacing.
        raise InputError(error.source, error.problem.replace("--us-spacing", "--spacing")) from None
    feature_model = load_feature_model(
        model, modality="us", profile=profile, device=device, view=view
    )
    probs = predict_us(feature_model, sequence)
    kidney = int(np.count_nonzero(probs >= threshold))
    if kind == "png":
        if sequence.n_frames != 1:
            raise InputError(
                destination,
                f"a PNG holds one frame but the input has {sequence.n_frames}: write a .nii.gz",
            )
        if probabilities:
            picture = np.round(np.clip(probs[0], 0.0, 1.0) * 255.0).astype(np.uint8)
        else:
            picture = np.where(probs[0] >= threshold, 255, 0).astype(np.uint8)
        _write_png(picture, destination)
    elif probabilities:
        write_image(_us_output_image(probs, sequence, source), destination)
    else:
        mask_values = (probs >= threshold).astype(np.uint8)
        write_mask(_us_output_image(mask_values, sequence, source), destination)
    return SegmentResult(destination, kidney, int(probs.size), feature_model.source)

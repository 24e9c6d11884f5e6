"""Figures of registration results and benchmarks, and the overlay frames of the result videos.

Figures (each returns the PNG path it wrote, atomically):

* :func:`figure_stacks`: the paper's Figure 2. CT result planes and U/S frames seen as volumes
  stacked over time (time is the R-L axis): the "sagittal" view is a frame, the "axial" and
  "coronal" views cut the stack along one column / one row, so breathing motion shows as waves.
* :func:`figure_planes_coronal`: the paper's Figure 5. A coronal (and an axial) CT slice through
  the kidney with the footprint of each frame pose (initial, reference, result...) drawn in it.
* :func:`figure_error_vs_breathing`: per-frame errors against the breathing signal.
* :func:`figure_boxplots`: one box per method (benchmark tables).
* :func:`figure_error_vs_phase`: error binned by breathing phase (see :func:`breathing_phase`).
* :func:`figure_overlay_montage`: a grid of U/S frames with kidney contours.

:func:`overlay_frame` (RGB frame with contours, numpy only) is shared by the montage and
:func:`write_overlay_video`.

matplotlib state is never touched: every figure is a :class:`matplotlib.figure.Figure` with its
own Agg canvas (no pyplot, no backend switch, no current figure) drawn inside
``matplotlib.rc_context``, so the functions are safe in notebooks, servers and tests. matplotlib
and imageio are imported only when a figure or a video is made.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from kidneyreg.evaluation.contours import CONTOUR_STRUCTURE, contour_mask
from kidneyreg.geometry import is_rigid, transform_points
from kidneyreg.io.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CT_WINDOW",
    "PLANE_COLOURS",
    "Colour",
    "ContourLayer",
    "breathing_phase",
    "figure_boxplots",
    "figure_error_vs_breathing",
    "figure_error_vs_phase",
    "figure_overlay_montage",
    "figure_planes_coronal",
    "figure_stacks",
    "overlay_frame",
    "sequence_window",
    "write_overlay_video",
]

#: A colour: a matplotlib name or hex string, RGB floats in [0, 1] or RGB integers in 0..255.
Colour = str | tuple[float, float, float] | tuple[int, int, int]

#: Soft-tissue CT display window (HU): level 40, width 400.
CT_WINDOW: tuple[float, float] = (-160.0, 240.0)
#: Plane colours of the paper's Figure 5 (blue initial, green reference, red result).
PLANE_COLOURS: dict[str, str] = {
    "initial": "#1f77b4",
    "reference": "#2ca02c",
    "result": "#d62728",
}
# Further plane/method colours (Okabe-Ito, colour-blind safe) after the named ones.
_PALETTE = ("#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7")
# Default colours of mask outlines drawn over images (bright on grey, colour-blind safe, and
# distinct from the yellow crosshairs).
_MASK_COLOURS = ("#00dcff", "#ff8c00", "#ff4fd8", "#7cfc00")
# Colour of the kidney outline drawn on CT slices (distinct from the three plane colours).
_KIDNEY_COLOUR = "#ffd700"
_CROSSHAIR_COLOUR = "#ffff66"
_DPI = 110
_STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "image.interpolation": "nearest",
}
# Overlay videos: frames are upscaled so that their larger side is at least this many pixels.
_VIDEO_MIN_SIDE = 360
_VIDEO_MAX_SCALE = 4
# Codecs tried in order: H.264 (small, plays everywhere), then MPEG-4 part 2 for ffmpeg builds
# without libx264. CRF 28 keeps 150 overlay frames of ~400 x 520 px around 1 MB.
_VIDEO_CODECS: dict[str, list[str]] = {
    "libx264": ["-crf", "28", "-preset", "medium", "-movflags", "+faststart"],
    "mpeg4": ["-q:v", "7"],
}
# Largest side (pixels) of the CT slices resampled for figure_planes_coronal.
_SLICE_MAX_PIXELS = 640
# Margin (mm) around the kidney and the plane footprints in figure_planes_coronal.
_SLICE_MARGIN_MM = 12.0


class ContourLayer(NamedTuple):
    """Masks whose contours are drawn on every frame of a sequence, with a colour and a label.

    Attributes:
        masks: ``(n_frames, rows, cols)``; nonzero is inside. Float maps are thresholded at 0.5.
        colour: The contour colour (see :data:`Colour`).
        label: Legend text, e.g. ``"CT kidney (resliced by the result)"``.

    Example:
        >>> layer = ContourLayer(np.zeros((3, 8, 8)), (255, 140, 0), "CT kidney")
        >>> layer.label
        'CT kidney'
    """

    masks: ArrayLike
    colour: Colour
    label: str


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _figure(
    out_path: str | Path, figsize: tuple[float, float], *, dpi: int = _DPI
) -> Iterator[Figure]:
    """A private Agg figure (constrained layout) saved atomically as PNG when the block ends."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # rc_context restores every rcParam on exit; its typed signature lists literal keys only.
    with matplotlib.rc_context(cast(Any, _STYLE)):
        fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig
        with atomic_path(out_path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)


def _rgb255(colour: Colour) -> tuple[int, int, int]:
    """A colour as RGB integers 0..255."""
    if isinstance(colour, str):
        from matplotlib.colors import to_rgb

        rgb = to_rgb(colour)
        return (round(rgb[0] * 255), round(rgb[1] * 255), round(rgb[2] * 255))
    values = tuple(colour)
    if len(values) != 3:
        raise ValueError(f"a colour needs 3 components, got {colour!r}")
    if all(isinstance(v, (int, np.integer)) for v in values):
        if not all(0 <= int(v) <= 255 for v in values):
            raise ValueError(f"integer colour components must be in 0..255, got {colour!r}")
        return (int(values[0]), int(values[1]), int(values[2]))
    if not all(0.0 <= float(v) <= 1.0 for v in values):
        raise ValueError(f"float colour components must be in [0, 1], got {colour!r}")
    return (round(values[0] * 255), round(values[1] * 255), round(values[2] * 255))


def _hex(colour: Colour) -> str:
    """A colour as a matplotlib hex string."""
    r, g, b = _rgb255(colour)
    return f"#{r:02x}{g:02x}{b:02x}"


def _stack(values: ArrayLike, name: str) -> NDArray[np.float32]:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"{name} must have shape (n_frames, rows, cols), got {array.shape}")
    return array


def _masks(values: ArrayLike, shape: tuple[int, ...], name: str) -> NDArray[np.bool_]:
    array = np.asarray(values)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        return np.asarray(array >= 0.5)
    return np.asarray(array != 0)


def _pixel_size(pixel_size: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(s) for s in pixel_size)
    if len(values) != 2 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"pixel_size must be two finite values > 0 (sx, sy), got {pixel_size!r}")
    return values[0], values[1]


def _colour_for(name: str, position: int, colours: Mapping[str, Colour] | None) -> str:
    if colours is not None and name in colours:
        return _hex(colours[name])
    if name in PLANE_COLOURS:
        return PLANE_COLOURS[name]
    return _PALETTE[position % len(_PALETTE)]


def sequence_window(frames: ArrayLike) -> tuple[float, float]:
    """Display window ``(low, high)`` of a U/S sequence, one for all frames (no flicker).

    B-mode frames holding integers in 0..255 get ``(0, 255)``; anything else its 0.5 and 99.5
    percentiles.

    Example:
        >>> sequence_window(np.array([[[0, 10], [200, 30]]], dtype=np.uint8))
        (0.0, 255.0)
    """
    array = np.asarray(frames, dtype=np.float32)
    if array.size == 0:
        raise ValueError("sequence_window needs at least one pixel")
    if array.min() >= 0 and array.max() <= 255 and np.array_equal(array, np.round(array)):
        return (0.0, 255.0)
    low, high = np.percentile(array, [0.5, 99.5])
    if not high > low:
        high = low + 1.0
    return (float(low), float(high))


# ----------------------------------------------------------------------------------------------
# Overlays, montage and video
# ----------------------------------------------------------------------------------------------


def _zoom(image: NDArray[Any], scale: int) -> NDArray[np.float32]:
    """Bilinear integer upscaling of a 2D array (as float32; masks give fractions)."""
    # grid_mode: pixels are areas, so the upscaled image covers exactly the same extent;
    # "nearest" edges: a mask touching the border still reaches the upscaled border.
    return np.asarray(
        ndimage.zoom(
            np.asarray(image, dtype=np.float32), scale, order=1, mode="nearest", grid_mode=True
        ),
        dtype=np.float32,
    )


def overlay_frame(
    us_frame: ArrayLike,
    contours: Sequence[tuple[ArrayLike, Colour]] = (),
    *,
    window: tuple[float, float] | None = None,
    scale: int = 1,
    thickness: int = 1,
) -> NDArray[np.uint8]:
    """A U/S frame as an RGB image with mask contours drawn in colour.

    The contour of a mask is :func:`kidneyreg.evaluation.contour_mask` (the foreground pixels
    with a background 4-neighbour), the definition the contour metrics use. With ``scale > 1``
    the frame and the masks are upscaled bilinearly first (masks thresholded at 0.5), so the
    contours are drawn one output pixel thick on a smooth outline. Later contours are drawn over
    earlier ones.

    Args:
        us_frame: ``(rows, cols)`` B-mode frame.
        contours: ``(mask, colour)`` pairs; each mask ``(rows, cols)``, nonzero inside (a float
            map is thresholded at 0.5).
        window: Intensity range mapped to black..white; default :func:`sequence_window`.
        scale: Integer upscaling factor (1..8).
        thickness: Contour thickness in output pixels (1..5).

    Returns:
        uint8 ``(rows * scale, cols * scale, 3)``.

    Example:
        >>> mask = np.zeros((6, 6), dtype=np.uint8)
        >>> mask[2:5, 2:5] = 1
        >>> rgb = overlay_frame(np.full((6, 6), 100), [(mask, (255, 0, 0))])
        >>> rgb[2, 2].tolist(), rgb[3, 3].tolist()
        ([255, 0, 0], [100, 100, 100])
    """
    frame = np.asarray(us_frame, dtype=np.float32)
    if frame.ndim != 2 or min(frame.shape) < 1:
        raise ValueError(f"us_frame must be a 2D array (rows, cols), got shape {frame.shape}")
    if not (isinstance(scale, (int, np.integer)) and 1 <= scale <= 8):
        raise ValueError(f"scale must be an integer in 1..8, got {scale!r}")
    if not (isinstance(thickness, (int, np.integer)) and 1 <= thickness <= 5):
        raise ValueError(f"thickness must be an integer in 1..5, got {thickness!r}")
    low, high = window if window is not None else sequence_window(frame)
    if not high > low:
        raise ValueError(f"window must be (low, high) with high > low, got {window!r}")
    if scale > 1:
        frame = _zoom(frame, int(scale))
    grey = np.clip((frame - low) * (255.0 / (high - low)), 0.0, 255.0)
    rgb = np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=2)
    for mask, colour in contours:
        inside = _masks(mask, tuple(np.asarray(us_frame).shape), "contour mask")
        if scale > 1:
            inside = _zoom(inside, int(scale)) >= 0.5
        edge = contour_mask(inside)
        if thickness > 1:
            edge = ndimage.binary_dilation(
                edge, structure=CONTOUR_STRUCTURE, iterations=int(thickness) - 1
            )
        rgb[edge] = _rgb255(colour)
    return rgb


def _layers(
    layers: Sequence[ContourLayer], shape: tuple[int, int, int]
) -> list[tuple[NDArray[np.bool_], tuple[int, int, int], str]]:
    return [
        (
            _masks(layer.masks, shape, f"layer {layer.label!r} masks"),
            _rgb255(layer.colour),
            layer.label,
        )
        for layer in layers
    ]


def _auto_scale(rows: int, cols: int) -> int:
    return int(min(_VIDEO_MAX_SCALE, max(1, math.ceil(_VIDEO_MIN_SIDE / max(rows, cols)))))


def figure_overlay_montage(
    us_frames: ArrayLike,
    layers: Sequence[ContourLayer],
    out_path: str | Path,
    *,
    max_frames: int = 24,
    frame_indices: Sequence[int] | None = None,
    window: tuple[float, float] | None = None,
    highlight: Sequence[int] = (),
    highlight_label: str = "adaptation",
    pixel_size: Sequence[float] | None = None,
    frame_rate: float | None = None,
    title: str | None = None,
) -> Path:
    """A grid of U/S frames with the contours of each layer, with a colour legend.

    Args:
        us_frames: ``(n, rows, cols)`` B-mode sequence.
        layers: Contour layers drawn on every shown frame.
        out_path: PNG to write.
        max_frames: Frames shown when ``frame_indices`` is None (evenly spaced, first and last
            included).
        frame_indices: Frames to show instead.
        window: Intensity window; default :func:`sequence_window` of the whole sequence.
        highlight: Frames whose tile title is marked with ``highlight_label`` (e.g. the frames of
            the adaptation cycle).
        highlight_label: Mark for highlighted frames.
        pixel_size: ``(sx, sy)`` mm; when given, a 20 mm scale bar is drawn on the first tile.
        frame_rate: Frames per second; when given, tile titles show the time too.
        title: Figure title.

    Returns:
        ``out_path`` as a Path.

    Example:
        >>> layers = [ContourLayer(masks, "orange", "CT kidney")]  # doctest: +SKIP
        >>> figure_overlay_montage(frames, layers, "montage.png")  # doctest: +SKIP
    """
    frames = _stack(us_frames, "us_frames")
    n, rows, cols = frames.shape
    drawn = _layers(layers, frames.shape)
    if frame_indices is None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        shown = sorted({round(float(x)) for x in np.linspace(0, n - 1, min(n, max_frames))})
    else:
        shown = [int(k) for k in frame_indices]
        if not shown or any(not 0 <= k < n for k in shown):
            raise ValueError(f"frame_indices must be non-empty and within 0..{n - 1}")
    win = window if window is not None else sequence_window(frames)
    marked = {int(k) for k in highlight}
    scale = min(3, _auto_scale(rows, cols))
    n_cols = min(len(shown), 6 if len(shown) > 9 else max(1, math.ceil(math.sqrt(len(shown)))))
    n_rows = math.ceil(len(shown) / n_cols)
    tile_w = 2.3
    tile_h = tile_w * rows / cols + 0.3
    from matplotlib.lines import Line2D

    with _figure(out_path, (tile_w * n_cols, tile_h * n_rows + 0.9)) as fig:
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        for position, ax in enumerate(axes.ravel()):
            ax.set_axis_off()
            if position >= len(shown):
                continue
            k = shown[position]
            rgb = overlay_frame(
                frames[k], [(m[k], c) for m, c, _ in drawn], window=win, scale=scale, thickness=2
            )
            ax.imshow(rgb, interpolation="antialiased")
            text = f"frame {k}"
            if frame_rate:
                text += f"  ({k / frame_rate:.2f} s)"
            if k in marked:
                text += f"  [{highlight_label}]"
            ax.set_title(text, fontsize=8)
            if position == 0 and pixel_size is not None:
                sx, _ = _pixel_size(pixel_size)
                bar = 20.0 / sx * scale
                y = rgb.shape[0] * 0.94
                x0 = rgb.shape[1] * 0.06
                ax.plot([x0, x0 + bar], [y, y], color="white", linewidth=2)
                ax.text(
                    x0 + bar / 2,
                    y - rgb.shape[0] * 0.03,
                    "20 mm",
                    color="white",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        handles = [Line2D([], [], color=_hex(c), linewidth=2, label=label) for _, c, label in drawn]
        if handles:
            fig.legend(
                handles=handles, loc="outside lower center", ncol=len(handles), frameon=False
            )
        if title:
            fig.suptitle(title)
    return Path(out_path)


def _timeline(
    width: int, k: int, n: int, cycle_starts: Sequence[int], highlight: NDArray[np.bool_]
) -> NDArray[np.uint8]:
    """A thin progress strip: highlighted frames, cycle starts and the current frame."""
    height = 8
    strip = np.full((height, width, 3), 35, dtype=np.uint8)
    columns = np.minimum((np.arange(width) * n) // max(width, 1), n - 1)
    strip[2:-2][:, highlight[columns]] = (120, 80, 20)
    for start in cycle_starts:
        if 0 <= start < n:
            x = round(start * (width - 1) / max(n - 1, 1))
            strip[:, x] = (150, 150, 150)
    x = round(k * (width - 1) / max(n - 1, 1))
    strip[:, max(0, x - 1) : x + 2] = (255, 255, 255)
    return strip


def _video_frames(
    frames: NDArray[np.float32],
    drawn: list[tuple[NDArray[np.bool_], tuple[int, int, int], str]],
    window: tuple[float, float],
    scale: int,
    cycle_starts: Sequence[int],
    highlight: NDArray[np.bool_],
) -> Iterator[NDArray[np.uint8]]:
    n = frames.shape[0]
    for k in range(n):
        # Two pixels: yuv420p halves the colour resolution, which washes out 1-pixel lines.
        rgb = overlay_frame(
            frames[k], [(m[k], c) for m, c, _ in drawn], window=window, scale=scale, thickness=2
        )
        picture = np.concatenate([rgb, _timeline(rgb.shape[1], k, n, cycle_starts, highlight)])
        # Pad to multiples of 16 (H.264 macroblocks; yuv420p needs even sizes) with black.
        pad_rows = -picture.shape[0] % 16
        pad_cols = -picture.shape[1] % 16
        yield np.pad(picture, ((0, pad_rows), (0, pad_cols), (0, 0)))


def write_overlay_video(
    us_frames: ArrayLike,
    layers: Sequence[ContourLayer],
    out_path: str | Path,
    *,
    fps: float = 20.0,
    window: tuple[float, float] | None = None,
    scale: int | None = None,
    cycle_starts: Sequence[int] = (),
    highlight: Sequence[int] = (),
    codec: str = "libx264",
) -> Path:
    """Every frame with its contours as an MP4 video, written atomically.

    Each video frame is :func:`overlay_frame` (upscaled so that its larger side is at least
    360 px) above a thin timeline: the highlighted frames (e.g. the adaptation cycle) in dark
    orange, cycle starts as grey ticks, the current frame in white. Frames are padded with black
    to multiples of 16 pixels. H.264 (``libx264``, CRF 28) is tried first, then MPEG-4 part 2
    when the ffmpeg build lacks the requested codec.

    Args:
        us_frames: ``(n, rows, cols)`` B-mode sequence.
        layers: Contour layers.
        out_path: ``.mp4`` file to write.
        fps: Frames per second (the U/S frame rate).
        window: Intensity window; default :func:`sequence_window` of the sequence.
        scale: Integer upscaling factor; default chosen from the frame size.
        cycle_starts: Breathing cycle starts (frame indices) marked on the timeline.
        highlight: Frames highlighted on the timeline.
        codec: ffmpeg encoder tried first.

    Returns:
        ``out_path`` as a Path.

    Raises:
        RuntimeError: No codec could encode the video.

    Example:
        >>> layers = [ContourLayer(masks, "orange", "CT kidney")]  # doctest: +SKIP
        >>> write_overlay_video(frames, layers, "overlay.mp4", fps=18.0)  # doctest: +SKIP
    """
    frames = _stack(us_frames, "us_frames")
    n, rows, cols = frames.shape
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    drawn = _layers(layers, frames.shape)
    win = window if window is not None else sequence_window(frames)
    factor = _auto_scale(rows, cols) if scale is None else int(scale)
    marked = np.zeros(n, dtype=bool)
    for k in highlight:
        if 0 <= int(k) < n:
            marked[int(k)] = True
    import imageio.v2 as iio

    codecs = [codec] + [c for c in _VIDEO_CODECS if c != codec]
    failures: list[str] = []
    with atomic_path(out_path) as tmp:
        for name in codecs:
            try:
                writer = iio.get_writer(
                    tmp,
                    format="FFMPEG",
                    mode="I",
                    fps=float(fps),
                    codec=name,
                    quality=None,
                    pixelformat="yuv420p",
                    macro_block_size=16,
                    output_params=list(_VIDEO_CODECS.get(name, [])),
                    ffmpeg_log_level="error",
                )
                try:
                    for picture in _video_frames(frames, drawn, win, factor, cycle_starts, marked):
                        writer.append_data(picture)
                finally:
                    writer.close()
            except (OSError, RuntimeError, ValueError) as error:
                failures.append(f"{name}: {str(error).splitlines()[0] if str(error) else error!r}")
                continue
            if tmp.stat().st_size > 0:
                break
        else:
            raise RuntimeError(
                f"{out_path}: no codec could encode the video ({'; '.join(failures)})"
            )
    return Path(out_path)


# ----------------------------------------------------------------------------------------------
# Figure 2: stacks over time
# ----------------------------------------------------------------------------------------------


def _frame_index(k: int, n: int) -> int:
    if not -n <= int(k) < n:
        raise ValueError(f"frame_index {k} out of range for {n} frames")
    return int(k) % n


def figure_stacks(
    ct_planes: ArrayLike,
    us_frames: ArrayLike,
    pixel_size: Sequence[float],
    out_path: str | Path,
    *,
    frame_index: int,
    cut: tuple[int, int] | None = None,
    masks: Mapping[str, ArrayLike] | None = None,
    mask_colours: Mapping[str, Colour] | None = None,
    frame_rate: float | None = None,
    ct_window: tuple[float, float] = CT_WINDOW,
    us_window: tuple[float, float] | None = None,
    title: str | None = None,
) -> Path:
    """The paper's Figure 2: CT result planes and U/S frames as stacks over time.

    Frames are stacked along time, the R-L axis of the paper's RAI display. For each modality
    (top row CT planes resliced by the result, bottom row U/S):

    * **axial**: the stack cut along image column ``c`` (lateral position u): depth against time,
      showing the back-and-forth (A-P) motion of the kidney;
    * **sagittal**: frame ``frame_index`` itself (depth down, lateral across);
    * **coronal**: the stack cut along image row ``r`` (depth v): lateral position against time,
      showing the up-and-down (S-I, u in the default pose) motion.

    Yellow crosshairs mark the same ``(r, c)`` and frame in every view of both rows, so a
    structure under the crosshair on the U/S should be under it on the CT too. Optional masks
    (e.g. the U/S kidney mask) are outlined in all six views.

    Args:
        ct_planes: ``(n, rows, cols)`` CT planes in HU (``ct_planes.nii.gz``).
        us_frames: ``(n, rows, cols)`` U/S frames.
        pixel_size: ``(sx, sy)`` mm.
        out_path: PNG to write.
        frame_index: The frame shown in the sagittal view and marked in the others.
        cut: ``(row, col)`` of the cuts; default the centroid of the first mask on that frame
            (the kidney), else the frame centre.
        masks: Label -> ``(n, rows, cols)`` masks outlined in every view.
        mask_colours: Label -> colour for ``masks`` (default: a colour-blind-safe palette).
        frame_rate: Frames per second: time axes in seconds instead of frames.
        ct_window: CT display window (HU).
        us_window: U/S display window; default :func:`sequence_window`.
        title: Figure title.

    Returns:
        ``out_path`` as a Path.

    Example:
        >>> figure_stacks(ct, us, (0.8, 0.8), "stacks.png", frame_index=20)  # doctest: +SKIP
    """
    ct = _stack(ct_planes, "ct_planes")
    us = _stack(us_frames, "us_frames")
    if ct.shape != us.shape:
        raise ValueError(f"ct_planes {ct.shape} and us_frames {us.shape} must have the same shape")
    n, rows, cols = us.shape
    sx, sy = _pixel_size(pixel_size)
    k = _frame_index(frame_index, n)
    outlines = {label: _masks(m, us.shape, f"mask {label!r}") for label, m in (masks or {}).items()}
    if cut is None:
        first = next(iter(outlines.values()), None)
        if first is not None and first[k].any():
            rr, cc = np.nonzero(first[k])
            cut = (round(float(rr.mean())), round(float(cc.mean())))
        else:
            cut = (rows // 2, cols // 2)
    r, c = int(cut[0]), int(cut[1])
    if not (0 <= r < rows and 0 <= c < cols):
        raise ValueError(f"cut {cut} outside the frame ({rows} x {cols})")
    step = 1.0 / frame_rate if frame_rate else 1.0
    t_unit = "time (s)" if frame_rate else "frame"
    t_k = k * step
    t_extent = (-0.5 * step, (n - 0.5) * step)
    depth_extent = ((rows - 0.5) * sy, -0.5 * sy)  # rows downward
    lateral_extent = (-0.5 * sx, (cols - 0.5) * sx)
    colours = {
        label: _hex(mask_colours[label])
        if mask_colours is not None and label in mask_colours
        else _MASK_COLOURS[i % len(_MASK_COLOURS)]
        for i, label in enumerate(outlines)
    }
    u_mm, v_mm = c * sx, r * sy
    us_win = us_window if us_window is not None else sequence_window(us)
    from matplotlib.lines import Line2D

    frame_w = cols * sx
    frame_h = rows * sy
    width_ratios = [1.0, frame_w / frame_h * 0.9 + 0.4, 1.0]
    with _figure(out_path, (13.0, 7.4)) as fig:
        axes = fig.subplots(2, 3, gridspec_kw={"width_ratios": width_ratios})
        for row_axes, (name, stack, vmin, vmax) in zip(
            axes,
            [
                ("CT (result planes)", ct, ct_window[0], ct_window[1]),
                ("U/S", us, us_win[0], us_win[1]),
            ],
            strict=True,
        ):
            ax_axial, ax_sag, ax_cor = row_axes
            axial = stack[:, :, c].T  # (rows, n): depth x time
            coronal = stack[:, r, :].T  # (cols, n): lateral x time
            shown = dict(cmap="gray", vmin=vmin, vmax=vmax, interpolation="antialiased")
            ax_axial.imshow(axial, extent=(*t_extent, *depth_extent), aspect="auto", **shown)
            ax_sag.imshow(stack[k], extent=(*lateral_extent, *depth_extent), **shown)
            ax_cor.imshow(
                coronal, extent=(*t_extent, *lateral_extent), origin="lower", aspect="auto", **shown
            )
            for label, mask in outlines.items():
                kw = dict(levels=[0.5], colors=colours[label], linewidths=0.9)
                if mask[:, :, c].any():
                    ax_axial.contour(
                        mask[:, :, c].T.astype(float),
                        extent=(*t_extent, depth_extent[1], depth_extent[0]),
                        **kw,
                    )
                if mask[k].any():
                    ax_sag.contour(
                        mask[k].astype(float),
                        extent=(
                            lateral_extent[0],
                            lateral_extent[1],
                            depth_extent[1],
                            depth_extent[0],
                        ),
                        **kw,
                    )
                if mask[:, r, :].any():
                    ax_cor.contour(
                        mask[:, r, :].T.astype(float), extent=(*t_extent, *lateral_extent), **kw
                    )
            cross = dict(color=_CROSSHAIR_COLOUR, linewidth=0.8, linestyle="--", alpha=0.9)
            ax_axial.axhline(v_mm, **cross)
            ax_axial.axvline(t_k, **cross)
            ax_sag.axhline(v_mm, **cross)
            ax_sag.axvline(u_mm, **cross)
            ax_cor.axhline(u_mm, **cross)
            ax_cor.axvline(t_k, **cross)
            ax_axial.set_title(f"{name} · axial (column u = {u_mm:.1f} mm)")
            ax_sag.set_title(f"{name} · sagittal (frame {k})")
            ax_cor.set_title(f"{name} · coronal (row v = {v_mm:.1f} mm)")
            ax_axial.set_xlabel(t_unit)
            ax_axial.set_ylabel("depth v (mm)")
            ax_sag.set_xlabel("lateral u (mm)")
            ax_sag.set_ylabel("depth v (mm)")
            ax_cor.set_xlabel(t_unit)
            ax_cor.set_ylabel("lateral u (mm)")
        handles = [Line2D([], [], color=_CROSSHAIR_COLOUR, linestyle="--", label="crosshair")]
        handles += [Line2D([], [], color=colours[label], label=label) for label in outlines]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(
            title or "Frames stacked over time (time = R-L axis): CT planes at the result vs U/S"
        )
    return Path(out_path)


# ----------------------------------------------------------------------------------------------
# Figure 5: plane footprints in coronal / axial CT slices
# ----------------------------------------------------------------------------------------------


def _polylines(
    field: NDArray[np.float64] | np.ma.MaskedArray, level: float
) -> list[NDArray[np.float64]]:
    """Iso-lines of a 2D field at ``level`` as ``(N, 2)`` arrays of ``(col, row)``."""
    import contourpy

    generator = contourpy.contour_generator(z=field, line_type="Separate")
    return [np.asarray(line, dtype=np.float64) for line in generator.lines(level) if len(line) > 1]


def _footprint_outlines(footprint: NDArray[np.bool_]) -> list[NDArray[np.float64]]:
    """Outline polylines ``(col, row)`` of a footprint mask (closed, around its pixel centres)."""
    padded = np.pad(footprint.astype(np.float64), 1)
    return [line - 1.0 for line in _polylines(padded, 0.5)]


def _to_world(
    matrix: NDArray[np.float64], colrow: NDArray[np.float64], pixel_size: tuple[float, float]
) -> NDArray[np.float64]:
    uvw = np.column_stack(
        [colrow[:, 0] * pixel_size[0], colrow[:, 1] * pixel_size[1], np.zeros(len(colrow))]
    )
    return transform_points(matrix, uvw)


def _world_bounds(image: sitk.Image) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    size = np.asarray(image.GetSize())
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint(
                tuple(float(v) for v in np.where(bits, size - 0.5, -0.5))
            )
            for bits in np.ndindex(2, 2, 2)
        ]
    )
    return corners.min(axis=0), corners.max(axis=0)


def _mask_world_points(mask: sitk.Image) -> NDArray[np.float64]:
    array = sitk.GetArrayViewFromImage(mask)
    inside = np.asarray(array >= 0.5) if np.issubdtype(array.dtype, np.floating) else array != 0
    zyx = np.argwhere(inside)
    if len(zyx) == 0:
        return np.empty((0, 3))
    origin = np.asarray(mask.GetOrigin())
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    spacing = np.asarray(mask.GetSpacing())
    return np.asarray(origin + (zyx[:, ::-1] * spacing) @ direction.T)


def _axis_slice(
    volume: sitk.Image,
    fixed_axis: int,
    value: float,
    low: NDArray[np.float64],
    high: NDArray[np.float64],
    spacing: float,
    interpolator: int,
    default: float,
    pixel_type: int,
) -> NDArray[Any]:
    """The volume on an LPS-aligned slice ``world[fixed_axis] = value`` over ``[low, high]``."""
    size = [max(1, math.ceil(float(high[a] - low[a]) / spacing) + 1) for a in range(3)]
    size[fixed_axis] = 1
    origin = [float(v) for v in low]
    origin[fixed_axis] = float(value)
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetOrigin(origin)
    reference.SetSpacing((spacing, spacing, spacing))
    out = sitk.Resample(
        volume, reference, sitk.Transform(3, sitk.sitkIdentity), interpolator, default, pixel_type
    )
    array = sitk.GetArrayFromImage(out)  # (z, y, x)
    return np.take(array, 0, axis=2 - fixed_axis)


def figure_planes_coronal(
    ct: sitk.Image,
    ct_kidney_mask: sitk.Image | None,
    matrices: Mapping[str, ArrayLike],
    frame_shape: Sequence[int],
    pixel_size: Sequence[float],
    out_path: str | Path,
    *,
    footprint: ArrayLike | None = None,
    colours: Mapping[str, Colour] | None = None,
    ct_window: tuple[float, float] = CT_WINDOW,
    title: str | None = None,
) -> Path:
    """The paper's Figure 5: frame poses drawn in coronal and axial CT slices through the kidney.

    Both slices are LPS-aligned (radiological display: patient right on the left; superior up in
    the coronal view, anterior up in the axial view) and pass through the CT kidney centroid.
    For every pose, the frame's footprint (``footprint`` mask, e.g. the U/S fan, or the whole
    frame) is drawn projected onto the slice (translucent) and its intersection with the slice
    as a thick line, in the pose's colour: by default initial blue, reference green, result red
    as in the paper. The kidney outline on each slice is dashed gold.

    Args:
        ct: The CT (HU), any orientation.
        ct_kidney_mask: Kidney mask (or soft map, thresholded at 0.5) on any grid; centres the
            slices. None: the slices pass through the middle of the footprints.
        matrices: Name -> 4x4 pose (U/S image mm -> CT world LPS mm), e.g. ``{"initial": ...,
            "reference": ..., "result": ...}``.
        frame_shape: ``(rows, cols)`` of a frame.
        pixel_size: ``(sx, sy)`` mm.
        out_path: PNG to write.
        footprint: ``(rows, cols)`` mask of the imaged region of a frame; default all of it.
        colours: Name -> colour overrides.
        ct_window: CT display window (HU).
        title: Figure title.

    Returns:
        ``out_path`` as a Path.

    Example:
        >>> figure_planes_coronal(ct, mask, {"initial": m0, "result": m1}, (131, 174),
        ...                       (1.6, 1.6), "planes.png")  # doctest: +SKIP
    """
    if not matrices:
        raise ValueError("figure_planes_coronal needs at least one pose")
    poses: dict[str, NDArray[np.float64]] = {}
    for name, matrix in matrices.items():
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (4, 4) or not is_rigid(m):
            raise ValueError(f"pose {name!r} must be a rigid 4x4 matrix")
        poses[name] = m
    rows, cols = (int(v) for v in frame_shape)
    sxy = _pixel_size(pixel_size)
    fp = (
        np.ones((rows, cols), dtype=bool)
        if footprint is None
        else _masks(footprint, (rows, cols), "footprint")
    )
    if not fp.any():
        raise ValueError("footprint is empty")
    outlines = _footprint_outlines(fp)
    world_outlines = {
        name: [_to_world(m, line, sxy) for line in outlines] for name, m in poses.items()
    }
    plane_points = np.concatenate([p for lines in world_outlines.values() for p in lines])
    kidney = np.empty((0, 3)) if ct_kidney_mask is None else _mask_world_points(ct_kidney_mask)
    if len(kidney):
        centre = kidney.mean(axis=0)
        region = np.concatenate([kidney, plane_points])
    else:
        centre = np.mean(
            [
                transform_points(m, [cols * sxy[0] / 2, rows * sxy[1] / 2, 0])
                for m in poses.values()
            ],
            axis=0,
        )
        region = plane_points
    ct_low, ct_high = _world_bounds(ct)
    low = region.min(axis=0) - _SLICE_MARGIN_MM
    high = region.max(axis=0) + _SLICE_MARGIN_MM
    # A near-sagittal plane makes a thin region along R-L: widen every axis to a sensible view
    # (at least 0.7 of the longest one and 120 mm), around the region's middle.
    middle = (low + high) / 2
    half = np.maximum((high - low) / 2, max(60.0, 0.35 * float(np.max(high - low))))
    low = np.maximum(middle - half, ct_low)
    high = np.minimum(middle + half, ct_high)
    if np.any(high <= low):
        low, high = ct_low, ct_high  # the poses lie outside the CT: show the whole CT
    spacing = max(float(min(ct.GetSpacing())), float(np.max(high - low)) / _SLICE_MAX_PIXELS)
    views = [  # (fixed axis, horizontal axis, vertical axis, name, vertical upward?)
        (1, 0, 2, "coronal", True),
        (2, 0, 1, "axial", False),
    ]
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    with _figure(out_path, (12.0, 6.6)) as fig:
        axes = fig.subplots(1, 2)
        for ax, (fixed, h_axis, v_axis, view, upward) in zip(axes, views, strict=True):
            level = float(centre[fixed])
            image = _axis_slice(
                ct, fixed, level, low, high, spacing, sitk.sitkLinear, -1024.0, sitk.sitkFloat32
            )
            h_ext = (low[h_axis] - spacing / 2, low[h_axis] + (image.shape[1] - 0.5) * spacing)
            v_ext = (low[v_axis] - spacing / 2, low[v_axis] + (image.shape[0] - 0.5) * spacing)
            extent = (*h_ext, *(v_ext if upward else v_ext[::-1]))
            ax.imshow(
                image,
                cmap="gray",
                vmin=ct_window[0],
                vmax=ct_window[1],
                extent=extent,
                origin="lower" if upward else "upper",
                interpolation="antialiased",
            )
            if ct_kidney_mask is not None:
                kmask = _axis_slice(
                    ct_kidney_mask,
                    fixed,
                    level,
                    low,
                    high,
                    spacing,
                    sitk.sitkLinear,
                    0.0,
                    sitk.sitkFloat32,
                )
                if kmask.max() >= 0.5:
                    ax.contour(
                        kmask,
                        levels=[0.5],
                        colors=_KIDNEY_COLOUR,
                        linewidths=1.0,
                        linestyles="--",
                        extent=(*h_ext, *v_ext),
                        origin="lower",
                    )
            for position, (name, m) in enumerate(poses.items()):
                colour = _colour_for(name, position, colours)
                for world in world_outlines[name]:
                    ax.fill(
                        world[:, h_axis], world[:, v_axis], color=colour, alpha=0.13, linewidth=0
                    )
                    ax.plot(
                        world[:, h_axis], world[:, v_axis], color=colour, linewidth=0.7, alpha=0.7
                    )
                # Intersection with the slice: iso-line of the fixed world coordinate over the
                # footprint (a straight segment, clipped to the footprint by the mask).
                uu, vv = np.meshgrid(np.arange(cols) * sxy[0], np.arange(rows) * sxy[1])
                coordinate = m[fixed, 0] * uu + m[fixed, 1] * vv + m[fixed, 3]
                field = np.ma.masked_array(coordinate, mask=~fp)
                for line in _polylines(field, level):
                    world = _to_world(m, line, sxy)
                    ax.plot(
                        world[:, h_axis],
                        world[:, v_axis],
                        color=colour,
                        linewidth=2.2,
                        solid_capstyle="round",
                    )
            ax.set_xlim(*h_ext)
            ax.set_ylim(*(v_ext if upward else v_ext[::-1]))
            ax.set_aspect("equal")
            axis_name = "xyz"
            ax.set_xlabel(f"{axis_name[h_axis]} (mm, LPS)")
            ax.set_ylabel(f"{axis_name[v_axis]} (mm, LPS)")
            ax.set_title(f"{view} slice at {axis_name[fixed]} = {level:.1f} mm")
            letters = ("R", "L", "I", "S") if upward else ("R", "L", "P", "A")
            style = dict(
                transform=ax.transAxes,
                color="white",
                fontsize=10,
                fontweight="bold",
                ha="center",
                va="center",
            )
            ax.text(0.03, 0.5, letters[0], **style)
            ax.text(0.97, 0.5, letters[1], **style)
            ax.text(0.5, 0.03, letters[2], **style)
            ax.text(0.5, 0.97, letters[3], **style)
        handles: list[Any] = [
            Patch(
                facecolor=_colour_for(name, i, colours),
                edgecolor=_colour_for(name, i, colours),
                alpha=0.8,
                label=f"{name} plane",
            )
            for i, name in enumerate(poses)
        ]
        if ct_kidney_mask is not None:
            handles.append(Line2D([], [], color=_KIDNEY_COLOUR, linestyle="--", label="CT kidney"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(
            title
            or "U/S plane in the CT: thick line = intersection with the slice, "
            "shaded = footprint projected"
        )
    return Path(out_path)


# ----------------------------------------------------------------------------------------------
# Errors against breathing, methods, phases
# ----------------------------------------------------------------------------------------------


def breathing_phase(n_frames: int, cycle_starts: Sequence[int]) -> NDArray[np.float64]:
    """Breathing phase in ``[0, 1)`` of every frame from the cycle starts (0 = a cycle start).

    Inside a cycle the phase grows linearly from 0 at its start to 1 at the next start. Frames
    before the first start or after the last one use the length of the nearest complete cycle.
    With fewer than two starts no cycle length is known and every phase is NaN.

    Args:
        n_frames: Number of frames.
        cycle_starts: Increasing frame indices where cycles start (end-expiration).

    Example:
        >>> breathing_phase(6, [1, 3, 5]).tolist()
        [0.5, 0.0, 0.5, 0.0, 0.5, 0.0]
    """
    starts = np.asarray(sorted({int(s) for s in cycle_starts}), dtype=np.float64)
    phase = np.full(int(n_frames), np.nan)
    if len(starts) < 2:
        return phase
    frames = np.arange(int(n_frames), dtype=np.float64)
    # Extend the starts by one extrapolated cycle on each side so that every frame is inside.
    first_len = starts[1] - starts[0]
    last_len = starts[-1] - starts[-2]
    before = starts[0] - first_len * np.arange(math.ceil(starts[0] / first_len) + 1, 0, -1)
    after = starts[-1] + last_len * np.arange(
        1, math.ceil(max(n_frames - starts[-1], 0) / last_len) + 2
    )
    knots = np.concatenate([before, starts, after])
    cycle = np.searchsorted(knots, frames, side="right") - 1
    phase = (frames - knots[cycle]) / (knots[cycle + 1] - knots[cycle])
    return np.asarray(np.clip(phase, 0.0, np.nextafter(1.0, 0.0)), dtype=np.float64)


def figure_error_vs_breathing(
    per_frame: Mapping[str, ArrayLike],
    breathing_signal: ArrayLike | None,
    cycle_boundaries: Sequence[int],
    out_path: str | Path,
    *,
    frame_rate: float | None = None,
    adaptation_frames: tuple[int, int] | Literal["first"] | None = "first",
    ylabel: str = "error (mm)",
    signal_label: str = "breathing signal",
    title: str | None = None,
) -> Path:
    """Per-frame errors against the breathing signal (twin y axes).

    Args:
        per_frame: Label -> ``(n,)`` per-frame values (NaN where undefined), e.g.
            ``{"TRE": ..., "MCD CT-CT": ...}``, all in the unit of ``ylabel``.
        breathing_signal: ``(n,)`` breathing signal (right axis, grey), or None.
        cycle_boundaries: Frame indices where breathing cycles start (dashed vertical lines).
        out_path: PNG to write.
        frame_rate: Frames per second: time axis in seconds instead of frames.
        adaptation_frames: Frames ``[start, stop)`` of the adaptation cycle, shaded; ``"first"``
            shades the first complete cycle of ``cycle_boundaries``; None shades nothing.
        ylabel: Left axis label.
        signal_label: Right axis label.
        title: Axes title.

    Returns:
        ``out_path`` as a Path.

    Example:
        >>> figure_error_vs_breathing({"TRE": tre}, signal, [0, 48], "err.png")  # doctest: +SKIP
    """
    series = {label: np.asarray(v, dtype=np.float64) for label, v in per_frame.items()}
    if not series:
        raise ValueError("per_frame needs at least one series")
    lengths = {v.shape for v in series.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"every series must be 1D of one length, got shapes {lengths}")
    n = next(iter(series.values())).shape[0]
    signal = None if breathing_signal is None else np.asarray(breathing_signal, dtype=np.float64)
    if signal is not None and signal.shape != (n,):
        raise ValueError(f"breathing_signal must have shape ({n},), got {signal.shape}")
    step = 1.0 / frame_rate if frame_rate else 1.0
    t = np.arange(n) * step
    starts = sorted(int(s) for s in cycle_boundaries)
    if adaptation_frames == "first":
        span = (starts[0], starts[1]) if len(starts) >= 2 else None
    else:
        span = adaptation_frames
    with _figure(out_path, (10.0, 4.2)) as fig:
        ax = fig.subplots()
        handles: list[Any] = []
        if span is not None:
            handles.append(
                ax.axvspan(
                    (span[0] - 0.5) * step,
                    (span[1] - 0.5) * step,
                    color="#f5c26b",
                    alpha=0.35,
                    linewidth=0,
                    label="adaptation cycle",
                )
            )
        for start in starts:
            ax.axvline(start * step, color="0.55", linestyle="--", linewidth=0.8)
        if starts:
            from matplotlib.lines import Line2D

            handles.append(
                Line2D([], [], color="0.55", linestyle="--", linewidth=0.8, label="cycle start")
            )
        for i, (label, values) in enumerate(series.items()):
            (line,) = ax.plot(
                t,
                values,
                marker="o",
                markersize=2.5,
                linewidth=1.3,
                color=_colour_for(label, i, None),
                label=label,
                zorder=3,
            )
            handles.append(line)
        ax.set_xlabel("time (s)" if frame_rate else "frame")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0.0)
        ax.set_xlim(t[0] - 0.5 * step, t[-1] + 0.5 * step)
        ax.grid(True, axis="y", color="0.9")
        ax.set_zorder(2)
        ax.patch.set_visible(False)  # the twin axes below must show through
        if signal is not None:
            twin = ax.twinx()
            twin.set_zorder(1)
            (sig_line,) = twin.plot(
                t, signal, color="0.45", linewidth=1.2, alpha=0.8, label=signal_label
            )
            twin.fill_between(t, signal, np.nanmin(signal), color="0.85", alpha=0.5)
            twin.set_ylabel(signal_label, color="0.35")
            twin.tick_params(axis="y", colors="0.35")
            handles.append(sig_line)
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        ax.set_title(title or "Per-frame error over the breathing cycles")
    return Path(out_path)


def _finite(values: ArrayLike) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def figure_boxplots(
    methods: Mapping[str, ArrayLike],
    metric_name: str,
    out_path: str | Path,
    *,
    unit: str = "mm",
    title: str | None = None,
    show_points: bool = True,
) -> Path:
    """Box plots of one metric, one box per method (NaNs left out).

    Boxes show the median and quartiles, whiskers 1.5 IQR; white diamonds the means; small dots
    the individual values (at most 400 per method, a random but fixed subset). Tick labels give
    each method's count.

    Args:
        methods: Method name -> values (any shape; flattened).
        metric_name: Metric shown, e.g. ``"MCD CT-CT"``.
        out_path: PNG to write.
        unit: Unit of the metric.
        title: Axes title.
        show_points: Draw the individual values.

    Returns:
        ``out_path`` as a Path.

    Example:
        >>> figure_boxplots({"ours": a, "pretrained": b}, "TRE", "box.png")  # doctest: +SKIP
    """
    if not methods:
        raise ValueError("figure_boxplots needs at least one method")
    data = {name: _finite(v) for name, v in methods.items()}
    names = list(data)
    rng = np.random.default_rng(0)
    width = max(4.5, 1.1 * len(names) + 1.5)
    with _figure(out_path, (width, 4.4)) as fig:
        ax = fig.subplots()
        positions = np.arange(1, len(names) + 1)
        present = [i for i, name in enumerate(names) if data[name].size]
        if present:
            boxes = ax.boxplot(
                [data[names[i]] for i in present],
                positions=positions[present],
                widths=0.55,
                showfliers=not show_points,
                patch_artist=True,
                medianprops={"color": "black", "linewidth": 1.4},
            )
            for j, patch in zip(present, boxes["boxes"], strict=True):
                patch.set_facecolor(_colour_for(names[j], j, None))
                patch.set_alpha(0.55)
        for i, name in enumerate(names):
            values = data[name]
            if not values.size:
                continue
            if show_points:
                shown = values if values.size <= 400 else rng.choice(values, 400, replace=False)
                jitter = rng.uniform(-0.16, 0.16, shown.size)
                ax.scatter(
                    positions[i] + jitter,
                    shown,
                    s=5,
                    color="0.2",
                    alpha=0.35,
                    linewidths=0,
                    zorder=3,
                )
            ax.scatter(
                [positions[i]],
                [values.mean()],
                marker="D",
                s=28,
                color="white",
                edgecolors="black",
                linewidths=0.8,
                zorder=4,
            )
        ax.set_xticks(positions)
        ax.set_xticklabels(
            [f"{name}\n(n={data[name].size})" for name in names],
            rotation=0 if len(names) <= 5 else 30,
        )
        ax.set_xlim(0.4, len(names) + 0.6)
        ax.set_ylabel(f"{metric_name} ({unit})" if unit else metric_name)
        ax.grid(True, axis="y", color="0.9")
        ax.set_axisbelow(True)
        ax.set_title(title or f"{metric_name} per method (diamond: mean)")
    return Path(out_path)


def figure_error_vs_phase(
    errors: Mapping[str, ArrayLike],
    phases: Mapping[str, ArrayLike] | ArrayLike,
    out_path: str | Path,
    *,
    metric_name: str,
    unit: str = "mm",
    n_bins: int = 10,
    title: str | None = None,
) -> Path:
    """A metric binned by breathing phase: median and interquartile band per method.

    Args:
        errors: Method -> per-frame values (pooled over cases; NaN left out).
        phases: Method -> phase of each value, or one array shared by all methods; phases in
            ``[0, 1)`` with 0 = cycle start (end-expiration), see :func:`breathing_phase`.
        out_path: PNG to write.
        metric_name: Metric shown, e.g. ``"TRE"``.
        unit: Unit of the metric.
        n_bins: Number of equal phase bins.
        title: Axes title.

    Returns:
        ``out_path`` as a Path.

    Example:
        >>> figure_error_vs_phase({"ours": tre}, breathing_phase(len(tre), starts), "phase.png",
        ...                       metric_name="TRE")  # doctest: +SKIP
    """
    if not errors:
        raise ValueError("figure_error_vs_phase needs at least one method")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres = 100.0 * (edges[:-1] + edges[1:]) / 2
    with _figure(out_path, (7.5, 4.2)) as fig:
        ax = fig.subplots()
        for i, (name, values) in enumerate(errors.items()):
            v = np.asarray(values, dtype=np.float64).ravel()
            p = np.asarray(
                phases[name] if isinstance(phases, Mapping) else phases, dtype=np.float64
            ).ravel()
            if p.shape != v.shape:
                raise ValueError(f"method {name!r}: {p.size} phases for {v.size} values")
            keep = np.isfinite(v) & np.isfinite(p)
            index = np.clip(np.digitize(p[keep], edges) - 1, 0, n_bins - 1)
            stats = np.full((n_bins, 3), np.nan)
            counts = np.bincount(index, minlength=n_bins)
            for b in range(n_bins):
                if counts[b]:
                    stats[b] = np.percentile(v[keep][index == b], [25, 50, 75])
            colour = _colour_for(name, i, None)
            ax.fill_between(
                centres, stats[:, 0], stats[:, 2], color=colour, alpha=0.18, linewidth=0
            )
            ax.plot(
                centres,
                stats[:, 1],
                marker="o",
                markersize=3.5,
                color=colour,
                label=f"{name} (n={int(keep.sum())})",
            )
        ax.set_xlim(0.0, 100.0)
        ax.set_ylim(bottom=0.0)
        ax.set_xlabel("breathing phase (% of cycle; 0 = end-expiration)")
        ax.set_ylabel(f"{metric_name} ({unit})" if unit else metric_name)
        ax.grid(True, color="0.92")
        ax.legend(loc="upper right", framealpha=0.9)
        ax.set_title(title or f"{metric_name} by breathing phase (line: median, band: IQR)")
    return Path(out_path)

"""Tests of kidneyreg.visualize: overlays, montage, video and the report figures."""

from __future__ import annotations

import sys
from pathlib import Path

import imageio.v2 as iio
import matplotlib
import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.evaluation.contours import contour_mask
from kidneyreg.geometry import DEFAULT_POSE_ROTATION, euler_to_matrix, make_rigid
from kidneyreg.geometry import resample_on_frames as reslice
from kidneyreg.visualize import (
    ContourLayer,
    breathing_phase,
    figure_boxplots,
    figure_error_vs_breathing,
    figure_error_vs_phase,
    figure_overlay_montage,
    figure_planes_coronal,
    figure_stacks,
    overlay_frame,
    sequence_window,
    write_overlay_video,
)

N_FRAMES = 12
FRAME_SHAPE = (24, 32)
PIXEL = (1.5, 1.5)
CENTRE = np.array([0.0, 4.0, -6.0])


def _ct() -> tuple[sitk.Image, sitk.Image]:
    """A 40^3 CT at 2 mm (identity direction) with an ellipsoid kidney, and its mask."""
    size, spacing = 40, 2.0
    origin = np.full(3, -(size - 1) * spacing / 2)
    zz, yy, xx = np.indices((size, size, size), dtype=np.float64) * spacing
    x, y, z = xx + origin[0], yy + origin[1], zz + origin[2]
    inside = ((x - CENTRE[0]) / 12) ** 2 + ((y - CENTRE[1]) / 9) ** 2 + (
        (z - CENTRE[2]) / 20
    ) ** 2 <= 1
    hu = np.where(inside, 180.0, 40.0 + 0.5 * x)
    hu[np.abs(y + 30) < 4] = 500.0  # a bright "bone" slab for contrast
    ct = sitk.GetImageFromArray(hu.astype(np.float32))
    ct.SetSpacing((spacing,) * 3)
    ct.SetOrigin(tuple(origin))
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(ct)
    return ct, mask


def _poses(shift: float = 0.0) -> np.ndarray:
    rows, cols = FRAME_SHAPE
    half = DEFAULT_POSE_ROTATION @ np.array([cols * PIXEL[0] / 2, rows * PIXEL[1] / 2, 0.0])
    poses = []
    for k in range(N_FRAMES):
        breathing = np.array([0.0, 1.0, 4.0]) * np.sin(2 * np.pi * k / 6)
        poses.append(make_rigid(DEFAULT_POSE_ROTATION, CENTRE + breathing - half + shift))
    return np.stack(poses)


@pytest.fixture(scope="module")
def data() -> dict[str, object]:
    ct, mask = _ct()
    poses = _poses()
    planes = reslice(ct, poses, FRAME_SHAPE, PIXEL, default_value=-1024)
    frames = np.clip((planes + 200) / 3, 0, 255).round().astype(np.uint8)
    masks = reslice(mask, poses, FRAME_SHAPE, PIXEL, interpolator="nearest")
    return {
        "ct": ct,
        "mask": mask,
        "poses": poses,
        "planes": planes,
        "frames": frames,
        "masks": masks,
    }


def _check_png(path: Path, min_width: int = 400) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 5000
    image = iio.imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width and image.shape[0] >= 250
    assert image[..., :3].std() > 10  # not a blank canvas
    return image


# ----------------------------------------------------------------------------------------------
# Overlays
# ----------------------------------------------------------------------------------------------


def test_overlay_draws_the_contour_in_its_colour() -> None:
    frame = np.tile(np.linspace(0, 255, 20), (16, 1))
    mask = np.zeros((16, 20), dtype=np.uint8)
    mask[4:12, 5:15] = 1
    rgb = overlay_frame(frame, [(mask, (255, 0, 0))])
    assert rgb.shape == (16, 20, 3) and rgb.dtype == np.uint8
    edge = contour_mask(mask)
    assert np.all(rgb[edge] == (255, 0, 0))
    grey = np.rint(frame).astype(np.uint8)
    assert np.all(rgb[~edge] == grey[~edge][:, None])  # everything else is the grey frame
    # Later contours are drawn over earlier ones; named and float colours are accepted.
    other = np.zeros_like(mask)
    other[4:12, 10:18] = 1
    both = overlay_frame(frame, [(mask, "red"), (other, (0.0, 1.0, 1.0))], window=(0, 255))
    assert np.all(both[contour_mask(other)] == (0, 255, 255))
    assert np.all(both[edge & ~contour_mask(other)] == (255, 0, 0))


def test_overlay_scale_and_thickness() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[3:7, 3:9] = True
    thin = overlay_frame(np.zeros((10, 12)), [(mask, (0, 255, 0))], scale=3)
    thick = overlay_frame(np.zeros((10, 12)), [(mask, (0, 255, 0))], scale=3, thickness=3)
    assert thin.shape == (30, 36, 3)
    green_thin = np.all(thin == (0, 255, 0), axis=-1)
    green_thick = np.all(thick == (0, 255, 0), axis=-1)
    assert green_thin.any() and green_thick.sum() > 2 * green_thin.sum()
    # The contour of the upscaled square: rows 3..6 -> 9..20, columns 3..8 -> 9..26.
    rows, cols = np.nonzero(green_thin)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (9, 20, 9, 26)
    assert np.all(thin[15, 18] == 0)


def test_overlay_rejects_bad_arguments() -> None:
    frame = np.zeros((8, 8))
    with pytest.raises(ValueError, match="2D"):
        overlay_frame(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="shape"):
        overlay_frame(frame, [(np.zeros((4, 4)), "red")])
    with pytest.raises(ValueError, match="scale"):
        overlay_frame(frame, scale=0)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        overlay_frame(frame, [(np.ones((8, 8)), (300, 0, 0))])
    with pytest.raises(ValueError, match="window"):
        overlay_frame(frame, window=(5.0, 5.0))


def test_sequence_window() -> None:
    assert sequence_window(np.array([[[0, 17], [250, 3]]])) == (0.0, 255.0)
    low, high = sequence_window(np.linspace(-1.0, 1.0, 1000).reshape(1, 10, 100))
    assert -1.0 < low < -0.98 and 0.98 < high < 1.0


def test_montage(tmp_path: Path, data: dict[str, object]) -> None:
    frames = np.asarray(data["frames"])
    masks = np.asarray(data["masks"])
    layers = [ContourLayer(masks, (255, 140, 0), "CT kidney"), ContourLayer(masks, "c", "U/S")]
    path = figure_overlay_montage(
        frames,
        layers,
        tmp_path / "montage.png",
        max_frames=8,
        highlight=[0, 1, 2],
        pixel_size=PIXEL,
        frame_rate=18.0,
        title="montage",
    )
    _check_png(path)
    with pytest.raises(ValueError, match="frame_indices"):
        figure_overlay_montage(frames, layers, tmp_path / "m.png", frame_indices=[0, 99])
    with pytest.raises(ValueError, match="masks"):
        figure_overlay_montage(frames, [ContourLayer(masks[:3], "red", "x")], tmp_path / "m.png")


def test_video_has_every_frame(tmp_path: Path, data: dict[str, object]) -> None:
    frames = np.asarray(data["frames"])
    layers = [ContourLayer(np.asarray(data["masks"]), (255, 140, 0), "CT kidney")]
    # An unknown codec falls back to the next one.
    path = write_overlay_video(
        frames,
        layers,
        tmp_path / "overlay.mp4",
        fps=18.0,
        cycle_starts=[0, 6],
        highlight=range(6),
        codec="no-such-codec",
    )
    reader = iio.get_reader(path, format="FFMPEG")
    try:
        assert reader.count_frames() == N_FRAMES
        picture = reader.get_data(3)
    finally:
        reader.close()
    assert picture.shape[0] % 16 == 0 and picture.shape[1] % 16 == 0
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.mp4"]


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def test_figure_stacks(tmp_path: Path, data: dict[str, object]) -> None:
    path = figure_stacks(
        np.asarray(data["planes"]),
        np.asarray(data["frames"]),
        PIXEL,
        tmp_path / "stacks.png",
        frame_index=4,
        masks={"U/S kidney mask": np.asarray(data["masks"])},
        frame_rate=18.0,
    )
    _check_png(path, min_width=1000)
    # Without masks the cut goes through the frame centre; negative frame indices count back.
    _check_png(
        figure_stacks(
            np.asarray(data["planes"]),
            np.asarray(data["frames"]),
            PIXEL,
            tmp_path / "plain.png",
            frame_index=-1,
            cut=(3, 30),
        ),
        min_width=1000,
    )
    with pytest.raises(ValueError, match="same shape"):
        figure_stacks(
            np.zeros((3, 4, 5)), np.zeros((3, 4, 6)), PIXEL, tmp_path / "x.png", frame_index=0
        )
    with pytest.raises(ValueError, match="frame_index"):
        figure_stacks(
            np.zeros((3, 4, 5)), np.zeros((3, 4, 5)), PIXEL, tmp_path / "x.png", frame_index=3
        )
    assert not (tmp_path / "x.png").exists()


def test_figure_planes_coronal(tmp_path: Path, data: dict[str, object]) -> None:
    poses = np.asarray(data["poses"])
    rows, cols = FRAME_SHAPE
    fan = np.zeros(FRAME_SHAPE, dtype=bool)
    rr, cc = np.mgrid[:rows, :cols]
    fan[np.abs(cc - cols / 2) <= 4 + rr * 0.6] = True  # a sector-like footprint
    tilted = poses[0] @ make_rigid(euler_to_matrix([0, 0.2, 0.1, 0, 0, 0])[:3, :3], [3, 2, 0])
    path = figure_planes_coronal(
        data["ct"],
        data["mask"],  # type: ignore[arg-type]
        {
            "initial": tilted,
            "reference": poses[0],
            "result": poses[0] @ euler_to_matrix([0.02, 0.0, 0.0, 0.5, 0.0, 0.0]),
        },
        FRAME_SHAPE,
        PIXEL,
        tmp_path / "planes.png",
        footprint=fan,
    )
    image = _check_png(path)
    # The paper's colours: some strongly red and some strongly blue pixels are drawn.
    rgb = image[..., :3].astype(int)
    assert np.any((rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90))
    assert np.any((rgb[..., 2] > 150) & (rgb[..., 0] < 90))
    # Without a kidney mask the slices are centred on the planes.
    _check_png(
        figure_planes_coronal(
            data["ct"],
            None,
            {"result": poses[3]},
            FRAME_SHAPE,
            PIXEL,  # type: ignore[arg-type]
            tmp_path / "nomask.png",
        )
    )
    with pytest.raises(ValueError, match="rigid"):
        figure_planes_coronal(
            data["ct"],
            None,
            {"bad": np.eye(4) * 2},
            FRAME_SHAPE,
            PIXEL,  # type: ignore[arg-type]
            tmp_path / "bad.png",
        )


def test_figure_error_vs_breathing(tmp_path: Path) -> None:
    n = 60
    signal = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / 25)
    tre = 1.0 + signal + np.linspace(0, 0.3, n)
    tre[7] = np.nan
    path = figure_error_vs_breathing(
        {"TRE": tre, "MCD CT-CT": tre / 2},
        signal,
        [0, 25, 50],
        tmp_path / "err.png",
        frame_rate=18.0,
    )
    _check_png(path)
    _check_png(
        figure_error_vs_breathing(
            {"TRE": tre}, None, [], tmp_path / "nosignal.png", adaptation_frames=(0, 10)
        )
    )
    with pytest.raises(ValueError, match="breathing_signal"):
        figure_error_vs_breathing({"TRE": tre}, signal[:5], [], tmp_path / "x.png")


def test_figure_boxplots(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    methods = {
        "one-cycle": rng.gamma(4, 0.3, 500),
        "pretrained": rng.gamma(4, 0.5, 80),
        "no frames": np.array([np.nan]),
    }
    _check_png(figure_boxplots(methods, "TRE", tmp_path / "box.png"))
    with pytest.raises(ValueError, match="at least one"):
        figure_boxplots({}, "TRE", tmp_path / "x.png")


def test_breathing_phase() -> None:
    np.testing.assert_allclose(breathing_phase(8, [2, 6]), [0.5, 0.75, 0, 0.25, 0.5, 0.75, 0, 0.25])
    phase = breathing_phase(30, [3, 13, 25])
    assert np.all((phase >= 0) & (phase < 1))
    assert phase[13] == 0 and phase[19] == pytest.approx(0.5) and phase[28] == pytest.approx(0.25)
    assert np.all(np.isnan(breathing_phase(5, [2])))


def test_figure_error_vs_phase(tmp_path: Path) -> None:
    starts = [0, 25, 50]
    phase = breathing_phase(75, starts)
    tre = 1.0 + np.sin(np.pi * phase)
    path = figure_error_vs_phase(
        {"one-cycle": tre, "pretrained": tre * 1.5},
        phase,
        tmp_path / "phase.png",
        metric_name="TRE",
        n_bins=8,
    )
    _check_png(path)
    _check_png(
        figure_error_vs_phase(
            {"a": tre[:40]}, {"a": phase[:40]}, tmp_path / "p2.png", metric_name="MCD"
        )
    )
    with pytest.raises(ValueError, match="phases"):
        figure_error_vs_phase({"a": tre}, phase[:10], tmp_path / "x.png", metric_name="TRE")


def test_figures_leave_matplotlib_state_alone(tmp_path: Path) -> None:
    rc_before = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    figure_boxplots({"a": np.arange(5.0)}, "TRE", tmp_path / "box.png")
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc_before
    if "matplotlib.pyplot" in sys.modules:  # imported by another module's test, not by us
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []

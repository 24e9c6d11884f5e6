"""B-mode renderer: format, echogenicity order, shadows, enhancement, speckle attached to tissue."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from kidneyreg.geometry import DEFAULT_POSE_ROTATION, invert_rigid, make_rigid, translation
from kidneyreg.simulate.probe import ProbeGeometry
from kidneyreg.simulate.tissues import Tissue
from kidneyreg.simulate.ultrasound import RandomAcoustics, UltrasoundRenderer

SPACING = 1.6
GEOMETRY = ProbeGeometry(55.0, 65.0, 150.0, 3.5, 90.0, 1.6)


def _volume(paint: dict[Tissue, list[tuple[float, float, float, float]]]) -> sitk.Image:
    """A slab of liver under 20 mm of fat, with boxes (z0, z1, y0, y1) of other tissues.

    World: x (L-R) -30..30, y (depth, posterior) 0..200, z (S-I, the frame's u) -150..150.
    """
    shape = (int(300 / SPACING), int(200 / SPACING), int(60 / SPACING))  # z, y, x
    z = -150 + SPACING * np.arange(shape[0])
    y = SPACING * np.arange(shape[1])
    labels = np.full(shape, Tissue.LIVER, np.uint8)
    labels[:, y < 20, :] = Tissue.FAT
    for tissue, boxes in paint.items():
        for z0, z1, y0, y1 in boxes:
            sel = ((z >= z0) & (z < z1))[:, None] & ((y >= y0) & (y < y1))[None, :]
            labels[sel] = tissue
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((SPACING,) * 3)
    image.SetOrigin((-30.0, 0.0, -150.0))
    return image


def _probe_matrix() -> np.ndarray:
    u_f, v_f = GEOMETRY.face_centre
    r = DEFAULT_POSE_ROTATION
    return make_rigid(r, np.array([0.0, 0.5, 0.0]) - u_f * r[:, 0] - v_f * r[:, 1])


def _renderer(labels: sitk.Image, seed: int = 0) -> UltrasoundRenderer:
    params = RandomAcoustics().sample(np.random.default_rng(seed))
    return UltrasoundRenderer(labels, GEOMETRY, _probe_matrix(), params)


def _mean_grey(frame: np.ndarray, tissue_frame: np.ndarray, tissue: Tissue) -> float:
    return float(frame[tissue_frame == tissue].mean())


def test_frames_are_uint8_fans() -> None:
    renderer = _renderer(_volume({}))
    m = _probe_matrix()
    frames = renderer.render(np.stack([m, m]))
    assert frames.dtype == np.uint8 and frames.shape == (2, *GEOMETRY.frame_shape)
    fan = GEOMETRY.fan_mask().astype(bool)
    assert not frames[:, ~fan].any()
    assert (frames[:, fan] > 0).mean() > 0.9
    # Liver is mid grey, not saturated nor black.
    tissue = renderer.tissue_frames(m[None])[0]
    assert 60 < _mean_grey(frames[0], tissue, Tissue.LIVER) < 170


def test_echogenicity_order() -> None:
    # Thin boxes side by side at the same depth: sinus fat > liver ~ spleen > cortex > medulla
    # > fluid (anechoic).
    order = [Tissue.SINUS_FAT, Tissue.SPLEEN, Tissue.CORTEX, Tissue.MEDULLA, Tissue.COLLECTING]
    paint = {t: [(-75.0 + 30 * i, -55.0 + 30 * i, 80.0, 92.0)] for i, t in enumerate(order)}
    labels = _volume(paint)
    greys = {t: [] for t in [*order, Tissue.LIVER]}  # type: dict[Tissue, list[float]]
    for seed in range(3):
        renderer = _renderer(labels, seed)
        m = _probe_matrix()[None]
        frame = renderer.render(m)[0]
        tissue = renderer.tissue_frames(m)[0]
        # The boxes' depth (frame v = world y + the array's sag), away from their edges.
        v0 = 82.0 + GEOMETRY.face_centre[1]
        band = np.zeros_like(tissue, dtype=bool)
        band[int(v0 / SPACING) : int((v0 + 8.0) / SPACING)] = True
        for t in greys:
            inner = ndimage.binary_erosion(tissue == t, iterations=2)
            greys[t].append(float(frame[band & inner].mean()))
    g = {t: np.mean(v) for t, v in greys.items()}
    assert g[Tissue.SINUS_FAT] > g[Tissue.LIVER] + 5
    assert abs(g[Tissue.SPLEEN] - g[Tissue.LIVER]) < 12
    assert g[Tissue.LIVER] > g[Tissue.CORTEX]
    assert g[Tissue.CORTEX] > g[Tissue.MEDULLA] + 10
    assert g[Tissue.MEDULLA] > g[Tissue.COLLECTING] + 10


def test_acoustic_shadow_behind_bone_and_enhancement_behind_fluid() -> None:
    # A rib (bone) at z -40..-25 and a fluid pocket at z 25..45, both at 40-55 mm depth.
    labels = _volume(
        {Tissue.BONE: [(-40.0, -25.0, 40.0, 48.0)], Tissue.COLLECTING: [(25.0, 45.0, 40.0, 60.0)]}
    )
    renderer = _renderer(labels)
    m = _probe_matrix()
    frame = renderer.render(m[None])[0].astype(float)
    u_c, v_a = GEOMETRY.apex

    def column_mean(z: float, depth0: float, depth1: float) -> float:
        # Along the beam through world z at the depth range (mm below the skin).
        r0 = GEOMETRY.radius_mm + depth0
        r1 = GEOMETRY.radius_mm + depth1
        values = []
        for r in np.linspace(r0, r1, 20):
            # Point on the beam that passes through (u = u_c + z, depth 47 mm).
            theta = np.arctan2(z, 47.0 + GEOMETRY.radius_mm)
            u, v = u_c + r * np.sin(theta), v_a + r * np.cos(theta)
            values.append(frame[round(v / SPACING), round(u / SPACING)])
        return float(np.mean(values))

    behind_bone = column_mean(-32.0, 70.0, 110.0)
    beside = column_mean(0.0, 70.0, 110.0)
    behind_fluid = column_mean(35.0, 70.0, 110.0)
    assert behind_bone < 0.3 * beside
    assert behind_fluid > beside + 5


def test_speckle_moves_with_the_tissue_and_decorrelates_out_of_plane() -> None:
    labels = _volume({})
    renderer = _renderer(labels)
    m = _probe_matrix()
    shift_px = 4
    # Tissue moved along u (+z in world) by 4 pixels; then 6 mm across the plane (x).
    in_plane = translation([0.0, 0.0, shift_px * SPACING])
    out_of_plane = translation([6.0, 0.0, 0.0])
    poses = np.stack([m, invert_rigid(in_plane) @ m, invert_rigid(out_of_plane) @ m])
    f0, f1, f2 = (f.astype(float) for f in renderer.render(poses))
    rows = slice(int(60 / SPACING), int(100 / SPACING))
    c = f0.shape[1] // 2
    cols = slice(c - 15, c + 15)
    shifted = slice(c - 15 + shift_px, c + 15 + shift_px)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert corr(f0[rows, cols], f1[rows, shifted]) > 0.8  # the pattern moved with the tissue
    assert corr(f0[rows, cols], f1[rows, cols]) < 0.5  # not a static noise pattern
    assert corr(f0[rows, cols], f2[rows, cols]) < 0.6  # elevational decorrelation


def test_rendering_is_deterministic_and_chunk_independent() -> None:
    labels = _volume({Tissue.CORTEX: [(-20.0, 20.0, 60.0, 90.0)]})
    m = _probe_matrix()
    poses = np.stack([invert_rigid(translation([0.0, 0.0, -k * 1.3])) @ m for k in range(5)])
    a = _renderer(labels, 3).render(poses, chunk=2)
    b = _renderer(labels, 3).render(poses, chunk=5)
    c = np.concatenate(
        [
            _renderer(labels, 3).render(poses[:3]),
            _renderer(labels, 3).render(poses[3:], first_index=3),
        ]
    )
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(a, _renderer(labels, 4).render(poses))


def test_body_wall_stays_while_viscera_slide() -> None:
    # Fat above 20 mm is the body wall (compartment 0); a cortex box in the viscera moves.
    labels = _volume({Tissue.CORTEX: [(-20.0, 20.0, 60.0, 90.0)]})
    array = sitk.GetArrayFromImage(labels)
    compartment = sitk.GetImageFromArray((array != Tissue.FAT).astype(np.uint8))
    compartment.CopyInformation(labels)
    params = RandomAcoustics().sample(np.random.default_rng(0))
    m = _probe_matrix()
    renderer = UltrasoundRenderer(labels, GEOMETRY, m, params, compartment=compartment)
    moved = invert_rigid(translation([0.0, 8.0, 16.0])) @ m  # viscera 8 mm deeper, 16 mm along u
    still, shifted = renderer.tissue_frames(np.stack([m, moved]))
    wall = int(10 / SPACING)
    assert np.array_equal(still[:wall], shifted[:wall])  # the wall does not move
    rows0, cols0 = np.nonzero(still == Tissue.CORTEX)
    rows1, cols1 = np.nonzero(shifted == Tissue.CORTEX)
    assert (rows1.mean() - rows0.mean()) * SPACING == pytest.approx(8.0, abs=2 * SPACING)
    assert (cols1.mean() - cols0.mean()) * SPACING == pytest.approx(16.0, abs=2 * SPACING)

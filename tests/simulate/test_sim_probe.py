"""Probe: group offsets (paper statistics), fan geometry, placement on the skin, windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.errors import InputError
from kidneyreg.geometry import DEFAULT_POSE_ROTATION, is_rigid, transform_points
from kidneyreg.simulate.probe import (
    GROUP_STATISTICS,
    ProbeGeometry,
    ProbeOffset,
    RandomProbeGeometry,
    RandomProbeOffset,
    find_skin,
    place_probe,
    visible_kidney_fraction,
)
from kidneyreg.simulate.tissues import Tissue

SPACING = 2.0
KIDNEY_CENTRE = np.array([-60.0, 50.0, 0.0])


def _phantom(*, bone_in_front: bool = False, crop_y: float | None = None) -> sitk.Image:
    """Elliptic body (LPS, y posterior), a right kidney, optionally a bone slab in front of it."""
    extent = np.array([320.0, 260.0, 300.0])
    origin = -extent / 2
    n = (extent / SPACING).astype(int)
    z, y, x = np.meshgrid(
        *[origin[i] + SPACING * np.arange(n[i]) for i in (2, 1, 0)], indexing="ij"
    )
    labels = np.zeros(n[::-1], np.uint8)
    labels[(x / 150) ** 2 + (y / 115) ** 2 <= 1] = Tissue.FAT
    labels[(x / 135) ** 2 + (y / 100) ** 2 <= 1] = Tissue.LIVER
    c = KIDNEY_CENTRE
    labels[((x - c[0]) / 28) ** 2 + ((y - c[1]) / 20) ** 2 + ((z - c[2]) / 55) ** 2 <= 1] = (
        Tissue.CORTEX
    )
    if bone_in_front:
        labels[(np.abs(y + 20) < 5) & (np.abs(x - c[0]) < 80)] = Tissue.BONE
    if crop_y is not None:
        keep = int((crop_y - origin[1]) / SPACING)
        labels = labels[:, keep:, :]
        origin = origin.copy()
        origin[1] += keep * SPACING
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((SPACING,) * 3)
    image.SetOrigin(tuple(float(v) for v in origin))
    return image


def _kidney_points(labels: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(labels)
    kz, ky, kx = np.nonzero(array == Tissue.CORTEX)
    return np.stack([kx, ky, kz], 1) * SPACING + np.asarray(labels.GetOrigin())


@pytest.mark.parametrize("group", ["A", "B"])
def test_group_offsets_match_the_paper(group: str) -> None:
    rng = np.random.default_rng(0)
    offsets = [RandomProbeOffset(group).sample(rng) for _ in range(200)]  # type: ignore[arg-type]
    (r_mean, r_sd), (t_mean, t_sd) = GROUP_STATISTICS[group]
    rot = np.array([o.rotation_norm_deg for o in offsets])
    tra = np.array([o.translation_norm_mm for o in offsets])
    assert rot.mean() == pytest.approx(r_mean, rel=0.1)
    assert rot.std() == pytest.approx(r_sd, rel=0.1)
    assert tra.mean() == pytest.approx(t_mean, rel=0.1)
    assert tra.std() == pytest.approx(t_sd, rel=0.1)
    assert all(o.group == group for o in offsets)
    # Directions are spread over the sphere: every axis gets both signs.
    components = np.array([o.rotation_deg for o in offsets])
    assert np.all((components > 0).mean(axis=0) > 0.3) and np.all(
        (components < 0).mean(axis=0) > 0.3
    )


def test_paper_numbers_are_the_reference() -> None:
    assert GROUP_STATISTICS["A"] == ((10.37, 2.24), (3.69, 0.95))
    assert GROUP_STATISTICS["B"] == ((24.72, 2.28), (5.04, 1.20))


def test_mixed_draws_both_groups_and_candidates_share_norms() -> None:
    rng = np.random.default_rng(1)
    groups = {RandomProbeOffset("mixed").sample(rng).group for _ in range(40)}
    assert groups == {"A", "B"}
    candidates = RandomProbeOffset("B").sample_candidates(rng, 5)
    norms = {(round(c.rotation_norm_deg, 9), round(c.translation_norm_mm, 9)) for c in candidates}
    assert len(norms) == 1 and len({c.rotation_deg for c in candidates}) == 5
    with pytest.raises(ValueError):
        RandomProbeOffset("C")  # type: ignore[arg-type]


def test_offset_matrix_acts_about_the_centre() -> None:
    offset = ProbeOffset("A", (5.0, -3.0, 8.0), (1.0, 2.0, -2.0))
    m = offset.matrix(KIDNEY_CENTRE)
    assert is_rigid(m)
    assert np.allclose(
        transform_points(m, KIDNEY_CENTRE), KIDNEY_CENTRE + np.array([1.0, 2.0, -2.0])
    )
    assert offset.to_dict()["rotation_norm_deg"] == pytest.approx(math.sqrt(25 + 9 + 64))


def test_fan_geometry() -> None:
    geo = ProbeGeometry(55.0, 65.0, 160.0, 3.5, 100.0, 0.8)
    rows, cols = geo.frame_shape
    mask = geo.fan_mask()
    assert mask.shape == (rows, cols)
    u_c = geo.apex[0]
    assert u_c == pytest.approx((cols - 1) * 0.8 / 2)
    # The arc's edges touch the top row, the bottom of the fan the last rows.
    assert mask[:3].any() and not mask[:3, cols // 2].any() and mask[rows - 2, cols // 2]
    # Width at the bottom: 2 (R + D) sin(fan / 2).
    assert cols * 0.8 == pytest.approx(2 * 215 * math.sin(math.radians(32.5)), abs=2.0)
    assert geo.in_fan(u_c, geo.face_centre[1] + 10.0) and not geo.in_fan(0.0, 5.0)
    sampled = RandomProbeGeometry().sample(np.random.default_rng(0), pixel_size=1.6)
    assert 50 <= sampled.radius_mm <= 60 and 60 <= sampled.fan_deg <= 70
    assert 150 <= sampled.depth_mm <= 180 and sampled.frequency_mhz == 3.5


def test_probe_sits_on_the_skin_and_looks_at_the_kidney() -> None:
    labels = _phantom()
    geo = ProbeGeometry(55.0, 65.0, 150.0, 3.5, 90.0, 2.0)
    offset = ProbeOffset("A", (4.0, -6.0, 7.0), (1.0, -2.0, 2.5))
    placement = place_probe(
        labels,
        _kidney_points(labels),
        offset.matrix(KIDNEY_CENTRE),
        KIDNEY_CENTRE,
        geo,
        lateral_shift_mm=10.0,
    )
    m = placement.matrix
    assert is_rigid(m)
    # Orientation: the offset applied to the default pose.
    assert np.allclose(m[:3, :3], offset.matrix(KIDNEY_CENTRE)[:3, :3] @ DEFAULT_POSE_ROTATION)
    # The middle of the array is on the skin: just outside the body, body just inside.
    face = transform_points(m, [*placement.geometry.face_centre, 0.0])
    assert np.allclose(face, placement.skin_point)
    x, y = face[0], face[1]
    assert (x / 150) ** 2 + (y / 115) ** 2 == pytest.approx(1.0, abs=0.05)
    # The offset kidney centre is on the view, 10 mm lateral of the fan axis, at its depth.
    centre = transform_points(offset.matrix(KIDNEY_CENTRE), KIDNEY_CENTRE)
    local = transform_points(np.linalg.inv(m), centre)
    u_f, v_f = placement.geometry.face_centre
    assert local == pytest.approx([u_f + 10.0, v_f + placement.kidney_depth_mm, 0.0], abs=1e-6)
    assert placement.geometry.depth_mm >= placement.kidney_depth_mm
    assert visible_kidney_fraction(labels, placement) > 0.95


def test_depth_grows_when_the_kidney_is_deep() -> None:
    labels = _phantom()
    shallow = ProbeGeometry(55.0, 65.0, 60.0, 3.5, 40.0, 2.0)
    placement = place_probe(labels, _kidney_points(labels), np.eye(4), KIDNEY_CENTRE, shallow)
    assert placement.geometry.depth_mm > 60.0
    local = transform_points(np.linalg.inv(placement.matrix), _kidney_points(labels))
    in_plane = local[np.abs(local[:, 2]) < 2.0]
    assert placement.geometry.in_fan(in_plane[:, 0], in_plane[:, 1]).all()


def test_shadowed_kidney_is_detected() -> None:
    labels = _phantom(bone_in_front=True)
    geo = ProbeGeometry(55.0, 65.0, 150.0, 3.5, 90.0, 2.0)
    placement = place_probe(labels, _kidney_points(labels), np.eye(4), KIDNEY_CENTRE, geo)
    assert visible_kidney_fraction(labels, placement) < 0.05


def test_image_too_small_for_the_probe() -> None:
    labels = _phantom(crop_y=0.0)  # the anterior half of the body is cut off
    geo = ProbeGeometry(55.0, 65.0, 150.0, 3.5, 90.0, 2.0)
    with pytest.raises(InputError, match="too small"):
        place_probe(
            labels, _kidney_points(labels), np.eye(4), KIDNEY_CENTRE, geo, source="ct.nii.gz"
        )
    with pytest.raises(InputError, match="outside the image"):
        find_skin(labels, [0.0, -500.0, 0.0], [0.0, -1.0, 0.0])

"""Probe: group offsets (paper statistics), fan geometry, placement on the skin, windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.errors import InputError
from kidneyreg.geometry import DEFAULT_POSE_ROTATION, is_rigid, transform_points
from kidneyreg.simulate.probe import (
    APPROACHES,
    FLANK_TILT_DEG,
    FLANK_TWIST_DEG,
    GROUP_STATISTICS,
    ProbeGeometry,
    ProbeOffset,
    ProbePlacement,
    RandomProbeGeometry,
    RandomProbeOffset,
    approach_rotation,
    find_skin,
    place_probe,
    place_probe_in_window,
    visible_kidney_fraction,
)
from kidneyreg.simulate.tissues import Tissue

SPACING = 2.0
KIDNEY_CENTRE = np.array([-60.0, 50.0, 0.0])


def _phantom(
    *,
    bone_in_front: bool = False,
    crop_y: float | None = None,
    bar_at: np.ndarray | None = None,
) -> sitk.Image:
    """Elliptic body (LPS, y posterior), a right kidney, optionally a bone slab in front of it.

    ``bar_at``: an (x, y) point where a 10 mm thick bone bar runs along S-I (a rib-like shadow).
    """
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
    if bar_at is not None:
        labels[np.hypot(x - bar_at[0], y - bar_at[1]) < 10.0] = Tissue.BONE
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


# ----------------------------------------------------------------------------------------------
# Approaches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_approach_rotations_are_proper_and_point_the_right_way(approach: str, side: str) -> None:
    r = approach_rotation(approach, side)
    assert r.shape == (3, 3)
    assert np.allclose(r.T @ r, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)
    assert np.allclose(r[:, 2], np.cross(r[:, 0], r[:, 1]))  # normal = u x v
    if approach == "sagittal":
        assert np.array_equal(r, DEFAULT_POSE_ROTATION)
        return
    u, v, normal = r.T
    medial = 1.0 if side == "right" else -1.0  # +x is the patient's left in LPS
    tilt, twist = math.radians(FLANK_TILT_DEG), math.radians(FLANK_TWIST_DEG)
    # Depth: medially, tilted towards anterior (-y), horizontal.
    assert v == pytest.approx([medial * math.cos(tilt), -math.sin(tilt), 0.0])
    # Array: superior (the default pose's sense), its upper end turned medially and posteriorly.
    assert u[2] == pytest.approx(math.cos(twist))
    assert medial * u[0] > 0 and u[1] > 0
    assert float(u @ DEFAULT_POSE_ROTATION[:, 0]) > 0.9
    # Coronal-oblique: the plane's normal is much closer to A-P than to L-R.
    assert abs(normal[1]) > 1.5 * abs(normal[0])
    assert math.degrees(math.acos(abs(normal[1]))) < FLANK_TILT_DEG + FLANK_TWIST_DEG
    # A fresh array each call: callers may modify it.
    r[0, 0] = 5.0
    assert approach_rotation(approach, side)[0, 0] != 5.0


def test_flank_views_of_both_kidneys_mirror_each_other() -> None:
    mirror = np.diag([-1.0, 1.0, 1.0])  # left <-> right in LPS
    right, left = approach_rotation("flank", "right"), approach_rotation("flank", "left")
    # u and v mirror; the normal (a cross product) mirrors with the opposite sign.
    assert np.allclose(mirror @ right[:, :2], left[:, :2])
    assert np.allclose(mirror @ right[:, 2], -left[:, 2])


def test_unknown_approach_or_side_is_refused() -> None:
    with pytest.raises(ValueError, match="approach must be one of sagittal, flank, got 'coronal'"):
        approach_rotation("coronal", "right")
    with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
        approach_rotation("flank", "middle")


def test_flank_probe_sits_on_the_posterolateral_flank() -> None:
    labels = _phantom()
    geo = ProbeGeometry(55.0, 65.0, 150.0, 3.5, 90.0, 2.0)
    base = approach_rotation("flank", "right")
    offset = ProbeOffset("A", (3.0, -5.0, 6.0), (1.0, 2.0, -1.5))
    placement = place_probe(
        labels,
        _kidney_points(labels),
        offset.matrix(KIDNEY_CENTRE),
        KIDNEY_CENTRE,
        geo,
        lateral_shift_mm=8.0,
        base_rotation=base,
    )
    m = placement.matrix
    assert is_rigid(m)
    assert np.allclose(m[:3, :3], offset.matrix(KIDNEY_CENTRE)[:3, :3] @ base)
    # On the skin, right of and behind the kidney (posterolateral), looking at it.
    skin = placement.skin_point
    assert (skin[0] / 150) ** 2 + (skin[1] / 115) ** 2 == pytest.approx(1.0, abs=0.05)
    assert skin[0] < KIDNEY_CENTRE[0] - 30.0 and skin[1] > KIDNEY_CENTRE[1]
    centre = transform_points(offset.matrix(KIDNEY_CENTRE), KIDNEY_CENTRE)
    local = transform_points(np.linalg.inv(m), centre)
    u_f, v_f = placement.geometry.face_centre
    # The long kidney (110 mm along u) leaves no room for the 8 mm shift: the probe centres it.
    assert placement.lateral_shift_mm in (8.0, 0.0)
    expected = [u_f + placement.lateral_shift_mm, v_f + placement.kidney_depth_mm, 0.0]
    assert local == pytest.approx(expected, abs=1e-6)
    assert visible_kidney_fraction(labels, placement) > 0.95
    with pytest.raises(ValueError, match="proper 3x3 rotation"):
        place_probe(
            labels,
            _kidney_points(labels),
            np.eye(4),
            KIDNEY_CENTRE,
            geo,
            base_rotation=np.diag([1.0, 1.0, -1.0]),
        )


def test_window_search_finds_a_flank_view_past_a_rib() -> None:
    base = approach_rotation("flank", "right")
    # A rib-like bar 45 mm from the kidney on the nominal flank beam.
    labels = _phantom(bar_at=KIDNEY_CENTRE - 45.0 * base[:, 1])
    geo = ProbeGeometry(55.0, 65.0, 150.0, 3.5, 90.0, 2.0)
    points = _kidney_points(labels)
    nominal = ProbeOffset("A", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    turned = ProbeOffset("A", (0.0, 0.0, 60.0), (0.0, 0.0, 0.0))  # beam from further forward
    blocked = place_probe(
        labels, points, nominal.matrix(KIDNEY_CENTRE), KIDNEY_CENTRE, geo, base_rotation=base
    )
    assert visible_kidney_fraction(labels, blocked) < 0.5
    placement, offset, visible = place_probe_in_window(
        labels, points, KIDNEY_CENTRE, [(nominal, 0.0), (turned, 0.0)], geo, base_rotation=base
    )
    assert offset is turned and visible > 0.9
    assert np.allclose(placement.matrix[:3, :3], turned.matrix(KIDNEY_CENTRE)[:3, :3] @ base)


def test_window_search_skips_rejected_views() -> None:
    """A view the caller rejects (its fan leaves the CT) gives way to the next best one; with
    every view rejected the reason is the error."""
    base = approach_rotation("flank", "right")
    labels = _phantom(bar_at=KIDNEY_CENTRE - 45.0 * base[:, 1])
    geo = ProbeGeometry(55.0, 65.0, 150.0, 3.5, 90.0, 2.0)
    points = _kidney_points(labels)
    nominal = ProbeOffset("A", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    turned = ProbeOffset("A", (0.0, 0.0, 60.0), (0.0, 0.0, 0.0))
    candidates = [(nominal, 0.0), (turned, 0.0)]
    turned_rotation = turned.matrix(KIDNEY_CENTRE)[:3, :3] @ base

    def reject_turned(placement: ProbePlacement) -> str | None:
        return "outside" if np.allclose(placement.matrix[:3, :3], turned_rotation) else None

    _, offset, visible = place_probe_in_window(
        labels, points, KIDNEY_CENTRE, candidates, geo, base_rotation=base, reject=reject_turned
    )
    assert offset is nominal and visible < 0.5
    with pytest.raises(InputError, match="fan leaves the CT"):
        place_probe_in_window(
            labels,
            points,
            KIDNEY_CENTRE,
            candidates,
            geo,
            base_rotation=base,
            reject=lambda _placement: "fan leaves the CT",
        )

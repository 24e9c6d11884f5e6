"""The plane search: its rigid correction and its recovery of a known out-of-plane error."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.geometry import make_rigid, resample_on_frames
from kidneyreg.registration.plane_search import (
    PlaneOffset,
    SectionSampler,
    search_plane_offset,
    structure_overlap,
)
from kidneyreg.simulate.case import SimulatedCase, simulate_case_data
from kidneyreg.simulate.tissues import kidney_labels, sinus_labels


def _pose(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    return make_rigid(q * np.sign(np.linalg.det(q)), rng.uniform(-50, 50, 3))


def test_identity_offset_leaves_poses_unchanged() -> None:
    poses = np.stack([_pose(s) for s in range(3)])
    pivots = np.array([[10.0, 20.0], [0.0, 0.0], [-5.0, 40.0]])
    np.testing.assert_allclose(PlaneOffset().apply(poses, pivots), poses, atol=1e-12)


def test_tilts_keep_the_pivot_and_the_normal_offset_moves_along_the_normal() -> None:
    pose, pivot = _pose(7), np.array([30.0, 55.0])
    point = np.array([pivot[0], pivot[1], 0.0, 1.0])
    tilted = PlaneOffset(tilt_u_deg=9.0, tilt_v_deg=-4.0).apply(pose[None], pivot[None])[0]
    np.testing.assert_allclose(tilted @ point, pose @ point, atol=1e-9)
    # The plane's normal turned by the two tilts.
    cosine = float(tilted[:3, 2] @ pose[:3, 2])
    assert np.degrees(np.arccos(cosine)) == pytest.approx(np.hypot(9.0, 4.0), abs=0.1)
    moved = PlaneOffset(normal_mm=-3.0, shift_u_mm=2.0).apply(pose[None], pivot[None])[0]
    np.testing.assert_allclose(
        moved @ point - pose @ point, np.r_[-3.0 * pose[:3, 2] + 2.0 * pose[:3, 0], 0.0]
    )


def test_in_plane_rotation_keeps_the_pivot_and_the_plane() -> None:
    pose, pivot = _pose(3), np.array([30.0, 55.0])
    point = np.array([pivot[0], pivot[1], 0.0, 1.0])
    turned = PlaneOffset(in_plane_deg=12.0).apply(pose[None], pivot[None])[0]
    np.testing.assert_allclose(turned @ point, pose @ point, atol=1e-9)
    np.testing.assert_allclose(turned[:3, 2], pose[:3, 2], atol=1e-12)  # same normal
    # The lateral axis turned by 12 degrees towards the depth axis.
    assert float(turned[:3, 0] @ pose[:3, 1]) == pytest.approx(np.sin(np.radians(12.0)))


def test_offset_vector_round_trip_and_validation() -> None:
    offset = PlaneOffset(1.0, -2.0, 3.5, 0.5, -0.5, 7.0)
    assert PlaneOffset.from_vector(offset.vector()) == offset
    assert offset.to_dict()["normal_mm"] == 3.5 and offset.to_dict()["in_plane_deg"] == 7.0
    with pytest.raises(ValueError, match="6 finite"):
        PlaneOffset.from_vector([0.0, 1.0])
    with pytest.raises(ValueError, match="6 finite"):
        PlaneOffset.from_vector([0.0, np.nan, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="pivots"):
        offset.apply(np.eye(4)[None], np.zeros((2, 2)))


@pytest.fixture(scope="module")
def case() -> SimulatedCase:
    return simulate_case_data(3, frames=8, profile="tiny")


def _maps(case: SimulatedCase) -> tuple[list[sitk.Image], list[np.ndarray]]:
    labels = sitk.GetArrayFromImage(case.labels)
    kidney = np.isin(labels, kidney_labels()) & (sitk.GetArrayFromImage(case.ct_kidney_mask) > 0)
    images = []
    for values in (kidney, np.isin(labels, sinus_labels()) & kidney):
        image = sitk.GetImageFromArray(values.astype(np.uint8))
        image.CopyInformation(case.labels)
        images.append(image)
    us = [np.isin(case.us_labels, kidney_labels()), np.isin(case.us_labels, sinus_labels())]
    return images, us


def _pivots(case: SimulatedCase) -> np.ndarray:
    pivots = []
    for mask in case.us_kidney_mask:
        rows, cols = np.nonzero(mask)
        pivots.append([cols.mean() * case.pixel_size, rows.mean() * case.pixel_size])
    return np.array(pivots)


def _error_mm(case: SimulatedCase, poses: np.ndarray, pivots: np.ndarray) -> float:
    """Mean distance (mm) from the true position of the corners of a 40 mm square at each pivot."""
    errors = []
    for du in (-20.0, 20.0):
        for dv in (-20.0, 20.0):
            corners = pivots + np.array([du, dv])
            points = np.c_[corners, np.zeros(len(pivots)), np.ones(len(pivots))]
            moved = np.einsum("nij,nj->ni", poses - case.matrices, points)[:, :3]
            errors.append(np.linalg.norm(moved, axis=1))
    return float(np.mean(errors))


def test_section_sampler_equals_nearest_resampling(case: SimulatedCase) -> None:
    ct_maps, us_maps = _maps(case)
    rows, cols = us_maps[0].shape[1:]
    pixel = (case.pixel_size, case.pixel_size)
    # The true poses and tilted, moved ones (sections partly outside the maps' bounding box).
    poses = np.concatenate(
        [
            case.matrices,
            PlaneOffset(7.0, -11.0, 5.0, 3.0, -2.0, 9.0).apply(case.matrices, _pivots(case)),
        ]
    )
    # The sinus on a coarser grid of its own: resampled onto the kidney's.
    coarse = sitk.Resample(
        ct_maps[1],
        [s // 2 for s in ct_maps[1].GetSize()],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        ct_maps[1].GetOrigin(),
        [2 * s for s in ct_maps[1].GetSpacing()],
        ct_maps[1].GetDirection(),
    )
    on_kidney_grid = sitk.Resample(coarse, ct_maps[0], sitk.Transform(), sitk.sitkNearestNeighbor)
    sections = SectionSampler([ct_maps[0], coarse], (rows, cols), pixel).sections(poses)
    for got, image in zip(sections, [ct_maps[0], on_kidney_grid], strict=True):
        expected = resample_on_frames(image, poses, (rows, cols), pixel, interpolator="nearest")
        assert expected.any()
        # Pixels exactly halfway between voxels may round either way.
        assert np.mean(got != (expected != 0)) < 1e-3
    with pytest.raises(ValueError, match="1 to 8"):
        SectionSampler([], (rows, cols), pixel)


@pytest.mark.parametrize(
    "error",
    [
        PlaneOffset(tilt_u_deg=4.0, normal_mm=6.0),
        # Beyond a local search's reach: group B's size of tilt, with an in-plane turn.
        PlaneOffset(tilt_v_deg=22.0, normal_mm=-4.0, in_plane_deg=6.0),
    ],
    ids=["small", "group-B-sized"],
)
def test_search_recovers_a_known_plane_error(case: SimulatedCase, error: PlaneOffset) -> None:
    ct_maps, us_maps = _maps(case)
    pixel = (case.pixel_size, case.pixel_size)
    pivots = _pivots(case)
    # At the true poses the sections are the U/S maps themselves.
    assert structure_overlap(ct_maps, us_maps, case.matrices, pixel) == pytest.approx(2.0)
    start = error.apply(case.matrices, pivots)
    result = search_plane_offset(
        ct_maps, us_maps, start, pivots, pixel, structures=("kidney", "sinus")
    )
    assert result.score_after > result.score_before
    assert result.structures == ("kidney", "sinus") and result.frames == tuple(range(8))
    corrected = result.offset.apply(start, pivots)
    assert _error_mm(case, start, pivots) > 5.0
    assert _error_mm(case, corrected, pivots) < 0.3 * _error_mm(case, start, pivots), result.offset


def test_search_keeps_poses_that_already_match(case: SimulatedCase) -> None:
    ct_maps, us_maps = _maps(case)
    result = search_plane_offset(
        ct_maps, us_maps, case.matrices, _pivots(case), (case.pixel_size, case.pixel_size)
    )
    assert result.offset == PlaneOffset() and result.score_after == result.score_before


def test_search_validates_its_inputs(case: SimulatedCase) -> None:
    ct_maps, us_maps = _maps(case)
    pixel = (case.pixel_size, case.pixel_size)
    with pytest.raises(ValueError, match="one CT and one U/S map"):
        search_plane_offset(ct_maps[:1], us_maps, case.matrices, _pivots(case), pixel)
    with pytest.raises(ValueError, match="pivots"):
        search_plane_offset(ct_maps, us_maps, case.matrices, _pivots(case)[:3], pixel)
    with pytest.raises(ValueError, match="U/S maps"):
        search_plane_offset(ct_maps, [m[:3] for m in us_maps], case.matrices, _pivots(case), pixel)
    with pytest.raises(TypeError, match="SimpleITK"):
        search_plane_offset([np.zeros(3)] * 2, us_maps, case.matrices, _pivots(case), pixel)  # type: ignore[list-item]

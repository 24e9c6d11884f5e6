"""The plane search: its rigid correction and its recovery of a known out-of-plane error."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.geometry import make_rigid
from kidneyreg.registration.plane_search import (
    PlaneOffset,
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


def test_offset_vector_round_trip_and_validation() -> None:
    offset = PlaneOffset(1.0, -2.0, 3.5, 0.5, -0.5)
    assert PlaneOffset.from_vector(offset.vector()) == offset
    assert offset.to_dict()["normal_mm"] == 3.5
    with pytest.raises(ValueError, match="5 finite"):
        PlaneOffset.from_vector([0.0, 1.0])
    with pytest.raises(ValueError, match="5 finite"):
        PlaneOffset.from_vector([0.0, np.nan, 0.0, 0.0, 0.0])
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


def test_search_recovers_a_known_out_of_plane_error(case: SimulatedCase) -> None:
    ct_maps, us_maps = _maps(case)
    pixel = (case.pixel_size, case.pixel_size)
    pivots = _pivots(case)
    # At the true poses the sections are the U/S maps themselves.
    assert structure_overlap(ct_maps, us_maps, case.matrices, pixel) == pytest.approx(2.0)
    error = PlaneOffset(tilt_u_deg=4.0, normal_mm=6.0)
    start = error.apply(case.matrices, pivots)
    result = search_plane_offset(
        ct_maps, us_maps, start, pivots, pixel, structures=("kidney", "sinus")
    )
    assert result.score_after > result.score_before
    assert result.structures == ("kidney", "sinus") and result.frames == tuple(range(8))
    corrected = result.offset.apply(start, pivots)

    def error_mm(poses: np.ndarray) -> float:
        points = np.c_[pivots, np.zeros(len(pivots)), np.ones(len(pivots))]
        moved = np.einsum("nij,nj->ni", poses - case.matrices, points)[:, :3]
        return float(np.linalg.norm(moved, axis=1).mean())

    assert error_mm(start) == pytest.approx(6.0, abs=1e-6)
    assert error_mm(corrected) < 2.0, result.offset


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

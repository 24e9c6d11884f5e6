"""Tests of the procedural abdomen (kidneyreg.simulate.anatomy), at coarse spacing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from kidneyreg.simulate.anatomy import (
    SIDE_VALUES,
    Anatomy,
    generate_anatomy,
    kidney_info_from_mask,
    sample_anatomy_parameters,
)
from kidneyreg.simulate.tissues import Tissue, kidney_labels

SPACING = 3.0


def _arrays(anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        sitk.GetArrayFromImage(anatomy.labels),
        sitk.GetArrayFromImage(anatomy.kidney_side),
        sitk.GetArrayFromImage(anatomy.compartment),
    )


def _world_points(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)[:, ::-1].astype(float)
    return np.asarray(image.GetOrigin()) + idx * np.asarray(image.GetSpacing())


@pytest.fixture(scope="module")
def anatomy() -> Anatomy:
    return generate_anatomy(0, spacing=2.0)


@pytest.fixture(scope="module")
def cohort() -> list[Anatomy]:
    return [generate_anatomy(seed, spacing=SPACING) for seed in range(10)]


def test_same_seed_same_arrays_and_other_seed_differs() -> None:
    a = generate_anatomy(5, spacing=SPACING)
    b = generate_anatomy(5, spacing=SPACING)
    c = generate_anatomy(6, spacing=SPACING)
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.kidneys["left"].to_dict() == b.kidneys["left"].to_dict()
    assert a.labels.GetSize() != c.labels.GetSize() or not np.array_equal(
        _arrays(a)[0], _arrays(c)[0]
    )
    assert a.kidneys["left"].length != c.kidneys["left"].length


def test_explicit_rng_gives_the_seeded_anatomy() -> None:
    a = generate_anatomy(4, spacing=SPACING, rng=np.random.default_rng(4))
    b = generate_anatomy(4, spacing=SPACING)
    np.testing.assert_array_equal(_arrays(a)[0], _arrays(b)[0])


def test_grid_is_identity_isotropic_lps_with_origin_at_l1(anatomy: Anatomy) -> None:
    for image in (anatomy.labels, anatomy.kidney_side, anatomy.compartment):
        assert image.GetPixelID() == sitk.sitkUInt8
        assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        assert image.GetSpacing() == (2.0, 2.0, 2.0)
        assert image.GetSize() == anatomy.labels.GetSize()
        assert image.GetOrigin() == anatomy.labels.GetOrigin()
    assert anatomy.metadata["vertebra_z"]["L1"] == 0.0
    # World (0, 0, 0) is inside the L1 vertebral body.
    index = anatomy.labels.TransformPhysicalPointToIndex((0.0, 0.0, 0.0))
    assert anatomy.labels[index] == Tissue.BONE
    json.dumps(anatomy.metadata)


def test_field_of_view_holds_the_body_and_both_kidneys_with_margins(anatomy: Anatomy) -> None:
    labels = _arrays(anatomy)[0]
    origin = np.asarray(anatomy.labels.GetOrigin())
    top = origin[2] + (labels.shape[0] - 1) * anatomy.spacing
    for info in anatomy.kidneys.values():
        assert info.centroid_world[2] - origin[2] >= 120.0
        assert top - info.centroid_world[2] >= 120.0
    # The whole cross-section is inside: the x and y faces are air.
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        assert np.all(face == Tissue.AIR)
    width = np.ptp(np.nonzero(labels.any(axis=(0, 1)))[0]) * anatomy.spacing
    depth = np.ptp(np.nonzero(labels.any(axis=(0, 2)))[0]) * anatomy.spacing
    assert 280.0 <= width <= 420.0
    assert 190.0 <= depth <= 300.0


def test_every_tissue_label_is_present(anatomy: Anatomy) -> None:
    present = set(np.unique(_arrays(anatomy)[0]).tolist())
    assert {int(t) for t in Tissue} <= present


def test_kidney_mask_is_the_union_of_that_sides_kidney_tissues(anatomy: Anatomy) -> None:
    labels, side, _ = _arrays(anatomy)
    kidney_tissue = np.isin(labels, kidney_labels())
    np.testing.assert_array_equal(kidney_tissue, side > 0)
    for name, value in SIDE_VALUES.items():
        mask = sitk.GetArrayFromImage(anatomy.kidney_mask(name))
        assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
        np.testing.assert_array_equal(mask == 1, side == value)
        inner = set(np.unique(labels[mask == 1]).tolist())
        assert inner == set(kidney_labels())
    with pytest.raises(ValueError, match="right' or 'left"):
        anatomy.kidney_mask("middle")


def test_kidney_inner_structure_proportions(anatomy: Anatomy) -> None:
    labels, side, _ = _arrays(anatomy)
    for value in SIDE_VALUES.values():
        inside = labels[side == value]
        fraction = {t: float(np.mean(inside == t)) for t in kidney_labels()}
        assert 0.45 < fraction[Tissue.CORTEX] < 0.88
        assert 0.04 < fraction[Tissue.MEDULLA] < 0.35
        assert 0.02 < fraction[Tissue.SINUS_FAT] < 0.25
        assert 0.003 < fraction[Tissue.COLLECTING] < 0.1  # collapsed to distended
        volume_ml = inside.size * anatomy.spacing**3 / 1000.0
        assert 80.0 < volume_ml < 250.0


def test_compartments(anatomy: Anatomy) -> None:
    labels, side, comp = _arrays(anatomy)
    assert set(np.unique(comp).tolist()) == {0, 1}
    assert np.all(comp[side > 0] == 1)
    assert np.all(comp[labels == Tissue.AIR] == 0)
    assert np.all(comp[labels == Tissue.BONE] == 0)
    for organ in (Tissue.LIVER, Tissue.SPLEEN, Tissue.BOWEL, Tissue.ARTERY, Tissue.LUNG):
        assert np.all(comp[labels == organ] == 1), organ.name
    # Most muscle is body wall (the diaphragm is the exception).
    assert np.mean(comp[labels == Tissue.MUSCLE] == 0) > 0.85


def test_kidney_sizes_positions_and_orientation_over_seeds(cohort: list[Anatomy]) -> None:
    tol = SPACING  # one voxel
    for anatomy in cohort:
        side = _arrays(anatomy)[1]
        infos = {}
        for name, value in SIDE_VALUES.items():
            # Principal axes of the mask, independent of the generator's own axes.
            measured = kidney_info_from_mask(
                side == value, anatomy.labels.GetOrigin(), anatomy.spacing, name
            )
            infos[name] = measured
            assert 95.0 - tol <= measured.length <= 125.0 + tol
            assert 50.0 - tol <= measured.width <= 65.0 + tol
            assert 30.0 - tol <= measured.thickness <= 45.0 + tol
            given = anatomy.kidneys[name]
            assert abs(abs(float(given.axes[:, 0] @ measured.axes[:, 0])) - 1.0) < 1 - math.cos(
                math.radians(10)
            )
            long_axis = given.axes[:, 0]
            medial = 1.0 if name == "right" else -1.0  # +x is the patient's left
            # Upper pole medial and posterior: 10-20 degrees each way (+- a little).
            coronal = math.degrees(math.atan2(medial * long_axis[0], long_axis[2]))
            sagittal = math.degrees(math.atan2(long_axis[1], long_axis[2]))
            assert 8.0 <= coronal <= 22.0
            assert 8.0 <= sagittal <= 22.0
            # The hilum faces antero-medially.
            hilum = given.hilum_direction
            assert medial * hilum[0] > 0.5 and hilum[1] < -0.2
            np.testing.assert_allclose(np.linalg.norm(hilum), 1.0, atol=1e-9)
            np.testing.assert_allclose(given.axes.T @ given.axes, np.eye(3), atol=1e-9)
            assert np.linalg.det(given.axes) > 0
            assert medial * given.centroid_world[0] < -50.0  # beside the spine
        drop = infos["left"].centroid_world[2] - infos["right"].centroid_world[2]
        assert 7.0 <= drop <= 23.0
        levels = anatomy.metadata["vertebra_z"]
        for name, info in infos.items():
            poles = info.centroid_world[2] + np.array([-0.5, 0.5]) * info.length * math.cos(
                math.radians(15)
            )
            assert levels["L4"] < poles[0] < levels["L2"], name
            assert levels["L1"] < poles[1] < levels["T11"], name


def test_hilum_points_at_the_sinus(cohort: list[Anatomy]) -> None:
    anatomy = cohort[0]
    labels, side, _ = _arrays(anatomy)
    for name, value in SIDE_VALUES.items():
        info = anatomy.kidneys[name]
        sinus = (side == value) & np.isin(labels, [Tissue.SINUS_FAT, Tissue.COLLECTING])
        offset = _world_points(anatomy.labels, sinus).mean(axis=0) - info.centroid_world
        assert float(offset @ info.hilum_direction) > 3.0


def test_organs_are_where_a_radiologist_expects_them(anatomy: Anatomy) -> None:
    labels = _arrays(anatomy)[0]
    image = anatomy.labels
    right = anatomy.kidneys["right"]
    left = anatomy.kidneys["left"]
    liver = _world_points(image, labels == Tissue.LIVER)
    spleen = _world_points(image, labels == Tissue.SPLEEN)
    assert liver[:, 0].mean() < -30.0 < 30.0 < spleen[:, 0].mean()
    assert liver[:, 2].mean() > right.centroid_world[2] + 20.0
    assert spleen[:, 2].mean() > left.centroid_world[2] + 20.0
    # The liver tip reaches below the right kidney's upper pole, lateral or anterior to it.
    upper_pole = right.centroid_world[2] + 0.4 * right.length
    tip = liver[liver[:, 2] < upper_pole - 10.0]
    assert len(tip) > 0
    assert (
        np.mean((tip[:, 0] < right.centroid_world[0]) | (tip[:, 1] < right.centroid_world[1])) > 0.9
    )
    # Lung bases above the kidneys; psoas medial to them at the lower pole level.
    lung = _world_points(image, labels == Tissue.LUNG)
    assert lung[:, 2].min() > right.centroid_world[2]
    # Bone (ribs, transverse processes) behind the upper poles.
    bone = _world_points(image, labels == Tissue.BONE)
    for info in (right, left):
        c = info.centroid_world
        behind = (
            (np.abs(bone[:, 0] - c[0]) < 40.0)
            & (bone[:, 1] > c[1] + 15.0)
            & (bone[:, 2] > c[2] + 10.0)
            & (bone[:, 2] < c[2] + 80.0)
        )
        assert behind.sum() > 5
    # Aorta left of the IVC, both in front of the spine.
    artery = _world_points(image, labels == Tissue.ARTERY)
    vein = _world_points(image, labels == Tissue.VEIN)
    near = lambda p: p[np.abs(p[:, 2] - right.centroid_world[2] + 40.0) < 10.0]  # noqa: E731
    assert near(artery)[:, 0].mean() > near(vein)[:, 0].mean()
    assert near(artery)[:, 1].mean() < 0.0
    # Gas inside the body only in the bowel region, in front of the kidneys.
    gas = _world_points(image, labels == Tissue.GAS)
    assert np.median(gas[:, 1]) < right.centroid_world[1]


def test_spacing_changes_resolution_not_the_patient() -> None:
    fine = generate_anatomy(3, spacing=2.0)
    coarse = generate_anatomy(3, spacing=3.0)
    for name in ("right", "left"):
        np.testing.assert_allclose(
            fine.kidneys[name].centroid_world, coarse.kidneys[name].centroid_world, atol=2.0
        )
        assert abs(fine.kidneys[name].length - coarse.kidneys[name].length) <= 4.0


def test_parameters_are_json_and_in_range() -> None:
    for seed in range(20):
        params = sample_anatomy_parameters(np.random.default_rng(seed))
        data = json.loads(json.dumps(params.to_dict()))
        assert 300.0 <= data["body_width"] <= 380.0
        assert 200.0 <= data["body_depth"] <= 280.0
        assert 8 <= params.kidneys["left"].n_pyramids <= 12
        assert params.kidneys["right"].centre[2] < params.kidneys["left"].centre[2] - 9.0


def test_collecting_system_is_mostly_collapsed_and_sometimes_distended(
    cohort: list[Anatomy],
) -> None:
    # Antero-posterior pelvis diameter (2 x 0.8 x pelvis_mm): under 6 mm in most kidneys, past
    # 10 mm (distended) in some, as in adults scanned without a full bladder or obstruction.
    kidneys = [
        k
        for seed in range(100)
        for k in sample_anatomy_parameters(np.random.default_rng(seed)).kidneys.values()
    ]
    ap = np.array([1.6 * k.pelvis_mm for k in kidneys])
    assert 0.4 < np.mean(ap < 6.0) < 0.7
    assert 0.1 < np.mean(ap > 10.0) < 0.35
    assert ap.min() >= 2.4 and ap.max() <= 14.4
    calyx = np.array([k.calyx_mm for k in kidneys])
    assert np.corrcoef(ap, calyx)[0, 1] > 0.5  # calyces widen with the pelvis
    # Painted: the collecting system's volume follows the sampled distension.
    volumes, sizes = [], []
    for anatomy in cohort:
        labels, side, _ = _arrays(anatomy)
        params = sample_anatomy_parameters(np.random.default_rng(anatomy.seed)).kidneys
        for name, value in SIDE_VALUES.items():
            volumes.append(np.sum((side == value) & (labels == Tissue.COLLECTING)) * SPACING**3)
            sizes.append(params[name].pelvis_mm)
    assert max(volumes) > 4.0 * min(volumes)
    assert np.corrcoef(sizes, volumes)[0, 1] > 0.7


def test_bad_spacing_is_rejected() -> None:
    with pytest.raises(ValueError, match="spacing"):
        generate_anatomy(0, spacing=0.0)


def test_gallbladder_varies_and_lies_in_front_of_the_right_kidney() -> None:
    params = [sample_anatomy_parameters(np.random.default_rng(seed)) for seed in range(40)]
    present = [p for p in params if p.gallbladder is not None]
    assert 0.75 * len(params) <= len(present) < len(params)  # some patients have none
    offsets = np.array([p.gallbladder for p in present])
    assert np.ptp(offsets[:, 0]) > 25.0 and np.ptp(offsets[:, 1]) > 15.0
    assert np.all(offsets[:, 1] < -50.0)  # anterior to the kidney
    assert np.ptp([p.gallbladder_scale for p in present]) > 0.3
    assert any(p.liver_cysts for p in params) and not all(p.liver_cysts for p in params)
    # Painted: a fluid body of at least 3 ml where the sampled offset from the right kidney's
    # centre puts it.
    seed = next(i for i, p in enumerate(params) if p.gallbladder is not None)
    anatomy = generate_anatomy(seed, spacing=SPACING)
    labels = _arrays(anatomy)[0]
    fluid = _world_points(anatomy.labels, labels == Tissue.FLUID)
    centre = np.asarray(params[seed].kidneys["right"].centre)
    near = fluid[np.linalg.norm(fluid[:, :2] - (centre[:2] + offsets[0, :2]), axis=1) < 30.0]
    assert len(near) * SPACING**3 > 3000.0
    assert abs(near[:, 0].mean() - centre[0] - offsets[0, 0]) < 10.0


def test_fluid_structures_leave_the_other_draws_of_a_seed_unchanged() -> None:
    # They come from a generator of their own, so a seed's other parameters are those it had
    # before they existed (values recorded from that version of the sampler).
    rng = np.random.default_rng(3)
    params = sample_anatomy_parameters(rng)
    assert params.noise_seed == 538513314
    assert params.body_width == pytest.approx(306.85193337148996)
    np.testing.assert_allclose(
        params.kidneys["right"].centre, (-75.74861557769, 11.916866975644943, -34.825211126518354)
    )

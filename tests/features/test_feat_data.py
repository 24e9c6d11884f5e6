"""Training data: layouts, patient split, preprocessing and kidney-biased patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from feature_cases import blob_volume, ellipsoid, us_frames, write_ct_case, write_us_case
from kidneyreg.errors import InputError
from kidneyreg.features.augment import RandomTissueContrast, RandomTissueGain
from kidneyreg.features.config import feature_config
from kidneyreg.features.data import (
    CaseData,
    CaseFiles,
    PatchSampler,
    find_cases,
    load_case,
    normalize_us,
    read_ct_target,
    split_by_patient,
)
from kidneyreg.io.image import read_ct
from kidneyreg.simulate.tissues import Tissue


def test_find_cases_in_both_layouts(tmp_path: Path) -> None:
    write_ct_case(tmp_path / "cohort" / "case_001", layout="sim")
    write_ct_case(tmp_path / "cohort" / "case_000", layout="sim")
    write_us_case(tmp_path / "cohort" / "case_000")
    (tmp_path / "cohort" / "notes").mkdir()
    ct = find_cases(tmp_path / "cohort", "ct")
    assert [c.name for c in ct] == ["case_000", "case_001"]
    assert [c.name for c in find_cases(tmp_path / "cohort", "us")] == ["case_000"]
    kits = write_ct_case(tmp_path / "kits" / "case_00000", layout="kits")
    (found,) = find_cases(tmp_path / "kits", "ct")
    assert found.labels == (1, 2) and found.image.name == "imaging.nii.gz"
    # KiTS: labels 1 and 2 are both kidney.
    target = read_ct_target(found, read_ct(kits / "imaging.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(kits / "segmentation.nii.gz")))
    assert (labels == 2).any()
    assert np.array_equal(sitk.GetArrayFromImage(target), labels > 0)
    # A case folder itself is accepted, and so is a folder of cohorts (links followed).
    assert [c.name for c in find_cases(kits, "ct")] == ["case_00000"]
    (tmp_path / "all").mkdir()
    (tmp_path / "all" / "sim").symlink_to(tmp_path / "cohort")
    (tmp_path / "all" / "kits").symlink_to(tmp_path / "kits")
    names = [c.name for c in find_cases(tmp_path / "all", "ct")]
    assert names == ["kits/case_00000", "sim/case_000", "sim/case_001"]


def test_find_cases_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        find_cases(tmp_path / "missing", "ct")
    with pytest.raises(InputError, match="no US training case"):
        find_cases(tmp_path, "us")


def test_simulator_label_map_gives_both_kidneys(tmp_path: Path) -> None:
    folder = write_ct_case(tmp_path / "case_000")
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"))
    labels = np.zeros(ct.GetSize()[::-1], np.uint8)
    labels[2:5, 2:5, 2:5] = 9  # cortex of a second kidney (Tissue.CORTEX)
    labels[10, 15, 17] = 10  # medulla of the first
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(folder / "labels.nii.gz"))
    (files,) = find_cases(tmp_path, "ct")
    target = sitk.GetArrayFromImage(read_ct_target(files, read_ct(files.image)))
    assert target.sum() == 27 + 1


def test_split_is_by_patient_and_reproducible() -> None:
    cases = [
        CaseFiles(f"case_{i}", f"patient_{i // 2}", Path("ct"), Path("mask")) for i in range(10)
    ]
    train, val = split_by_patient(cases, 0.2, seed=3)
    assert split_by_patient(cases, 0.2, seed=3) == (train, val)
    assert len(val) == 2 and len(train) == 8  # one of five patients, both of its cases
    assert not {c.patient for c in train} & {c.patient for c in val}
    assert split_by_patient(cases[:2], 0.5, seed=0)[1] == []  # one patient: no validation


def test_patient_key_comes_from_case_json(tmp_path: Path) -> None:
    for name, seed in (("case_000", 5), ("case_001", 5), ("case_002", 6)):
        folder = write_ct_case(tmp_path / name)
        (folder / "case.json").write_text(
            json.dumps({"anatomy_seed": seed, "anatomy_source": "procedural"})
        )
    patients = {c.name: c.patient for c in find_cases(tmp_path, "ct")}
    assert patients["case_000"] == patients["case_001"] != patients["case_002"]
    # Cases simulated from one real CT are one patient whatever their seed.
    for name, seed in (("real_0", 1), ("real_1", 2)):
        folder = write_ct_case(tmp_path / "real" / name)
        (folder / "case.json").write_text(json.dumps({"anatomy_seed": seed, "anatomy_source": "x"}))
    assert {c.patient for c in find_cases(tmp_path / "real", "ct")} == {"ct-x"}


def test_load_ct_case_resamples_normalises_and_pads(tmp_path: Path) -> None:
    folder = write_ct_case(tmp_path / "case_000")
    config = feature_config("ct", "tiny")
    (files,) = find_cases(tmp_path, "ct")
    case = load_case(files, config)
    assert case.image.dtype == np.float16 and case.mask.dtype == np.uint8
    assert all(n >= p for n, p in zip(case.image.shape, config.patch_size, strict=True))
    assert 0.0 <= float(case.image.min()) and float(case.image.max()) <= 1.0
    # The kidney volume is kept (ellipsoid 5 x 7 x 6 voxels of 3 x 2 x 2 mm ~ 10.6 ml).
    kidney_ml = case.mask.sum() * 3.2**3 / 1000
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ct_kidney_mask.nii.gz")))
    assert kidney_ml == pytest.approx(truth.sum() * 12 / 1000, rel=0.25)
    assert len(case.kidney_voxels) == case.mask.sum()


def test_load_us_case(tmp_path: Path) -> None:
    write_us_case(tmp_path / "case_000", pixel=1.6)
    config = feature_config("us", "tiny")
    (files,) = find_cases(tmp_path, "us")
    case = load_case(files, config)
    assert case.image.shape[0] == 6  # frames are never resampled
    assert case.image.shape[1] >= 48 and case.image.shape[2] >= 64  # padded to the window
    assert case.mask.any() and float(case.image.max()) <= 1.0
    assert normalize_us(np.array([0, 255]))[1] == 1.0


def test_patch_sampler_kidney_fraction_and_shapes() -> None:
    config = feature_config("ct", "tiny")
    mask = ellipsoid((40, 120, 120), (20, 60, 60), (4, 8, 8)).astype(np.uint8)
    case = CaseData.from_arrays("blob", 0.2 + 0.5 * mask, mask)
    always = PatchSampler([case], config, kidney_fraction=1.0)
    g = torch.Generator().manual_seed(0)
    patches = [always.sample(g) for _ in range(12)]
    assert all(p[0].shape == (1, *config.patch_size) for p in patches)
    assert all(float(p[1].sum()) > 0 for p in patches)
    never = PatchSampler([case], config, kidney_fraction=0.0)
    hits = [float(never.sample(g)[1].sum()) > 0 for _ in range(40)]
    assert sum(hits) < 40  # uniform patches often miss the kidney
    small = CaseData.from_arrays("small", *blob_volume(0, (8, 56, 56)))
    with pytest.raises(ValueError, match="smaller than the patch"):
        PatchSampler([small], config)


def test_patch_sampler_takes_other_patch_sizes_that_fit() -> None:
    config = feature_config("ct", "tiny")  # patch (16, 48, 48)
    mask = ellipsoid((40, 100, 120), (20, 50, 60), (4, 8, 8)).astype(np.uint8)
    case = CaseData.from_arrays("blob", 0.2 + 0.5 * mask, mask)
    other = CaseData.from_arrays("wide", *blob_volume(1, (36, 110, 96)))
    sampler = PatchSampler([case, other], config, kidney_fraction=1.0)
    assert sampler.largest_patch == (36, 100, 96)
    g = torch.Generator().manual_seed(0)
    image, mask_patch = sampler.sample(g, (32, 96, 64))
    assert image.shape == mask_patch.shape == (1, 32, 96, 64)
    with pytest.raises(ValueError, match="does not fit every case"):
        sampler.sample(g, (48, 48, 48))
    us = PatchSampler(
        [
            CaseData.from_arrays(
                "us",
                normalize_us(us_frames(n=4, rows=60, cols=80)[0]),
                us_frames(n=4, rows=60, cols=80)[1],
            )
        ],
        feature_config("us", "tiny", window=3),
    )
    assert us.largest_patch == (3, 60, 80)
    assert us.sample(g, (3, 48, 80))[0].shape == (1, 3, 48, 80)
    with pytest.raises(ValueError, match="does not match the us network"):
        us.sample(g, (5, 48, 64))


def test_us_patches_are_windows_centred_on_kidney_frames() -> None:
    config = feature_config("us", "tiny", window=3)
    frames, masks = us_frames(n=4, rows=60, cols=80)
    masks[[0, 1, 3]] = 0  # kidney only in frame 2
    case = CaseData.from_arrays("us", normalize_us(frames), masks)
    sampler = PatchSampler([case], config, kidney_fraction=1.0)
    image, mask = sampler.sample(torch.Generator().manual_seed(1))
    assert image.shape == (1, 3, 48, 64)
    assert float(mask[0, 1].sum()) > 0 and float(mask[0, 0].sum()) == 0  # middle frame = 2


def test_ct_case_keeps_the_tissue_map_and_patches_are_recoloured(tmp_path: Path) -> None:
    folder = write_ct_case(tmp_path / "case_000")
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"))
    kidney = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ct_kidney_mask.nii.gz")))
    labels = np.where(kidney > 0, int(Tissue.CORTEX), int(Tissue.FAT)).astype(np.uint8)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(folder / "labels.nii.gz"))
    config = feature_config("ct", "tiny")
    (files,) = find_cases(tmp_path, "ct")
    case = load_case(files, config)
    assert case.tissues is not None and case.tissues.shape == case.image.shape
    # The tissue map follows the (reoriented, resampled, cropped) image: its cortex is the kidney
    # mask up to boundary voxels (nearest-neighbour labels, interpolated mask).
    cortex, kidney = case.tissues == int(Tissue.CORTEX), case.mask.astype(bool)
    assert 2 * (cortex & kidney).sum() / (cortex.sum() + kidney.sum()) > 0.85
    plain = PatchSampler([case], config, kidney_fraction=1.0)
    recoloured = PatchSampler([case], config, 1.0, RandomTissueContrast(probability=1.0))
    a, mask_a = plain.sample(torch.Generator().manual_seed(2))
    b, mask_b = recoloured.sample(torch.Generator().manual_seed(2))
    assert torch.equal(mask_a, mask_b)  # same patch, only the intensities change
    assert not torch.allclose(a, b)
    # KiTS cases (no tissue map) pass through the recolouring sampler unchanged.
    kits_folder = write_ct_case(tmp_path / "kits" / "case_0", layout="kits")
    kits = load_case(find_cases(kits_folder, "ct")[0], config)
    assert kits.tissues is None
    kits_plain = PatchSampler([kits], config, 1.0).sample(torch.Generator().manual_seed(3))
    kits_recoloured = PatchSampler([kits], config, 1.0, RandomTissueContrast(probability=1.0))
    assert torch.equal(kits_plain[0], kits_recoloured.sample(torch.Generator().manual_seed(3))[0])
    with pytest.raises(ValueError, match="tissues"):
        CaseData.from_arrays("bad", case.image, case.mask, case.tissues[:1])
    # A label map on another grid (here: shifted origin) is not taken as the CT's tissue map.
    image.SetOrigin(tuple(o + 5.0 for o in ct.GetOrigin()))
    sitk.WriteImage(image, str(folder / "labels.nii.gz"))
    assert load_case(find_cases(folder, "ct")[0], config).tissues is None


def test_us_case_keeps_the_tissue_map_and_patches_get_tissue_gains(tmp_path: Path) -> None:
    folder = write_us_case(tmp_path / "case_000")
    kidney = sitk.ReadImage(str(folder / "us_kidney_mask.nii.gz"))
    values = sitk.GetArrayFromImage(kidney)
    labels = sitk.GetImageFromArray(
        np.where(values > 0, int(Tissue.CORTEX), int(Tissue.LIVER)).astype(np.uint8)
    )
    labels.CopyInformation(kidney)
    sitk.WriteImage(labels, str(folder / "us_labels.nii.gz"))
    config = feature_config("us", "tiny", window=3)
    (files,) = find_cases(tmp_path, "us")
    case = load_case(files, config)
    assert case.tissues is not None and case.tissues.shape == case.image.shape
    cortex, mask = case.tissues == int(Tissue.CORTEX), case.mask.astype(bool)
    assert 2 * (cortex & mask).sum() / (cortex.sum() + mask.sum()) > 0.85
    plain = PatchSampler([case], config, kidney_fraction=1.0)
    gained = PatchSampler([case], config, 1.0, RandomTissueGain(probability=1.0))
    a, mask_a = plain.sample(torch.Generator().manual_seed(2))
    b, mask_b = gained.sample(torch.Generator().manual_seed(2))
    assert torch.equal(mask_a, mask_b)  # same window, only the brightness changes
    assert not torch.allclose(a, b)
    assert torch.equal(a == 0, b == 0)  # dark stays dark (gains multiply)
    # A label map of another size is not this sequence's: the case trains without it.
    sitk.WriteImage(labels[:, :, :2], str(folder / "us_labels.nii.gz"))
    assert load_case(files, config).tissues is None
    (folder / "us_labels.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match=r"us_labels\.nii\.gz: unreadable U/S tissue label map"):
        load_case(files, config)


def test_sinus_networks_learn_the_sinus_of_the_label_maps(tmp_path: Path) -> None:
    """``structure="sinus"``: the target is the sinus labels, on the CT grid and on the frames."""
    folder = write_ct_case(tmp_path / "ct" / "case_000")
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"))
    kidney = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ct_kidney_mask.nii.gz"))) > 0
    # The sinus: the kidney's voxels within 60 % of its extent around the centre.
    centre = np.argwhere(kidney).mean(axis=0)
    half = (np.argwhere(kidney).max(axis=0) - np.argwhere(kidney).min(axis=0)) / 2
    grid = np.indices(kidney.shape).transpose(1, 2, 3, 0)
    sinus = kidney & (np.abs(grid - centre) < 0.6 * half).all(axis=-1)
    labels = np.where(kidney, int(Tissue.CORTEX), int(Tissue.FAT))
    labels[sinus] = int(Tissue.SINUS_FAT)
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(folder / "labels.nii.gz"))
    (files,) = find_cases(tmp_path / "ct", "ct")
    kidney_case = load_case(files, feature_config("ct", "tiny"))
    sinus_case = load_case(files, feature_config("ct", "tiny", structure="sinus"))
    assert 0 < sinus_case.mask.sum() < 0.6 * kidney_case.mask.sum()
    assert sinus_case.tissues is not None
    np.testing.assert_array_equal(sinus_case.mask, sinus_case.tissues == int(Tissue.SINUS_FAT))
    # U/S: the collecting system counts as sinus too.
    us_folder = write_us_case(tmp_path / "us" / "case_000")
    us_kidney = sitk.ReadImage(str(us_folder / "us_kidney_mask.nii.gz"))
    values = sitk.GetArrayFromImage(us_kidney)
    us_labels = np.where(values > 0, int(Tissue.CORTEX), int(Tissue.LIVER)).astype(np.uint8)
    rows = np.nonzero(values.any(axis=(0, 2)))[0]
    middle = rows[len(rows) // 2]
    us_labels[:, middle - 1 : middle + 2][values[:, middle - 1 : middle + 2] > 0] = int(
        Tissue.COLLECTING
    )
    written = sitk.GetImageFromArray(us_labels)
    written.CopyInformation(us_kidney)
    sitk.WriteImage(written, str(us_folder / "us_labels.nii.gz"))
    (us_files,) = find_cases(tmp_path / "us", "us")
    us_case = load_case(us_files, feature_config("us", "tiny", window=3, structure="sinus"))
    assert us_case.tissues is not None and us_case.mask.any()
    np.testing.assert_array_equal(us_case.mask, us_case.tissues == int(Tissue.COLLECTING))
    # Without label maps there is no sinus target.
    (us_folder / "us_labels.nii.gz").unlink()
    (us_files,) = find_cases(tmp_path / "us", "us")
    with pytest.raises(InputError, match="tissue label maps"):
        load_case(us_files, feature_config("us", "tiny", window=3, structure="sinus"))
    with pytest.raises(ValueError, match="structure must be one of"):
        feature_config("ct", "tiny", structure="liver")
    # Checkpoints written before the option rebuild as kidney networks.
    saved = feature_config("ct", "tiny").to_dict()
    del saved["structure"]
    assert type(feature_config("ct", "tiny")).from_dict(saved).structure == "kidney"

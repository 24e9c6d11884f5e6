"""How well does each kind of evidence pin down the U/S plane's out-of-plane tilt?

For simulated cases (``kidneyreg simulate`` folders, with ``labels.nii.gz``, ``us_labels.nii.gz``
and ``ground_truth.json``), the true pose of every ``--step``-th frame is tilted by an angle
about the frame's lateral axis (u, columns) or its depth axis (v, rows), through the U/S kidney
centroid; the tilted CT plane is then shifted in plane to its best kidney-outline overlap with
the U/S frame (as any registration of the outlines would do). The script reports, against the
tilt, how well the CT plane still matches the U/S frame by:

* ``kidney``: Dice of the kidney outlines (what a kidney feature map carries),
* ``sinus``: Dice of the renal sinus (sinus fat and collecting system: the central echo complex),
* ``medulla``: Dice of the medullary pyramids,
* ``liver``, ``muscle``: Dice of the liver and of the muscles (psoas, quadratus lumborum,
  diaphragm, abdominal wall) inside the U/S fan: the anatomy around the kidney, which the
  paper's kidney-masked inputs leave out,
* ``fan labels``: share of the fan's pixels outside the kidney whose tissue label agrees,
* ``mind``: mean absolute MIND difference inside the U/S kidney between the B-mode window and the
  kidney-masked CT (the paper's image term; lower is better),
* ``mind fan``: the same difference over the whole fan against the unmasked CT (the anatomy
  around the kidney included),
* ``lc2 fan``, ``lc2 kidney``: LC2 (Wein et al., 2008, the classic CT-U/S similarity: how much of
  the B-mode's local variance a linear combination of CT intensity and CT gradient magnitude
  explains) between the B-mode frame and the unmasked CT plane, over the fan and inside the U/S
  kidney (higher is better).

With ``--offsets`` the true plane is moved along its normal instead of tilted: positive offsets
move it towards the CT kidney centroid (the kidney's cross-section grows), negative ones away.

At tilt 0 every Dice is 1 by construction (the simulator draws the U/S labels from the CT labels
on the true plane); what matters is how fast each score falls off with the tilt. A score that
barely changes over +-16 degrees cannot tell the registration which tilt is right, whatever
network reads it.

Usage::

    .venv/bin/python benchmarks/tilt_observability.py runs/heldout_A/case_* runs/heldout_B/case_* \
        [--step 8] [--tilts 4 8 16 | --offsets -8 -4 4 8] [--no-mind] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from numpy.typing import NDArray
from scipy.ndimage import uniform_filter
from scipy.signal import fftconvolve

from kidneyreg.geometry import resample_on_frames
from kidneyreg.io.image import read_ct, read_mask
from kidneyreg.io.transforms import read_transforms_json
from kidneyreg.registration.mind import mind_descriptor
from kidneyreg.registration.plane_search import PlaneOffset
from kidneyreg.simulate.tissues import KIDNEY_TISSUES, Tissue, sinus_labels

STRUCTURES: dict[str, tuple[int, ...]] = {
    "kidney": tuple(int(t) for t in KIDNEY_TISSUES),
    "sinus": sinus_labels(),
    "medulla": (int(Tissue.MEDULLA),),
}
#: Structures around the kidney, scored inside the U/S fan only (the CT plane extends beyond it).
CONTEXT: dict[str, tuple[int, ...]] = {
    "liver": (int(Tissue.LIVER),),
    "muscle": (int(Tissue.MUSCLE),),
}
# In-plane search radius for the outline shift, in pixels.
_SHIFT_RADIUS = 8
# Window of U/S frames and parallel CT planes MIND is computed on (the network's window).
_WINDOW = 5
# LC2 patch side in pixels.
_LC2_PATCH = 7


def tilted(
    pose: NDArray[np.float64],
    centre_uv: NDArray[np.float64],
    about_u: float,
    about_v: float,
    normal_offset: float = 0.0,
) -> NDArray[np.float64]:
    """``pose`` rotated in its own frame about the u then v axis through ``centre_uv`` (degrees),
    optionally moved ``normal_offset`` mm along the frame normal."""
    offset = PlaneOffset(tilt_u_deg=about_u, tilt_v_deg=about_v, normal_mm=normal_offset)
    return offset.apply(np.asarray(pose)[None], np.asarray(centre_uv)[None])[0]


def _best_shift(fixed: NDArray[np.bool_], moving: NDArray[np.bool_]) -> tuple[int, int]:
    """Integer (row, column) shift of ``moving`` that overlaps ``fixed`` most."""
    corr = fftconvolve(fixed.astype(np.float32), moving[::-1, ::-1].astype(np.float32), "same")
    # With mode "same", zero shift sits at index n // 2 of each axis.
    cy, cx = corr.shape[0] // 2, corr.shape[1] // 2
    r = _SHIFT_RADIUS
    window = corr[cy - r : cy + r + 1, cx - r : cx + r + 1]
    row, col = np.unravel_index(int(window.argmax()), window.shape)
    return int(row) - r, int(col) - r


def _shift(image: NDArray[Any], shift: tuple[int, int]) -> NDArray[Any]:
    return np.roll(image, shift, axis=(-2, -1))


def _dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def _mind(slab: NDArray[np.float32]) -> NDArray[np.float32]:
    """MIND of the middle of ``(5, rows, cols)`` parallel planes, ``(6, rows, cols)``."""
    volume = torch.from_numpy(np.ascontiguousarray(slab.transpose(2, 1, 0)))[None, None]
    descriptor = mind_descriptor(volume.float(), 1e-6, x_index=_WINDOW // 2)
    return descriptor[0, :, :, :, 0].numpy().transpose(0, 2, 1)


def _lc2(
    us: NDArray[np.float32],
    ct: NDArray[np.float32],
    grad: NDArray[np.float32],
    inside: NDArray[np.bool_],
    size: int = _LC2_PATCH,
) -> float:
    """Linear correlation of linear combination (LC2): the share of the U/S intensity variance,
    patch by patch, that a linear combination of CT intensity and CT gradient magnitude explains,
    weighted by each patch's U/S variance (Wein et al., 2008); pixels outside ``inside`` are
    left out of the patches and of the sum."""
    w = inside.astype(np.float64)
    u, p, g = (a.astype(np.float64) * w for a in (us, ct, grad))
    n = uniform_filter(w, size)
    ok = n > 0.5
    n = np.where(ok, n, 1.0)

    def mean(a: NDArray[np.float64]) -> NDArray[np.float64]:
        return uniform_filter(a, size) / n

    mu, mp, mg = mean(u), mean(p), mean(g)
    vpp = mean(p * p) - mp * mp
    vgg = mean(g * g) - mg * mg
    vpg = mean(p * g) - mp * mg
    vpu = mean(p * u) - mp * mu
    vgu = mean(g * u) - mg * mu
    vuu = mean(u * u) - mu * mu
    det = vpp * vgg - vpg * vpg
    eps = 1e-6 * (np.abs(vpp * vgg).max() + 1e-12)
    explained = (vgg * vpu * vpu - 2 * vpg * vpu * vgu + vpp * vgu * vgu) / np.maximum(det, eps)
    explained = np.clip(explained, 0.0, vuu)
    use = ok & inside & (vuu > 0)
    return float(explained[use].sum() / max(vuu[use].sum(), 1e-12))


def case_scores(
    case: Path, tilts: list[float], step: int, with_mind: bool, *, offsets: bool = False
) -> dict[str, Any]:
    """Scores per structure against the tilt magnitude (mean over +-u and +-v tilts).

    With ``offsets`` the ``tilts`` are signed normal offsets (mm) instead: positive moves the
    plane towards the CT kidney centroid (its cross-section grows), negative away from it.
    """
    labels = sitk.ReadImage(str(case / "labels.nii.gz"))
    us_image = sitk.ReadImage(str(case / "us.nii.gz"))
    pixel = tuple(float(s) for s in us_image.GetSpacing()[:2])
    us_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "us_labels.nii.gz")))
    us_bmode = sitk.GetArrayFromImage(us_image).astype(np.float32)
    truth = read_transforms_json(case / "ground_truth.json").matrices
    us_kidney = np.isin(us_labels, STRUCTURES["kidney"])
    half = _WINDOW // 2
    frames = [k for k in range(half, len(truth) - half, step) if us_kidney[k].sum() >= 50]
    ct = read_ct(case / "ct.nii.gz") if with_mind else None
    ct_soft = ct_grad = None
    if ct is not None:
        # Soft-tissue window, then the 3D gradient magnitude (what produces specular echoes).
        ct_soft = sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), sitk.sitkFloat32, -200.0, 300.0)
        ct_grad = sitk.GradientMagnitudeRecursiveGaussian(ct_soft, 1.0)
    ct_mask = read_mask(case / "ct_kidney_mask.nii.gz", ct) if ct is not None else None
    shape = us_labels.shape[1:]
    directions = [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)]
    if offsets:
        directions = [(0.0, 0.0)]
        label_values = sitk.GetArrayViewFromImage(labels)
        kidney_voxels = np.argwhere(np.isin(label_values, STRUCTURES["kidney"]))
        kidney_centroid = np.array(
            labels.TransformContinuousIndexToPhysicalPoint(
                [float(v) for v in kidney_voxels.mean(axis=0)[::-1]]
            )
        )
    names = (*STRUCTURES, *CONTEXT, "fan labels", "mind", "mind fan", "lc2 fan", "lc2 kidney")
    scores: dict[str, dict[float, float]] = {name: {} for name in names}
    for magnitude in [0.0, *tilts]:
        per_direction: dict[str, list[float]] = {name: [] for name in scores}
        for du, dv in directions[:1] if magnitude == 0 else directions:
            values: dict[str, list[float]] = {name: [] for name in scores}
            for k in frames:
                rows, cols = np.nonzero(us_kidney[k])
                centre = np.array([cols.mean() * pixel[0], rows.mean() * pixel[1]])
                normal = 0.0
                if offsets:
                    # Sign of the normal that points from the frame's kidney point to the centroid.
                    point = truth[k] @ np.array([centre[0], centre[1], 0.0, 1.0])
                    inward = np.sign(truth[k][:3, 2] @ (kidney_centroid - point[:3])) or 1.0
                    normal = float(inward * magnitude)
                pose = tilted(truth[k], centre, du * magnitude, dv * magnitude, normal)
                ct_labels = resample_on_frames(
                    labels, pose[None], shape, pixel, interpolator="nearest"
                )[0]
                shift = _best_shift(us_kidney[k], np.isin(ct_labels, STRUCTURES["kidney"]))
                ct_labels = _shift(ct_labels, shift)
                for name, codes in STRUCTURES.items():
                    values[name].append(
                        _dice(np.isin(ct_labels, codes), np.isin(us_labels[k], codes))
                    )
                fan = us_labels[k] > 0  # the labelled sector; the CT plane extends beyond it
                for name, codes in CONTEXT.items():
                    values[name].append(
                        _dice(np.isin(ct_labels, codes) & fan, np.isin(us_labels[k], codes))
                    )
                around = fan & ~us_kidney[k]
                values["fan labels"].append(float((ct_labels == us_labels[k])[around].mean()))
                if ct is not None and ct_mask is not None:
                    poses = np.stack(
                        [
                            tilted(
                                truth[k],
                                centre,
                                du * magnitude,
                                dv * magnitude,
                                (i - half) * pixel[0] + normal,
                            )
                            for i in range(_WINDOW)
                        ]
                    )
                    hu = _shift(resample_on_frames(ct, poses, shape, pixel), shift)
                    inside = resample_on_frames(
                        ct_mask, poses[half : half + 1], shape, pixel, interpolator="nearest"
                    )[0].astype(bool)
                    window = _mind(us_bmode[k - half : k + half + 1])
                    masked = hu * _shift(inside, shift)[None]
                    difference = np.abs(window - _mind(masked.astype(np.float32)))
                    values["mind"].append(float(difference[:, us_kidney[k]].mean()))
                    difference = np.abs(window - _mind(hu.astype(np.float32)))
                    values["mind fan"].append(float(difference[:, fan].mean()))
                    assert ct_soft is not None and ct_grad is not None
                    middle = poses[half : half + 1]
                    soft = _shift(resample_on_frames(ct_soft, middle, shape, pixel)[0], shift)
                    grad = _shift(resample_on_frames(ct_grad, middle, shape, pixel)[0], shift)
                    bmode = us_bmode[k]
                    values["lc2 fan"].append(_lc2(bmode, soft, grad, fan))
                    values["lc2 kidney"].append(_lc2(bmode, soft, grad, us_kidney[k]))
            for name in scores:
                # A structure absent from every frame (no liver in the fan) has only NaN Dice.
                finite = [v for v in values[name] if np.isfinite(v)]
                if finite:
                    per_direction[name].append(float(np.mean(finite)))
        for name in scores:
            if per_direction[name]:
                scores[name][magnitude] = float(np.mean(per_direction[name]))
    info = json.loads((case / "case.json").read_text(encoding="utf-8"))
    return {
        "case": str(case),
        "group": info.get("group"),
        "anatomy": info.get("anatomy_source"),
        "frames": len(frames),
        "scores": {name: s for name, s in scores.items() if s},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", type=Path, nargs="+")
    parser.add_argument("--step", type=int, default=8, help="use every STEP-th frame")
    parser.add_argument("--tilts", type=float, nargs="+", default=[4.0, 8.0, 16.0])
    parser.add_argument(
        "--offsets",
        type=float,
        nargs="+",
        default=None,
        help="signed normal offsets (mm, + towards the kidney centroid) instead of tilts",
    )
    parser.add_argument("--no-mind", action="store_true", help="skip the MIND term (faster)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    perturbations = args.tilts if args.offsets is None else args.offsets
    unit = "deg" if args.offsets is None else "mm"
    magnitudes = [0.0, *perturbations]
    header = "| case | group | score | " + " | ".join(f"{m:g} {unit}" for m in magnitudes) + " |"
    print(header)
    print("|" + " --- |" * (3 + len(magnitudes)))
    for case in args.cases:
        row = case_scores(
            case, perturbations, args.step, not args.no_mind, offsets=args.offsets is not None
        )
        rows.append(row)
        for name, by_tilt in row["scores"].items():
            cells = " | ".join(f"{by_tilt[m]:.3f}" for m in magnitudes)
            print(f"| {case.name} | {row['group']} | {name} | {cells} |", flush=True)
    names = list(rows[0]["scores"])
    print("\nmean over cases:")
    for name in names:
        means = [np.mean([r["scores"][name][m] for r in rows]) for m in magnitudes]
        print(f"| all ({len(rows)}) | | {name} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()

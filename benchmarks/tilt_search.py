"""Can an explicit tilt search fix what the network leaves (group B's tilt), and what does it need?

For each held-out case (``kidneyreg simulate`` folder with ground truth and label maps) the
bundled model registers the sequence from the initial alignment (ground-truth masks as feature
maps, one pass). Then one correction, common to the frames of the first ``--frames`` frames
(every ``--every``-th), is searched: a tilt of each frame's estimate about its lateral (u) and
depth (v) axis through the frame's U/S kidney centroid, on a grid of +-``--range`` degrees, and
for each tilt the in-plane shift that maximises the overlap summed over the frames. The
correction is chosen by

* ``kidney``: the kidney Dice alone (what the kidney feature maps carry), or
* ``kidney+sinus``: kidney Dice plus renal-sinus Dice,

and the TRE and plane angle of those frames are reported before and after. The U/S kidney map
comes from the bundled U/S feature network (``--us-kidney network``, realistic errors) or the
ground-truth mask; the sinus comes from the simulator's label maps on both sides, i.e. a perfect
sinus segmentation: the ``kidney+sinus`` rows are an optimistic bound of what sinus feature maps
could give.

Usage::

    .venv/bin/python benchmarks/tilt_search.py runs/heldout_B/case_00* runs/heldout_A/case_00* \
        [--us-kidney network|mask] [--range 24] [--step 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import tilt_observability  # a sibling script: benchmarks/ is on sys.path
import torch
from numpy.typing import NDArray
from scipy.signal import fftconvolve

from kidneyreg.evaluation.evaluate import evaluate_frames
from kidneyreg.geometry import resample_on_frames
from kidneyreg.io.image import read_ct, read_mask
from kidneyreg.io.transforms import read_transforms_json
from kidneyreg.io.us import read_us_mask, read_us_sequence
from kidneyreg.pipeline import (
    Registrar,
    convex_regions,
    load_registration_model,
    persistent_region,
)

tilted = tilt_observability.tilted
SINUS_CODES: tuple[int, ...] = tilt_observability.STRUCTURES["sinus"]
# In-plane search radius (pixels) of the common shift.
SHIFT_RADIUS = 8


def _correlation(fixed: NDArray[np.bool_], moving: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Overlap of ``moving`` rolled by every shift within the radius onto ``fixed``."""
    corr = fftconvolve(fixed.astype(np.float32), moving[::-1, ::-1].astype(np.float32), "same")
    cy, cx = corr.shape[0] // 2, corr.shape[1] // 2
    r = SHIFT_RADIUS
    return np.asarray(corr[cy - r : cy + r + 1, cx - r : cx + r + 1], dtype=np.float64)


def search_tilt(
    estimates: NDArray[np.float64],
    centres_uv: NDArray[np.float64],
    us_kidney: NDArray[np.bool_],
    us_sinus: NDArray[np.bool_],
    ct_kidney: sitk.Image,
    ct_labels: sitk.Image,
    pixel_size: tuple[float, float],
    angles: NDArray[np.float64],
    *,
    use_sinus: bool,
) -> tuple[tuple[float, float], NDArray[np.float64]]:
    """The common (tilt about u, tilt about v) and in-plane shift that best match the frames.

    Args:
        estimates: ``(n, 4, 4)`` poses of the frames to match.
        centres_uv: ``(n, 2)`` U/S kidney centroids (mm), the tilt pivots.
        us_kidney, us_sinus: ``(n, rows, cols)`` U/S maps of the frames.
        ct_kidney: CT kidney mask; ``ct_labels``: simulator label map (sinus codes).
        pixel_size: U/S ``(sx, sy)`` mm.
        angles: Candidate tilts (degrees) about each axis.
        use_sinus: Score kidney Dice plus sinus Dice instead of kidney Dice alone.

    Returns:
        The chosen tilts and the corrected ``(n, 4, 4)`` poses.
    """
    shape = us_kidney.shape[1:]
    best: tuple[float, tuple[float, float], NDArray[np.float64]] | None = None
    for about_u in angles:
        for about_v in angles:
            poses = np.stack(
                [tilted(m, c, about_u, about_v) for m, c in zip(estimates, centres_uv, strict=True)]
            )
            kidney = resample_on_frames(
                ct_kidney, poses, shape, pixel_size, interpolator="nearest"
            ).astype(bool)
            score = 2 * sum(map(_correlation, us_kidney, kidney)) / (us_kidney.sum() + kidney.sum())
            if use_sinus:
                labels = resample_on_frames(
                    ct_labels, poses, shape, pixel_size, interpolator="nearest"
                )
                sinus = np.isin(labels, SINUS_CODES) & kidney  # this kidney's sinus only
                total = max(float(us_sinus.sum() + sinus.sum()), 1.0)
                score = score + 2 * sum(map(_correlation, us_sinus, sinus)) / total
            row, col = np.unravel_index(int(score.argmax()), score.shape)
            if best is None or score[row, col] > best[0]:
                shift = np.eye(4)
                # Rolling the CT slice by (row, col) pixels moves its pose the other way.
                shift[:3, 3] = [
                    -(col - SHIFT_RADIUS) * pixel_size[0],
                    -(row - SHIFT_RADIUS) * pixel_size[1],
                    0.0,
                ]
                best = (float(score[row, col]), (float(about_u), float(about_v)), poses @ shift)
    assert best is not None
    return best[1], best[2]


def evaluate_case(case: Path, args: argparse.Namespace) -> dict[str, Any]:
    info = json.loads((case / "case.json").read_text(encoding="utf-8"))
    ct = read_ct(case / "ct.nii.gz")
    ct_mask = read_mask(case / "ct_kidney_mask.nii.gz", ct)
    labels = sitk.ReadImage(str(case / "labels.nii.gz"))
    sequence = read_us_sequence(case / "us.nii.gz")
    us_mask = read_us_mask(case / "us_kidney_mask.nii.gz", sequence)
    us_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "us_labels.nii.gz")))
    truth = read_transforms_json(case / "ground_truth.json").matrices
    pixel = (float(sequence.pixel_size[0]), float(sequence.pixel_size[1]))
    registrar = Registrar(
        ct, args.model, ct_mask=ct_mask, device="cpu", kidney=info["kidney"], refinements=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = registrar.prepare(sequence, us_mask)
    estimates = registrar.register(prepared).matrices
    if args.us_kidney == "network":
        from kidneyreg.features.infer import load_feature_model, predict_us

        model = load_feature_model(None, modality="us", profile=registrar.profile.name)
        us_kidney = convex_regions(persistent_region(predict_us(model, sequence, stride=5) >= 0.5))
    else:
        us_kidney = us_mask.astype(bool)
    us_sinus = np.isin(us_labels, SINUS_CODES)
    limit = min(len(truth), args.frames)
    frames = np.array([k for k in range(0, limit, args.every) if us_kidney[k].sum() >= 50])
    centres = np.array(
        [
            [
                np.nonzero(us_kidney[k])[1].mean() * pixel[0],
                np.nonzero(us_kidney[k])[0].mean() * pixel[1],
            ]
            for k in frames
        ]
    )
    angles = np.arange(-args.range, args.range + 1e-9, args.step)

    def scores(poses: NDArray[np.float64]) -> dict[str, float]:
        values = evaluate_frames(ct_mask, us_mask[frames], pixel, poses, truth[frames]).values
        return {
            "tre": float(np.nanmean(values["tre"])),
            "plane_angle_deg": float(np.nanmean(values["plane_angle_deg"])),
        }

    row: dict[str, Any] = {
        "case": str(case),
        "group": info["group"],
        "frames": len(frames),
        "pretrained": scores(estimates[frames]),
    }
    for name, use_sinus in (("kidney", False), ("kidney+sinus", True)):
        tilt, poses = search_tilt(
            estimates[frames],
            centres,
            us_kidney[frames],
            us_sinus[frames],
            ct_mask,
            labels,
            pixel,
            angles,
            use_sinus=use_sinus,
        )
        row[name] = {**scores(poses), "tilt_deg": list(tilt)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", type=Path, nargs="+")
    parser.add_argument("--us-kidney", choices=("network", "mask"), default="network")
    parser.add_argument("--range", type=float, default=24.0, help="largest tilt tried (deg)")
    parser.add_argument("--step", type=float, default=4.0, help="tilt grid step (deg)")
    parser.add_argument("--frames", type=int, default=64, help="search on the first FRAMES")
    parser.add_argument("--every", type=int, default=4, help="every EVERY-th of them")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.model = load_registration_model(None)
    rows = []
    print(
        "| case | group | pretrained TRE (mm) / angle (deg) | kidney search | kidney+sinus search |"
    )
    print("| --- | --- | --- | --- | --- |")
    for case in args.cases:
        row = evaluate_case(case, args)
        rows.append(row)
        cells = [
            f"{row[m]['tre']:.2f} / {row[m]['plane_angle_deg']:.1f}"
            for m in ("pretrained", "kidney", "kidney+sinus")
        ]
        print(f"| {case.name} | {row['group']} | " + " | ".join(cells) + " |", flush=True)
    for group in sorted({r["group"] for r in rows}):
        chosen = [r for r in rows if r["group"] == group]
        cells = [
            f"{np.mean([r[m]['tre'] for r in chosen]):.2f} / "
            f"{np.mean([r[m]['plane_angle_deg'] for r in chosen]):.1f}"
            for m in ("pretrained", "kidney", "kidney+sinus")
        ]
        print(f"| mean ({len(chosen)}) | {group} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()

"""Size bias of the bundled feature networks' kidney maps: their outline against the truth's.

A map that matches the kidney's outline on average may still be larger or smaller than it, and
a loss that matches CT sections to U/S outlines reads a size difference between the two maps as
an offset of the plane along its normal (near the kidney's middle a section shrinks by ``d`` mm
only ``sqrt(2 R d)`` mm off it; R = 18 mm: 0.5 mm of size for 4 mm of offset). For each case
(``kidneyreg simulate`` output, procedural or ``--from-ct``):

* U/S: the map as ``register`` reads it (disjoint windows, threshold 0.5,
  :func:`~kidneyreg.pipeline.persistent_region`, :func:`~kidneyreg.pipeline.convex_regions`)
  against ``us_kidney_mask``: Dice, precision, recall and the signed boundary offset, the area
  difference divided by the true outline's length (mm; > 0: the map is larger), mean over frames
  with at least 20 kidney pixels;
* CT: the CT network's map (threshold 0.5, the connected pieces within 5 voxels of the true
  kidney) against ``ct_kidney_mask``: the same, the volume difference divided by the true
  surface area.

Usage::

    .venv/bin/python benchmarks/eval_map_bias.py runs/heldout_A/case_* runs/realsim2/case_000 \\
        [--us-view sagittal|flank] [--us-model CKPT] [--ct-model CKPT] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from eval_us_maps import pipeline_maps  # a sibling script: benchmarks/ is on sys.path
from numpy.typing import NDArray
from scipy import ndimage

from kidneyreg.features.infer import load_feature_model, predict_ct
from kidneyreg.features.metrics import dice
from kidneyreg.io.us import read_us_mask, read_us_sequence
from kidneyreg.pipeline import FEATURE_THRESHOLD


def boundary_length(mask: NDArray[np.bool_], spacing: float) -> float:
    """Length (2D) or area (3D) of ``mask``'s boundary, counted as its boundary pixels."""
    edge = mask & ~ndimage.binary_erosion(mask)
    return float(edge.sum()) * spacing ** (mask.ndim - 1)


def precision_recall(
    prediction: NDArray[np.bool_], truth: NDArray[np.bool_]
) -> tuple[float, float]:
    """Share of the prediction inside the truth, share of the truth covered."""
    both = float((prediction & truth).sum())
    return both / max(float(prediction.sum()), 1.0), both / max(float(truth.sum()), 1.0)


def _cells(row: tuple[float, ...] | NDArray[np.float64]) -> str:
    # Columns 3 and 7 are the signed offsets (mm), the rest shares.
    return " | ".join(f"{v:+.2f}" if i in (3, 7) else f"{v:.3f}" for i, v in enumerate(row))


def main() -> None:
    """Score every case, print one line each and the means over the procedural cases."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", type=Path, nargs="+")
    parser.add_argument("--us-view", choices=("sagittal", "flank"), default="sagittal")
    parser.add_argument("--us-model", type=Path, default=None, help="default: the bundled one")
    parser.add_argument("--ct-model", type=Path, default=None, help="default: the bundled one")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    us_model = load_feature_model(args.us_model, modality="us", view=args.us_view)
    ct_model = load_feature_model(args.ct_model, modality="ct")
    columns = ("Dice", "precision", "recall", "offset (mm)")
    print("| case | " + " | ".join(f"U/S {c}" for c in columns) + " | ", end="")
    print(" | ".join(f"CT {c}" for c in columns) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for case in args.cases:
        sequence = read_us_sequence(case / "us.nii.gz", min_frames=1)
        truth = np.asarray(read_us_mask(case / "us_kidney_mask.nii.gz", sequence)) > 0
        kept = pipeline_maps(us_model, sequence, FEATURE_THRESHOLD)[1]
        sx, sy = (float(v) for v in sequence.pixel_size)
        offsets = [
            float(kept[k].sum() - truth[k].sum())
            * sx
            * sy
            / boundary_length(truth[k], 0.5 * (sx + sy))
            for k in range(truth.shape[0])
            if truth[k].sum() >= 20
        ]
        ct = sitk.ReadImage(str(case / "ct.nii.gz"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "ct_kidney_mask.nii.gz"))) > 0
        found = sitk.GetArrayFromImage(predict_ct(ct_model, ct)) >= FEATURE_THRESHOLD
        pieces, _ = ndimage.label(found)
        near = np.unique(pieces[ndimage.binary_dilation(mask, iterations=5) & (pieces > 0)])
        ct_map = np.isin(pieces, near[near > 0])
        spacing = float(np.mean(ct.GetSpacing()))
        ct_offset = float(ct_map.sum() - mask.sum()) * float(np.prod(ct.GetSpacing()))
        ct_offset /= boundary_length(mask, spacing)
        row = (
            dice(kept, truth),
            *precision_recall(kept, truth),
            float(np.mean(offsets)) if offsets else float("nan"),
            dice(ct_map, mask),
            *precision_recall(ct_map, mask),
            ct_offset,
        )
        print(f"| {case} | {_cells(row)} |", flush=True)
        info = json.loads((case / "case.json").read_text(encoding="utf-8"))
        if info.get("anatomy_source") == "procedural":
            rows.append(row)
    if rows:
        print(f"| mean of {len(rows)} procedural | {_cells(np.mean(rows, axis=0))} |")


if __name__ == "__main__":
    main()

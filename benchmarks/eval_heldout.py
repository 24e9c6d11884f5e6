"""Accuracy of a registration model on held-out simulated patients, by probe-offset group.

For every case folder of the given cohorts (``kidneyreg simulate`` output, with ground truth) it
builds a :class:`kidneyreg.pipeline.Registrar`, registers the sequence with the pretrained model,
then (``--adapt``) adapts it on the first detected breathing cycle (the paper's one-cycle transfer
learning, 2 epochs) and registers again. Every pose set is scored against the ground truth with
:func:`kidneyreg.evaluation.evaluate.evaluate_frames` on the same frames: those after the
adaptation cycle with ``--adapt`` (as the paper scores the rest of the sequence), all frames
without. Rotation errors are also split along the true frame axes (tilts about u and v, in-plane).
Rows: initial alignment (kidney centroids matched; default sagittal pose, or with
``--init`` each case's ``init.json``, e.g. a flank simulation), pretrained,
adapted; means over cases of the per-case means, per group (A, B) and overall.

With ``--sinus masks|network`` the adapted model is also scored after the plane search
(:meth:`kidneyreg.pipeline.Registrar.search_plane`, row ``adapted_sinus``), and so is the
pretrained model (``pretrained_sinus``, the search on the first breathing cycle, as ``register
--no-adapt`` runs it), on renal-sinus maps from the label maps or from the sinus feature
networks. Row ``adapted_sinus_choice`` is what ``register`` does with sinus maps
(:meth:`~kidneyreg.pipeline.Registrar.adapt` with its plane search: the same adaptation, then
whichever of the weights before and after it overlaps kidney and sinus better after its own
search). The error at the U/S kidney centroid
(the evaluation's ``translation_error_mm``; the TRE averages the error over every kidney pixel,
so tilts add to it) is also split along the true frame's axes (in plane along u and v, out of
plane along the normal w).

Feature maps come from the ground-truth masks (``--features masks``, the default: the table then
measures registration alone) or from the bundled feature networks (``--features network``, what
``kidneyreg register`` does without masks); ``--features ct-network`` takes the CT's map from its
network, cut back to the capsule by its HU, and the U/S masks from the ground truth (what
``register --us-mask`` without ``--ct-mask`` does), ``--features us-network`` the U/S map from
its network and the CT mask from the ground truth, to tell which side's map costs what.

Usage::

    .venv/bin/python benchmarks/eval_heldout.py --cohort runs/heldout_A --cohort runs/heldout_B \
        --adapt [--model model.pt] [--features network] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from kidneyreg.evaluation.evaluate import evaluate_frames
from kidneyreg.io.image import read_ct, read_mask
from kidneyreg.io.transforms import read_transforms_json
from kidneyreg.io.us import read_us_mask, read_us_sequence
from kidneyreg.pipeline import Registrar, load_registration_model
from kidneyreg.simulate.case import sinus_mask_array, sinus_mask_image

METRICS = ("tre", "mcd_ctct", "hd_ctct", "plane_angle_deg")
#: Rotation error split along the true frame's axes: tilts about the lateral (u) and depth (v)
#: axes move the plane out of itself, a rotation about the normal (w) stays in plane.
AXIS_METRICS = ("tilt_u_deg", "tilt_v_deg", "inplane_deg")
#: The error at the U/S kidney centroid (the evaluation's translation error; the TRE is the mean
#: over all kidney pixels, so a tilt about the centroid adds to the TRE, not to this) split along
#: the true frame's axes: lateral (u) and depth (v), in plane, and the normal (w), out of plane;
#: "w_signed" keeps the sign (positive: the estimated plane lies on the +w side of the true one).
OFFSET_METRICS = ("offset_u_mm", "offset_v_mm", "offset_w_mm", "offset_w_signed_mm")


def axis_errors_deg(estimated: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``(n, 3)`` absolute rotation-vector components of ``true^-1 estimated`` in frame axes."""
    relative = np.einsum("nji,njk->nik", true[:, :3, :3], estimated[:, :3, :3])
    return np.abs(Rotation.from_matrix(relative).as_rotvec(degrees=True))


def axis_offsets_mm(estimated: np.ndarray, true: np.ndarray, centres_uv: np.ndarray) -> np.ndarray:
    """``(n, 3)`` components (u, v, w) of the error at each frame's ``centres_uv`` point (mm).

    The point ``(u, v, 0)`` of frame ``k`` goes to CT world by both poses; the difference is
    expressed in the true frame's axes, so its norm is the translation error at that point
    (:func:`kidneyreg.evaluation.metrics.translation_error_mm`).
    """
    points = np.concatenate(
        [centres_uv, np.zeros((len(centres_uv), 1)), np.ones((len(centres_uv), 1))], axis=1
    )
    difference = np.einsum("nij,nj->ni", estimated - true, points)[:, :3]
    return np.einsum("nji,nj->ni", true[:, :3, :3], difference)


def _is_method(value: Any) -> bool:
    """Whether a row entry holds a pose set's scores (not the plane search's parameters)."""
    return isinstance(value, dict) and "tre" in value


def _scores(values: dict[str, Any], frames: np.ndarray) -> dict[str, float]:
    return {name: float(np.nanmean(np.asarray(values[name])[frames])) for name in METRICS}


def evaluate_case(
    case: Path,
    model: Any,
    *,
    adapt: bool,
    features: str,
    refinements: int | None,
    anchor: float | None = None,
    also_anchors: Sequence[float] = (),
    use_init: bool = False,
    also_refinements: int | None = None,
    also_frame_step: int | None = None,
    sinus: str | None = None,
    sinus_models: tuple[Path | None, Path | None] = (None, None),
    ct_sinus_hu: bool = False,
    mirror: bool | None = None,
    us_features: Path | None = None,
) -> dict[str, Any]:
    """Scores of one case: ``{"initial": {...}, "pretrained": {...}, "adapted": {...}}``.

    With ``also_refinements`` the pretrained and the adapted model also register with that many
    refinement passes (``"pretrained_r0"``, ``"adapted_r0"`` for 0): the same adaptation, so the
    two settings differ only in the passes. With ``also_frame_step`` ``m`` they also register
    with the network on every ``m``-th frame and the poses between interpolated
    (``"pretrained_step3"``, ``"adapted_step3"`` for 3; :attr:`Registrar.frame_step`), again
    after the same adaptation. Each of ``also_anchors`` adapts the pretrained model again with
    that anchor weight (``"adapted_a0"`` for 0, scored on the same frames). With
    ``sinus="masks"`` the CT and the U/S get renal-sinus masks from the simulator's label maps
    (with ``"network"`` from the sinus feature networks ``sinus_models``, CT and U/S; None: the
    bundled U/S one and the CT's HU inside its kidney map; with ``ct_sinus_hu`` the CT's sinus
    is read from its HU with masks too, :func:`~kidneyreg.preprocess.renal_sinus`), and
    ``"pretrained_sinus"`` / ``"adapted_sinus"`` are the pretrained / adapted model with the
    plane search (:meth:`Registrar.search_plane`) applied; the rows without the suffix stay
    without it. ``us_features``: the U/S kidney feature network of
    ``features="network"`` or ``"us-network"`` (None: the bundled one).
    """
    ct = read_ct(case / "ct.nii.gz")
    ct_mask = read_mask(case / "ct_kidney_mask.nii.gz", ct)
    sequence = read_us_sequence(case / "us.nii.gz")
    us_masks = read_us_mask(case / "us_kidney_mask.nii.gz", sequence)
    truth = read_transforms_json(case / "ground_truth.json").matrices
    info = json.loads((case / "case.json").read_text(encoding="utf-8"))
    ct_from_mask = features in ("masks", "us-network")
    us_from_masks = features in ("masks", "ct-network")
    init = None
    if use_init:
        init = read_transforms_json(case / "init.json").broadcast_to(sequence.n_frames)
    ct_sinus = us_sinus = None
    if sinus == "masks":
        if not ct_sinus_hu:
            ct_sinus = sinus_mask_image(sitk.ReadImage(str(case / "labels.nii.gz")))
        us_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "us_labels.nii.gz")))
        us_sinus = sinus_mask_array(us_labels)
    registrar = Registrar(
        ct,
        model,
        ct_mask=ct_mask if ct_from_mask else None,
        trim_ct_fat=features == "ct-network",  # as register does with --us-mask alone
        ct_sinus_mask=ct_sinus,
        sinus_networks=sinus == "network",
        ct_sinus_features=sinus_models[0],
        us_sinus_features=sinus_models[1],
        us_features=us_features,
        device="cpu",
        kidney=info["kidney"],
        refinements=refinements,
        init=init,
        mirror=mirror,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = registrar.prepare(
            sequence, us_masks if us_from_masks else None, sinus_masks=us_sinus
        )

    def register(stage: str) -> None:
        registrar.refinements = refinements
        poses[stage] = registrar.register(prepared)
        if also_refinements is not None:
            registrar.refinements = also_refinements
            poses[f"{stage}_r{also_refinements}"] = registrar.register(prepared)
            registrar.refinements = refinements
        if also_frame_step is not None:
            registrar.frame_step = also_frame_step
            poses[f"{stage}_step{also_frame_step}"] = registrar.register(prepared)
            registrar.frame_step = 1

    def register_searched(stage: str) -> None:
        """The current weights with the plane search applied: row ``{stage}_sinus``."""
        search = registrar.search_plane(prepared)
        poses[f"{stage}_sinus"] = registrar.register(prepared)
        registrar.plane_search = None
        planes[stage] = {
            **search.offset.to_dict(),
            "seconds": search.seconds,
            "score": search.score_after,
        }

    poses: dict[str, Any] = {"initial": None}
    planes: dict[str, Any] = {}
    register("pretrained")
    initial = poses["pretrained"].initial_matrices
    if sinus is not None:
        register_searched("pretrained")
    frames = np.arange(sequence.n_frames)
    seconds = 0.0
    if adapt:
        started = time.perf_counter()
        record = registrar.adapt(prepared, anchor_weight=anchor, plane_search=False)
        seconds = time.perf_counter() - started
        register("adapted")
        if sinus is not None:
            register_searched("adapted")
            # What register does with sinus maps: the same adaptation, then the weights before
            # or after it, whichever overlaps better after its own search.
            registrar.reset()
            chosen = registrar.adapt(prepared, anchor_weight=anchor)
            poses["adapted_sinus_choice"] = registrar.register(prepared)
            planes["choice"] = {"undone": chosen.undone, "scores": chosen.search_scores}
        frames = np.arange(record.frame_range[1], sequence.n_frames)
        for weight in also_anchors:
            registrar.reset()
            registrar.adapt(prepared, anchor_weight=weight)
            register(f"adapted_a{weight:g}")
    row: dict[str, Any] = {
        "case": str(case),
        "group": info["group"],
        "frames": [int(frames[0]), int(frames[-1])],
        "adapt_s": seconds,
    }
    if planes:
        row["plane_search"] = planes
    # The TRE's point: each scored frame's U/S kidney centroid (mm), frames without kidney skipped.
    visible = np.array([us_masks[k].sum() > 0 for k in range(sequence.n_frames)])
    scored = frames[visible[frames]]
    centres = np.zeros((sequence.n_frames, 2))
    for k in scored:
        rows_, cols_ = np.nonzero(us_masks[k])
        centres[k] = [cols_.mean() * sequence.pixel_size[0], rows_.mean() * sequence.pixel_size[1]]
    for name, result in poses.items():
        matrices = initial if result is None else result.matrices
        values = evaluate_frames(ct_mask, us_masks, sequence.pixel_size, matrices, truth).values
        row[name] = _scores(values, frames)
        axes = axis_errors_deg(np.asarray(matrices)[frames], np.asarray(truth)[frames])
        row[name].update(zip(AXIS_METRICS, map(float, axes.mean(axis=0)), strict=True))
        offsets = axis_offsets_mm(
            np.asarray(matrices)[scored], np.asarray(truth)[scored], centres[scored]
        )
        row[name].update(
            zip(OFFSET_METRICS[:3], map(float, np.abs(offsets).mean(axis=0)), strict=True)
        )
        row[name][OFFSET_METRICS[3]] = float(offsets[:, 2].mean())
    return row


def _table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    lines = [
        "| group | cases | method | TRE (mm) | MCD CT-CT (mm) | HD CT-CT (mm) "
        "| plane angle (deg) | tilt about u (deg) | tilt about v (deg) | in-plane (deg) "
        "| centroid error along u (mm) | along v (mm) | along w (mm) | w signed (mm) |",
        "|" + " --- |" * 14,
    ]
    for group in ("A", "B", "all"):
        chosen = [r for r in rows if group in ("all", r["group"])]
        if not chosen:
            continue
        for method in methods:
            cells = []
            for metric in METRICS + AXIS_METRICS + OFFSET_METRICS:
                values = np.array([r[method].get(metric, np.nan) for r in chosen])
                cells.append(f"{values.mean():.2f} ± {values.std():.2f}")
            lines.append(f"| {group} | {len(chosen)} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, action="append", required=True)
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--adapt", action="store_true", help="also one-cycle adaptation")
    parser.add_argument(
        "--features",
        choices=("masks", "network", "ct-network", "us-network"),
        default="masks",
        help="kidney maps from the ground truth, the networks, or the network on one side only",
    )
    parser.add_argument(
        "--refinements",
        type=int,
        default=None,
        help="extra passes per frame (default: register's, 1 before and 0 after adaptation)",
    )
    parser.add_argument(
        "--anchor",
        type=float,
        default=None,
        help="adaptation anchor weight (default: register's, 0 with masks, 0.1 with networks)",
    )
    parser.add_argument(
        "--also-anchor",
        type=float,
        action="append",
        default=[],
        help="also adapt with this anchor weight (repeatable; same cases and frames)",
    )
    parser.add_argument(
        "--init", action="store_true", help="start from each case's init.json (--init)"
    )
    parser.add_argument(
        "--also-refinements",
        type=int,
        default=None,
        help="also register with this many passes (same adaptation), e.g. 0",
    )
    parser.add_argument(
        "--also-frame-step",
        type=int,
        default=None,
        help="also register with the network on every N-th frame, the poses between "
        "interpolated (same adaptation)",
    )
    parser.add_argument(
        "--sinus",
        choices=("masks", "network"),
        default=None,
        help="also the plane search after adaptation, on renal-sinus maps from the label maps "
        "(masks) or from the sinus feature networks (network)",
    )
    parser.add_argument("--ct-sinus-features", type=Path, default=None)
    parser.add_argument(
        "--ct-sinus-hu",
        action="store_true",
        help="with --sinus masks: the CT's sinus from its HU inside the kidney mask (not labels)",
    )
    parser.add_argument("--us-sinus-features", type=Path, default=None)
    parser.add_argument(
        "--mirror",
        choices=("auto", "on", "off"),
        default="auto",
        help="network in the mirrored grid: auto (left kidneys, as register does), on, off",
    )
    parser.add_argument(
        "--us-features",
        type=Path,
        default=None,
        help="U/S kidney feature network with --features network or us-network "
        "(default: the bundled one)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_registration_model(args.model)
    rows = []
    for cohort in args.cohort:
        for case in sorted(p for p in cohort.iterdir() if (p / "case.json").is_file()):
            row = evaluate_case(
                case,
                model,
                adapt=args.adapt,
                features=args.features,
                refinements=args.refinements,
                anchor=args.anchor,
                also_anchors=args.also_anchor,
                use_init=args.init,
                also_refinements=args.also_refinements,
                also_frame_step=args.also_frame_step,
                sinus=args.sinus,
                sinus_models=(args.ct_sinus_features, args.us_sinus_features),
                ct_sinus_hu=args.ct_sinus_hu,
                mirror={"auto": None, "on": True, "off": False}[args.mirror],
                us_features=args.us_features,
            )
            rows.append(row)
            print(
                f"{case} ({row['group']}): TRE "
                + ", ".join(f"{m} {row[m]['tre']:.2f}" for m in row if _is_method(row[m])),
                flush=True,
            )
    methods = [m for m in rows[0] if _is_method(rows[0][m])] if rows else []
    passes = "auto" if args.refinements is None else args.refinements
    print(f"\nmodel {model.source}, features {args.features}, refinements {passes}\n")
    print(_table(rows, methods))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()

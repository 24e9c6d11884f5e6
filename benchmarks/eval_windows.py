"""One network pass per window on held-out cases: what a registration model alone does.

For each model and each case folder (``kidneyreg simulate`` output with ground truth), up to
``--per-case`` windows evenly spread over the frames showing the kidney are registered from their
initial alignment by one forward pass (no refinement pass, no adaptation), with the ground-truth
masks (and, for a model trained with ``pretrain --sinus``, the label maps' sinus) as feature
maps. This is how pretraining validates, and it works for models that ``kidneyreg register``
cannot run yet (those needing sinus maps). Reported per model, as means over windows: TRE, MCD
CT-CT, and the rotation error split along the true frame axes (tilts about the lateral u and the
depth v axis, in plane).

Usage::

    .venv/bin/python benchmarks/eval_windows.py --model bundled --model runs/sinus/reg.pt \
        runs/heldout_B/case_000 runs/heldout_B/case_001 [--per-case 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from eval_heldout import axis_errors_deg  # a sibling script: benchmarks/ is on sys.path

from kidneyreg.evaluation.evaluate import evaluate_frames
from kidneyreg.pipeline import RegistrationModel, load_registration_model
from kidneyreg.registration.pairs import ValidationWindows, load_case

COLUMNS = ("tre", "mcd_ctct", "tilt_u_deg", "tilt_v_deg", "inplane_deg")


def evaluate_model(
    model: RegistrationModel,
    folders: list[Path],
    per_case: int,
    cache: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Mean scores of the initial alignment and of one pass of ``model`` over the windows.

    ``cache`` keeps loaded cases between calls (keyed by profile and structures).
    """
    net = model.net.eval()
    key = (model.profile, net.config.structures)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = [load_case(f, model.profile, structures=key[1]) for f in folders]
    mid = net.config.window // 2
    windows = ValidationWindows(cache[key], per_case=per_case)
    rows: dict[str, list[list[float]]] = {"initial": [], "model": []}
    with torch.no_grad():
        for i in range(len(windows)):
            item = windows[i]
            case = windows.cases[int(item["case"])]
            k = int(item["k"])
            output = net(item["fixed"][None], item["moving"][None]).matrices[0, mid]
            for name, offset in (("initial", np.eye(4)), ("model", output.double().numpy())):
                pose = case.initial_grid(k).matrix @ offset @ case.window_P(k)[mid]
                values = evaluate_frames(
                    case.ct_mask,
                    case.us_mask[k][None],
                    case.pixel_size,
                    pose[None],
                    case.references[k][None],
                ).values
                axes = axis_errors_deg(pose[None], case.references[k][None])[0]
                rows[name].append([float(values["tre"][0]), float(values["mcd_ctct"][0]), *axes])
    return {
        "model": model.source,
        "structures": list(net.config.structures),
        "windows": len(windows),
        **{
            name: dict(zip(COLUMNS, np.nanmean(np.array(r), axis=0).tolist(), strict=True))
            for name, r in rows.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", type=Path, nargs="+")
    parser.add_argument("--model", action="append", required=True, help="checkpoint or 'bundled'")
    parser.add_argument("--per-case", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache: dict[Any, Any] = {}
    results = []
    print(
        "| model | method | TRE (mm) | MCD CT-CT (mm) | tilt u (deg) | tilt v (deg) "
        "| in plane (deg) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.model:
        model = load_registration_model(None if spec == "bundled" else spec)
        result = evaluate_model(model, args.cases, args.per_case, cache)
        results.append(result)
        for name in ("initial", "model"):
            cells = " | ".join(f"{result[name][c]:.2f}" for c in COLUMNS)
            print(f"| {spec} | {name} | {cells} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()

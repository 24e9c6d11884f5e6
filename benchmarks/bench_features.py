"""Feature-network benchmark: the paper's Table 1 and the Appendix E window-size study.

Steps (each skipped when its result is given or already there, so an interrupted run resumes):

1. simulate a training cohort and a held-out test cohort (different seeds: different patients)
   unless ``--train`` / ``--test`` folders are given;
2. train the CT and U/S feature networks on the training cohort (``kidneyreg train-features``),
   unless ``--ct-model`` / ``--us-model`` (or ``--bundled``) are given;
3. print Table 1 (Dice, sensitivity, the paper's "specificity" = precision) on the test cohort;
4. with ``--window-study``, train one U/S network per window size and print Appendix E's table.

A quick way to train a pair of models from scratch::

    .venv/bin/python benchmarks/bench_features.py --out runs/features --profile cpu \\
        --train-cases 24 --test-cases 8 --epochs 16 --steps 150

which runs ``kidneyreg simulate --out runs/features/train --cases 24 --seed 100`` (test:
``--cases 8 --seed 200``) and ``kidneyreg train-features --modality ct|us --data
runs/features/train --out runs/features/{ct,us}.pt --epochs 16 --steps 150 --seed 0``. The
bundled models were made with the longer, multi-phase recipe of ``docs/models.md``.

Usage (Table 1 of the bundled models on a fresh test cohort)::

    .venv/bin/python benchmarks/bench_features.py --out runs/features --bundled
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from kidneyreg.features.benchmark import feature_table, format_table, window_study
from kidneyreg.features.train import default_train_settings, export_model, train_from_folder
from kidneyreg.io.atomic import atomic_write_text
from kidneyreg.simulate.case import simulate_cohort


def _cohort(folder: Path, cases: int, seed: int, profile: str) -> Path:
    if not (folder / "cohort.json").is_file():
        print(f"simulating {cases} case(s) into {folder} (seed {seed})", flush=True)
        simulate_cohort(folder, cases, seed, profile=profile, preview=False)
    return folder


def main() -> None:
    """Run the benchmark and print Markdown tables (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Working folder.")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--train", type=Path, help="Training cohort (default: simulate one).")
    parser.add_argument("--test", type=Path, help="Held-out cohort (default: simulate one).")
    parser.add_argument("--train-cases", type=int, default=24)
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--train-seed", type=int, default=100)
    parser.add_argument("--test-seed", type=int, default=200)
    parser.add_argument("--ct-model", type=Path, help="CT checkpoint (default: train one).")
    parser.add_argument("--us-model", type=Path, help="U/S checkpoint (default: train one).")
    parser.add_argument("--bundled", action="store_true", help="Evaluate the bundled models.")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Steps per epoch.")
    parser.add_argument("--seed", type=int, default=0, help="Training seed.")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate.")
    parser.add_argument(
        "--finetune-epochs", type=int, default=0, help="Extra epochs at --finetune-lr."
    )
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--export", type=Path, help="Write float16 copies of the models here.")
    parser.add_argument("--window-study", action="store_true", help="Also run Appendix E.")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 3, 5, 7, 9])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    test_dir = args.test or _cohort(
        args.out / "test", args.test_cases, args.test_seed, args.profile
    )
    needs_training = not args.bundled and (args.ct_model is None or args.us_model is None)
    train_dir = args.train
    if train_dir is None and (needs_training or args.window_study):
        train_dir = _cohort(args.out / "train", args.train_cases, args.train_seed, args.profile)
    settings = default_train_settings(
        args.profile,
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        learning_rate=args.lr,
        seed=args.seed,
    )
    models: dict[str, Path | None] = {"ct": args.ct_model, "us": args.us_model}
    if not args.bundled:
        for modality in ("ct", "us"):
            if models[modality] is None:
                assert train_dir is not None
                stages = [settings]
                if args.finetune_epochs > 0:
                    stages.append(
                        dataclasses.replace(
                            settings,
                            epochs=settings.epochs + args.finetune_epochs,
                            learning_rate=args.finetune_lr,
                        )
                    )
                for stage in stages:
                    result = train_from_folder(
                        modality,
                        train_dir,
                        args.out / f"{modality}.pt",
                        profile=args.profile,
                        settings=stage,
                        resume=True,
                        device=args.device,
                        log=lambda line: print(line, flush=True),
                    )
                models[modality] = result.best
            if args.export is not None:
                model_path = models[modality]
                assert model_path is not None
                target = args.export / f"features_{modality}_{args.profile}.pt"
                export_model(model_path, target)
                print(f"wrote {target}", flush=True)
    rows = feature_table(
        test_dir,
        ct_model=models["ct"],
        us_model=models["us"],
        profile=args.profile,
        device=args.device,
        log=lambda line: print(line, flush=True),
    )
    results: dict[str, object] = {
        "profile": args.profile,
        "test_cohort": str(test_dir),
        "table_1": [row.__dict__ for row in rows],
    }
    print("\nTable 1 (held-out simulated patients):\n")
    print(format_table(rows))
    if args.window_study:
        assert train_dir is not None
        study = window_study(
            train_dir,
            test_dir,
            args.out / "window_study",
            windows=args.windows,
            profile=args.profile,
            settings=settings,
            device=args.device,
            log=lambda line: print(line, flush=True),
        )
        results["window_study"] = [row.__dict__ for row in study]
        print("\nAppendix E (U/S window size):\n")
        print(format_table(study, first_column="window"))
    results["seconds"] = time.perf_counter() - started
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Carry the full benchmark's work folder between sessions through the repository.

    python carry.py save WORK DEST     # at the end of a session
    python carry.py restore DEST WORK  # at the start of the next, before share_fold.py

A fold whose held-out cases are all registered travels as its results/ and trainings/ JSON
files. A fold still under way also takes its finished pretrainings (those with a training record)
as compact checkpoints (``kidneyreg.registration.train.export_model``: the weights that
registration loads, ~0.5 MB, without the optimizer state), so that the next session registers its
cases without pretraining again. Its unfinished pretrainings start afresh.
"""

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from kidneyreg.evaluation import benchmark as b


def save(work: Path, dest: Path) -> None:
    from kidneyreg.registration.train import export_model

    shutil.copy2(work / "settings.json", dest / "settings.json")
    settings = json.loads((work / "settings.json").read_text())["settings"]
    cases = b._cohort_cases(work / "cohort")
    patients, groups = [c.patient for c in cases], [c.group for c in cases]
    fold_of = b.assign_folds(patients, settings["folds"], settings["seed"], strata=groups)
    held_out = Counter(fold_of)
    for fold in sorted(work.glob("fold_*")):
        records = sorted((fold / "trainings").glob("*.json"))
        results = sorted((fold / "results").glob("*.json"))
        if not records and not results:
            continue
        out = dest / fold.name
        for sub, files in (("trainings", records), ("results", results)):
            (out / sub).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, out / sub / f.name)
        done = len(results) == held_out[int(fold.name.split("_")[1])]
        kept = out / "checkpoints"
        if done:
            shutil.rmtree(kept, ignore_errors=True)
            continue
        kept.mkdir(exist_ok=True)
        for record in records:
            checkpoint = fold / f"{record.stem}.pt"
            if checkpoint.is_file() and not (kept / checkpoint.name).is_file():
                export_model(checkpoint, kept / checkpoint.name)
        print(f"{fold.name}: {len(records)} pretrainings, {len(results)} cases (under way)")


def restore(dest: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy2(dest / "settings.json", work / "settings.json")
    for fold in sorted(dest.glob("fold_*")):
        out = work / fold.name
        for sub in ("trainings", "results"):
            if (fold / sub).is_dir():
                shutil.copytree(fold / sub, out / sub, dirs_exist_ok=True)
        for checkpoint in sorted((fold / "checkpoints").glob("*.pt")):
            shutil.copy2(checkpoint, out / checkpoint.name)


if __name__ == "__main__":
    action, source, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    {"save": save, "restore": restore}[action](source, target)

"""How folds 1-4 of the full cpu benchmark were scheduled: two processes share each fold.

Scheduling only. kidneyreg at 2d1d025 (the version fold 0 was finished with; put it first on
PYTHONPATH, e.g. from ``git worktree add ../bench 2d1d025``) shares a work folder between
processes by whole folds, so this script calls that version's own functions per pretraining and
per held-out case, each claimed with a file lock, and writes the files ``kidneyreg benchmark``
writes (``trainings/NAME.json``, ``NAME.pt``, ``results/CASE.json``); the benchmark then reuses
them. Since 2026-12-04 ``kidneyreg benchmark`` shares folds this way itself.

    OMP_NUM_THREADS=1 PYTHONPATH=../bench/src python share_fold.py WORK FOLD [FOLD ...]

with WORK the work folder (``runs/bench_full/.cpu.benchmark-work``, holding the run's
``settings.json``); start one process per core.
"""

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kidneyreg.evaluation import benchmark as b
from kidneyreg.io.atomic import atomic_write_text
from kidneyreg.io.lock import FileLock
from kidneyreg.pipeline import load_registration_model
from kidneyreg.profiles import get_profile
from kidneyreg.results import json_ready
from kidneyreg.simulate.case import case_seed, simulate_case


def say(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def claim_each(
    items: Iterable[Any],
    lock: Callable[[Any], Path],
    done: Callable[[Any], bool],
    work: Callable[[Any], None],
) -> None:
    """Work on every item that is not done and that no other process holds."""
    for item in items:
        claim = FileLock(lock(item))
        if done(item) or not claim.acquire(blocking=False):
            continue
        try:
            if not done(item):  # another process may have finished it meanwhile
                work(item)
        finally:
            claim.release()


def wait_for(paths: Iterable[Path]) -> None:
    paths = list(paths)
    while not all(p.is_file() for p in paths):
        time.sleep(20)


def main(work: Path, folds: list[int]) -> None:
    settings = b._settings(
        profile=None,
        folds=None,
        cases=None,
        frames=None,
        epochs=None,
        pairs=None,
        batch_size=2,
        lr=3e-4,
        supervision=1.0,
        val_fraction=None,
        repeats=None,
        adapt_epochs=None,
        seed=0,
        tables=None,
        quick=False,
    )
    stored = json.loads((work / "settings.json").read_text())
    if stored["settings"] != json.loads(json.dumps(settings.to_dict())):
        raise SystemExit(f"{work}: settings differ from the full setting's")
    trainings, methods, _ = b.benchmark_plan(
        settings.tables,
        window=get_profile(settings.profile).window,
        repeats=settings.repeats,
        adapt_epochs=settings.adapt_epochs,
        seed=settings.seed,
    )

    cohort = work / "cohort"
    cohort.mkdir(exist_ok=True)
    names = [f"case_{i:03d}" for i in range(settings.cases)]

    def simulate(i: int) -> None:
        say(f"simulating {names[i]}")
        simulate_case(
            cohort / names[i],
            case_seed(settings.seed, i),
            frames=settings.frames,
            group="A" if i % 2 == 0 else "B",
            profile=settings.profile,
            preview=False,
        )

    claim_each(
        range(settings.cases),
        lambda i: cohort / f".claim_{i}.lock",
        lambda i: (cohort / names[i] / "case.json").is_file(),
        simulate,
    )
    wait_for(cohort / name / "case.json" for name in names)
    cases = b._cohort_cases(cohort)
    fold_of = b.assign_folds(
        [c.patient for c in cases], settings.folds, settings.seed, strata=[c.group for c in cases]
    )
    # The long pretrainings first, so that the two processes end together.
    order = sorted(trainings, key=lambda t: {"full": 0, "no-decoder": 9}.get(t.name, 5))
    for fold in folds:
        run_fold(work / f"fold_{fold}", fold, cases, fold_of, order, methods, settings)
    say("done")


def run_fold(
    fold_dir: Path,
    fold: int,
    cases: list[Any],
    fold_of: list[int],
    trainings: list[Any],
    methods: list[Any],
    settings: Any,
) -> None:
    """Pretrain what no other process has taken, then register the held-out cases likewise."""
    train = [c for c, f in zip(cases, fold_of, strict=True) if f != fold]
    test = [c for c, f in zip(cases, fold_of, strict=True) if f == fold]
    record = {t.name: fold_dir / "trainings" / f"{t.name}.json" for t in trainings}
    result = {c.case_id: fold_dir / "results" / f"{c.case_id}.json" for c in test}
    for sub in ("trainings", "results"):
        (fold_dir / sub).mkdir(parents=True, exist_ok=True)
    say(f"fold {fold}: held out {[c.case_id for c in test]}")

    def pretrain(spec: Any) -> None:
        say(f"fold {fold}: pretraining {spec.name}")
        _, run = b._pretrain_one(spec, fold, train, fold_dir, settings, "cpu", False, say)
        atomic_write_text(record[spec.name], json.dumps(json_ready(run)) + "\n")
        say(f"fold {fold}: {spec.name} done ({run['seconds_this_run']:.0f} s)")

    claim_each(
        trainings,
        lambda t: fold_dir / f".claim_{t.name}.lock",
        lambda t: record[t.name].is_file(),
        pretrain,
    )
    wait_for(record.values())
    if all(p.is_file() for p in result.values()):
        return  # a finished fold (carried without its checkpoints)
    models = {
        t.name: load_registration_model(fold_dir / f"{t.name}.pt", device="cpu") for t in trainings
    }

    def register(case: Any) -> None:
        say(f"fold {fold}: registering {case.case_id}")
        rows, description = b._register_case(case, fold, models, methods, settings, "cpu")
        text = json.dumps({"rows": rows, "description": description}) + "\n"
        atomic_write_text(result[case.case_id], text)
        say(f"fold {fold}: {case.case_id} done ({description['seconds']:.0f} s)")

    claim_each(
        test,
        lambda c: fold_dir / f".claim_{c.case_id}.lock",
        lambda c: result[c.case_id].is_file(),
        register,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(f) for f in sys.argv[2:]])

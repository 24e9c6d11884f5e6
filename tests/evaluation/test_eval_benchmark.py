"""``kidneyreg benchmark``: fold splitting, formatting, the plan, and the --quick run end to end."""

from __future__ import annotations

import csv
import json
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kidneyreg.cli import app, main
from kidneyreg.errors import InputError
from kidneyreg.evaluation.benchmark import (
    FRAME_COLUMNS,
    OUTPUT_FILES,
    TABLE_KEYS,
    TABLE_METRICS,
    BenchmarkResult,
    adaptation_cycle,
    assign_folds,
    benchmark_plan,
    format_mean_std,
    read_baselines,
    removal_plan,
    run_benchmark,
    summarise_method,
)
from kidneyreg.io.lock import LOCKING_AVAILABLE, FileLock

runner = CliRunner()
# --quick: 4 cases of 10 frames, 2 folds, 2 Appendix H repeats.
QUICK_CASES, QUICK_FRAMES, QUICK_REPEATS = 4, 10, 2
TABLE_COLUMNS = ["Method", *(label for _, label in TABLE_METRICS), "Frames", "Cases"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def test_format_mean_std_hand_values() -> None:
    assert format_mean_std(3.9712, 1.3749) == "3.97 ± 1.37"
    assert format_mean_std(1.0, 0.5) == "1.00 ± 0.50"
    assert format_mean_std(12.3456, 0.04, digits=1) == "12.3 ± 0.0"
    assert format_mean_std(2.0, math.nan) == "2.00 ± n/a"
    assert format_mean_std(math.nan, 1.0) == "n/a"


def test_folds_keep_patients_together_and_spread_groups() -> None:
    # Four patients, two per group: with 2 folds each fold must get one A and one B patient.
    patients = ["a", "a", "b", "c", "d", "d"]
    groups = ["A", "A", "A", "B", "B", "B"]
    for seed in range(6):
        folds = assign_folds(patients, 2, seed, strata=groups)
        assert folds[0] == folds[1] and folds[4] == folds[5]
        by_fold = {
            f: sorted({g for g, k in zip(groups, folds, strict=True) if k == f}) for f in (0, 1)
        }
        assert by_fold == {0: ["A", "B"], 1: ["A", "B"]}
        assert assign_folds(patients, 2, seed, strata=groups) == folds  # deterministic
    # Five patients in three folds: patient counts 2, 2, 1 and every patient in one fold.
    five = ["p1", "p2", "p3", "p4", "p5"]
    folds = assign_folds(five, 3, seed=3)
    assert sorted(np.bincount(folds, minlength=3).tolist()) == [1, 2, 2]
    # One fold per patient: a permutation of the folds.
    assert sorted(assign_folds(five, 5, seed=1)) == [0, 1, 2, 3, 4]
    assert len({tuple(assign_folds(five, 2, seed=s)) for s in range(8)}) > 1  # seed matters
    with pytest.raises(InputError, match="at least 2"):
        assign_folds(five, 1, seed=0)
    with pytest.raises(InputError, match="5 folds need at least 5 patients, the cohort has 2"):
        assign_folds(["x", "x", "y"], 5, seed=0)


def test_adaptation_cycle_leaves_test_frames() -> None:
    assert adaptation_cycle(np.arange(0, 60), 121).tolist() == list(range(60))
    assert adaptation_cycle(np.arange(4, 60), 121).tolist() == list(range(4, 60))
    # The whole short sequence is one (fallback) cycle: cut to the first half.
    assert adaptation_cycle(np.arange(10), 10).tolist() == [0, 1, 2, 3, 4]
    # 100 frames, cycle 0..79: 20 left < 25 -> first half.
    assert adaptation_cycle(np.arange(80), 100).tolist() == list(range(50))
    # 100 frames, cycle 0..74: 25 left -> kept.
    assert adaptation_cycle(np.arange(75), 100).tolist() == list(range(75))


def test_removal_plan() -> None:
    cases = [f"case_{i:03d}" for i in range(40)]
    for repeat in (1, 2, 3):
        plan = removal_plan(7, repeat, 0, cases, 1000)
        assert 0.01 <= plan.fraction <= 0.10
        assert len(plan.removed_cases) == round(plan.fraction * 40)
        assert set(plan.removed_cases) <= set(cases)
        assert plan.pairs == 1000 - max(1, round(plan.fraction * 1000))
        # Same share in every fold of a repeat, chosen cases per fold; deterministic.
        other = removal_plan(7, repeat, 1, cases, 1000)
        assert other.fraction == plan.fraction and other.pairs == plan.pairs
        assert removal_plan(7, repeat, 0, cases, 1000) == plan
    assert (
        removal_plan(7, 1, 0, cases, 1000).fraction != removal_plan(7, 2, 0, cases, 1000).fraction
    )
    # Tiny data: never removes every case, keeps at least one pair.
    tiny = removal_plan(0, 1, 0, ["only"], 1)
    assert tiny.removed_cases == () and tiny.pairs == 1


def test_plan_reuses_trainings() -> None:
    trainings, methods, specs = benchmark_plan(list(TABLE_KEYS), window=5, repeats=3)
    assert [t.name for t in trainings] == [
        "full",
        "no-mind",
        "no-decoder",
        "no-hierarchical",
        "window-1",
        "window-3",
        "removal-1",
        "removal-2",
        "removal-3",
    ]
    keys = [m.key for m in methods]
    assert len(keys) == len(set(keys))
    assert {"initial", "pretrained", "one-cycle", "one-shot", "five-shot", "scratch"} <= set(keys)
    assert [s.key for s in specs] == list(TABLE_KEYS)
    # Every row refers to a planned method; window 5 is the full model.
    planned = set(keys)
    assert all(row.method in planned for spec in specs for row in spec.rows)
    app_g = next(s for s in specs if s.key == "appG")
    assert [r.method for r in app_g.rows] == ["window-1", "window-3", "one-cycle", "initial"]
    only4, methods4, _ = benchmark_plan(["table4"])
    assert [t.name for t in only4] == ["full"]
    assert {m.key for m in methods4} == {"initial", "one-cycle"}
    with pytest.raises(InputError, match="unknown table"):
        benchmark_plan(["table9"])
    with pytest.raises(InputError, match="at least 2 repeats"):
        benchmark_plan(["appH"], repeats=1)


def test_summarise_method_hand_values() -> None:
    rows = [
        {"method": "m", "case": "c1", "group": "A", "test": 1, "tre": 1.0, "mcd_ctus": 2.0},
        {"method": "m", "case": "c1", "group": "A", "test": 1, "tre": 3.0, "mcd_ctus": math.nan},
        {"method": "m", "case": "c2", "group": "B", "test": 1, "tre": 8.0, "mcd_ctus": 4.0},
        {"method": "m", "case": "c2", "group": "B", "test": 0, "tre": 100.0, "mcd_ctus": 100.0},
        {"method": "other", "case": "c1", "group": "A", "test": 1, "tre": 50.0, "mcd_ctus": 1.0},
    ]
    summary, n_cases = summarise_method(rows, "m")
    assert n_cases == 2
    assert summary["tre"].mean == pytest.approx(4.0)  # (1 + 3 + 8) / 3
    assert summary["tre"].std == pytest.approx(math.sqrt(26 / 3))  # population std
    assert summary["mcd_ctus"].mean == pytest.approx(3.0) and summary["mcd_ctus"].n_missing == 1
    group_a, n_a = summarise_method(rows, "m", "A")
    assert n_a == 1 and group_a["tre"].mean == pytest.approx(2.0) and group_a["tre"].std == 1.0
    assert math.isnan(summarise_method(rows, "absent")[0]["tre"].mean)


def _write_baseline(path: Path, cases: list[str]) -> Path:
    rng = np.random.default_rng(0)
    lines = [
        "method,learning,case,frame,test,hd_ctus,mcd_ctus,hd_ctct,mcd_ctct,tre,plane_angle_deg"
    ]
    for learning in ("one-step", "two-step"):
        for case in cases:
            for frame in range(3):
                values = ",".join(f"{v:.3f}" for v in rng.uniform(1.0, 9.0, 6))
                lines.append(f"VoxelMorph,{learning},{case},{frame},1,{values}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_baselines(tmp_path: Path) -> None:
    good = _write_baseline(tmp_path / "vm.csv", ["case_000", "case_001"])
    rows, names = read_baselines([good], {"case_000": "A", "case_001": "B"})
    assert names == ["VoxelMorph"] and len(rows) == 12
    assert {r["method"] for r in rows} == {
        "baseline:VoxelMorph:one-step",
        "baseline:VoxelMorph:two-step",
    }
    assert {r["group"] for r in rows if r["case"] == "case_001"} == {"B"}
    bad = tmp_path / "bad.csv"
    bad.write_text("method,case,frame,tre\nX,case_000,0,1.0\n", encoding="utf-8")
    with pytest.raises(InputError, match="lack the column"):
        read_baselines([bad])
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(
        "method,learning,case,frame,tre\nX,three-step,case_000,0,1\n", encoding="utf-8"
    )
    with pytest.raises(InputError, match="line 2: learning must be one-step or two-step"):
        read_baselines([wrong])


# ----------------------------------------------------------------------------------------------
# --quick end to end
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkResult:
    root = tmp_path_factory.mktemp("bench")
    baseline = _write_baseline(root / "voxelmorph.csv", [f"case_{i:03d}" for i in range(4)])
    return run_benchmark(None, root / "out", quick=True, device="cpu", baselines=[baseline])


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_quick_writes_every_output(quick: BenchmarkResult) -> None:
    out = quick.out_dir
    for name in (*OUTPUT_FILES, *(f"{key}.csv" for key in TABLE_KEYS)):
        assert (out / name).is_file(), name
    for figure in ("box_tre.png", "box_mcd_ctct.png", "box_mcd_ctus.png", "phase_tre.png"):
        assert (out / "figures" / figure).stat().st_size > 0
    assert quick.markdown == out / "benchmark.md"
    text = quick.markdown.read_text(encoding="utf-8")
    assert "Table 2: ablation study" in text and "ground-truth kidney masks" in text
    assert "figures/box_tre.png" in text
    # Nothing is left beside the output: no staging folder, no work folder.
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "voxelmorph.csv"]


@pytest.mark.slow
def test_quick_tables_have_the_paper_layout(quick: BenchmarkResult) -> None:
    expected_rows = {
        "table2": 6,
        "table3": 3 + 2,  # + VoxelMorph one-step and two-step
        "table4": 4 + 2,  # + VoxelMorph two-step, groups A and B
        "appF": 6,
        "appG": 4,
        "appH": 1 + QUICK_REPEATS + 1,
    }
    assert list(quick.tables) == list(TABLE_KEYS)
    for key, table in quick.tables.items():
        assert table.columns == TABLE_COLUMNS, key
        assert len(table.rows) == expected_rows[key], key
        records = _csv_rows(quick.out_dir / f"{key}.csv")
        assert len(records) == expected_rows[key]
        for record in records:
            for name, _ in TABLE_METRICS:
                value = float(record[f"{name}_mean"])
                assert math.isfinite(value), (key, record["row"], name)
                assert float(record[f"{name}_std"]) >= 0.0
    table2 = quick.tables["table2"]
    assert table2.rows[0][0].startswith("Ours") and table2.rows[-1][0].startswith("Initial")
    # Cells are "mean ± std"; each method row counts every held-out case.
    assert all(" ± " in cell for row in table2.rows for cell in row[1:7])
    assert all(row[8] == QUICK_CASES for row in table2.rows)
    table4 = _csv_rows(quick.out_dir / "table4.csv")
    assert [r["group"] for r in table4] == ["A", "B", "A", "B", "A", "B"]
    assert all(int(r["n_cases"]) == QUICK_CASES // 2 for r in table4)
    assert any("VoxelMorph, two-step" in row[0] for row in quick.tables["table3"].rows)
    assert quick.headline is table2


@pytest.mark.slow
def test_quick_frames_and_config(quick: BenchmarkResult) -> None:
    frames = _csv_rows(quick.out_dir / "frames.csv")
    assert list(frames[0]) == list(FRAME_COLUMNS)
    ours = [r for r in frames if not r["method"].startswith("baseline:")]
    methods = {r["method"] for r in ours}
    assert len(ours) == len(methods) * QUICK_CASES * QUICK_FRAMES
    # The adaptation cycle is the first half of each short sequence; the rest is scored.
    for row in ours:
        assert row["test"] == str(int(int(row["frame"]) >= QUICK_FRAMES // 2))
    config = json.loads((quick.out_dir / "config.json").read_text(encoding="utf-8"))
    assert config["settings"]["quick"] is True and config["settings"]["profile"] == "tiny"
    assert set(config["seeds"]) >= {"benchmark", "cohort", "folds", "pretraining", "adaptation"}
    assert len(config["simulated_cases"]) == QUICK_CASES
    assert {c["group"] for c in config["simulated_cases"]} == {"A", "B"}
    fold_of = {c["case"]: c["fold"] for c in config["cases"]}
    for row in ours:  # every case was held out in its own fold only
        assert int(row["fold"]) == fold_of[row["case"]]
    runs = config["training_runs"]
    assert len(runs) == 2 * 8  # 2 folds x 8 distinct trainings
    for run in runs:
        assert not set(run["train_cases"]) & {c for c, f in fold_of.items() if f == run["fold"]}
    assert config["runtime_s"] > 0 and "kidneyreg benchmark" in config["command"]


@pytest.mark.slow
def test_cli_quick_replaces_the_output_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    out.mkdir()
    (out / "stale.txt").write_text("old run", encoding="utf-8")
    args = ["benchmark", "--quick", "--out", str(out), "--tables", "table4", "--seed", "1"]
    work = tmp_path / ".bench.benchmark-work"
    # One fold alone (as one of several parallel processes would): work only, no report.
    # Another process setting up the work folder (simulating the cohort) makes this one wait.
    setup = FileLock(tmp_path / ".bench.benchmark-work.lock")
    setup.acquire()
    timer = threading.Timer(1.0, setup.release)
    timer.start()
    result = runner.invoke(app, [*args, "--only-fold", "1"])
    timer.join()
    assert result.exit_code == 0, result.output
    if LOCKING_AVAILABLE:
        assert "waiting for another benchmark process to finish setting up" in result.output
    assert "run again without --only-fold" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    assert (work / "fold_1" / "full.pt").is_file() and not (work / "fold_0").exists()
    fold_1_results = sorted((work / "fold_1" / "results").glob("*.json"))
    assert fold_1_results
    records = sorted((work / "fold_1" / "trainings").glob("*.json"))
    assert [p.stem for p in records] == ["full"]
    # A finished fold travels as its results and training records alone (no checkpoints).
    for checkpoint in (work / "fold_1").glob("*.pt"):
        checkpoint.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in [*records, *fold_1_results]}
    result = runner.invoke(app, [*args, "--keep-work"])
    assert result.exit_code == 0, result.output
    assert "Table 4" in result.output and f"wrote {out / 'benchmark.md'}" in result.output
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.glob("*.csv")) == ["frames.csv", "table4.csv"]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["settings"]["seed"] == 1 and config["settings"]["tables"] == ["table4"]
    # The fold done alone was reused, not redone.
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert not (work / "fold_1" / "full.pt").exists()
    assert sorted(r["fold"] for r in config["training_runs"]) == [0, 1]
    assert {c["fold"] for c in config["cases"]} == {0, 1}
    assert (work / "fold_0" / "full.pt").is_file() and (work / "cohort").is_dir()
    # The same settings again: checkpoints and per-case results are reused, same outputs.
    before = {
        name: (out / name).read_text(encoding="utf-8") for name in ("table4.csv", "frames.csv")
    }
    run_benchmark(None, out, quick=True, tables=["table4"], seed=1, device="cpu")
    for name, text in before.items():
        assert (out / name).read_text(encoding="utf-8") == text, name
    resumed = json.loads((out / "config.json").read_text(encoding="utf-8"))
    # Case results come from the work folder verbatim (their timings too).
    assert resumed["case_runs"] == config["case_runs"]
    assert not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]  # the lock file went too


def test_only_fold_out_of_range_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--only-fold: folds are numbered 0\.\.1, got 2"):
        run_benchmark(None, tmp_path / "out", quick=True, only_folds=[0, 2], device="cpu")
    with pytest.raises(InputError, match="got none"):
        run_benchmark(None, tmp_path / "out", quick=True, only_folds=[], device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_tables_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["kidneyreg", "benchmark", "--quick", "--out", str(tmp_path / "o"), "--tables", "tab9"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: --tables: unknown table(s) tab9")
    assert not (tmp_path / "o").exists()


def test_cli_help_documents_the_full_setting() -> None:
    result = runner.invoke(app, ["benchmark", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for option in ("--quick", "--profile", "--folds", "--epochs", "--pairs", "--tables", "--seed"):
        assert option in text
    assert "Full setting (defaults): --profile cpu, 5 folds" in text


def test_damaged_work_file_is_a_one_line_error(tmp_path: Path) -> None:
    from kidneyreg.evaluation.benchmark import _read_json

    damaged = tmp_path / "fold_0" / "results" / "case_000.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"rows": [', encoding="utf-8")  # cut short, as by a full disk
    with pytest.raises(InputError, match=r"case_000\.json: unreadable benchmark work file"):
        _read_json(damaged)


@pytest.mark.skipif(not LOCKING_AVAILABLE, reason="no flock on this platform")
def test_work_folder_in_use_by_a_run_with_other_settings_is_not_emptied(tmp_path: Path) -> None:
    from kidneyreg.evaluation.benchmark import _work_folder

    work = tmp_path / ".out.benchmark-work"
    (work / "fold_0" / "results").mkdir(parents=True)
    (work / "settings.json").write_text('{"settings": "other"}\n', encoding="utf-8")
    kept = work / "fold_0" / "results" / "case_000.json"
    kept.write_text("{}", encoding="utf-8")
    other_run = FileLock(work / ".in-use.lock", shared=True)
    other_run.acquire()
    with pytest.raises(InputError, match="other settings that is still running"):
        run_benchmark(None, tmp_path / "out", quick=True, device="cpu")
    assert kept.is_file() and not (tmp_path / "out").exists()
    # Once that run has ended, the folder is emptied for the new settings.
    other_run.release()
    said: list[str] = []
    assert _work_folder(tmp_path / "out", {"settings": "new"}, said.append) == work
    assert not kept.exists() and said == [f"emptying {work}: it holds a run with other settings"]


@pytest.mark.slow
@pytest.mark.skipif(not LOCKING_AVAILABLE, reason="no flock on this platform")
# The benchmark records the short sequences' BreathingNotDetectedWarning with
# warnings.catch_warnings, which is process-wide: with two threads standing in for two processes
# one thread's recording can let the other's warning through (only in this test).
@pytest.mark.filterwarnings("ignore::kidneyreg.cycles.BreathingNotDetectedWarning")
def test_processes_sharing_a_fold_split_its_pretrainings_and_cases(tmp_path: Path) -> None:
    # Two runs of the same fold at once (threads stand in for processes: the locks conflict
    # between open files) each take the pretrainings and cases the other has not taken.
    out = tmp_path / "bench"
    logs: list[list[str]] = [[], []]
    failures: list[BaseException] = []

    def run(log: list[str]) -> None:
        try:
            run_benchmark(
                None,
                out,
                quick=True,
                tables=["table2"],
                only_folds=[0],
                device="cpu",
                log=log.append,
            )
        except BaseException as error:  # reported in the test thread
            failures.append(error)

    threads = [threading.Thread(target=run, args=(log,)) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    said = [message for log in logs for message in log]
    trained = sorted(m.split()[3] for m in said if ": pretraining " in m)
    assert trained == ["full", "no-decoder", "no-hierarchical", "no-mind"]  # each once
    registered = [m.split()[3] for m in said if ": registering " in m]
    fold_0 = tmp_path / ".bench.benchmark-work" / "fold_0"
    assert sorted(registered) == sorted(p.stem for p in (fold_0 / "results").glob("*.json"))
    assert len(set(registered)) == len(registered) == 2


@pytest.mark.skipif(not LOCKING_AVAILABLE, reason="no flock on this platform")
def test_an_item_another_process_holds_is_skipped_then_waited_for(tmp_path: Path) -> None:
    from kidneyreg.evaluation.benchmark import _claimed_in_turn

    other = FileLock(tmp_path / "b.lock")  # another process works on "b"
    other.acquire()
    done: list[str] = []
    said: list[str] = []

    def work(item: str) -> None:
        done.append(item)
        if item == "c":  # the other process finishes "b" while this one works on "c"
            threading.Timer(0.5, other.release).start()

    _claimed_in_turn(
        ["a", "b", "c"],
        lambda item: tmp_path / f"{item}.lock",
        work,
        lambda item: f"{item}, which another process holds",
        said.append,
    )
    assert done == ["a", "c", "b"]
    assert said == ["waiting for b, which another process holds"]

"""Benchmark of ``kidneyreg simulate``: seconds per case and per frame, cpu and paper profiles.

Each run simulates one procedural case of ``--frames`` frames in memory (anatomy, CT, probe
placement, breathing, B-mode rendering, masks) and then writes its folder; the table gives the
median over ``--repeats`` runs with different seeds.

Usage::

    .venv/bin/python benchmarks/bench_simulate.py --frames 150 --repeats 3 --profiles cpu paper

The numbers in ``docs/simulator/README.md`` come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kidneyreg.simulate.case import simulate_case_data, write_case


def run_once(profile: str, seed: int, frames: int, out: Path) -> dict[str, float]:
    """Simulate and write one case; return its timings in seconds."""
    started = time.perf_counter()
    case = simulate_case_data(seed, frames=frames, group="mixed", profile=profile)
    simulated = time.perf_counter() - started
    mark = time.perf_counter()
    write_case(case, out / f"{profile}_{seed}", preview=True)
    written = time.perf_counter() - mark
    timings = case.info["timings"]
    return {
        "case_s": simulated + written,
        "simulate_s": simulated,
        "write_s": written,
        "anatomy_and_ct_s": timings["anatomy_and_ct_s"],
        "render_s": timings["render_s"],
        "render_per_frame_s": timings["render_s"] / frames,
        "case_per_frame_s": (simulated + written) / frames,
        "frame_rows": case.frames.shape[1],
        "frame_cols": case.frames.shape[2],
    }


def main() -> None:
    """Run the benchmark and print a Markdown table (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profiles", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for profile in args.profiles:
            runs = [run_once(profile, seed, args.frames, Path(tmp)) for seed in range(args.repeats)]
            results[profile] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(
        f"{args.frames} frames, median of {args.repeats} runs, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        "| profile | frame (rows x cols) | case total (s) | anatomy + CT (s) | render (s/frame) "
        "| writing (s) | total per frame (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for profile, r in results.items():
        print(
            f"| {profile} | {r['frame_rows']:.0f} x {r['frame_cols']:.0f} | {r['case_s']:.1f} "
            f"| {r['anatomy_and_ct_s']:.1f} | {r['render_per_frame_s']:.3f} | {r['write_s']:.1f} "
            f"| {r['case_per_frame_s']:.3f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

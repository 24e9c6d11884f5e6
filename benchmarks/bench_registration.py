"""Benchmark of the registration network: time and peak memory per window, per profile and variant.

For each profile and network variant, a fresh Python process (so that peak memory is its own)
builds the network and one window of random inputs, then measures

* ``forward``: inference (``torch.inference_mode``), what registering one frame costs;
* ``train``: forward + FIM loss on the sampled slabs + backward, what one training step costs
  (without the optimiser update);
* peak memory: the growth of the process's peak resident memory over its size after set-up,
  first after the forward runs, then after the training runs;

as medians (and minima) over ``--repeats`` runs after one warm-up run, with ``--threads`` torch
threads (2 = the project's CPU target). With the default variant (``slab2``) it also times the
loss alone (forward + backward in the 6 parameters of each frame) with the slab sampler and with
full-volume warps.

Variants (``--variants``): ``paper`` (the paper's whole-volume decoder, feature maps only: 2
input channels), ``paper-4ch`` (+ images: 4 channels), ``paper-nchw`` (without channels-last),
``slab2`` (the default: finest two decoder levels on the R-L slab +-2 voxels), ``slab2-4ch``,
``slab2-nchw``, ``slab4`` (+-4), ``slab4-1lvl`` (slab on the finest level only), ``no-decoder`` and
``flat`` (the ablations without decoder / without hierarchical regression).

Usage::

    .venv/bin/python benchmarks/bench_registration.py --profiles tiny cpu --repeats 7
    .venv/bin/python benchmarks/bench_registration.py --profiles paper --variants paper slab4

The numbers in the registration section of the docs come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"decoder_slab_half_width": None},
    "paper-4ch": {"decoder_slab_half_width": None, "use_images": True},
    "paper-nchw": {"decoder_slab_half_width": None, "channels_last": False},
    "slab2": {"decoder_slab_half_width": 2},
    "slab2-4ch": {"decoder_slab_half_width": 2, "use_images": True},
    "slab2-nchw": {"decoder_slab_half_width": 2, "channels_last": False},
    "slab4": {"decoder_slab_half_width": 4},
    "slab4-1lvl": {"decoder_slab_half_width": 4, "decoder_slab_levels": 1},
    "no-decoder": {"use_decoder": False},
    "flat": {"hierarchical": False},
}
#: slab2 is the default configuration.
DEFAULT_VARIANTS = [
    "paper",
    "paper-4ch",
    "paper-nchw",
    "slab2",
    "slab2-4ch",
    "slab2-nchw",
    "slab4",
    "no-decoder",
]


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()  # warm-up: oneDNN primitive creation, allocator growth
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), min(runs)


def worker(profile: str, variant: str, repeats: int, threads: int, batch: int) -> dict[str, Any]:
    """Measure one (profile, variant) in this process; returns seconds and MB."""
    import torch

    from kidneyreg.geometry import euler_to_matrix_torch
    from kidneyreg.registration import RegistrationConfig, RegistrationNet, fim_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = RegistrationConfig.from_profile(profile, **VARIANTS[variant])
    net = RegistrationNet(config)
    nx, ny, nz = config.volume_shape
    fixed = torch.zeros(batch, 2, nz, ny, nx)
    lo = nx // 2 - config.window // 2
    fixed[..., lo : lo + config.window] = torch.rand(batch, 2, nz, ny, config.window)
    moving = torch.rand(batch, 2, nz, ny, nx)
    base = _peak_rss_mb()

    def forward() -> None:
        with torch.inference_mode():
            net(fixed, moving)

    net.eval()
    fwd_median, fwd_min = _time(forward, repeats)
    fwd_peak = _peak_rss_mb() - base

    def train() -> None:
        net.zero_grad(set_to_none=True)
        out = net(fixed, moving)
        net.loss(out, fixed, moving).total.backward()

    net.train()
    train_median, train_min = _time(train, repeats)
    train_peak = _peak_rss_mb() - base
    result: dict[str, Any] = {
        "profile": profile,
        "variant": variant,
        "volume": f"{nx}x{ny}x{nz}",
        "window": config.window,
        "batch": batch,
        "threads": threads,
        "parameters": net.num_parameters(),
        "forward_s": fwd_median / batch,
        "forward_min_s": fwd_min / batch,
        "forward_peak_mb": fwd_peak / batch,
        "train_s": train_median / batch,
        "train_min_s": train_min / batch,
        "train_peak_mb": train_peak / batch,
    }
    if variant == "slab2":
        params = torch.zeros(batch, config.window, 6)
        params[..., 3:] = 2.0
        params.requires_grad_(True)
        for warp in ("slab", "full"):

            def loss_only(warp: str = warp) -> None:
                params.grad = None
                terms = fim_loss(euler_to_matrix_torch(params), fixed, moving, config, warp=warp)  # type: ignore[arg-type]
                terms.total.backward()

            median, _ = _time(loss_only, repeats)
            result[f"loss_{warp}_s"] = median / batch
    return result


def _run_worker(profile: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--profiles",
        profile,
        "--variants",
        variant,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{profile}/{variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(results: list[dict[str, Any]], profile: str, a: str, b: str, key: str) -> str:
    rows = {r["variant"]: r for r in results if r["profile"] == profile}
    if a not in rows or b not in rows:
        return ""
    return f"{rows[a][key] / rows[b][key]:.2f}"


def main() -> None:
    """Run the benchmark, print Markdown tables (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["tiny", "cpu"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="Windows per forward pass.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(args.profiles[0], args.variants[0], args.repeats, args.threads, args.batch)
        print(json.dumps(result))
        return

    results = []
    for profile in args.profiles:
        for variant in args.variants:
            result = _run_worker(profile, variant, args)
            results.append(result)
            print(
                f"  {profile:5s} {variant:11s} forward {result['forward_s'] * 1e3:8.1f} ms  "
                f"train {result['train_s'] * 1e3:8.1f} ms",
                file=sys.stderr,
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"per window (Nw = 5, batch {args.batch}), median (min) of {args.repeats} runs, "
        f"{args.threads} torch threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, load average {load:.1f}"
    )
    print()
    print(
        "| profile | variant | params | forward ms | frames/s | forward peak MB "
        "| fwd+bwd ms | fwd+bwd peak MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['profile']} ({r['volume']}) | {r['variant']} | {r['parameters']:,} "
            f"| {r['forward_s'] * 1e3:.1f} ({r['forward_min_s'] * 1e3:.1f}) "
            f"| {1.0 / r['forward_s']:.1f} | {r['forward_peak_mb']:.0f} "
            f"| {r['train_s'] * 1e3:.1f} ({r['train_min_s'] * 1e3:.1f}) "
            f"| {r['train_peak_mb']:.0f} |"
        )
    print()
    print("| profile | ratio | forward | fwd+bwd |")
    print("| --- | --- | --- | --- |")
    pairs = [
        ("paper-4ch", "paper", "4 vs 2 input channels (whole-volume decoder)"),
        ("slab2-4ch", "slab2", "4 vs 2 input channels (slab decoder)"),
        ("paper", "slab2", "whole-volume decoder vs slab +-2 (speed-up)"),
        ("paper", "slab4", "whole-volume decoder vs slab +-4 (speed-up)"),
        ("slab4", "slab2", "slab +-4 vs slab +-2"),
        ("paper-nchw", "paper", "channels-first vs channels-last (whole volume)"),
        ("slab2-nchw", "slab2", "channels-first vs channels-last (slab)"),
        ("slab2", "no-decoder", "default vs encoder only"),
    ]
    for profile in args.profiles:
        for a, b, label in pairs:
            fwd = _ratio(results, profile, a, b, "forward_s")
            trn = _ratio(results, profile, a, b, "train_s")
            if fwd:
                print(f"| {profile} | {label} | {fwd} | {trn} |")
    loss_rows = [r for r in results if "loss_slab_s" in r]
    if loss_rows:
        print()
        print(
            "| profile | measured in | FIM loss fwd+bwd, slab sampler ms "
            "| with full-volume warps ms |"
        )
        print("| --- | --- | --- | --- |")
        for r in loss_rows:
            print(
                f"| {r['profile']} | {r['variant']} | {r['loss_slab_s'] * 1e3:.1f} "
                f"| {r['loss_full_s'] * 1e3:.1f} |"
            )
    if args.json is not None:
        from kidneyreg.io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark of the onsite pipeline: one-cycle adaptation time and per-frame registration time.

For each profile it simulates one case (seed 0, two breathing cycles), builds a
:class:`kidneyreg.pipeline.Registrar` with the case's kidney masks (so the timings are those of
the registration path, not of the feature networks; ``--us-network`` takes the U/S maps from
the bundled feature network instead, as ``kidneyreg register`` does, its time counted in the
U/S preparation) and measures, as medians over repeated runs:

* ``register``: :meth:`Registrar.register` on the whole prepared sequence, milliseconds per frame
  (windows built, batched network inference with the per-frame FIM loss terms, ``M_k``
  composed), after one warm-up run; and ``ms_per_frame`` with the U/S preparation included
  (``--frame-step m``: the network runs on every ``m``-th frame and the poses between are
  interpolated, ``1 / m`` of the network calls; the streaming path registers every window);
* ``stream``: :meth:`Registrar.register_frame` on single windows (what a live scanner feed
  costs per frame, no batching);
* ``adapt``: :meth:`Registrar.adapt` with the paper's one-cycle strategy (2 epochs on the windows
  of the first detected breathing cycle), seconds, the model reset to its initial weights before
  every run;
* ``plane search`` (``--sinus``: renal-sinus masks from the case's label maps for the CT and
  the U/S): the two plane searches the adaptation then runs (before and after it), seconds.

The model is ``--model`` (a checkpoint) or, without one, a freshly initialised network of the
configuration ``kidneyreg pretrain`` builds for the profile (``--slab H`` sets the R-L slab
half width of the finest decoder levels, ``--slab -1`` the paper's whole-volume decoder): the
weights do not change the cost.

Targets (issue 6): at the ``cpu`` profile, registration faster than the U/S frame rate (20 fps,
50 ms per frame) and adaptation well under the paper's 2-3 minutes.

Usage::

    .venv/bin/python benchmarks/bench_pipeline.py --profiles cpu --repeats 5 --adapt-repeats 3
    .venv/bin/python benchmarks/bench_pipeline.py --profiles paper --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kidneyreg.pipeline import ADAPTED_REFINEMENTS


def _model(profile: str, path: Path | None, slab: int | None) -> Any:
    from kidneyreg.pipeline import load_registration_model
    from kidneyreg.registration import RegistrationConfig, RegistrationNet

    if path is not None:
        return load_registration_model(path, profile=profile)
    torch.manual_seed(0)
    overrides = {} if slab is None else {"decoder_slab_half_width": None if slab < 0 else slab}
    return RegistrationNet(RegistrationConfig.from_profile(profile, **overrides)).eval()


def bench_profile(profile: str, args: argparse.Namespace) -> dict[str, Any]:
    """All measurements of one profile."""
    from kidneyreg.io.us import UltrasoundSequence
    from kidneyreg.pipeline import Registrar
    from kidneyreg.simulate.case import simulate_case_data

    started = time.perf_counter()
    case = simulate_case_data(0, frames=args.frames, profile=profile)
    sequence = UltrasoundSequence(
        case.frames.astype(np.float32), (case.pixel_size, case.pixel_size), case.frame_rate
    )
    simulate_s = time.perf_counter() - started
    ct_sinus, us_sinus = None, None
    if args.sinus:
        ct_sinus, us_sinus = case.sinus_masks()
    registrar = Registrar(
        case.ct,
        _model(profile, args.model, args.slab),
        ct_mask=case.ct_kidney_mask,
        ct_sinus_mask=ct_sinus,
        device=args.device,
        batch_size=args.batch_size,
        refinements=args.refinements,
        frame_step=args.frame_step,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = registrar.prepare(
            sequence, None if args.us_network else case.us_kidney_mask, sinus_masks=us_sinus
        )
    n = prepared.n_frames

    registrar.register(prepared)  # warm-up: allocator, oneDNN primitives, CUDA kernels
    per_frame, with_prep = [], []
    for _ in range(args.repeats):
        result = registrar.register(prepared)
        per_frame.append(result.timing["network_ms_per_frame"])
        with_prep.append(result.timing["ms_per_frame"])

    nw = int(registrar.profile.window)
    stream = []
    for k in np.linspace(nw // 2, n - 1 - nw // 2, args.repeats).round().astype(int):
        window = slice(int(k) - nw // 2, int(k) + nw // 2 + 1)
        frame = registrar.register_frame(
            case.frames[window],
            pixel_size=(case.pixel_size, case.pixel_size),
            masks=None if args.us_network else case.us_kidney_mask[window],
        )
        stream.append(1000.0 * frame.seconds)

    adapt_s, search_s, steps, windows = [], [], 0, 0
    for _ in range(args.adapt_repeats):
        registrar.reset()
        record = registrar.adapt(prepared, strategy="one-cycle", batch_size=args.adapt_batch_size)
        adapt_s.append(record.seconds)
        if registrar.plane_search is not None:
            search_s.append(registrar.plane_search.seconds)
        steps, windows = record.steps, len(record.frames)
    config = registrar.config
    return {
        "profile": profile,
        "device": str(registrar.device),
        "threads": torch.get_num_threads(),
        "frames": n,
        "frame_rate": case.frame_rate,
        "cycles_detected": bool(prepared.cycles is not None and prepared.cycles.detected),
        "model": "checkpoint " + str(args.model) if args.model else "fresh network",
        "decoder_slab_half_width": config.decoder_slab_half_width,
        "batch_size": registrar.batch_size,
        "refinements": registrar.refinements,
        "frame_step": registrar.frame_step,
        "us_features": "network" if args.us_network else "masks",
        "register_ms_per_frame": statistics.median(per_frame),
        "register_ms_per_frame_min": min(per_frame),
        "register_with_us_preparation_ms_per_frame": statistics.median(with_prep),
        "register_fps": 1000.0 / statistics.median(per_frame),
        "stream_ms_per_frame": statistics.median(stream),
        "adapt_s": statistics.median(adapt_s) if adapt_s else None,
        "adapt_s_min": min(adapt_s) if adapt_s else None,
        "plane_search_s": statistics.median(search_s) if search_s else None,
        "adapt_steps": steps,
        "adapt_windows": windows,
        "adapt_batch_size": args.adapt_batch_size,
        "repeats": args.repeats,
        "adapt_repeats": args.adapt_repeats,
        "simulate_s": simulate_s,
        "ct_preparation_s": registrar.ct_seconds,
    }


def main() -> None:
    """Run the benchmark, print a Markdown table (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["cpu"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model", type=Path, default=None, help="Registration checkpoint.")
    parser.add_argument(
        "--slab", type=int, default=None, help="Decoder slab half width (-1: whole volume)."
    )
    parser.add_argument("--frames", type=int, default=None, help="Frames (default: 2 cycles).")
    parser.add_argument("--repeats", type=int, default=5, help="Registration runs.")
    parser.add_argument("--adapt-repeats", type=int, default=3, help="Adaptation runs.")
    parser.add_argument("--batch-size", type=int, default=None, help="Windows per forward pass.")
    parser.add_argument("--adapt-batch-size", type=int, default=1, help="Windows per step.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument(
        "--refinements",
        type=int,
        default=ADAPTED_REFINEMENTS,
        help="Extra passes per frame (default: what register runs after adaptation).",
    )
    parser.add_argument(
        "--frame-step",
        type=int,
        default=1,
        help="Network on every N-th frame, the poses between interpolated (1: every frame).",
    )
    parser.add_argument(
        "--us-network",
        action="store_true",
        help="U/S feature maps from the bundled network (its time is in '+ U/S prep').",
    )
    parser.add_argument(
        "--sinus",
        action="store_true",
        help="Renal-sinus masks for CT and U/S: the adaptation also runs its plane searches.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    if args.repeats < 1 or args.adapt_repeats < 0:
        parser.error("--repeats must be >= 1 and --adapt-repeats >= 0")
    torch.set_num_threads(args.threads)
    results = [bench_profile(profile, args) for profile in args.profiles]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print()
    print(
        "| profile | device | frames | register ms/frame (fps) | + U/S prep ms/frame "
        "| streaming ms/frame | one-cycle adaptation s (steps) | plane searches s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        adapt = "-" if r["adapt_s"] is None else f"{r['adapt_s']:.1f} ({r['adapt_steps']})"
        search = "-" if r["plane_search_s"] is None else f"{r['plane_search_s']:.1f}"
        print(
            f"| {r['profile']} | {r['device']} x{r['threads']} | {r['frames']} "
            f"| {r['register_ms_per_frame']:.0f} ({r['register_fps']:.1f}) "
            f"| {r['register_with_us_preparation_ms_per_frame']:.0f} "
            f"| {r['stream_ms_per_frame']:.0f} | {adapt} | {search} |"
        )
    if args.json is not None:
        from kidneyreg.io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

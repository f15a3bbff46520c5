"""One thread against several on small-tensor work: the measurement behind ``diffusion_lab.set_threads(1)``.

Each workload (sampling an exact 2-D target with a few samplers, at batches of thousands; the MMD^2 of the result to
the exact law) runs alternately with 1 intra-op thread and with N threads (default: every core torch sees), the
order flipped on every repeat so that drift in the machine's load hits both sides alike. The table reports the
median seconds of each side and their ratio t_N / t_1 (> 1: the extra threads cost time).

    python benchmarks/threads.py [--threads N] [--repeats R] [--quick] [--json PATH]

The numbers depend on the machine and on what else runs on it: a shared CPU is where the extra threads hurt most.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import diffusion_lab
from diffusion_lab.metrics import mmd2_exact
from diffusion_lab.samplers import sample
from diffusion_lab.schedules import get_schedule
from diffusion_lab.targets import get_target


def workloads(quick: bool):
    """(name, batch, fn) triples; fn() runs the work once."""
    target, schedule = get_target("ring8"), get_schedule("vp")
    field = target.field(schedule)
    batches = (1000, 4000) if quick else (1000, 4000, 16000)
    out = []
    for n in batches:
        x_T = target.marginal(schedule, schedule.t_max).sample(n, torch.Generator().manual_seed(0))
        for method, nfe in (("dpmpp_2m", 20), ("heun", 20), ("em", 50)):
            def run(method=method, nfe=nfe, x_T=x_T):
                sample(field, x_T, method, nfe=nfe, generator=torch.Generator().manual_seed(1))

            out.append((f"{method}, {nfe} NFE", n, run))
    x = target.sample(2000, torch.Generator().manual_seed(2))
    out.append(("MMD^2 to the exact law", 2000, lambda: mmd2_exact(x, target)))
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fn, threads: int, repeats: int) -> dict:
    """Median seconds with 1 and with ``threads`` threads, alternating (order flipped each repeat), after one warm-up
    run of each."""
    times = {1: [], threads: []}
    for n in (1, threads):
        with diffusion_lab.threads(n):
            fn()
    for r in range(repeats):
        for n in ((1, threads) if r % 2 == 0 else (threads, 1)):
            with diffusion_lab.threads(n):
                times[n].append(_time(fn))
    t1, tn = statistics.median(times[1]), statistics.median(times[threads])
    return {"seconds_1": t1, "seconds_n": tn, "ratio_n_over_1": tn / t1, "all_1": times[1], "all_n": times[threads]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help=f"the many-threads side (default: os.cpu_count() = {os.cpu_count()})")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side and workload (default 5)")
    p.add_argument("--quick", action="store_true", help="two batch sizes, three repeats")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.threads < 2:
        p.error(f"--threads must be >= 2 to compare with one thread, got {args.threads}")
    repeats = 3 if args.quick else args.repeats
    if repeats < 1:
        p.error(f"--repeats must be >= 1, got {repeats}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"1 vs {args.threads} intra-op threads, {repeats} alternating repeats, median seconds; "
          f"{os.cpu_count()} cores" + (f", load average {load[0]:.2f} at start" if load else ""))
    hdr = f"{'workload':26s} {'batch':>6s} {'t_1 [s]':>9s} {f't_{args.threads} [s]':>9s} {'t_N / t_1':>9s}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for name, n, fn in workloads(args.quick):
        m = measure(fn, args.threads, repeats)
        rows.append({"workload": name, "batch": n, "threads": args.threads, **m})
        print(f"{name:26s} {n:6d} {m['seconds_1']:9.4f} {m['seconds_n']:9.4f} {m['ratio_n_over_1']:9.2f}", flush=True)
    ratios = [r["ratio_n_over_1"] for r in rows]
    print(f"t_N / t_1: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")
    if args.json:
        from diffusion_lab._io import atomic_write

        doc = {"rows": rows, "threads": args.threads, "repeats": repeats, "cpu_count": os.cpu_count(),
               "load_average": load, "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "diffusion_lab": diffusion_lab.__version__,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

        def write(tmp):
            with open(tmp, "w") as fh:
                json.dump(doc, fh, indent=2)

        atomic_write(args.json, write)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""relayd beside itself: one throughput workload, several sets of relayd options, interleaved.

    scripts/compare_relayd.py --n 50 --mib 64 --repeat 4 "" "--spill-dir /dev/shm"

Each positional argument is one set of extra relayd options ("" = the defaults). Every set
gets its own relayd (one worker per CPU unless --workers), started once; each repeat runs
the throughput workload of scripts/bench on every set in turn, each run once every relayd
is idle (1 `curl -T -` producer, N receivers over one Python process per usable core, every
byte of every receiver compared with the payload), so noise hits all sets alike. Prints median GB/s and server CPU-seconds
per delivered GB, min–max, and the ratio of each set to the first. The question-sized
companion of scripts/bench: no peers.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lib import payload, servers, workloads  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "-"     # a tiny run may measure 0 CPU


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("options", nargs="+", help='relayd options per set, e.g. "" "--window 1M"')
    ap.add_argument("--n", type=int, default=50, help="receivers (default 50)")
    ap.add_argument("--mib", type=int, default=64, help="payload MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="compare-relayd-") as work, \
            contextlib.ExitStack() as stack:
        data = payload.PayloadCache(work).get(args.mib << 20)
        relays = [stack.enter_context(servers.RelaydServer(
            work, REPO, args.workers, label=o or "(defaults)", options=shlex.split(o)))
            for o in args.options]
        runs = {r.name: [] for r in relays}
        for repeat in range(args.repeat):
            for relay in relays:
                servers.settle(relays)
                figures = workloads.run_throughput(relay, data, args.n)
                runs[relay.name].append(figures)
                print(f"run {repeat + 1} {relay.name}: {figures['GB/s']:.3f} GB/s, "
                      f"{figures['CPU s/GB']:.3f} CPU-s/GB", flush=True)
    print(f"\nN = {args.n}, {args.mib} MiB, {args.workers} workers, medians of {args.repeat}")
    base = None
    for name, figures in runs.items():
        gbs = [f["GB/s"] for f in figures]
        cpu = [f["CPU s/GB"] for f in figures]
        med = statistics.median(gbs), statistics.median(cpu)
        base = base or med
        print(f"{name:30} {med[0]:.3f} GB/s ({min(gbs):.3f}–{max(gbs):.3f})  "
              f"{med[1]:.3f} CPU-s/GB ({min(cpu):.3f}–{max(cpu):.3f})  "
              f"ratio {ratio(med[0], base[0])} GB/s, {ratio(med[1], base[1])} CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

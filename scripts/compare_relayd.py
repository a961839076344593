#!/usr/bin/env python3
"""relayd beside itself: one workload, several sets of relayd options, interleaved.

    scripts/compare_relayd.py --n 50 --mib 64 --repeat 4 "" "--spill-dir /dev/shm"
    scripts/compare_relayd.py --token-pipes 1000 --n 2 --repeat 3 repo=/tmp/before ""
    scripts/compare_relayd.py --many-pipes 2000 --n 4 --repeat 6 repo=/tmp/before ""

Each positional argument is one set of extra relayd options ("" = the defaults); a set that
begins with `repo=PATH` runs the relayd of another checkout (e.g. a `git worktree` of an
older commit: before and after a change, in one sitting). Every set gets its own relayd (one
worker per CPU unless --workers), started once; each repeat runs one workload on every set
in turn, each run once every relayd is idle, so noise hits all sets alike. The default
workload is scripts/bench's throughput (1 `curl -T -` producer, N receivers over one Python
process per usable core, every byte of every receiver compared with the payload): median
GB/s and server CPU-seconds per delivered GB, min–max, and each set's ratio to the first.
`--latency` runs the latency workload instead, `--many-pipes P` scripts/bench's manypipes
(CPU ms per pipe), `--token-pipes P` many concurrent token streams (bench_lib/tokenpipes.py:
server CPU per line). The question-sized companion of scripts/bench: no peers.
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
from bench_lib import payload, servers, tokenpipes, workloads  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENCY_LINES, LATENCY_RATE, LATENCY_WARMUP = 1000, 200, 20   # as scripts/bench's full run


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "-"     # a tiny run may measure 0 CPU


def print_figure(runs: dict, title: str, args, key: str, unit: str, digits: int) -> None:
    """One figure per set: median (min–max) and its ratio to the first set's."""
    print(f"\n{title}, {args.workers} workers, medians of {args.repeat}")
    base = None
    for name, figures in runs.items():
        values = [f[key] for f in figures]
        med = statistics.median(values)
        base = base or med
        print(f"{name:40} {med:.{digits}f} {unit} ({min(values):.{digits}f}–"
              f"{max(values):.{digits}f})  ratio {ratio(med, base)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("options", nargs="+", help='relayd options per set, e.g. "" "--window 1M"')
    ap.add_argument("--n", type=int, default=50, help="receivers (default 50)")
    ap.add_argument("--mib", type=int, default=64, help="payload MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--content-length", action="store_true",
                    help="the producer uploads a file (curl -T FILE) instead of stdin (chunked)")
    ap.add_argument("--latency", action="store_true",
                    help="the latency workload instead (paced lines to N receivers: p50/p99)")
    ap.add_argument("--many-pipes", type=int, metavar="P",
                    help="scripts/bench's manypipes workload: P concurrent pipes of N "
                         "receivers, --pipe-kib each (Content-Length): server CPU ms per pipe")
    ap.add_argument("--pipe-kib", type=int, default=1, help="with --many-pipes (default 1)")
    ap.add_argument("--token-pipes", type=int, metavar="P",
                    help="P concurrent pipes of N receivers, each producer sending a 100-byte "
                         "line every 50 ms for 4 s: server CPU per line (bench_lib/tokenpipes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="compare-relayd-") as work, \
            contextlib.ExitStack() as stack:
        size = (args.many_pipes * args.pipe_kib << 10) if args.many_pipes else args.mib << 20
        data = payload.PayloadCache(work).get(size)
        relays = []
        for o in args.options:
            words, repo = shlex.split(o), REPO
            if words and words[0].startswith("repo="):
                repo = words.pop(0)[len("repo="):]
            relays.append(stack.enter_context(servers.RelaydServer(
                work, repo, args.workers, label=o or "(defaults)", options=words)))
        runs = {r.name: [] for r in relays}
        for repeat in range(args.repeat):
            for relay in relays:
                servers.settle(relays)
                if args.many_pipes:
                    figures = workloads.run_many_pipes(relay, data, args.many_pipes, args.n)
                    runs[relay.name].append(figures)
                    print(f"run {repeat + 1} {relay.name}: {figures['CPU ms/pipe']:.3f} CPU-ms "
                          f"per pipe, {figures['receivers refused']} receivers refused",
                          flush=True)
                    continue
                if args.token_pipes:
                    figures = tokenpipes.run_token_pipes(relay, args.token_pipes, args.n, 0.05,
                                                         4.0, f"tok{repeat}")
                    runs[relay.name].append(figures)
                    print(f"run {repeat + 1} {relay.name}: {figures['CPU us/line']:.1f} CPU-us "
                          f"per line ({figures['lines']} lines)", flush=True)
                    continue
                if args.latency:
                    figures = workloads.run_latency(relay, args.n, LATENCY_LINES, LATENCY_RATE,
                                                    LATENCY_WARMUP)
                    runs[relay.name].append(figures)
                    print(f"run {repeat + 1} {relay.name}: p50 {figures['p50 ms']:.3f} ms, "
                          f"p99 {figures['p99 ms']:.3f} ms", flush=True)
                    continue
                figures = workloads.run_throughput(relay, data, args.n,
                                                   content_length=args.content_length)
                runs[relay.name].append(figures)
                print(f"run {repeat + 1} {relay.name}: {figures['GB/s']:.3f} GB/s, "
                      f"{figures['CPU s/GB']:.3f} CPU-s/GB", flush=True)
    if args.many_pipes:
        print_figure(runs, f"{args.many_pipes} pipes x N = {args.n}, {args.pipe_kib} KiB each",
                     args, "CPU ms/pipe", "CPU-ms per pipe", 3)
        return 0
    if args.token_pipes:
        print_figure(runs, f"{args.token_pipes} token pipes x N = {args.n}, a line per pipe "
                     "every 50 ms", args, "CPU us/line", "CPU-us per line", 1)
        return 0
    if args.latency:
        print(f"\nlatency N = {args.n}, {LATENCY_LINES} lines at {LATENCY_RATE}/s, "
              f"{args.workers} workers, medians of {args.repeat}")
        for name, figures in runs.items():
            p50 = statistics.median(f["p50 ms"] for f in figures)
            p99 = statistics.median(f["p99 ms"] for f in figures)
            print(f"{name:40} p50 {p50:.3f} ms  p99 {p99:.3f} ms  "
                  f"(p99 {min(f['p99 ms'] for f in figures):.3f}–"
                  f"{max(f['p99 ms'] for f in figures):.3f})")
        return 0
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

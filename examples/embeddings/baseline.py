#!/usr/bin/env python3
"""Measures the world without the pipe: the catalog embedded once per consumer.

    python baseline.py --passes 8

Runs producer.py `--passes` times, each as a fresh process (as each consumer container
would have to: import torch, load the weights, embed the catalog), one after another so
they do not fight over the cores, with its output thrown away. Prints each pass's wall
and CPU time and the totals; CPU is user + system of the child, all its threads.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

PRODUCER = Path(__file__).with_name("producer.py")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_pass(catalog: Path) -> tuple[float, float, str]:
    """(wall s, CPU s, the producer's stderr line) of one fresh embedding process."""
    cpu0, wall0 = children_cpu_s(), time.perf_counter()
    done = subprocess.run([sys.executable, str(PRODUCER), str(catalog)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return time.perf_counter() - wall0, children_cpu_s() - cpu0, done.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=8, help="how many consumers (8)")
    parser.add_argument("--catalog", type=Path, default=PRODUCER.with_name("catalog.tsv"))
    args = parser.parse_args()

    print(f"baseline: {args.passes} consumers each embed the catalog themselves "
          f"({args.passes} fresh processes, one after another)")
    walls, cpus, digests = [], [], set()
    for i in range(1, args.passes + 1):
        wall, cpu, report = one_pass(args.catalog)
        walls.append(wall)
        cpus.append(cpu)
        digests.add(report.rsplit("sha256 ", 1)[-1])
        print(f"  pass {i}: {wall:5.2f} s wall, {cpu:5.2f} CPU-s")
    mean_wall, mean_cpu = sum(walls) / len(walls), sum(cpus) / len(cpus)
    print(f"  with the pipe:    1 pass,  {mean_wall:6.2f} s wall, {mean_cpu:6.2f} CPU-s "
          f"(the mean pass above)")
    print(f"  without the pipe: {args.passes} passes, {sum(walls):6.2f} s wall, "
          f"{sum(cpus):6.2f} CPU-s")
    print(f"  saved: {args.passes - 1} passes, {sum(cpus) - mean_cpu:.2f} CPU-s; "
          f"{len(digests)} distinct vector digest(s) across the passes")


if __name__ == "__main__":
    main()

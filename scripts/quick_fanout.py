#!/usr/bin/env python3
"""Quick side-by-side of relayd's transmit strategies: 1 curl producer -> N curl receivers.

    scripts/quick_fanout.py --n 50 --mib 256 --transmit copy sendfile --repeat 3

For each strategy: a fresh relayd (all CPUs as workers), N `curl -o /dev/null` receivers,
then `curl -T -` from a random payload file. Prints delivered GB/s (all receivers' bytes
over the wall time) and relayd's CPU-seconds per delivered GB (supervisor + workers, psutil),
with the ratio of each strategy to the first. Byte counts of every receiver are checked.
The full benchmark with peers is scripts/bench; this is the tool for one quick question.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import psutil


def start_relay(transmit: str, window: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "--host", "127.0.0.1", "--port", "0",
                             "--transmit", transmit, "--window", window],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline().decode()
    return proc, re.search(r"http://[0-9.]+:[0-9]+", line).group()


def cpu_seconds(proc: subprocess.Popen) -> float:
    p = psutil.Process(proc.pid)
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        t = q.cpu_times()
        total += t.user + t.system
    return total


def one_run(transmit: str, n: int, src: str, size: int, window: str) -> tuple[float, float]:
    proc, url = start_relay(transmit, window)
    try:
        time.sleep(0.3)
        cpu0 = cpu_seconds(proc)
        receivers = [subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                                       f"{url}/q?n={n}"], stdout=subprocess.PIPE)
                     for _ in range(n)]
        t0 = time.perf_counter()
        with open(src, "rb") as f:
            sender = subprocess.run(["curl", "-sS", "-T", "-", f"{url}/q?n={n}"], stdin=f,
                                    stdout=subprocess.DEVNULL, check=True)
        sizes = [int(r.communicate()[0]) for r in receivers]
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(proc) - cpu0
        if sizes != [size] * n or sender.returncode:
            raise SystemExit(f"integrity: receivers got {set(sizes)} bytes, expected {size}")
        delivered_gb = size * n / 1e9
        return delivered_gb / wall, cpu / delivered_gb
    finally:
        proc.terminate()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--window", default="4M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transmit", nargs="+", default=["copy", "sendfile"])
    args = ap.parse_args()
    size = args.mib << 20
    with tempfile.NamedTemporaryFile(prefix="fanout-", delete=False) as f:
        for _ in range(args.mib):
            f.write(os.urandom(1 << 20))
        src = f.name
    try:
        results = {}
        for r in range(args.repeat):
            for t in args.transmit:           # interleaved: noise hits every strategy alike
                results.setdefault(t, []).append(one_run(t, args.n, src, size, args.window))
    finally:
        os.unlink(src)
    base = args.transmit[0]
    med = {t: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for t, v in results.items()}
    print(f"n={args.n} payload={args.mib} MiB window={args.window} repeat={args.repeat} "
          f"workers={os.cpu_count()}")
    print(f"{'transmit':10} {'GB/s delivered':>15} {'CPU-s/GB':>10} {'GB/s ratio':>11} "
          f"{'CPU/GB ratio':>13}")
    for t, (gbps, cpu) in med.items():
        print(f"{t:10} {gbps:15.3f} {cpu:10.3f} {gbps / med[base][0]:11.2f} "
              f"{cpu / med[base][1]:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

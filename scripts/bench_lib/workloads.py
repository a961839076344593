"""One measured run of each workload against one running server, integrity checked.

Every function returns a dict of figures for one run, or raises IntegrityError when a
receiver's byte count or sha256 differs from what was sent (or a line was lost), or
WorkloadError when a client failed. Receivers always connect first, then the producer
starts, for every server alike. GB = 10^9 bytes.
"""
import json
import os
import subprocess
import sys
import threading
import time
import uuid

from bench_lib.lifetime import die_with_parent


SCRIPTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
MIB = 1 << 20
# Receivers and producers are bounded: generous for the slowest expected rate, never forever.
MIN_RUN_DEADLINE_S = 60
SLOWEST_EXPECTED_BPS = 20e6
LATENCY_SETTLE_S = 0.3
PRODUCER_FAILURE_GRACE_S = 10
WAITING_SETTLE_S = 2.0


class WorkloadError(RuntimeError):
    """A client or the harness failed (not a data mismatch)."""


class IntegrityError(RuntimeError):
    """A receiver got bytes different from the producer's."""


def unique_path(prefix):
    return f"/{prefix}-{uuid.uuid4().hex[:12]}"


class ClientProcess:
    """A bench_lib program run as a child process that speaks tagged JSON lines on stdout."""

    def __init__(self, module, args, deadline_s, stdin=subprocess.DEVNULL):
        env = dict(os.environ, PYTHONPATH=SCRIPTS_DIR)
        self.deadline_s = deadline_s
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"bench_lib.{module}", *map(str, args),
             "--deadline-s", str(deadline_s)],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True, preexec_fn=die_with_parent, text=True)

    def expect(self, tag):
        """Block until the child prints `tag {json}`; returns the json."""
        for line in self.process.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        self.kill()
        raise WorkloadError(f"client exited without {tag}: {self.process.stderr.read()[-800:]}")

    def send(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish_within(self, grace_s):
        """The RESULT document if the child prints it within grace_s, else WorkloadError."""
        outcome = {}

        def read_result():
            try:
                outcome["result"] = self.expect("RESULT")
            except WorkloadError as exc:
                outcome["error"] = exc

        # A thread, not communicate(): expect() already buffered stdout through its iterator.
        reader = threading.Thread(target=read_result, daemon=True)
        reader.start()
        reader.join(grace_s)
        if reader.is_alive():
            self.kill()
            reader.join()
            raise WorkloadError(f"receivers still running {grace_s:.0f} s later")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def finish(self):
        """The RESULT document; the child is waited for (killed past its deadline)."""
        result = self.expect("RESULT")
        try:
            self.process.wait(max(5, self.deadline_s - (time.monotonic() - self.started_at)))
        except subprocess.TimeoutExpired:
            self.kill()
        return result

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def deadline_for(total_bytes):
    return max(MIN_RUN_DEADLINE_S, total_bytes / SLOWEST_EXPECTED_BPS)


def start_receivers(server, target, count, mode="bytes", deadline_s=MIN_RUN_DEADLINE_S,
                    extra=()):
    receivers = ClientProcess(
        "receivers",
        ["--port", server.port, "--target", target, "--count", count, "--mode", mode, *extra],
        deadline_s, stdin=subprocess.PIPE if mode == "wait" else subprocess.DEVNULL)
    receivers.expect("READY")
    return receivers


def run_curl_producer(server, target, payload, deadline_s):
    """curl -sS -T - URL, fed the payload on stdin (chunked upload). Returns curl's output."""
    with open(payload.path, "rb") as body:
        try:
            done = subprocess.run(["curl", "-sS", "-T", "-", server.url + target], stdin=body,
                                  capture_output=True, timeout=deadline_s,
                                  start_new_session=True, preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired:
            raise WorkloadError(f"curl producer exceeded {deadline_s:.0f} s") from None
    if done.returncode != 0:
        raise WorkloadError(f"curl producer exited {done.returncode}: {done.stderr[-300:]!r}")
    return done.stdout.decode("utf-8", "replace")


def produce_and_receive(server, target, payload, receivers, deadline_s):
    """Run the curl producer (if any), then collect the receivers' RESULT.

    A failed producer still lets the receivers report (briefly): what they saw, e.g. a
    corrupt body, says more than curl's exit code.
    """
    try:
        if server.has_producer:
            try:
                run_curl_producer(server, target, payload, deadline_s)
            except WorkloadError as producer_failure:
                try:
                    result = receivers.finish_within(PRODUCER_FAILURE_GRACE_S)
                except WorkloadError as receivers_failure:
                    raise WorkloadError(f"{producer_failure}; {receivers_failure}") from None
                verify(result["receivers"], payload.size, payload.sha256,
                       f"{server.name} (after: {producer_failure})")
                raise
        return receivers.finish()
    finally:
        receivers.kill()


def verify(receivers, size, sha256, label):
    """Raise IntegrityError naming every receiver whose body is not exactly the payload."""
    bad = [r for r in receivers
           if r["error"] or not r["complete"] or r["bytes"] != size or r["sha256"] != sha256]
    if bad:
        sample = "; ".join(
            f"#{r['index']}: {r['bytes']} B complete={r['complete']} error={r['error']} "
            f"sha256 {'ok' if r['sha256'] == sha256 else 'MISMATCH'}" for r in bad[:5])
        raise IntegrityError(f"{label}: {len(bad)}/{len(receivers)} receivers wrong "
                             f"(expected {size} B sha256 {sha256[:16]}…): {sample}")


def transfer_target(server, payload, n, prefix):
    """Pipe servers: a fresh path per run; nginx: the payload file itself."""
    if not server.has_producer:
        return "/" + os.path.basename(payload.path)
    return f"{unique_path(prefix)}?n={n}"


def run_throughput(server, payload, n):
    """1 curl producer -> n receivers: delivered GB/s and server CPU-seconds per GB."""
    target = transfer_target(server, payload, n, "throughput")
    deadline_s = deadline_for(payload.size * n)
    cpu_before = server.cpu_seconds()
    receivers = start_receivers(server, target, n, deadline_s=deadline_s)
    result = produce_and_receive(server, target, payload, receivers, deadline_s)
    cpu_used = server.cpu_seconds() - cpu_before
    server.check_alive()
    outcomes = result["receivers"]
    verify(outcomes, payload.size, payload.sha256, f"{server.name} throughput n={n}")
    delivered = sum(r["bytes"] for r in outcomes)
    elapsed_s = (max(r["t_done_ns"] for r in outcomes)
                 - min(r["t_connect_ns"] for r in outcomes)) / 1e9
    return {"GB/s": delivered / elapsed_s / GB, "CPU s/GB": cpu_used / (delivered / GB),
            "delivered_bytes": delivered, "elapsed_s": elapsed_s, "cpu_s": cpu_used}


def run_latency(server, n, lines, rate, warmup_lines):
    """Paced chunked producer -> n line-splitting receivers: per-line latency, lines lost."""
    target = f"{unique_path('tokens')}?n={n}"
    deadline_s = MIN_RUN_DEADLINE_S + lines / rate
    receivers = start_receivers(server, target, n, mode="lines", deadline_s=deadline_s,
                                extra=["--warmup-lines", warmup_lines])
    try:
        time.sleep(LATENCY_SETTLE_S)  # let the server register every GET before lines flow
        producer = ClientProcess("producer", ["--port", server.port, "--target", target,
                                              "--lines", lines, "--rate", rate], deadline_s)
        sent = producer.finish()
        result = receivers.finish()
    finally:
        receivers.kill()
    server.check_alive()
    outcomes = result["receivers"]
    lost = sum(max(0, sent["lines"] - r["lines"]) for r in outcomes)
    verify(outcomes, sent["bytes"], sent["sha256"], f"{server.name} latency n={n}")
    if lost or any(r["gaps"] for r in outcomes):
        raise IntegrityError(f"{server.name} latency n={n}: {lost} lines lost")
    latency = result["latency_ns"]
    return {"p50 ms": latency["p50"] / 1e6, "p99 ms": latency["p99"] / 1e6,
            "max ms": latency["max"] / 1e6, "lines lost": lost}


def run_fast_receivers(server, payload, n, throttle_bps):
    """n receivers, #0 throttled (or not): aggregate GB/s of receivers 1..n-1 only."""
    target = transfer_target(server, payload, n, "slow")
    deadline_s = deadline_for(payload.size * n) + (payload.size / throttle_bps if throttle_bps
                                                    else 0)
    extra = ["--throttle-bps", throttle_bps, "--lift-throttle-after-fast"] if throttle_bps else []
    receivers = start_receivers(server, target, n, deadline_s=deadline_s, extra=extra)
    result = produce_and_receive(server, target, payload, receivers, deadline_s)
    server.check_alive()
    outcomes = result["receivers"]
    verify(outcomes, payload.size, payload.sha256, f"{server.name} slow-receiver n={n}")
    fast = outcomes[1:]
    elapsed_s = (max(r["t_done_ns"] for r in fast) - min(r["t_connect_ns"] for r in outcomes)) / 1e9
    return sum(r["bytes"] for r in fast) / elapsed_s / GB


def run_slow_receiver(server, payload, n, throttle_bps):
    """Fast receivers' speed beside one throttled receiver, as a ratio to an all-fast run."""
    all_fast = run_fast_receivers(server, payload, n, 0)
    with_slow = run_fast_receivers(server, payload, n, throttle_bps)
    return {"fast GB/s, all fast": all_fast, "fast GB/s, one slow": with_slow,
            "ratio": with_slow / all_fast}


def run_waiting(server, count, settle_s=WAITING_SETTLE_S):
    """count receivers parked on count distinct paths: server RSS idle vs with all waiting."""
    rss_idle = server.rss_bytes()
    receivers = ClientProcess(
        "receivers", ["--port", server.port, "--target", unique_path("wait") + "-{i}?n=1",
                      "--count", count, "--mode", "wait"],
        MIN_RUN_DEADLINE_S + count / 1000, stdin=subprocess.PIPE)
    try:
        ready = receivers.expect("READY")
        time.sleep(settle_s)  # the server parses the last GETs after our sends return
        receivers.send("CHECK")
        counts = receivers.expect("CHECKED")
        rss_waiting = server.rss_bytes()
        receivers.send("CLOSE")
        receivers.finish()
    finally:
        receivers.kill()
    server.check_alive()
    return {"RSS idle MiB": rss_idle / MIB, "RSS waiting MiB": rss_waiting / MIB,
            "KiB per waiter": (rss_waiting - rss_idle) / 1024 / count,
            "not waiting": count - counts["silent"], "counts": counts,
            "connect errors": ready["errors"]}

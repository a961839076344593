"""One measured run of each workload against one running server, integrity checked.

Every function returns a dict of figures for one run, or raises IntegrityError when a
receiver's bytes differ from what was sent (or a line was lost), or WorkloadError when a
client failed. Receivers always connect first, then the producer starts, for every server
alike. GB = 10^9 bytes.

The clients are the harness's own processes, never the server's: procstats counts the
server's process tree only, so their CPU is not server CPU. How they run is a Clients:
receivers spread over one process per usable core, each body checked in full (compare: byte
for byte against the payload file; sha256: hashed).
"""
import dataclasses
import json
import os
import signal
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
SLOWEST_EXPECTED_PIPES_PER_S = 50
LATENCY_SETTLE_S = 0.3
PRODUCER_FAILURE_GRACE_S = 10
RESULT_POLL_S = 0.05
WAITING_SETTLE_S = 2.0


class WorkloadError(RuntimeError):
    """A client or the harness failed (not a data mismatch)."""


class IntegrityError(RuntimeError):
    """A receiver got bytes different from the producer's."""


@dataclasses.dataclass(frozen=True)
class Clients:
    """How the harness's receivers run: over how many processes, and how bodies are checked."""

    processes: int = len(os.sched_getaffinity(0))
    check: str = "compare"      # or "sha256"

    def describe(self):
        how = ("every body byte compared with the payload file (memcmp), the file's sha256 "
               "checked once per process" if self.check == "compare"
               else "count and sha256 of every body")
        return f"receivers over up to {self.processes} processes; {how}"


def unique_path(prefix):
    return f"/{prefix}-{uuid.uuid4().hex[:12]}"


class ClientProcess:
    """A bench_lib program run as a child process that speaks tagged JSON lines on stdout."""

    def __init__(self, module, args, deadline_s, stdin=subprocess.DEVNULL):
        env = dict(os.environ, PYTHONPATH=SCRIPTS_DIR)
        self.deadline_s = deadline_s
        self.started_at = time.monotonic()
        self.result = self.failure = None
        self.collected = threading.Event()
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
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass    # the child has exited: what it printed, or failed to, tells the rest

    def collect_in_background(self):
        """Read RESULT in a thread: `collected` is set with `result` or `failure`."""
        def read_result():
            try:
                self.result = self.finish()
            except WorkloadError as exc:
                self.failure = exc
            finally:
                self.collected.set()

        # A thread, not communicate(): expect() already buffered stdout through its iterator.
        threading.Thread(target=read_result, daemon=True).start()

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


def wait_results(clients, producer=None, grace_s=PRODUCER_FAILURE_GRACE_S):
    """Every client's RESULT document, in order. Once the producer has failed, the clients
    have grace_s to report (what they saw, e.g. a corrupt body, says more than its exit code)."""
    for client in clients:
        client.collect_in_background()
    give_up_at = None
    for client in clients:
        while not client.collected.wait(RESULT_POLL_S):
            if give_up_at is None and producer is not None and producer.failed():
                give_up_at = time.monotonic() + grace_s
            if give_up_at is not None and time.monotonic() > give_up_at:
                for other in clients:
                    other.kill()
                raise WorkloadError(f"receivers still running {grace_s:.0f} s later")
        if client.failure:
            raise client.failure
    return [client.result for client in clients]


def spread(count, processes):
    """count split into at most `processes` near-equal shares, none empty."""
    processes = max(1, min(processes, count))
    return [count // processes + (i < count % processes) for i in range(processes)]


class Receivers:
    """The receivers of one target, over several client processes started together.

    shares: [(count, extra args of its process)], receiver indices assigned in that order.
    Every process connects once all are prepared (GO), so no process's start-up is timed;
    when the constructor returns, every GET is sent.
    """

    def __init__(self, server, target, shares, deadline_s, clients, payload=None,
                 mode="bytes"):
        if clients.check == "compare" and payload is not None:
            check = ["--check", "compare", "--reference", payload.path,
                     "--reference-sha256", payload.sha256]
        else:
            check = ["--check", "sha256"]
        self.processes = []
        first_index = 0
        try:
            for count, extra in shares:
                self.processes.append(ClientProcess(
                    "receivers", ["--port", server.port, "--target", target, "--count", count,
                                  "--first-index", first_index, "--mode", mode, "--wait-go",
                                  *check, *extra], deadline_s, stdin=subprocess.PIPE))
                first_index += count
            for process in self.processes:
                process.expect("PREPARED")
            for process in self.processes:
                process.send("GO")
            for process in self.processes:
                process.expect("READY")
        except BaseException:
            self.kill()
            raise

    def kill(self):
        for process in self.processes:
            process.kill()


def merged_outcomes(results):
    return sorted((r for result in results for r in result["receivers"]),
                  key=lambda r: r["index"])


def deadline_for(total_bytes):
    return max(MIN_RUN_DEADLINE_S, total_bytes / SLOWEST_EXPECTED_BPS)


class CurlProducer:
    """curl -sS -T - URL, fed the payload on stdin (a chunked upload), in the background; with
    content_length, curl -T FILE (a Content-Length upload)."""

    def __init__(self, server, target, payload, deadline_s, content_length=False):
        self.deadline_s = deadline_s
        source = payload.path if content_length else "-"
        with open(payload.path, "rb") as body:
            self.process = subprocess.Popen(
                ["curl", "-sS", "-T", source, server.url + target], stdin=body,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=die_with_parent)
        # Drained in a thread so curl never blocks on the progress lines it prints.
        self.output = {}
        self.cpu_s = None                 # curl's user + system seconds, once it has exited
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        # Not communicate(): it would reap curl, and wait4 is where its CPU time comes from.
        err = []
        stderr = threading.Thread(target=lambda: err.append(self.process.stderr.read()),
                                  daemon=True)
        stderr.start()
        self.output["stdout"] = self.process.stdout.read()
        stderr.join()
        self.output["stderr"] = err[0] if err else b""
        _, status, usage = os.wait4(self.process.pid, 0)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.process.returncode = os.waitstatus_to_exitcode(status)

    def failed(self):
        return self.process.returncode not in (None, 0)    # set by _read once curl exits

    def finish(self):
        """Wait for curl; WorkloadError if it fails or outlives the deadline."""
        self.reader.join(self.deadline_s)
        if self.reader.is_alive():
            self.kill()
            raise WorkloadError(f"curl producer exceeded {self.deadline_s:.0f} s")
        if self.process.returncode != 0:
            raise WorkloadError(f"curl producer exited {self.process.returncode}: "
                                f"{self.output['stderr'][-300:]!r}")

    def kill(self):
        if self.process.returncode is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)   # not Popen's: it would reap curl
            except ProcessLookupError:
                pass
        self.reader.join()


def produce_and_receive(server, target, payload, fast, deadline_s, slow=(),
                        content_length=False):
    """Start the curl producer (if any), collect the fast clients' RESULT, then LIFT the slow
    ones' throttle and collect theirs. Returns every receiver's outcome, by index, and the
    receivers' own CPU seconds and the producer's (None without one)."""
    producer = (CurlProducer(server, target, payload, deadline_s, content_length)
                if server.has_producer else None)
    try:
        try:
            results = wait_results(fast, producer)
            for client in slow:
                client.send("LIFT")
            results += wait_results(slow, producer)
        except WorkloadError as receivers_failure:
            if producer is not None and producer.failed():
                try:
                    producer.finish()
                except WorkloadError as producer_failure:
                    raise WorkloadError(f"{producer_failure}; {receivers_failure}") from None
            raise
        outcomes = merged_outcomes(results)
        if producer is not None:
            try:
                producer.finish()
            except WorkloadError as producer_failure:
                verify(outcomes, payload.size, payload.sha256,
                       f"{server.name} (after: {producer_failure})")
                raise
        return (outcomes, sum(result["client_cpu_s"] for result in results),
                producer.cpu_s if producer is not None else None)
    finally:
        for client in (*fast, *slow):
            client.kill()
        if producer is not None:
            producer.kill()


def verify(receivers, size, sha256, label):
    """Raise IntegrityError naming every receiver whose body is not exactly the payload."""
    bad = [r for r in receivers
           if r["error"] or not r["complete"] or r["bytes"] != size
           or not body_matches(r, sha256)]
    if bad:
        sample = "; ".join(
            f"#{r['index']}: {r['bytes']} B complete={r['complete']} error={r['error']} "
            f"{describe_body(r, sha256)}" for r in bad[:5])
        raise IntegrityError(f"{label}: {len(bad)}/{len(receivers)} receivers wrong "
                             f"(expected {size} B sha256 {sha256[:16]}…): {sample}")


def body_matches(outcome, sha256):
    if outcome.get("check") == "compare":
        return outcome["mismatch_at"] is None
    return outcome["sha256"] == sha256


def describe_body(outcome, sha256):
    if outcome.get("check") == "compare":
        return ("bytes equal the payload's" if outcome["mismatch_at"] is None
                else f"DIFFERS from the payload at byte {outcome['mismatch_at']}")
    return f"sha256 {'ok' if outcome['sha256'] == sha256 else 'MISMATCH'}"


def transfer_target(server, payload, n, prefix):
    """Pipe servers: a fresh path per run; nginx: the payload file itself."""
    if not server.has_producer:
        return "/" + os.path.basename(payload.path)
    return f"{unique_path(prefix)}?n={n}"


def run_throughput(server, payload, n, clients=Clients(), content_length=False):
    """1 curl producer -> n receivers: delivered GB/s and server CPU-seconds per GB. The
    producer uploads chunked from stdin, or with content_length a Content-Length file."""
    target = transfer_target(server, payload, n, "throughput")
    deadline_s = deadline_for(payload.size * n)
    cpu_before = server.cpu_seconds()
    receivers = Receivers(server, target, [(count, []) for count in spread(n, clients.processes)],
                          deadline_s, clients, payload)
    outcomes, client_cpu_s, producer_cpu_s = produce_and_receive(
        server, target, payload, receivers.processes, deadline_s, content_length=content_length)
    cpu_used = server.cpu_seconds() - cpu_before
    server.check_alive()
    verify(outcomes, payload.size, payload.sha256, f"{server.name} throughput n={n}")
    delivered = sum(r["bytes"] for r in outcomes)
    elapsed_s = (max(r["t_done_ns"] for r in outcomes)
                 - min(r["t_connect_ns"] for r in outcomes)) / 1e9
    figures = {"GB/s": delivered / elapsed_s / GB, "CPU s/GB": cpu_used / (delivered / GB),
               "delivered_bytes": delivered, "elapsed_s": elapsed_s, "cpu_s": cpu_used,
               "client_processes": len(receivers.processes), "client_cpu_s": client_cpu_s}
    if producer_cpu_s is not None:
        # The curl producer shares the machine's cores: with the receivers' CPU it bounds
        # what any relay can deliver here (docs/performance.md).
        figures["producer CPU s/GB"] = producer_cpu_s / (delivered / GB)
    return figures


def run_latency(server, n, lines, rate, warmup_lines):
    """Paced chunked producer -> n line-splitting receivers: per-line latency, lines lost.

    One receivers process, sha256 check: 200 lines/s is no load for a client, and the
    latency percentiles come from one process's stamps.
    """
    target = f"{unique_path('tokens')}?n={n}"
    deadline_s = MIN_RUN_DEADLINE_S + lines / rate
    receivers = Receivers(server, target, [(n, ["--warmup-lines", warmup_lines])], deadline_s,
                          Clients(processes=1, check="sha256"), mode="lines")
    try:
        time.sleep(LATENCY_SETTLE_S)  # let the server register every GET before lines flow
        producer = ClientProcess("producer", ["--port", server.port, "--target", target,
                                              "--lines", lines, "--rate", rate], deadline_s)
        sent = producer.finish()
        result = receivers.processes[0].finish()
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


def run_fast_receivers(server, payload, n, throttle_bps, clients):
    """n receivers, #0 alone in its own process, throttled (or not): aggregate GB/s of
    receivers 1..n-1 only, which share the other processes."""
    target = transfer_target(server, payload, n, "slow")
    deadline_s = deadline_for(payload.size * n) + (payload.size / throttle_bps if throttle_bps
                                                    else 0)
    # The same process layout with or without the throttle, so the ratio compares like runs.
    slow_args = ["--throttle-bps", throttle_bps, "--lift-on-stdin"] if throttle_bps else []
    shares = [(1, slow_args)] + [(count, []) for count in spread(n - 1, clients.processes)]
    receivers = Receivers(server, target, shares, deadline_s, clients, payload)
    slow, fast = receivers.processes[:1], receivers.processes[1:]
    outcomes, _, _ = produce_and_receive(server, target, payload, fast, deadline_s, slow=slow)
    server.check_alive()
    verify(outcomes, payload.size, payload.sha256, f"{server.name} slow-receiver n={n}")
    fast_outcomes = outcomes[1:]
    elapsed_s = (max(r["t_done_ns"] for r in fast_outcomes)
                 - min(r["t_connect_ns"] for r in outcomes)) / 1e9
    return sum(r["bytes"] for r in fast_outcomes) / elapsed_s / GB


def run_slow_receiver(server, payload, n, throttle_bps, clients=Clients()):
    """Fast receivers' speed beside one throttled receiver, as a ratio to an all-fast run."""
    all_fast = run_fast_receivers(server, payload, n, 0, clients)
    with_slow = run_fast_receivers(server, payload, n, throttle_bps, clients)
    return {"fast GB/s, all fast": all_fast, "fast GB/s, one slow": with_slow,
            "ratio": with_slow / all_fast}


def run_many_pipes(server, payload, pipes, n, clients=Clients()):
    """`pipes` concurrent pipes x n receivers, each pipe a distinct slice of the payload
    (payload.size // pipes bytes, Content-Length): delivered GB/s, server CPU per GB and per
    pipe, pipes delivered per second, receivers refused (503: counted, never a failure).

    nginx (no producer) serves each slice as a Range of the payload file to its n receivers.
    Clients: bench_lib.pipes, one process per usable core, stepped together (see there).
    """
    size = payload.size // pipes
    processes = max(1, min(clients.processes, pipes * n))
    deadline_s = (deadline_for(size * pipes * n)
                  + pipes * (n + 1) / processes / SLOWEST_EXPECTED_PIPES_PER_S)
    prefix = ("/" + os.path.basename(payload.path) if not server.has_producer
              else unique_path("pipes"))
    common = ["--port", server.port, "--prefix", prefix, "--pipes", pipes, "--n", n,
              "--size", size, "--reference", payload.path, "--reference-sha256", payload.sha256,
              "--processes", processes] + ([] if server.has_producer else ["--static"])
    group = []
    try:
        for index in range(processes):
            group.append(ClientProcess("pipes", common + ["--process-index", index],
                                       deadline_s, stdin=subprocess.PIPE))
        for client in group:
            client.expect("PREPARED")
        cpu_before = server.cpu_seconds()
        for client in group:
            client.send("GO")
        for client in group:
            client.expect("RECEIVERS")
        for client in group:
            client.send("PRODUCERS")
        unanswered = sum(client.expect("HEADS")["unanswered"] for client in group)
        for client in group:
            client.send("BODIES")
        results = wait_results(group)
        cpu_used = server.cpu_seconds() - cpu_before
    finally:
        for client in group:
            client.kill()
    server.check_alive()
    total = {key: sum(r[key] for r in results)
             for key in ("receivers", "ok", "refused", "failed", "corrupt", "delivered_bytes")}
    pipes_delivered = pipes - len(set().union(*(r["pipes_not_delivered"] for r in results)))
    if total["failed"]:
        failures = [text for r in results for text in r["failures"]][:5]
        raise IntegrityError(
            f"{server.name} manypipes P={pipes}: {total['failed']}/{total['receivers']} "
            f"receivers wrong ({total['corrupt']} with corrupt bytes; expected {size} B each, "
            f"503 refusals not counted): {'; '.join(failures)}")
    elapsed_s = (max(r["t_last_done_ns"] for r in results)
                 - min(r["t_first_connect_ns"] for r in results)) / 1e9
    delivered_gb = total["delivered_bytes"] / GB
    producers = {}
    for result in results:
        for status, count in result["producers"].items():
            producers[status] = producers.get(status, 0) + count
    return {"GB/s": delivered_gb / elapsed_s,
            "CPU s/GB": cpu_used / delivered_gb if delivered_gb else None,
            "CPU ms/pipe": cpu_used / pipes * 1000,
            "pipes/s": pipes_delivered / elapsed_s,
            "receivers refused": total["refused"],
            "pipes": pipes, "pipes delivered": pipes_delivered, "bytes_per_pipe": size,
            "elapsed_s": elapsed_s, "cpu_s": cpu_used,
            "delivered_bytes": total["delivered_bytes"], "producers": producers,
            "producer_errors": [e for r in results for e in r["producer_errors"]][:5],
            "producers unanswered before the bodies": unanswered,
            "client_processes": processes,
            "client_cpu_s": sum(r["client_cpu_s"] for r in results)}


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

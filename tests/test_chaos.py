"""Chaos: what an operator meets after the first week, against the real daemon on loopback.

Each case is a sentence of behaviour; every receiver is checked by sha256. Nothing here
asserts speed: every wait is on a state (/health, a process, a log line) with a generous
deadline, so a loaded machine makes a case slower, never red.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import random
import resource
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from conftest import (MIB, SHORT_BODY, SlowTransfer, curl_receiver, curl_sender,
                      curl_transfer_works, health_retry, parse_head, payload, read_response,
                      sha256_file, transfer_logs, wait_all, wait_for)


def worker_pids(relay) -> set[int]:
    return {w["pid"] for w in health_retry(relay)["workers"]}


def live_children(relay) -> set[int]:
    """The supervisor's worker processes that are still running (not zombies)."""
    found = set()
    for p in psutil.Process(relay.proc.pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                found.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_sighups_in_quick_succession_lose_no_transfer_and_no_waiting_receiver(
        start_relay, tmp_path):
    relay = start_relay(workers=2)
    first = worker_pids(relay)
    # Three pipes streaming, each paused mid-body by its feeder ...
    streaming = [SlowTransfer(relay, tmp_path, f"/streaming-{i}", 3, 2 * MIB,
                              pause_at=MIB // 2, seed=i) for i in range(3)]
    wait_for(lambda: health_retry(relay)["pipes_streaming"] == 3, timeout=30,
             what="three pipes streaming")
    for t in streaming:
        assert t.paused.wait(30), "a feeder never reached its pause point"
    # ... and two pipes whose receivers wait for senders that come only after the reloads.
    src = payload(tmp_path, 700_000, "late.src", seed=9)
    late = {f"/late-{i}": [tmp_path / f"late-{i}-{k}.out" for k in range(3)] for i in range(2)}
    late_receivers = [curl_receiver(f"{relay.url}{path}?n=3", out)
                      for path, outs in late.items() for out in outs]
    wait_for(lambda: health_retry(relay)["pipes_waiting"] == 2, timeout=30,
             what="two pipes waiting for their senders")

    for k in range(1, 6):
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: relay.stderr_text().count("SIGHUP") >= k, timeout=10,
                 what=f"SIGHUP {k} handled")
    # The supervisor is alive and the first generation still carries its transfers.
    assert relay.proc.poll() is None, relay.stderr_text()

    late_senders = [curl_sender(f"{relay.url}{path}?n=3", src) for path in late]
    assert wait_all(late_senders + late_receivers) == [0] * 8
    for outs in late.values():
        assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 3
    for t in streaming:
        assert t.wait() == (0, [0, 0, 0])
        assert t.receiver_shas() == [t.sha] * 3

    # Once the transfers end, the queued reload runs: only new workers remain.
    def reloaded():
        pids = worker_pids(relay)
        return len(pids) == 2 and not pids & first and live_children(relay) == pids
    wait_for(reloaded, timeout=60, interval=0.1, what="one generation of new workers")
    assert relay.proc.poll() is None
    assert "supervisor error" not in relay.stderr_text()
    curl_transfer_works(relay, tmp_path, "/after-the-reloads")
    assert relay.wait_idle()["slots_in_use"] == 0


def _half_closing_sender(port: int, path: str, body: bytes) -> bytes:
    """A complete Content-Length request, then shutdown(SHUT_WR) (`nc -N`); the response."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"PUT %s HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n"
              % (path.encode(), len(body)) + body)
    s.shutdown(socket.SHUT_WR)
    return read_response(s, limit=1 << 24)


def _receive(port: int, path: str) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: relay\r\n\r\n" % path.encode())
    status, headers, body = parse_head(read_response(s, limit=1 << 24))
    s.close()
    return body if status == 200 and len(body) == int(headers["content-length"]) else b""


@pytest.mark.parametrize("first", ["senders", "receivers"])
def test_senders_that_half_close_after_a_complete_body_reach_every_receiver(start_relay, first):
    relay = start_relay(workers=2)
    pipes, n, size = 400, 4, 320 * 1024
    bodies = {f"/half-closed-{i}?n={n}": random.Random(i).randbytes(size) for i in range(pipes)}
    expected = {path: hashlib.sha256(body).hexdigest() for path, body in bodies.items()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=pipes * (n + 1)) as pool:
        if first == "receivers":
            got = {path: [pool.submit(_receive, relay.port, path) for _ in range(n)]
                   for path in bodies}
            wait_for(lambda: health_retry(relay)["pipes_waiting"] == pipes, timeout=60,
                     what="every pipe's receivers waiting")
        sent = {path: pool.submit(_half_closing_sender, relay.port, path, body)
                for path, body in bodies.items()}
        if first == "senders":
            wait_for(lambda: health_retry(relay)["pipes_waiting"] == pipes, timeout=60,
                     what="every pipe's sender waiting")
            got = {path: [pool.submit(_receive, relay.port, path) for _ in range(n)]
                   for path in bodies}
        for path, futures in got.items():
            shas = [hashlib.sha256(f.result()).hexdigest() for f in futures]
            assert shas == [expected[path]] * n, (path, sent[path].result()[-300:])
            assert b"Sent successfully" in sent[path].result()
    assert relay.wait_idle()["slots_in_use"] == 0


def test_kill_9_of_a_worker_mid_transfer_ends_its_pipes_visibly_short_and_the_others_complete(
        start_relay, tmp_path):
    relay = start_relay(workers=2)
    n, pipes = 3, 6
    transfers = [SlowTransfer(relay, tmp_path, f"/kill-w-{i}", n, 3 * MIB, pause_at=MIB,
                              seed=i) for i in range(pipes)]
    wait_for(lambda: health_retry(relay)["pipes_streaming"] == pipes, timeout=30,
             what="every pipe streaming")
    for t in transfers:
        assert t.paused.wait(20)
    # Really in flight: every receiver has part of its body, none all of it.
    wait_for(lambda: all(o.exists() and o.stat().st_size > 0 for t in transfers
                         for o in t.outs), timeout=30, what="every receiver has bytes")
    assert all(o.stat().st_size < 3 * MIB for t in transfers for o in t.outs)
    victim = next(w["pid"] for w in relay.health()["workers"] if w["index"] == 0)
    os.kill(victim, signal.SIGKILL)
    results = [t.wait() for t in transfers]
    logs = wait_for(lambda: (lambda found: found if all(t.path in found for t in transfers)
                             else None)(transfer_logs(relay)), timeout=20, what="6 log lines")
    summary = []
    for t, (sender_code, codes) in zip(transfers, results):
        log, shas = logs[t.path], t.receiver_shas()
        summary.append((t.path, log["sender"], log["workers"], sender_code, codes))
        # Never a receiver that exits 0 with the wrong bytes; a short one got a prefix.
        for code, sha, out in zip(codes, shas, t.outs):
            assert code != 0 or sha == t.sha, (t.path, codes, log)
            if code != 0:
                assert code in SHORT_BODY, (t.path, codes)
                got = out.read_bytes() if out.exists() else b""
                assert t.data.startswith(got), (t.path, len(got))
        if log["sender"] == 0:
            assert log["outcome"].startswith("aborted"), log
            assert all(c != 0 for c in codes), (t.path, codes, log)
            assert sender_code != 0
        else:
            on_victim = log["workers"].get(0, 0)
            assert log["lost"] == on_victim and log["done"] == n - on_victim, log
            assert sum(c == 0 and s == t.sha for c, s in zip(codes, shas)) \
                == log["done"], (t.path, codes, log)
            assert sum(1 for c in codes if c != 0) == log["lost"], (t.path, codes, log)
            if log["done"]:
                assert log["outcome"].startswith("ok"), log
                assert sender_code == 0, (t.path, sender_code, t.sender.stdout.read())
    print("\npipes (path, sender worker, receivers per worker, sender exit, receiver exits):")
    for row in summary:
        print("  ", row)

    def respawned():
        h = health_retry(relay)
        pids = {w["index"]: w["pid"] for w in h["workers"]}
        return (h["workers_alive"] == 2 and len(pids) == 2 and victim not in pids.values()
                and h["worker_restarts"] >= 1)
    wait_for(respawned, timeout=20, what="worker 0 respawned")
    h = relay.wait_idle()
    assert (h["pipes_waiting"], h["pipes_streaming"], h["slots_in_use"]) == (0, 0, 0)
    curl_transfer_works(relay, tmp_path, "/after-worker-kill")


@contextlib.contextmanager
def tiny_tmpfs(tmp_path, size: str):
    """A tmpfs of `size` mounted for the test (root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def spill_failures(relay) -> int:
    return sum(w["spill_write_failures"] for w in health_retry(relay)["workers"])


class SlowReceiver(threading.Thread):
    """A receiver with a small receive buffer that reads about 1 MB/s -- a slow reader the
    kernel's loopback buffers cannot hide -- or, with `stalled`, reads nothing until `go`
    is set. `body` is what it got, `complete` whether its Content-Length was met."""

    def __init__(self, port: int, path: str, stalled: bool = False):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: relay\r\n\r\n" % path.encode())
        self.sock.settimeout(60)
        self.go = threading.Event()
        if not stalled:
            self.go.set()
        self.body = b""
        self.complete = False
        self.start()

    def run(self) -> None:
        data = b""
        self.go.wait(60)
        try:
            while True:
                chunk = self.sock.recv(64 * 1024)
                if not chunk:
                    break
                data += chunk
                time.sleep(0.05)
        except OSError:
            pass
        self.sock.close()
        status, headers, self.body = parse_head(data) if data else (0, {}, b"")
        self.complete = status == 200 and len(self.body) == int(headers["content-length"])


@pytest.mark.parametrize("policy", ["block", "drop"])
def test_a_full_spill_disk_loses_nothing_under_block_and_cuts_only_the_slowest_under_drop(
        start_relay, tmp_path, policy):
    """Four pipes of three receivers, one of them slow, spill into a 1 MiB tmpfs. Under
    block the slow one reads at 1 MB/s and gets every byte; under drop it stalls and is cut
    with a short body (its body is larger than the few MiB loopback socket buffers hold, so
    the stall reaches the relay). The fast ones always get every byte."""
    with tiny_tmpfs(tmp_path, "1m") as spill_dir:
        relay = start_relay("--window", "512k", "--spill-dir", str(spill_dir), "--slow", policy,
                            workers=2)
        pipes, n, size = 4, 3, (4 if policy == "block" else 16) * MIB
        srcs = [payload(tmp_path, size, f"full-{i}.src", seed=i) for i in range(pipes)]
        outs = [[tmp_path / f"full-{i}-{k}.out" for k in range(n - 1)] for i in range(pipes)]
        slow = [SlowReceiver(relay.port, f"/full-disk-{i}?n={n}", stalled=policy == "drop")
                for i in range(pipes)]
        fast = [[curl_receiver(f"{relay.url}/full-disk-{i}?n={n}", o) for o in outs[i]]
                for i in range(pipes)]
        senders = [curl_sender(f"{relay.url}/full-disk-{i}?n={n}", srcs[i])
                   for i in range(pipes)]
        codes = [wait_all(f) for f in fast]
        assert wait_all(senders) == [0] * pipes
        for r in slow:
            r.go.set()
            r.join(90)
        assert spill_failures(relay) > 0, "the spill never filled the disk: nothing was shown"
        assert "No space left on device" in relay.stderr_text()
        for i in range(pipes):
            data = srcs[i].read_bytes()
            assert codes[i] == [0] * (n - 1), (policy, i, codes[i])
            assert [sha256_file(o) for o in outs[i]] == [sha256_file(srcs[i])] * (n - 1)
            if policy == "block":
                assert slow[i].complete and slow[i].body == data, (i, len(slow[i].body))
            else:           # cut visibly (short), or complete and correct; never wrong
                assert data.startswith(slow[i].body), i
                assert slow[i].complete == (slow[i].body == data), i
        if policy == "drop":
            assert not all(r.complete for r in slow), "drop cut no slow receiver"
        assert relay.wait_idle()["slots_in_use"] == 0


def test_out_of_descriptors_the_daemon_lives_and_serves_once_idle_connections_close(
        start_relay, tmp_path):
    limit = 200
    relay = start_relay(workers=1, preexec=lambda: resource.setrlimit(
        resource.RLIMIT_NOFILE, (limit, limit)))
    idle = []
    for _ in range(limit + 100):          # more than the worker has descriptors for
        idle.append(socket.create_connection(("127.0.0.1", relay.port), timeout=10))
    wait_for(lambda: "accept failed" in relay.stderr_text(), timeout=30,
             what="the worker running out of descriptors")
    assert relay.proc.poll() is None
    for s in idle:
        s.close()
    curl_transfer_works(relay, tmp_path, "/after-emfile")
    log = relay.stderr_text()
    assert relay.proc.poll() is None
    assert log.count("accept failed") <= 3, "one line per episode, not a storm"
    assert "Traceback" not in log

"""Chaos: what an operator meets after the first week, against the real daemon on loopback.

Each case is a sentence of behaviour; every receiver is checked by sha256. Nothing here
asserts speed: every wait is on a state (/health, a process, a log line) with a generous
deadline, so a loaded machine makes a case slower, never red.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import random
import signal
import socket

import psutil
import pytest

from conftest import (MIB, SlowTransfer, curl_receiver, curl_sender, curl_transfer_works,
                      health_retry, parse_head, payload, read_response, sha256_file, wait_all,
                      wait_for)


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

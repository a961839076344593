"""n = 1 pipes are spliced: both sockets in the sender's worker, the body moved by the kernel.

The real daemon, real curl and raw sockets; every receiver's bytes compared with the
sender's. With two workers a receiver often lands on the other worker: its socket is handed
over (counted in /metrics), and everything the contract promises must hold the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import threading
import time

import psutil
import pytest

from conftest import (CURL, SHORT_BODY, curl_receiver, curl_sender, decode_chunked, parse_head,
                      payload, raw_request, read_until_closed, sha256_file, wait_all, wait_for)

MIB = 1 << 20


def waiting_receiver(relay, path: str, version: str = "1.1") -> socket.socket:
    """A raw receiver of path, registered (the pipe is waiting) when this returns."""
    host = b"Host: r\r\n" if version == "1.1" else b""
    receiver = raw_request(relay.port, b"GET %s HTTP/%s\r\n%s\r\n"
                           % (path.encode(), version.encode(), host))
    wait_for(lambda: relay.health()["pipes_waiting"] == 1, what="the receiver waiting")
    return receiver


def chunked_sender(relay, path: str) -> socket.socket:
    return raw_request(relay.port, b"PUT %s HTTP/1.1\r\nHost: r\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n" % path.encode())


def metric(relay, name: str) -> float:
    text = subprocess.run([CURL, "-s", relay.url + "/metrics"], capture_output=True,
                          text=True, timeout=30).stdout
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_n1_pipes_are_spliced_and_every_receiver_gets_the_senders_bytes(
        start_relay, tmp_path, framing):
    relay = start_relay(workers=2)
    src = payload(tmp_path, 3 * MIB + 12345, seed=3)
    for i in range(12):
        out = tmp_path / f"out-{i}"
        url = f"{relay.url}/splice-{framing}-{i}"
        if i % 2:      # both arrival orders
            receiver = curl_receiver(url, out)
            time.sleep(0.05)
            sender = (curl_sender(url, src) if framing == "content-length"
                      else curl_sender(url, None, stdin=open(src, "rb")))
        else:
            sender = (curl_sender(url, src) if framing == "content-length"
                      else curl_sender(url, None, stdin=open(src, "rb")))
            time.sleep(0.05)
            receiver = curl_receiver(url, out)
        assert wait_all([sender, receiver]) == [0, 0]
        assert sha256_file(out) == sha256_file(src)
        assert b"Sent successfully to 1 receiver(s)" in sender.stdout.read()
    logs = relay.stderr_text()
    assert logs.count("transmit=splice") == 12, logs
    # Twelve pipes on two workers: some receivers landed on the other worker than their
    # sender (each worker publishes its counters within a second).
    wait_for(lambda: metric(relay, "relayd_receivers_handed_over_total") >= 1, timeout=10,
             what="a receiver handed over to its sender's worker")
    assert relay.wait_idle()["slots_in_use"] == 0


def test_a_chunked_body_partly_read_with_its_head_is_relayed_whole(start_relay):
    """The head and the first chunks in one write: httptools has begun the body, so the
    splice stream relays the rest through the parser."""
    relay = start_relay(workers=1)
    body = random.Random(5).randbytes(300_000)
    chunks = [body[i:i + 7000] for i in range(0, len(body), 7000)]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-T: 1\r\n\r\n"
    receiver = waiting_receiver(relay, "/partly")
    sender = raw_request(relay.port, b"PUT /partly HTTP/1.1\r\nHost: r\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + wire[:20000])
    sender.sendall(wire[20000:])
    data, closed = read_until_closed(receiver, timeout=30)
    status, headers, raw = parse_head(data)
    assert closed and status == 200 and headers["transfer-encoding"] == "chunked"
    assert decode_chunked(raw) == (body, True)
    assert b"Sent successfully" in read_until_closed(sender, timeout=30)[0]


@pytest.mark.parametrize("parsed", [False, True], ids=["passed-through", "parsed"])
def test_an_http10_receiver_of_a_spliced_chunked_body_gets_the_plain_body(start_relay, parsed):
    relay = start_relay(workers=2)
    body = random.Random(7).randbytes(900_000)
    wire = b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                    for c in (body[i:i + 65536] for i in range(0, len(body), 65536)))
    wire += b"0\r\n\r\n"
    receiver = waiting_receiver(relay, "/h10", version="1.0")
    head = b"PUT /h10 HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
    if parsed:
        sender = raw_request(relay.port, head + wire)
    else:
        sender = raw_request(relay.port, head)
        time.sleep(0.2)        # the head alone first: the body passes through
        sender.sendall(wire)
    data, closed = read_until_closed(receiver, timeout=30)
    status, headers, got = parse_head(data)
    assert closed and status == 200 and "transfer-encoding" not in headers
    assert got == body
    assert b"Sent successfully" in read_until_closed(sender, timeout=30)[0]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_sender_that_dies_mid_body_leaves_its_spliced_receiver_visibly_short(
        start_relay, tmp_path, framing):
    relay = start_relay(workers=2)
    data = random.Random(9).randbytes(2 * MIB)
    out = tmp_path / "short.out"
    receiver = curl_receiver(f"{relay.url}/dies", out, "--no-buffer")   # every byte on disk
    wait_for(lambda: relay.health()["pipes_waiting"] == 1, what="the receiver waiting")
    head = b"PUT /dies HTTP/1.1\r\nHost: r\r\n" + (
        b"Content-Length: %d\r\n\r\n" % len(data) if framing == "content-length"
        else b"Transfer-Encoding: chunked\r\n\r\n")
    s = raw_request(relay.port, head)
    wire = data[:MIB] if framing == "content-length" else b"%x\r\n%s\r\n" % (MIB, data[:MIB])
    s.sendall(wire)
    wait_for(lambda: out.exists() and out.stat().st_size >= MIB, timeout=30,
             what="the first MiB at the receiver")
    s.close()
    code, = wait_all([receiver])
    assert code in SHORT_BODY
    assert out.read_bytes() == data[:MIB]
    wait_for(lambda: "outcome=aborted" in relay.stderr_text(), what="the aborted transfer")
    assert relay.wait_idle()["slots_in_use"] == 0


def test_a_spliced_receiver_that_leaves_mid_body_ends_the_sender_with_an_error(start_relay):
    relay = start_relay(workers=2)
    receiver = waiting_receiver(relay, "/leaves")
    sender = chunked_sender(relay, "/leaves")
    sender.sendall(b"%x\r\n%s\r\n" % (65536, b"x" * 65536))
    got = b""
    while len(got) < 65536:
        got += receiver.recv(65536)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01" + b"\0" * 7)
    receiver.close()                            # a reset, mid-body

    def feed():
        try:
            for _ in range(200):
                sender.sendall(b"%x\r\n%s\r\n" % (65536, b"y" * 65536))
        except OSError:
            pass
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    answer, closed = read_until_closed(sender, timeout=30)
    assert closed and b"[ERROR] all receivers left" in answer, answer[-300:]
    feeder.join(30)
    assert relay.wait_idle()["slots_in_use"] == 0


def test_a_malformed_chunk_mid_body_ends_the_spliced_receiver_short(start_relay):
    relay = start_relay(workers=1)
    receiver = waiting_receiver(relay, "/bad")
    sender = chunked_sender(relay, "/bad")
    time.sleep(0.2)
    sender.sendall(b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n")
    data, closed = read_until_closed(receiver, timeout=30)
    status, _, raw = parse_head(data)
    assert closed and status == 200
    assert decode_chunked(raw) == (b"hello", False)          # the good chunk, then no terminator
    assert b"malformed" in read_until_closed(sender, timeout=30)[0]


def test_the_sha_of_a_spliced_body_is_independent_of_how_the_sender_writes_it(start_relay):
    """Odd write sizes, one byte at a time at the start: framing never leaks into data."""
    relay = start_relay(workers=2)
    body = random.Random(11).randbytes(200_000)
    wire = b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                    for c in (body[i:i + 777] for i in range(0, len(body), 777))) + b"0\r\n\r\n"
    receiver = waiting_receiver(relay, "/odd")
    sender = chunked_sender(relay, "/odd")
    time.sleep(0.2)
    for b in wire[:300]:
        sender.sendall(bytes([b]))
    pos = 300
    rng = random.Random(1)
    while pos < len(wire):
        step = rng.randint(1, 5000)
        sender.sendall(wire[pos:pos + step])
        pos += step
    data, closed = read_until_closed(receiver, timeout=30)
    got, ended = decode_chunked(parse_head(data)[2])
    assert closed and ended and hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


def worker_cpu_seconds(relay) -> float:
    (w,) = relay.health()["workers"]
    return sum(psutil.Process(w["pid"]).cpu_times()[:2])


def test_a_frame_that_arrives_in_pieces_leaves_an_http10_receivers_worker_idle(start_relay):
    """A size line cut short (the rest of it not sent yet): the worker waits for it without
    polling. Peeking at the frame and leaving it unread kept the socket readable, and the
    worker spun at full CPU for as long as the sender paused."""
    relay = start_relay(workers=1)
    receiver = waiting_receiver(relay, "/pieces", version="1.0")
    sender = chunked_sender(relay, "/pieces")
    wait_for(lambda: relay.health()["pipes_streaming"] == 1, what="the transfer started")
    sender.sendall(b"5\r\nhello\r\n1")
    wait_for(lambda: relay.health()["workers"][0]["bytes_in"] >= 5, timeout=10,
             what="the first chunk in")
    before = worker_cpu_seconds(relay)
    time.sleep(1.0)                          # the pause whose cost is measured
    spent = worker_cpu_seconds(relay) - before
    sender.sendall(b"\r\n!\r\n0\r\n\r\n")
    data, closed = read_until_closed(receiver, timeout=30)
    assert closed and parse_head(data)[2] == b"hello!"
    assert spent < 0.25, f"the worker used {spent:.2f} CPU-s while the sender paused 1 s"


def test_an_overlong_last_chunk_and_trailer_never_freeze_the_worker(start_relay):
    """A last-chunk line of 4 KiB of extension and a 9,000-byte trailer line without its end,
    for an HTTP/1.0 receiver: the worker keeps answering (it looped forever, inside one
    callback, until the heartbeat killed it), and the transfer ends short when the sender
    leaves."""
    relay = start_relay(workers=1)
    receiver = waiting_receiver(relay, "/trailer", version="1.0")
    sender = chunked_sender(relay, "/trailer")
    wait_for(lambda: relay.health()["pipes_streaming"] == 1, what="the transfer started")
    sender.sendall(b"5\r\nhello\r\n0;" + b"a" * 4094 + b"\r\nX-A: " + b"b" * 9000)
    wait_for(lambda: relay.health()["workers"][0]["bytes_in"] >= 5, timeout=10,
             what="the first chunk in")
    for _ in range(3):                        # the one worker still answers
        assert relay.health()["status"] == "ok"
    sender.close()
    data, _ = read_until_closed(receiver, timeout=30)
    assert parse_head(data)[2] == b"hello"
    wait_for(lambda: "path='/trailer'" in relay.stderr_text(), what="the transfer logged")
    assert "outcome=aborted" in relay.stderr_text()


def health_on(conn: socket.socket) -> dict:
    """/health asked on a keep-alive connection (so its worker opens and closes nothing)."""
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: r\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return json.loads(body)


def connections_on_worker(relay, index: int, count: int, spare: list) -> list[socket.socket]:
    """`count` keep-alive connections that landed on worker `index`; the others go to
    `spare`, left open until the caller is done (a close would free a descriptor there)."""
    found = []
    for _ in range(400):
        s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        (found if health_on(s)["answered_by"] == index else spare).append(s)
        if len(found) == count:
            return found
    raise AssertionError(f"not {count} connections on worker {index}")


def test_a_receiver_socket_lost_to_emfile_on_its_way_ends_the_pipe_visibly(start_relay):
    """The sender's worker has no free descriptor when the receiver's socket is passed to
    it (SCM_RIGHTS): the kernel drops the socket. The receiver is lost, the sender is told,
    the pipe ends, and the worker serves on (before, it took the number the socket had in
    the other process: it closed its own control channel and exited, or wrapped a pipe and
    left the transfer streaming forever)."""
    relay = start_relay(workers=2)
    spare: list[socket.socket] = []
    try:
        (sender,) = connections_on_worker(relay, 0, 1, spare)
        receiver, poll = connections_on_worker(relay, 1, 2, spare)
        worker0 = next(w["pid"] for w in health_on(poll)["workers"] if w["index"] == 0)
        sender.sendall(b"PUT /lost HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n\r\n")
        wait_for(lambda: health_on(poll)["pipes_waiting"] == 1, what="the sender waiting")
        proc = psutil.Process(worker0)
        soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
        used = {int(fd) for fd in os.listdir(f"/proc/{worker0}/fd")}
        proc.rlimit(psutil.RLIMIT_NOFILE, (next(n for n in range(soft) if n not in used), hard))
        try:
            receiver.sendall(b"GET /lost HTTP/1.1\r\nHost: r\r\n\r\n")
            wait_for(lambda: "path='/lost'" in relay.stderr_text(), what="the transfer logged")
        finally:
            proc.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
        assert "outcome=aborted: all receivers left" in relay.stderr_text()
        sender.sendall(b"hello")
        assert b"[ERROR]" in read_until_closed(sender, timeout=30)[0]
        assert read_until_closed(receiver, timeout=30) == (b"", True)
    finally:
        for s in spare:
            s.close()
    h = relay.wait_idle()
    assert worker0 in {w["pid"] for w in h["workers"]} and h["workers_alive"] == 2
    assert "error handling" not in relay.stderr_text()

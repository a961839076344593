"""The data path end to end: real curl senders and receivers, sha256 of every receiver."""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import (curl_receiver, curl_sender, decode_chunked, health_retry, parse_head,
                      payload, raw_request, read_until_closed, sha256_file, start_slow_transfer,
                      wait_all, wait_for, waiting_count)

SIZES = {"empty": 0, "one-byte": 1, "1MiB": 1 << 20}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def relay_once(relay, tmp_path, path, n, size, chunked, receivers_first=True, seed=0):
    """One transfer with curl on both ends; returns (sender sha, [receiver sha], sender out)."""
    src = payload(tmp_path, size, f"src-{seed}.bin", seed)
    url = f"{relay.url}{path}?n={n}"
    outs = [tmp_path / f"out-{seed}-{i}.bin" for i in range(n)]
    receivers = []
    if receivers_first:
        receivers = [curl_receiver(url, o) for o in outs]
        wait_for(lambda: waiting_count(relay) == 1, what="receivers waiting")
    if chunked:
        sender = curl_sender(url, None, stdin=open(src, "rb"))
    else:
        sender = curl_sender(url, src)
    if not receivers_first:
        wait_for(lambda: waiting_count(relay) == 1, what="sender waiting")
        receivers = [curl_receiver(url, o) for o in outs]
    codes = wait_all([sender, *receivers])
    assert codes == [0] * (n + 1), (codes, sender.stderr.read(), sender.stdout.read())
    return sha256_file(src), [sha256_file(o) for o in outs], sender.stdout.read().decode()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_receivers_first_then_sender_all_get_same_bytes(relay, tmp_path, n, size, chunked):
    want, got, out = relay_once(relay, tmp_path, f"/rf-{n}-{size}-{chunked}", n, size, chunked)
    assert got == [want] * n
    assert f"Sent successfully to {n} receiver(s)" in out


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_sender_first_then_receivers_all_get_same_bytes(relay, tmp_path, size, chunked):
    want, got, out = relay_once(relay, tmp_path, f"/sf-{size}-{chunked}", 3, size, chunked,
                                receivers_first=False)
    assert got == [want] * 3
    assert "Waiting for 3 receiver(s)" in out


@pytest.mark.parametrize("transmit", ["copy", "sendfile"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_payload_of_many_windows_wraps_the_ring_intact(start_relay, tmp_path, transmit, chunked):
    relay = start_relay("--window", "512k", "--transmit", transmit, workers=2)
    size = 24 * 512 * 1024 + 12345          # 24 windows and a ragged end
    want, got, _ = relay_once(relay, tmp_path, "/wrap", 3, size, chunked)
    assert got == [want] * 3
    relay.wait_idle()


def test_fifty_curl_receivers_spread_over_both_workers_get_identical_bytes(start_relay,
                                                                           tmp_path):
    relay = start_relay("--window", "1M", workers=2)
    before = {w["index"]: w["receivers"] for w in relay.health()["workers"]}
    want, got, _ = relay_once(relay, tmp_path, "/fifty", 50, 3 << 20, chunked=True)
    assert got == [want] * 50
    after = {w["index"]: w["receivers"] for w in relay.health()["workers"]}
    served = {i: after[i] - before.get(i, 0) for i in after}
    # The cross-process path is the point of the design: both workers held receivers.
    assert sorted(served.values())[0] > 0, served
    assert sum(served.values()) == 50
    log = wait_for(lambda: re.search(r"path='/fifty'.*workers=(\S+)", relay.stderr_text()),
                   what="transfer log line")
    assert log.group(1).count("w") == 2, log.group(0)


def test_both_transmit_modes_deliver_to_fifty_receivers(start_relay, tmp_path):
    for transmit in ("copy", "sendfile"):
        relay = start_relay("--transmit", transmit, "--window", "512k", workers=2)
        want, got, _ = relay_once(relay, tmp_path, f"/m-{transmit}", 50, 2 << 20, chunked=False)
        assert got == [want] * 50
        assert f"transmit={transmit}" in relay.stderr_text()


def test_path_is_free_again_after_a_transfer(relay, tmp_path):
    for i in range(3):
        want, got, _ = relay_once(relay, tmp_path, "/again", 2, 1000 + i, chunked=bool(i % 2),
                                  seed=i)
        assert got == [want] * 2
    relay.wait_idle()


# -- failures ---------------------------------------------------------------------------------

def test_sender_killed_mid_body_gives_receivers_a_short_body(relay, tmp_path):
    url = f"{relay.url}/killed?n=3"
    outs = [tmp_path / f"k{i}" for i in range(3)]
    receivers = [curl_receiver(url, o) for o in outs]
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(url, None, stdin=subprocess.PIPE)
    sent = random.Random(1).randbytes(300_000)
    sender.stdin.write(sent)           # a chunked body that is never ended
    sender.stdin.flush()
    wait_for(lambda: all(o.exists() and o.stat().st_size >= 250_000 for o in outs),
             what="receivers got the first bytes")
    sender.kill()
    codes = wait_all(receivers)
    # A truncated chunked body: curl reports a partial transfer (18) or a receive error (56).
    assert all(c in (18, 56) for c in codes), codes
    # Short, never corrupt: each receiver has the start of what was sent.
    got = [o.read_bytes() for o in outs]
    assert [sha256_bytes(g) for g in got] == [sha256_bytes(sent[:len(g)]) for g in got]
    relay.wait_idle()


def test_content_length_sender_that_stops_short_gives_receivers_a_short_body(relay, tmp_path):
    url = f"{relay.url}/short?n=2"
    outs = [tmp_path / f"s{i}" for i in range(2)]
    receivers = [curl_receiver(url, o) for o in outs]
    wait_for(lambda: waiting_count(relay) == 1)
    s = raw_request(relay.port, b"PUT /short?n=2 HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 1000000\r\n\r\n" + b"y" * 5000)
    progress = b""
    while b"Start sending" not in progress:        # the worker has started the stream
        progress += s.recv(4096)
    s.close()                 # the 5000 bytes sent are read before the relay sees the EOF
    codes = wait_all(receivers)
    assert codes == [18, 18], codes
    assert [o.read_bytes() for o in outs] == [b"y" * 5000] * 2
    relay.wait_idle()


def test_receiver_leaving_mid_stream_does_not_disturb_the_others(relay, tmp_path):
    src = payload(tmp_path, 8 << 20)
    url = f"{relay.url}/leaver?n=3"
    outs = [tmp_path / f"l{i}" for i in range(2)]
    receivers = [curl_receiver(url, o) for o in outs]
    quitter = raw_request(relay.port, b"GET /leaver?n=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(url, None, stdin=open(src, "rb"))
    quitter.recv(100_000)                     # take some bytes, then vanish
    quitter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    quitter.close()
    codes = wait_all([sender, *receivers])
    assert codes == [0, 0, 0], codes
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 2
    out = sender.stdout.read().decode()
    assert "Sent successfully to 2 receiver(s)" in out and "1 receiver(s) left" in out
    relay.wait_idle()


def test_waiting_receiver_that_leaves_does_not_count_toward_n(relay, tmp_path):
    early = raw_request(relay.port, b"GET /impatient?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: waiting_count(relay) == 1)
    early.close()
    wait_for(lambda: waiting_count(relay) == 0, what="the leaver forgotten")
    want, got, _ = relay_once(relay, tmp_path, "/impatient", 2, 50_000, chunked=True)
    assert got == [want] * 2


def test_sender_is_told_and_closed_when_all_receivers_leave(relay, tmp_path):
    url = f"{relay.url}/deserted?n=2"
    quitters = [raw_request(relay.port, b"GET /deserted?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
                for _ in range(2)]
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(url, None, stdin=subprocess.PIPE)
    sender.stdin.write(b"z" * 200_000)
    sender.stdin.flush()
    for q in quitters:
        q.recv(1000)
        q.close()
    wait_for(lambda: "outcome=aborted: all receivers left" in relay.stderr_text(),
             what="the abort")
    # curl notices its closed connection on its next write (its body is still open).
    try:
        for _ in range(20):
            sender.stdin.write(b"z" * 100_000)
            sender.stdin.flush()
    except BrokenPipeError:
        pass
    assert wait_all([sender]) != [0]
    assert b"[ERROR] all receivers left" in sender.stdout.read()
    relay.wait_idle()


def test_waiting_sender_that_hangs_up_leaves_the_rendezvous(relay, tmp_path):
    s = raw_request(relay.port, b"PUT /hangup?n=1 HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 10\r\n\r\n")
    wait_for(lambda: waiting_count(relay) == 1)
    s.close()
    wait_for(lambda: waiting_count(relay) == 0, what="the waiting sender forgotten")
    want, got, _ = relay_once(relay, tmp_path, "/hangup", 1, 10, chunked=False)
    assert got == [want]


# -- pace ------------------------------------------------------------------------------------

class SlowReader(threading.Thread):
    """A raw-socket receiver that reads in small sips with pauses. At `hold_at` body bytes it
    stops reading until `go` is set, so whatever finishes meanwhile finished before it."""

    def __init__(self, port: int, path: str, hold_at: int, sip: int = 16384,
                 pause: float = 0.01):
        super().__init__(daemon=True)
        self.sock = raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.sock.settimeout(60)
        self.sip, self.pause, self.hold_at = sip, pause, hold_at
        self.raw = b""
        self.holding = threading.Event()
        self.go = threading.Event()
        self.done = threading.Event()
        self.start()

    def body_bytes(self) -> int:
        head_end = self.raw.find(b"\r\n\r\n")
        return 0 if head_end < 0 else len(self.raw) - head_end - 4

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(self.sip):
                self.raw += chunk
                if not self.go.is_set() and self.body_bytes() >= self.hold_at:
                    self.holding.set()
                    self.go.wait(120)
                time.sleep(self.pause)
        finally:
            self.done.set()


def dechunk(body: bytes) -> bytes:
    out, i = b"", 0
    while True:
        j = body.index(b"\r\n", i)
        size = int(body[i:j], 16)
        if size == 0:
            return out
        out += body[j + 2:j + 2 + size]
        i = j + 2 + size + 2


def test_slow_reader_does_not_hold_fast_receivers_within_the_window(relay, tmp_path):
    src = payload(tmp_path, 2 << 20)                 # fits the 4 MiB window
    url = f"{relay.url}/pace?n=4"
    outs = [tmp_path / f"f{i}" for i in range(3)]
    fast = [curl_receiver(url, o) for o in outs]
    slow = SlowReader(relay.port, "/pace?n=4", hold_at=256 * 1024)
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(url, src)
    try:
        # The slow reader sips its first 256 KiB, then reads nothing until the fast ones are
        # done: were they held to its pace, they would never finish (curl's --max-time).
        assert slow.holding.wait(60), "the slow reader never got its first bytes"
        assert wait_all(fast) == [0, 0, 0]
        assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 3
        behind = slow.body_bytes()
        assert not slow.done.is_set() and behind < src.stat().st_size, behind
    finally:
        slow.go.set()
    assert slow.done.wait(60)
    head, _, body = slow.raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()             # a Content-Length sender (curl -T file)
    assert wait_all([sender]) == [0]
    assert body == src.read_bytes()


def test_sendfile_ring_pages_held_by_a_stalled_socket_are_not_overwritten(start_relay, tmp_path):
    """The page-punch rule: a receiver that stops reading keeps sendfile'd ring pages queued
    in its socket while the others make the ring wrap several times; when it reads again it
    must see the original bytes, not the pages' later contents."""
    relay = start_relay("--window", "512k", "--transmit", "sendfile", workers=1)
    src = payload(tmp_path, 24 << 20)
    url = f"{relay.url}/punch?n=2"
    out = tmp_path / "fast"
    fast = curl_receiver(url, out)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)   # room for many laps
    stalled.connect(("127.0.0.1", relay.port))
    stalled.sendall(b"GET /punch?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(url, src)
    # The fast receiver gets all 24 MiB while the stalled one reads nothing: by then the
    # 512 KiB ring has lapped dozens of times over whatever the stalled socket holds queued.
    assert wait_all([fast]) == [0]
    stalled.settimeout(30)
    data = b""
    while True:
        chunk = stalled.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    assert wait_all([sender]) == [0]
    body = data.partition(b"\r\n\r\n")[2]
    assert len(body) == len(src.read_bytes())
    assert body == src.read_bytes()
    assert sha256_file(out) == sha256_file(src)


def test_http10_receiver_of_a_chunked_sender_gets_the_plain_body(relay, tmp_path):
    src = payload(tmp_path, 3 << 20)
    s = raw_request(relay.port, b"GET /old?n=1 HTTP/1.0\r\n\r\n")
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(f"{relay.url}/old?n=1", None, stdin=open(src, "rb"))
    s.settimeout(30)
    data = b""
    while chunk := s.recv(1 << 20):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert body == src.read_bytes()
    assert wait_all([sender]) == [0]


def test_worker_killed_mid_transfer_is_respawned_and_relay_serves_on(start_relay, tmp_path):
    relay = start_relay(workers=2)
    size = 2 << 20
    # A transfer in flight: its feeder paused at 512 KiB, every receiver part of the way.
    t = start_slow_transfer(relay, tmp_path, "/mid-kill", n=2, size=size,
                            pause_at=512 * 1024, max_time=30)
    wait_for(lambda: all(o.exists() and o.stat().st_size > 0 for o in t.outs),
             what="every receiver has bytes")
    assert all(o.stat().st_size < size for o in t.outs)
    # The sender's worker: the one that counted the pipe's sender (published once a second).
    victim = wait_for(lambda: [w["pid"] for w in health_retry(relay)["workers"]
                               if w["senders"] == 1], what="the sender's worker")[0]
    os.kill(victim, signal.SIGKILL)
    codes = wait_all(t.receivers)
    assert all(c in (18, 56) for c in codes), codes          # a short body, visibly
    sender_code, _ = t.wait()
    assert sender_code != 0
    got = [o.read_bytes() for o in t.outs]
    assert all(len(g) < size for g in got)
    assert [sha256_bytes(g) for g in got] == [sha256_bytes(t.data[:len(g)]) for g in got]

    def respawned():
        try:        # a request may land in the dead worker's accept queue: reset, retry
            workers = relay.health()["workers"]
        except OSError:
            return False
        return len(workers) == 2 and victim not in [w["pid"] for w in workers]
    wait_for(respawned, what="respawned worker")
    want, got, _ = relay_once(relay, tmp_path, "/after-kill", 3, 100_000, chunked=True)
    assert got == [want] * 3


# -- what follows a sender's body -------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2], ids=["splice", "ring"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("arrival", ["with-the-head", "split", "after-the-head"])
def test_a_request_pipelined_behind_a_senders_body_is_not_part_of_it(start_relay, n, framing,
                                                                     arrival):
    """The parser goes on past the sender's message into whatever follows; before the fix
    the next request's body was appended to the pipe's (and a Content-Length splice never
    ended). Every receiver gets exactly the sender's body, and the sender is told success:
    the body read with the head, partly with it, or none of it (passed through as it came)."""
    relay = start_relay(workers=2)
    body = b"hello, pipelined world"
    path = f"/pipelined-{framing}-{arrival}?n={n}".encode()
    receivers = [raw_request(relay.port, b"GET %s HTTP/1.1\r\nHost: r\r\n\r\n" % path)
                 for _ in range(n)]
    wait_for(lambda: waiting_count(relay) == 1, what="the receivers waiting")
    if framing == "chunked":
        head = b"PUT %s HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n" % path
        wire = b"5\r\nhello\r\n11\r\n, pipelined world\r\n0\r\n\r\n"
    else:
        head = b"PUT %s HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n" % (path, len(body))
        wire = body
    behind = b"PUT /other HTTP/1.1\r\nHost: r\r\nContent-Length: 6\r\n\r\nEVIL!!"
    first = {"with-the-head": len(wire) + len(behind), "split": 3, "after-the-head": 0}[arrival]
    sender = raw_request(relay.port, head + (wire + behind)[:first])
    if first < len(wire):
        wait_for(lambda: relay.health()["pipes_streaming"] == 1, what="the transfer started")
        sender.sendall((wire + behind)[first:])
    for r in receivers:
        data, closed = read_until_closed(r, timeout=30)
        status, headers, raw = parse_head(data)
        assert closed and status == 200
        got = decode_chunked(raw) if framing == "chunked" else (raw, True)
        assert got == (body, True)
        if framing == "content-length":
            assert headers["content-length"] == str(len(body))
    assert b"Sent successfully" in read_until_closed(sender, timeout=30)[0]
    relay.wait_idle()

"""Fixtures: the real daemon as a subprocess on an ephemeral port, real curl clients.

No mocks: every test talks to `python -m relayd` over loopback sockets. Each relay test
compares every receiver's sha256 with the sender's.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

CURL = shutil.which("curl")
URL_RE = re.compile(rb"http://[0-9.]+:[0-9]+")
START_TIMEOUT_S = 20
CLIENT_TIMEOUT_S = 60
MIB = 1 << 20
SHORT_BODY = (18, 56)                # curl: partial transfer / receive error
FEED_BYTES = 64 * 1024               # a slow sender writes this much ...
FEED_PAUSE_S = 0.02                  # ... every 20 ms
LOG_RE = re.compile(r"relayd: transfer path='(?P<path>[^']*)' n=(?P<n>\d+) bytes=(?P<bytes>\d+) "
                    r"seconds=\S+ transmit=\S+ receivers_done=(?P<done>\d+) "
                    r"receivers_lost=(?P<lost>\d+) sender=w(?P<sender>\d+) "
                    r"workers=(?P<workers>\S*) outcome=(?P<outcome>.*)$", re.M)


class Relay:
    """A running relayd: `url`, `port`, `stderr_text()`, `health()`."""

    def __init__(self, tmp: Path, *args: str, workers: int = 1, env: dict | None = None,
                 preexec=None):
        self.args = ["--host", "127.0.0.1", "--port", "0", "--workers", str(workers), *args]
        self.workers = workers
        self.stderr_path = tmp / f"relayd-{os.getpid()}-{time.monotonic_ns()}.err"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "relayd", *self.args],
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env,
                                     preexec_fn=preexec)
        self.banner = self._read_banner()
        self.banner_at = time.monotonic()
        self.url = URL_RE.search(self.banner).group().decode()
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read_banner(self) -> bytes:
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"relayd did not start: {self.stderr_text()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1)
                if not chunk:
                    continue
                line += chunk
        return line

    def stderr_text(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def wait_idle(self, timeout: float = 20) -> dict:
        """Wait until no pipe is waiting or streaming and every slot is free."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if not (h["pipes_waiting"] or h["pipes_streaming"] or h["slots_in_use"]):
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"relay not idle: {h}")
            time.sleep(0.05)

    def exited(self, timeout: float) -> int | None:
        """The exit status once the daemon exits within `timeout` s, else None."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        stop_process(self.proc, sig, timeout)
        self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """Signal a process we started (by its PID), SIGKILL it if it outlives `timeout`."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture
def start_relay(tmp_path):
    """Factory: start_relay('--window', '512k', workers=2) -> Relay; stopped after the test."""
    started = []

    def start(*args: str, workers: int = 1, env: dict | None = None, preexec=None) -> Relay:
        relay = Relay(tmp_path, *args, workers=workers, env=env, preexec=preexec)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture(params=[1, 2], ids=["W1", "W2"])
def relay(request, start_relay) -> Relay:
    """A default relay, once with one worker and once with two."""
    return start_relay(workers=request.param)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def payload(tmp_path: Path, size: int, name: str = "payload.bin", seed: int = 0) -> Path:
    """A file of `size` pseudo-random bytes (deterministic per seed)."""
    path = tmp_path / name
    rnd = __import__("random").Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    return path


def curl_receiver(url: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([CURL, "-sS", "--max-time", str(CLIENT_TIMEOUT_S), *extra,
                             "-o", str(out), url], stderr=subprocess.PIPE)


def curl_sender(url: str, source: Path | None, *extra: str, stdin=None) -> subprocess.Popen:
    """`curl -T file` (Content-Length) or, with source None, `curl -T -` (chunked) from stdin."""
    return subprocess.Popen([CURL, "-sS", "--max-time", str(CLIENT_TIMEOUT_S), *extra,
                             "-T", str(source) if source else "-", url],
                            stdin=stdin if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_all(procs, timeout: float = CLIENT_TIMEOUT_S + 10) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append("timeout")
    return codes


def wait_for(predicate, timeout: float = 15, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def waiting_count(relay: Relay) -> int:
    return relay.health()["pipes_waiting"]


def raw_request(port: int, request: bytes, timeout: float = 10) -> socket.socket:
    """Open a socket to the relay and send raw request bytes; the caller reads."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(request)
    return s


def read_response(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the relay closes (or limit bytes)."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return data


def http(port: int, method: str, target: str, headers: dict | None = None,
         body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request with Connection: close; returns (status, headers lowercased, body)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("PUT", "POST"):
        lines.append(f"Content-Length: {len(body)}")
    s = raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    data = read_response(s)
    s.close()
    return parse_head(data)


def parse_head(data: bytes) -> tuple[int, dict, bytes]:
    """(status, headers lowercased, what follows the head) of a raw response."""
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers, rest


def read_until_closed(sock: socket.socket, timeout: float = 10) -> tuple[bytes, bool]:
    """(everything until the peer closed, whether it closed within `timeout`)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return data, True
        except socket.timeout:
            return data, False
        if not chunk:
            return data, True
        data += chunk
    return data, False


def health_retry(relay, timeout: float = 15) -> dict:
    """/health, retried: a connection can land in a dying worker's queue and be reset."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return relay.health()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)



def curl_transfer_works(relay, tmp_path: Path, path: str, n: int = 3,
                        size: int = 300_000) -> None:
    """A fresh curl transfer, receivers first; every receiver's sha256 is the sender's."""
    src = payload(tmp_path, size, f"{path.strip('/')}.src", seed=size)
    url = f"{relay.url}{path}?n={n}"
    outs = [tmp_path / f"{path.strip('/')}-{i}.out" for i in range(n)]
    receivers = [curl_receiver(url, o) for o in outs]
    sender = curl_sender(url, src)
    codes = wait_all([sender, *receivers])
    assert codes == [0] * (n + 1), (codes, sender.stdout.read())
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * n


class SlowTransfer:
    """A chunked curl sender (`curl -T -`) fed from a thread, FEED_BYTES every FEED_PAUSE_S,
    and n curl receivers. Feeding stops at `pause_at` bytes until `release()`."""

    def __init__(self, relay, tmp_path: Path, path: str, n: int, size: int,
                 pause_at: int | None = None, seed: int = 0, max_time: int = 60):
        self.data = random.Random(seed).randbytes(size)
        self.sha = hashlib.sha256(self.data).hexdigest()
        self.url = f"{relay.url}{path}?n={n}"
        self.path = path
        self.outs = [tmp_path / f"{path.strip('/')}-{i}.out" for i in range(n)]
        limit = ("--max-time", str(max_time))
        self.receivers = [curl_receiver(self.url, o, *limit) for o in self.outs]
        self.sender = curl_sender(self.url, None, *limit, stdin=subprocess.PIPE)
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.go = threading.Event()
        self.broken = False
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        pos = 0
        try:
            while pos < len(self.data):
                if self.pause_at is not None and pos >= self.pause_at and not self.go.is_set():
                    self.paused.set()
                    self.go.wait(120)
                self.sender.stdin.write(self.data[pos:pos + FEED_BYTES])
                self.sender.stdin.flush()
                pos += FEED_BYTES
                time.sleep(FEED_PAUSE_S)
        except OSError:              # curl died (its relay connection was cut): stop feeding
            self.broken = True
        finally:
            try:
                self.sender.stdin.close()
            except OSError:
                pass

    def release(self) -> None:
        self.go.set()

    def wait(self, timeout: float = 70) -> tuple[int, list]:
        """(sender exit code, [receiver exit codes])."""
        self.release()
        codes = wait_all([self.sender, *self.receivers], timeout)
        self.thread.join(10)
        return codes[0], codes[1:]

    def receiver_shas(self) -> list[str]:
        return [sha256_file(o) if o.exists() else "" for o in self.outs]


def start_slow_transfer(relay, tmp_path, path, n=2, size=2 * MIB, pause_at=512 * 1024,
                        seed=0, max_time=60) -> SlowTransfer:
    """A slow transfer that is streaming and paused at `pause_at` bytes when this returns."""
    t = SlowTransfer(relay, tmp_path, path, n, size, pause_at, seed, max_time)
    wait_for(lambda: health_retry(relay)["pipes_streaming"] >= 1, timeout=20,
             what=f"{path} streaming")
    assert t.paused.wait(20), "the feeder never reached its pause point"
    return t


def transfer_logs(relay) -> dict[str, dict]:
    """Transfer log lines by path: n, bytes, done, lost, sender, workers {index: count}."""
    found = {}
    for m in LOG_RE.finditer(relay.stderr_text()):
        d = m.groupdict()
        d["workers"] = {int(w[1:].split(":")[0]): int(w.split(":")[1])
                        for w in d["workers"].split(",") if w}
        for k in ("n", "bytes", "done", "lost", "sender"):
            d[k] = int(d[k])
        found[d["path"]] = d
    return found


def decode_chunked(wire: bytes) -> tuple[bytes, bool]:
    """(payload, whether the terminator arrived) of a chunked response body, strictly."""
    out, i = b"", 0
    while True:
        lf = wire.find(b"\r\n", i)
        if lf < 0:
            return out, False
        size = int(wire[i:lf].partition(b";")[0], 16)
        if size == 0:
            return out, wire[lf:lf + 4] == b"\r\n\r\n"
        if len(wire) < lf + 2 + size + 2:
            return out + wire[lf + 2:lf + 2 + size], False
        assert wire[lf + 2 + size:lf + 4 + size] == b"\r\n"
        out += wire[lf + 2:lf + 2 + size]
        i = lf + 4 + size


@pytest.fixture(scope="session", autouse=True)
def _curl_present():
    if CURL is None:
        pytest.exit("curl is required: apt-get install -y curl", returncode=2)

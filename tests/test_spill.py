"""Spill: lag beyond the window goes to a per-pipe file, so a slow receiver slows only itself."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (curl_receiver, curl_sender, payload, sha256_file, wait_all, wait_for,
                      waiting_count)

WINDOW = 512 * 1024
SETTLED_S = 2.5              # a figure unchanged this long (2+ publications) has settled


class ThrottledReader(threading.Thread):
    """A raw-socket receiver with a small socket buffer reading `rate` bytes/s: its lag cannot
    hide in kernel buffers, so it really lags. Collects the body (chunked framing removed).
    With `go`, it reads the response head and then nothing more until `go` is set."""

    def __init__(self, port: int, path: str, rate: int, go: threading.Event | None = None):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.sock.settimeout(60)
        self.rate = rate
        self.go = go
        self.has_head = threading.Event()
        self.raw = b""
        self.finished_at = None
        self.start()

    def run(self):
        sip = max(1024, self.rate // 50)
        try:
            while chunk := self.sock.recv(sip):
                self.raw += chunk
                if not self.has_head.is_set() and b"\r\n\r\n" in self.raw:
                    self.has_head.set()
                    if self.go is not None:
                        self.go.wait(120)
                time.sleep(len(chunk) / self.rate)
        except OSError:
            pass
        self.finished_at = time.monotonic()

    def body(self) -> tuple[bytes, bool]:
        """(body bytes, whether the body is complete: its Content-Length reached, or the
        chunked terminator seen)."""
        head, _, rest = self.raw.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                return rest, len(rest) == int(line.split(b":")[1])
        out, i = [], 0
        while True:
            j = rest.find(b"\r\n", i)
            if j < 0:
                return b"".join(out), False
            size = int(rest[i:j], 16)
            if size == 0:
                return b"".join(out), True
            if len(rest) < j + 2 + size:
                out.append(rest[j + 2:])
                return b"".join(out), False
            out.append(rest[j + 2:j + 2 + size])
            i = j + 2 + size + 2


def spill_fds(relay, spill_dir) -> list[str]:
    """Descriptors any relayd process holds on files in spill_dir (unlinked ones included)."""
    import psutil
    found = []
    for p in [psutil.Process(relay.proc.pid), *psutil.Process(relay.proc.pid).children()]:
        for fd in os.listdir(f"/proc/{p.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(spill_dir)):
                found.append(target)
    return found


def metric(relay, name: str) -> float:
    """A /metrics figure summed over every worker (each publishes about once a second)."""
    with urllib.request.urlopen(relay.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


def settled(read, what: str, timeout: float = 30):
    """read()'s value once it has stayed the same for SETTLED_S (checked 5 times a second)."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() - since < SETTLED_S:
        assert time.monotonic() < deadline, f"{what} never settled (last {value})"
        time.sleep(0.2)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def run_pipe(relay, tmp_path, size, fast=4, rate=2 << 20, path="/sp", query="",
             sender_rate=None, go=None):
    src = payload(tmp_path, size)
    n = fast + 1
    url = f"{relay.url}{path}?n={n}{query}"
    outs = [tmp_path / f"fast{i}" for i in range(fast)]
    fast_procs = [curl_receiver(url, o) for o in outs]
    slow = ThrottledReader(relay.port, f"{path}?n={n}{query}", rate, go)
    wait_for(lambda: waiting_count(relay) == 1)
    extra = ("--limit-rate", sender_rate) if sender_rate else ()
    sender = curl_sender(url, src, *extra)
    return src, outs, fast_procs, slow, sender


def test_slow_receiver_spills_while_fast_ones_finish_first_with_identical_bytes(start_relay,
                                                                                 tmp_path):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    relay = start_relay("--window", "512k", "--spill-dir", str(spill_dir), workers=2)
    size = 30 * WINDOW
    go = threading.Event()      # the slow receiver reads nothing past its head until then
    src, outs, fast, slow, sender = run_pipe(relay, tmp_path, size, go=go)
    try:
        spilled = wait_for(lambda: sum(w["spill_bytes"] for w in relay.health()["workers"]),
                           what="spill in use")
        assert wait_all(fast) == [0] * 4
        fast_done = time.monotonic()
        assert slow.is_alive() and len(slow.raw) < size, "the slow receiver is not behind"
        assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 4
    finally:
        slow.rate = 64 << 20    # the order is shown: it may now take its bytes from the file
        go.set()
    slow.join(60)
    body, complete = slow.body()
    assert complete and body == src.read_bytes()
    assert slow.finished_at > fast_done
    assert wait_all([sender]) == [0]
    relay.wait_idle()
    assert spilled > 0
    assert spill_fds(relay, spill_dir) == [] and os.listdir(spill_dir) == []


def test_a_lone_slow_receiver_holds_the_producer_and_never_spills(start_relay, tmp_path):
    """With one receiver nobody gains from a spill: the file would only cost a write and a
    read per byte. The producer is held instead, and every byte still arrives."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    relay = start_relay("--window", "512k", "--spill-dir", str(spill_dir), workers=2)
    src = payload(tmp_path, 12 * WINDOW)
    reader = ThrottledReader(relay.port, "/lone?n=1", 4 << 20)
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(f"{relay.url}/lone?n=1", src)
    while reader.is_alive():
        assert sum(w["spill_bytes"] for w in relay.health()["workers"]) == 0
        assert spill_fds(relay, spill_dir) == []
        time.sleep(0.05)
    body, complete = reader.body()
    assert complete and body == src.read_bytes()
    assert wait_all([sender]) == [0]


@pytest.mark.parametrize("how", ["daemon", "per-pipe"])
def test_drop_policy_cuts_the_receiver_past_the_spill_limit(start_relay, tmp_path, how):
    # A limit well above what a fast curl may lag on a loaded machine: only the slow one
    # (1 MiB/s against a producer at line speed) gets that far behind.
    args = ["--window", "512k", "--spill-limit", "6M", "--spill-dir", str(tmp_path)]
    args += ["--slow", "drop"] if how == "daemon" else ["--slow", "block"]
    relay = start_relay(*args, workers=2)
    query = "&slow=drop" if how == "per-pipe" else ""
    # A producer (20 MB/s) slower than the fast receivers and faster than the slow one
    # (1 MiB/s): with drop, whoever is slowest when the limit is reached is cut, so a producer
    # outrunning every receiver would cut fast ones too.
    src, outs, fast, slow, sender = run_pipe(relay, tmp_path, 20 << 20, rate=1 << 20,
                                             query=query, sender_rate="20M")
    assert wait_all(fast) == [0] * 4
    the_fast_complete_and_the_slow_one_is_cut_short(relay, src, outs, slow, sender)


def the_fast_complete_and_the_slow_one_is_cut_short(relay, src, outs, slow, sender) -> None:
    """After the fast receivers ended: their bytes are the sender's, the slow one's are a
    prefix (short, never corrupt), the sender succeeded, and the log says 4 done, 1 lost."""
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 4
    slow.join(60)
    body, complete = slow.body()
    assert not complete and len(body) < len(src.read_bytes())
    assert body == src.read_bytes()[:len(body)]
    assert wait_all([sender]) == [0]
    log = wait_for(lambda: "path='/sp'" in relay.stderr_text() and relay.stderr_text())
    assert "receivers_done=4 receivers_lost=1" in log


@pytest.mark.parametrize("budget", ["4M", "0"], ids=["budget-runs-out-mid-spill", "no-budget"])
def test_drop_policy_cuts_the_slowest_when_the_spill_budget_is_the_bound(start_relay, tmp_path,
                                                                         budget):
    """--slow drop with the node's spill budget met before the pipe's spill limit: the
    slowest is cut as at the limit (before, it held the producer and every fast receiver:
    the budget stopped the file, and the cut waited for a lag of --spill-limit)."""
    relay = start_relay("--window", "512k", "--spill-limit", "64M", "--spill-budget", budget,
                        "--slow", "drop", "--spill-dir", str(tmp_path), workers=2)
    # With no spill at all (budget 0), as when the disk refuses one, the ring is all the lag
    # there is and a receiver is cut once its socket has not drained for a grace time: this
    # one reads its head and then stops until the fast ones are done.
    go = threading.Event() if budget == "0" else None
    src, outs, fast, slow, sender = run_pipe(relay, tmp_path, 20 << 20, rate=1 << 20,
                                             sender_rate="20M", go=go)
    try:
        assert wait_all(fast) == [0] * 4
    finally:
        if go is not None:
            go.set()
    the_fast_complete_and_the_slow_one_is_cut_short(relay, src, outs, slow, sender)
    settled(lambda: metric(relay, "relayd_spill_bytes"), "the spill bytes")
    assert metric(relay, "relayd_spill_bytes") == 0


def test_a_lone_receiver_is_never_cut_by_drop_when_the_budget_is_spent(start_relay, tmp_path):
    """A pipe of n = 1 never spills, so the spent budget is no bound of its: under --slow
    drop its receiver holds the producer, as the README says, and gets every byte after a
    pause longer than the drop grace (the first cut for the budget cut it short)."""
    relay = start_relay("--window", "512k", "--transmit", "copy", "--slow", "drop",
                        "--spill-budget", "0", "--spill-dir", str(tmp_path), workers=2)
    src = payload(tmp_path, 8 << 20)
    go = threading.Event()
    lone = ThrottledReader(relay.port, "/lone?n=1", 64 << 20, go)
    wait_for(lambda: waiting_count(relay) == 1, what="the receiver waiting")
    sender = curl_sender(f"{relay.url}/lone?n=1", src)
    try:
        assert lone.has_head.wait(30), "the receiver got no response head"
        settled(lambda: metric(relay, "relayd_received_bytes_total"), "the bytes received")
    finally:
        go.set()                         # it paused past the drop grace; now it reads
    lone.join(60)
    body, complete = lone.body()
    assert complete and body == src.read_bytes()
    assert wait_all([sender]) == [0]


def test_block_policy_holds_the_producer_at_the_spill_limit_and_loses_nothing(start_relay,
                                                                              tmp_path):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    limit = 1 << 20
    relay = start_relay("--window", "512k", "--spill-limit", "1M", "--slow", "block",
                        "--spill-dir", str(spill_dir), workers=2)
    size = 16 << 20                 # far more than the window, the limit and socket buffers
    go = threading.Event()
    src, outs, fast, slow, sender = run_pipe(relay, tmp_path, size, rate=64 << 20, go=go)
    try:
        assert slow.has_head.wait(30), "the slow receiver got no response head"
        # The slow receiver reads nothing now. Once the relay has taken all it may, it takes
        # no more of the sender's body: it holds the producer, and the fast receivers with it.
        held = settled(lambda: metric(relay, "relayd_received_bytes_total"),
                       "the bytes the relay received")
        spilled = metric(relay, "relayd_spill_bytes")
        fast_got = [o.stat().st_size if o.exists() else 0 for o in outs]
        print(f"\nheld at {held / (1 << 20):.2f} MiB received of {size >> 20} MiB, "
              f"spill {spilled / (1 << 20):.2f} MiB, fast receivers at {fast_got}")
        assert 0 < held < size, held
        assert 0 < spilled <= limit, spilled
        assert all(got < size for got in fast_got), fast_got
        assert [p.poll() for p in [sender, *fast]] == [None] * 5, "finished while held"
    finally:
        go.set()                    # the slow receiver reads again: the producer goes on
    slow.join(60)
    body, complete = slow.body()
    assert complete and body == src.read_bytes()
    assert wait_all([sender, *fast]) == [0] * 5
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 4
    wait_for(lambda: metric(relay, "relayd_received_bytes_total") == size,
             what="every byte received once the slow receiver read again")


def test_exhausted_spill_budget_falls_back_to_holding_the_producer(start_relay, tmp_path):
    """--spill-budget 0: no pipe may spill a byte, so a receiver that lags past the window
    holds the producer instead; no spill file is ever opened."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    relay = start_relay("--window", "512k", "--spill-budget", "0", "--spill-dir",
                        str(spill_dir), workers=1)
    size = 8 << 20
    go = threading.Event()
    src, outs, fast, slow, sender = run_pipe(relay, tmp_path, size, rate=16 << 20, go=go)
    samples = 0

    def nothing_spilled() -> None:
        nonlocal samples
        assert metric(relay, "relayd_spill_bytes") == 0
        assert spill_fds(relay, spill_dir) == []
        samples += 1

    try:
        assert slow.has_head.wait(30), "the slow receiver got no response head"
        held = settled(lambda: (nothing_spilled(),
                                metric(relay, "relayd_received_bytes_total"))[1],
                       "the bytes the relay received")
        assert 0 < held < size, held                 # held at the window, not spilled
        assert [p.poll() for p in [sender, *fast]] == [None] * 5, "finished while held"
    finally:
        go.set()
    while slow.is_alive():
        nothing_spilled()
        slow.join(0.1)
    nothing_spilled()
    body, complete = slow.body()
    assert complete and body == src.read_bytes()
    assert wait_all([sender, *fast]) == [0] * 5
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 4
    assert samples > 10 and os.listdir(spill_dir) == []


def test_worker_killed_mid_spill_leaves_no_spill_file(start_relay, tmp_path):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    relay = start_relay("--window", "512k", "--spill-dir", str(spill_dir), workers=2)
    src, outs, fast, slow, sender = run_pipe(relay, tmp_path, 40 * WINDOW, rate=1 << 20)
    wait_for(lambda: sum(w["spill_bytes"] for w in relay.health()["workers"]),
             what="spill in use")
    victim = next(w for w in relay.health()["workers"] if w["spill_bytes"])["pid"]
    os.kill(victim, signal.SIGKILL)         # the producer's worker: the transfer aborts
    codes = wait_all([sender, *fast])
    assert codes[0] != 0 and all(c in (0, 18, 56) for c in codes[1:])
    data = src.read_bytes()
    for code, out in zip(codes[1:], outs):       # whole if it exited 0, else a prefix
        got = out.read_bytes() if out.exists() else b""
        assert got == data if code == 0 else got == data[:len(got)], (code, len(got))
    slow.rate = 1 << 30                          # only its bytes matter now: read the rest
    slow.join(60)
    body, _ = slow.body()
    # The lagging one: short, never corrupt (or whole, when the body had all arrived and its
    # worker lived on to send it from the spill file).
    assert body == data[:len(body)]
    slow.sock.close()
    wait_for(lambda: relay.health()["workers_alive"] == 2 and relay.health()["slots_in_use"] == 0,
             what="respawn and cleanup")
    wait_for(lambda: spill_fds(relay, spill_dir) == [], what="spill descriptors closed")
    assert os.listdir(spill_dir) == []


def test_leftover_spill_files_are_removed_at_start(start_relay, tmp_path):
    leftover = tmp_path / "relayd-spill-abc123"
    leftover.write_bytes(b"x" * 1000)
    relay = start_relay("--spill-dir", str(tmp_path), workers=1)
    assert not leftover.exists()
    assert "removed 1 spill file" in relay.stderr_text()

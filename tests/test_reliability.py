"""Reliability: timeouts, limits, faults, signals, a soak and a fuzz run against the real daemon.

Real `python -m relayd` processes, real sockets, real curl; no mocks. Every transfer compares
each receiver's sha256 with the sender's. Nothing here asserts speed: every wait is a bounded
timeout so a broken daemon fails the test instead of hanging it.

Sizes are CI-sized (the whole module runs in about a minute on two cores). The soak's
10,000-transfer run:

    RELAYD_SOAK_TRANSFERS=10000 python -m pytest -s -o timeout=1500 \\
        tests/test_reliability.py -k soak

prints transfers, bytes and the daemon's RSS and descriptors before and after (measured here:
10,000 transfers, 20.6 GB delivered in 146 s, RSS 82.9 -> 90.6 MiB, fds 63 -> 63). `-s` also
shows the figures of the 10,000 abandoned paths test, the kill -9 pipe table and the reload count.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import resource
import signal
import socket
import sys
import threading
import time
import urllib.request

import psutil
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
from bench_lib.hammer import ConnectionHammer  # noqa: E402
from conftest import (MIB, SHORT_BODY, SlowTransfer, curl_receiver, curl_sender,
                      curl_transfer_works, health_retry, payload, raw_request, read_response,
                      read_until_closed, sha256_file, start_slow_transfer, transfer_logs,
                      wait_all, wait_for, waiting_count)



# -- helpers ----------------------------------------------------------------------------------
def daemon_processes(relay) -> list[psutil.Process]:
    sup = psutil.Process(relay.proc.pid)
    return [sup, *sup.children(recursive=True)]


def daemon_rss(relay) -> int:
    total = 0
    for p in daemon_processes(relay):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def daemon_fds(relay) -> int:
    total = 0
    for p in daemon_processes(relay):
        try:
            total += p.num_fds()
        except psutil.NoSuchProcess:
            pass
    return total


def connections(relay) -> int:
    """Connections the workers hold, less the one answering this /health."""
    return sum(w["connections"] for w in health_retry(relay)["workers"]) - 1


VERSION_REQUEST = b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def queue_requests(port: int, count: int) -> list[socket.socket]:
    """`count` connections whose handshake the kernel completed and whose request is sent:
    they wait in a listener's queue while nobody accepts."""
    return [raw_request(port, VERSION_REQUEST, timeout=20) for _ in range(count)]


def answers(socks: list[socket.socket]) -> list[str]:
    """What each queued connection got: "200", another status line, "reset" or "none"."""
    got = []
    for s in socks:
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
            got.append("200" if data.startswith(b"HTTP/1.1 200") else repr(data[:20]))
        except ConnectionResetError:
            got.append("reset")
        except socket.timeout:
            got.append("none" if not data else repr(data[:20]))
        finally:
            s.close()
    return got


def listening_sockets(port: int) -> int:
    """Listening TCP sockets on the port, from /proc/net/tcp (state 0A): the open seats."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return sum(int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == "0A" for row in rows)


def descriptors(pid: int) -> dict[int, str]:
    """fd -> what it points at (`socket:[inode]`, `pipe:[inode]`, ...), from /proc."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass                          # closed while we looked
    return found


# -- slow clients and timeouts ----------------------------------------------------------------
def test_slowloris_client_gets_408_and_is_closed_while_a_normal_transfer_completes(
        start_relay, tmp_path):
    relay = start_relay("--head-timeout", "1", workers=2)
    slow = raw_request(relay.port, b"GET /x HTTP/1.1\r\nHo")
    stop = threading.Event()
    head_sent = threading.Event()   # never, unless the relay waited out the whole trickle

    def trickle():
        # A byte every 0.5 s, never idle, never a whole head (about 110 s of it): only the
        # absolute head timeout can end this connection before the head is complete.
        for byte in b"st: relay\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n":
            if stop.wait(0.5):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return
        head_sent.set()
    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    # Meanwhile a normal transfer on the same relay.
    src = payload(tmp_path, 2 * MIB)
    url = f"{relay.url}/beside-slowloris?n=2"
    outs = [tmp_path / f"beside-{i}" for i in range(2)]
    receivers = [curl_receiver(url, o) for o in outs]
    sender = curl_sender(url, src)
    data, closed = read_until_closed(slow, timeout=60)
    cut_mid_head = not head_sent.is_set()
    stop.set()
    slow.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"[ERROR]" in data
    assert closed, "the slowloris connection was left open"
    assert cut_mid_head, "the relay let the trickle finish its head"
    assert wait_all([sender, *receivers]) == [0, 0, 0]
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 2
    trickler.join(5)


def test_a_lone_receiver_and_a_lone_sender_get_their_rendezvous_timeout_and_no_pipe_remains(
        start_relay, tmp_path):
    relay = start_relay("--rendezvous-timeout", "1", workers=2)
    receiver = raw_request(relay.port, b"GET /lonely-receiver?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    src = payload(tmp_path, 200_000)
    sender = curl_sender(f"{relay.url}/lonely-sender?n=1", src, "--max-time", "15")
    data, closed = read_until_closed(receiver, timeout=10)
    receiver.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert data.partition(b"\r\n\r\n")[2].startswith(b"[ERROR] ")
    assert closed
    code = wait_all([sender], timeout=20)[0]
    out = sender.stdout.read().decode(errors="replace")
    assert "[ERROR]" in out, out
    assert code != 0, (code, out)
    wait_for(lambda: (lambda h: h["pipes_waiting"] == 0 and h["pipes_streaming"] == 0)(
        relay.health()), what="no pipe left")
    # Both refusals are logged and counted, the sender's too (its 200 had gone out: it was
    # told with an [ERROR] line, and was neither).
    log = wait_for(lambda: relay.stderr_text().count("rejected status=408") == 2 and
                   relay.stderr_text(), what="both 408s logged")
    assert "path='/lonely-sender'" in log and "path='/lonely-receiver'" in log


def test_the_connection_beyond_max_connections_gets_503_with_retry_after_and_never_hangs(
        start_relay):
    relay = start_relay("--max-connections", "5", workers=1)
    # Five waiting receivers hold the worker's five connections (one listener: FIFO accepts).
    held = [raw_request(relay.port, f"GET /held-{i}?n=2 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            for i in range(5)]
    for _ in range(3):
        extra = raw_request(relay.port, b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n",
                            timeout=30)
        data, closed = read_until_closed(extra, timeout=30)
        extra.close()
        assert data.startswith(b"HTTP/1.1 503"), data[:200]
        assert b"\r\nretry-after: " in data.lower()
        assert closed, "the refused connection was left open"
    # Counted and logged as every refusal is (they were neither).
    log = wait_for(lambda: relay.stderr_text().count("rejected status=503") >= 3 and
                   relay.stderr_text(), what="three refusals logged")
    assert "connection limit" in log
    for s in held:
        s.close()

    def refused_503() -> float:
        try:
            with urllib.request.urlopen(relay.url + "/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:                   # refused itself while the held ones go
            return 0.0
        return sum(float(v) for v in re.findall(
            r'^relayd_rejected_requests_total\{[^}]*status="503"[^}]*\} (\S+)$', text, re.M))
    wait_for(lambda: refused_503() >= 3, timeout=10, what="three 503s counted")

    def served():
        try:
            return health_retry(relay, timeout=1)["pipes_waiting"] == 0
        except (OSError, AssertionError):
            return False
    wait_for(served, what="served again")
    for _ in range(8):               # more than five, one after another
        s = raw_request(relay.port,
                        b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.close()
    wait_for(lambda: connections(relay) == 0, what="no connection held")


def test_a_stalled_receiver_is_closed_short_and_the_other_receivers_complete(start_relay,
                                                                            tmp_path):
    relay = start_relay("--window", "512k", "--receiver-stall-timeout", "2", workers=2)
    src = payload(tmp_path, 16 * MIB)
    url = f"{relay.url}/stalled?n=3"
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.settimeout(20)
    stalled.connect(("127.0.0.1", relay.port))
    stalled.sendall(b"GET /stalled?n=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    outs = [tmp_path / f"fast-{i}" for i in range(2)]
    receivers = [curl_receiver(url, o, "--max-time", "30") for o in outs]
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(url, src, "--max-time", "30")
    head = b""
    while b"\r\n\r\n" not in head:       # the head, then it reads nothing more
        chunk = stalled.recv(1)
        assert chunk, "closed before the head"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200")
    codes = wait_all([sender, *receivers], timeout=45)
    assert codes == [0, 0, 0], codes
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 2
    body, closed = read_until_closed(stalled, timeout=20)
    stalled.close()
    assert closed
    assert len(body) < src.stat().st_size, "the stalled receiver got the whole body"
    log = wait_for(lambda: transfer_logs(relay).get("/stalled"), what="transfer log line")
    assert (log["done"], log["lost"]) == (2, 1), log
    relay.wait_idle()


def test_a_sender_that_stalls_mid_body_is_aborted_and_receivers_end_short(start_relay,
                                                                         tmp_path):
    relay = start_relay("--sender-idle-timeout", "2", workers=2)
    url = f"{relay.url}/idle-sender?n=2"
    outs = [tmp_path / f"idle-{i}" for i in range(2)]
    receivers = [curl_receiver(url, o, "--max-time", "30") for o in outs]
    wait_for(lambda: waiting_count(relay) == 1)
    sent = random.Random(3).randbytes(1_000_000)
    sender = raw_request(relay.port, b"PUT /idle-sender?n=2 HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 10000000000\r\n\r\n" + sent, timeout=40)
    try:
        codes = wait_all(receivers, timeout=40)
        assert codes == [18, 18], codes
        # Everything the sender did send reached both receivers, and nothing else.
        assert [o.read_bytes() for o in outs] == [sent] * 2
        relay.wait_idle()
    finally:
        sender.close()


def test_more_complete_pipes_than_transfer_slots_wait_their_turn_and_all_complete(
        start_relay, tmp_path):
    """--max-transfers 2 and six complete pipes at once: none refused; the four that find no
    ring slot wait in line (their senders told every receiver is connected) and stream as
    slots come free; every receiver gets every byte."""
    relay = start_relay("--max-transfers", "2", workers=2)
    transfers = [SlowTransfer(relay, tmp_path, f"/in-line-{i}", 2, 600_000, pause_at=300_000,
                              seed=i) for i in range(6)]
    wait_for(lambda: (lambda h: h["pipes_streaming"] == 2 and h["pipes_waiting"] == 4)(
        health_retry(relay)), timeout=30, what="two streaming, four in line")
    for t in transfers:
        t.release()
    for t in transfers:
        sender_code, codes = t.wait()
        assert (sender_code, codes) == (0, [0, 0]), t.path
        assert t.receiver_shas() == [t.sha] * 2
    assert "503" not in relay.stderr_text()
    assert relay.wait_idle()["slots_in_use"] == 0


# -- many abandoned paths --------------------------------------------------------------------
ABANDONED = 10_000
RSS_SLACK = 30 * MIB


def test_a_worker_collects_garbage_only_once_most_of_a_crowd_has_left(tmp_path):
    """The trim's full collection walks every live object (tens of ms with thousands of
    connections open): a worker 1,100 connections below a 6,500 peak does not run it yet;
    once three quarters of the peak have gone it does, and the peak starts again from there.
    Real collections, watched through gc.callbacks (automatic ones paused meanwhile)."""
    import gc

    from relayd import ring
    from relayd.config import Config
    from relayd.worker import Worker

    arena = ring.Arena(slots=1, capacity=1 << 19, worker_slots=2)
    a, b = socket.socketpair()
    worker = Worker(Config(workers=1).validate(), arena, 0, [], a, None, os.getpid())
    full: list[int] = []

    def watch(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    gc.disable()
    gc.callbacks.append(watch)
    try:
        worker.conn_peak = 6500
        worker.conns = dict.fromkeys(range(5400))
        worker.trim()
        assert full == [] and worker.conn_peak == 6500
        worker.conns = dict.fromkeys(range(1500))
        worker.trim()
        assert full == [1] and worker.conn_peak == 1500
    finally:
        gc.callbacks.remove(watch)
        gc.enable()
        a.close()
        b.close()
        arena.close()


def test_ten_thousand_abandoned_paths_give_back_their_memory_and_connections(start_relay):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = ABANDONED + 2000
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        pass
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < ABANDONED + 500:
        pytest.skip(f"RLIMIT_NOFILE cannot reach {ABANDONED + 500}")
    socks: list[socket.socket] = []
    try:
        relay = start_relay(workers=2)         # inherits the raised limit
        health_retry(relay)
        baseline = daemon_rss(relay)
        for i in range(ABANDONED):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            socks.append(s)
            s.sendall(f"GET /abandon-{i}?n=2 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_for(lambda: waiting_count(relay) == ABANDONED, timeout=90, interval=0.2,
                 what=f"{ABANDONED} pipes waiting")
        # Per-worker counters are published about once a second: wait for the other's.
        peak_conns = wait_for(lambda: (lambda c: c if c == ABANDONED else None)(
            connections(relay)), timeout=10, interval=0.2, what="connections counted")
        peak = daemon_rss(relay)
        for s in socks:
            s.close()
        socks.clear()
        wait_for(lambda: waiting_count(relay) == 0, timeout=60, interval=0.2,
                 what="every pipe forgotten")
        wait_for(lambda: connections(relay) == 0, timeout=30, interval=0.2,
                 what="every connection closed")
        # Workers hand freed heap back (malloc_trim) on their once-a-second tick.
        deadline = time.monotonic() + 5
        while (after := daemon_rss(relay)) > baseline + RSS_SLACK \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"\n{ABANDONED} abandoned paths: daemon RSS baseline {baseline / MIB:.1f} MiB, "
              f"with {ABANDONED} waiting {peak / MIB:.1f} MiB, after {after / MIB:.1f} MiB; "
              f"connections at peak {peak_conns}")
        h = relay.health()
        assert (h["pipes_waiting"], h["pipes_streaming"], h["slots_in_use"]) == (0, 0, 0), h
        # Connections are freed at close (no parser<->connection cycle left for the
        # collector) and the heap is handed back once a crowd has left.
        assert after <= baseline + RSS_SLACK, (baseline, peak, after)
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))


# -- faults ----------------------------------------------------------------------------------
def test_a_stopped_worker_is_killed_and_replaced_by_the_heartbeat(start_relay, tmp_path):
    relay = start_relay("--worker-timeout", "2", workers=2)
    victim = next(w["pid"] for w in relay.health()["workers"] if w["index"] == 0)
    os.kill(victim, signal.SIGSTOP)
    try:
        # Some of these queue on the stopped worker's seat: its replacement answers them.
        queued = queue_requests(relay.port, 8)
        def replaced():
            h = health_retry(relay)
            pids = [w["pid"] for w in h["workers"]]
            return h["workers_alive"] == 2 and victim not in pids
        wait_for(replaced, timeout=20, what="the stopped worker replaced")
        assert not psutil.pid_exists(victim) or \
            psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
        assert answers(queued) == ["200"] * 8
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    curl_transfer_works(relay, tmp_path, "/after-heartbeat")


def test_kill_9_of_the_supervisor_takes_every_worker_down_and_frees_the_port(start_relay):
    relay = start_relay(workers=2)
    # Worker pids from the process table, not /health: a request would leave TIME_WAIT
    # sockets on the port, and the plain bind below must not depend on that.
    sup = psutil.Process(relay.proc.pid)
    workers = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(sup.children()),
                       what="two workers")
    os.kill(relay.proc.pid, signal.SIGKILL)
    relay.proc.wait(30)
    # PR_SET_PDEATHSIG: the workers exit on their own (nobody else signals them); the
    # deadline only bounds a failure.
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers outlived the supervisor: {alive}"
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", relay.port))
        probe.listen(1)
    finally:
        probe.close()


# -- signals ---------------------------------------------------------------------------------
def graceful_stop_lets_a_transfer_finish(start_relay, tmp_path, sig: int) -> None:
    relay = start_relay("--graceful-timeout", "10", workers=2)
    t = start_slow_transfer(relay, tmp_path, f"/graceful-{sig}", n=2, size=2 * MIB)
    relay.proc.send_signal(sig)
    wait_for(lambda: "graceful stop" in relay.stderr_text(), what="the stop logged")
    sender_code, codes = t.wait()              # fed to the end within the grace time
    assert (sender_code, codes) == (0, [0, 0])
    assert t.receiver_shas() == [t.sha] * 2
    assert relay.proc.wait(15) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()


def test_sigterm_lets_a_transfer_in_flight_finish_intact_then_exits_0(start_relay, tmp_path):
    graceful_stop_lets_a_transfer_finish(start_relay, tmp_path, signal.SIGTERM)


def test_sigint_behaves_like_sigterm(start_relay, tmp_path):
    graceful_stop_lets_a_transfer_finish(start_relay, tmp_path, signal.SIGINT)


def test_sigterm_aborts_a_transfer_that_outlives_the_grace_time_with_short_bodies(
        start_relay, tmp_path):
    relay = start_relay("--graceful-timeout", "1", workers=2)
    t = start_slow_transfer(relay, tmp_path, "/too-slow", n=2, size=2 * MIB, max_time=30)
    relay.proc.send_signal(signal.SIGTERM)
    codes = wait_all(t.receivers, timeout=20)       # the feeder stays paused
    assert all(c in SHORT_BODY for c in codes), codes
    assert relay.proc.wait(15) == 0
    sender_code, _ = t.wait(20)
    assert sender_code != 0


def test_sigquit_stops_at_once_even_with_a_transfer_in_flight(start_relay, tmp_path):
    # A grace time longer than any wait here: exiting at all, while the transfer is paused
    # and can never finish, shows SIGQUIT did not wait for it.
    relay = start_relay("--graceful-timeout", "600", workers=2)
    t = start_slow_transfer(relay, tmp_path, "/quit", n=2, size=2 * MIB, max_time=120)
    wait_for(lambda: all(o.exists() and o.stat().st_size > 0 for o in t.outs),
             what="every receiver has bytes")
    relay.proc.send_signal(signal.SIGQUIT)
    assert relay.exited(timeout=60) is not None, "SIGQUIT waited for the transfer"
    assert "graceful stop" not in relay.stderr_text()
    codes = wait_all(t.receivers, timeout=60)
    assert all(c != 0 for c in codes), codes
    for o in t.outs:                                # short, never corrupt
        got = o.read_bytes()
        assert len(got) < len(t.data) and got == t.data[:len(got)]
    t.wait(60)


def wait_for_reload(relay, old: set[int], workers: int = 2) -> set[int]:
    """Wait until /health lists `workers` workers, none of them old; the new pids."""
    def reloaded():
        pids = {w["pid"] for w in health_retry(relay)["workers"]}
        return pids if len(pids) == workers and not pids & old else None
    new = wait_for(reloaded, timeout=30, interval=0.05, what="new workers only")
    for pid in old:
        wait_for(lambda: not psutil.pid_exists(pid) or
                 psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, what="old worker gone")
    return new


def test_sighup_replaces_both_workers_without_refusing_or_resetting_a_connection(start_relay):
    relay = start_relay(workers=2)
    old = {w["pid"] for w in relay.health()["workers"]}
    hammer = ConnectionHammer(relay.port)
    hammer.start()
    time.sleep(0.5)
    relay.proc.send_signal(signal.SIGHUP)
    wait_for_reload(relay, old)
    time.sleep(0.5)
    hammer.stop.set()
    hammer.join(15)
    print(f"\nSIGHUP reload: {hammer.total} connections, failures {hammer.failures}")
    assert hammer.total > 0
    assert hammer.failures == {}, f"{sum(hammer.failures.values())} of {hammer.total} failed"


def test_a_transfer_in_flight_across_a_sighup_reload_completes_intact(start_relay, tmp_path):
    relay = start_relay(workers=2)
    old = {w["pid"] for w in relay.health()["workers"]}
    t = start_slow_transfer(relay, tmp_path, "/across-reload", n=3, size=3 * MIB)
    relay.proc.send_signal(signal.SIGHUP)

    def new_listening():
        pids = {w["pid"] for w in health_retry(relay)["workers"]}
        return len(pids - old) == 2
    wait_for(new_listening, timeout=20, what="the new workers")
    sender_code, codes = t.wait()                   # fed after the reload began
    assert (sender_code, codes) == (0, [0, 0, 0])
    assert t.receiver_shas() == [t.sha] * 3
    wait_for_reload(relay, old)
    curl_transfer_works(relay, tmp_path, "/after-reload")


# -- seats: a listener's queue outlives the worker serving it ----------------------------------
def test_a_reloads_new_worker_answers_what_queued_on_the_old_workers_seat(start_relay):
    """The old worker is stopped, so it cannot take its queue: the connections are answered
    only if the new worker accepts from the same listener (before seats, a new worker had a
    listener of its own, and the old one's queue was reset or waited for it)."""
    relay = start_relay(workers=1)
    (old,) = [w["pid"] for w in relay.health()["workers"]]
    os.kill(old, signal.SIGSTOP)
    try:
        socks = queue_requests(relay.port, 5)
        relay.proc.send_signal(signal.SIGHUP)
        got = answers(socks)
        state = psutil.Process(old).status() if psutil.pid_exists(old) else "gone"
        assert got == ["200"] * 5
        assert state == psutil.STATUS_STOPPED, "answered only once the old worker went"
    finally:
        os.kill(old, signal.SIGCONT)
    wait_for_reload(relay, {old}, workers=1)
    assert answers(queue_requests(relay.port, 1)) == ["200"]


def test_connections_queued_on_a_killed_workers_seat_are_answered_by_its_replacement(
        start_relay):
    relay = start_relay(workers=1)
    (victim,) = [w["pid"] for w in relay.health()["workers"]]
    # A worker that dies within its first second is respawned after a backoff, with its
    # seat closed meanwhile; this one has lived longer, so it is replaced at once.
    wait_for(lambda: time.time() - psutil.Process(victim).create_time() > 1.5,
             what="the worker older than the quick-death bound")
    os.kill(victim, signal.SIGSTOP)
    socks = queue_requests(relay.port, 5)
    os.kill(victim, signal.SIGKILL)
    assert answers(socks) == ["200"] * 5
    assert victim not in {w["pid"] for w in health_retry(relay)["workers"]}


def test_a_worker_dying_at_start_has_its_seat_closed_until_its_respawn(start_relay):
    """Kill each new worker of a seat as soon as it appears: once the deaths are quick the
    respawn waits out a backoff, and meanwhile the port has one listener fewer (new
    connections go to the live seat); then the seat opens again and both serve."""
    relay = start_relay(workers=2)
    sup = psutil.Process(relay.proc.pid)
    assert listening_sockets(relay.port) == 2
    survivor = sup.children()[0].pid            # the other seat's worker is left alone
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while listening_sockets(relay.port) == 2:
        assert time.monotonic() < deadline, f"the seat never closed ({len(killed)} kills)"
        for p in sup.children():
            if p.pid != survivor and p.pid not in killed:
                killed.add(p.pid)
                os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.01)
    assert "respawning" in relay.stderr_text()
    wait_for(lambda: listening_sockets(relay.port) == 2, timeout=30, what="the seat open again")
    wait_for(lambda: health_retry(relay)["workers_alive"] == 2, timeout=30, what="two workers")
    assert answers(queue_requests(relay.port, 4)) == ["200"] * 4



def test_a_reload_that_cannot_start_new_workers_leaves_the_old_ones_serving(start_relay):
    """Real EMFILE: the supervisor's soft descriptor limit leaves one free number, so each
    new worker's control socketpair fails. The old workers stay the serving generation (one
    killed is replaced, not left as a seat nobody serves) and the next SIGHUP reloads."""
    relay = start_relay(workers=2)
    sup = psutil.Process(relay.proc.pid)
    old = {w["pid"] for w in relay.health()["workers"]}
    soft, hard = sup.rlimit(psutil.RLIMIT_NOFILE)
    fds = {int(fd) for fd in os.listdir(f"/proc/{sup.pid}/fd")}
    tight = next(n for n in range(1, soft) if n - sum(fd < n for fd in fds) == 1)
    sup.rlimit(psutil.RLIMIT_NOFILE, (tight, hard))
    try:
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "cannot start a worker for seat 1" in relay.stderr_text(),
                 what="both seats' failures logged")
    finally:
        sup.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    assert "cannot start a worker for seat 0" in relay.stderr_text()
    assert {w["pid"] for w in health_retry(relay)["workers"]} == old
    assert answers(queue_requests(relay.port, 8)) == ["200"] * 8
    victim, survivor = sorted(old)
    os.kill(victim, signal.SIGKILL)

    def replaced():
        pids = {w["pid"] for w in health_retry(relay)["workers"]}
        return len(pids) == 2 and survivor in pids and victim not in pids
    wait_for(replaced, timeout=30, what="the killed old worker respawned")
    now = {w["pid"] for w in health_retry(relay)["workers"]}
    relay.proc.send_signal(signal.SIGHUP)
    wait_for_reload(relay, now)
    assert answers(queue_requests(relay.port, 8)) == ["200"] * 8



def test_a_worker_shares_no_socket_or_pipe_with_the_supervisor_but_its_seat(start_relay):
    """Not another seat, the reserved port socket, another worker's control channel or the
    supervisor's signal pipe, for the first workers and for a reload's (stdio, the arena's
    memfd and the eventfds are shared on purpose)."""
    relay = start_relay(workers=2)

    def check() -> None:
        sup = descriptors(relay.proc.pid)
        ours = {t for fd, t in sup.items() if fd > 2 and t.startswith(("socket:", "pipe:"))}
        seats = set()
        for w in health_retry(relay)["workers"]:
            shared = set(descriptors(w["pid"]).values()) & ours
            assert len(shared) == 1 and next(iter(shared)).startswith("socket:"), \
                (w["index"], shared)
            seats |= shared
        assert len(seats) == 2                     # one seat each, not the same one
    check()
    old = {w["pid"] for w in relay.health()["workers"]}
    relay.proc.send_signal(signal.SIGHUP)
    wait_for_reload(relay, old)
    check()



def test_sigterm_during_a_reload_stops_both_generations_cleanly(start_relay, tmp_path):
    """SIGTERM while a new generation is starting: no Retire is sent once stopping, every
    worker of both generations takes its queue and exits, the supervisor exits 0, and a
    transfer in flight finishes intact."""
    relay = start_relay("--graceful-timeout", "10", workers=2)
    t = start_slow_transfer(relay, tmp_path, "/term-in-reload", n=2, size=2 * MIB)
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reloading workers" in relay.stderr_text(), what="the reload")
    relay.proc.send_signal(signal.SIGTERM)
    sender_code, codes = t.wait()
    assert (sender_code, codes) == (0, [0, 0])
    assert t.receiver_shas() == [t.sha] * 2
    assert relay.proc.wait(30) == 0
    assert "supervisor error" not in relay.stderr_text()


# -- soak ------------------------------------------------------------------------------------
SOAK_TRANSFERS = int(os.environ.get("RELAYD_SOAK_TRANSFERS", "300"))
SOAK_WARMUP = 20
SOAK_CONCURRENCY = 8
SOAK_TIMEOUT_S = 120


def soak_size(rng: random.Random) -> int:
    """Mostly small: a fifth tiny or empty, most under 64 KiB, a few up to 4 MiB."""
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.25:
        return rng.randint(1, 100)
    if r < 0.75:
        return rng.randint(100, 64 * 1024)
    if r < 0.95:
        return rng.randint(64 * 1024, 1 * MIB)
    return rng.randint(1 * MIB, 4 * MIB)


async def soak_sender(port: int, path: str, data: bytes, chunked: bool,
                      rng: random.Random) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        framing = (b"Transfer-Encoding: chunked" if chunked
                   else b"Content-Length: %d" % len(data))
        writer.write(b"PUT %s HTTP/1.1\r\nHost: soak\r\n%s\r\n\r\n" % (path.encode(), framing))
        piece_max = rng.choice([97, 4096, 65536, MIB]) if len(data) < 256 * 1024 \
            else rng.choice([4096, 65536, MIB])
        pos = 0
        while pos < len(data):
            piece = data[pos:pos + rng.randint(1, piece_max)]
            pos += len(piece)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return await reader.read()               # progress lines until the relay closes
    finally:
        writer.close()


async def soak_receiver(port: int, path: str) -> tuple[str, int]:
    """(sha256 of the body, its length); raises if the body is not complete."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: soak\r\n\r\n" % path.encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        assert head.startswith("http/1.1 200"), head
        h, total = hashlib.sha256(), 0
        m = re.search(r"\r\ncontent-length: (\d+)", head)
        if m:
            left = int(m.group(1))
            while left:
                block = await reader.read(min(left, MIB))
                assert block, f"short body: {left} bytes missing"
                h.update(block)
                left -= len(block)
                total += len(block)
        else:
            assert "transfer-encoding: chunked" in head, head
            while True:
                size = int((await reader.readline()).strip(), 16)
                if size == 0:
                    assert await reader.readexactly(2) == b"\r\n"
                    break
                block = await reader.readexactly(size)
                h.update(block)
                total += size
                assert await reader.readexactly(2) == b"\r\n"
        return h.hexdigest(), total
    finally:
        writer.close()


class SoakFailure(AssertionError):
    """One soak transfer went wrong; `path` names it in the daemon's log."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


async def soak_transfer(port: int, i: int, seed: int) -> int:
    """One random transfer; returns the bytes delivered (all receivers)."""
    rng = random.Random(seed * 1_000_003 + i)
    n = rng.randint(1, 16)
    data = rng.randbytes(soak_size(rng))
    want = hashlib.sha256(data).hexdigest()
    path = f"/soak-{seed}-{i}"
    target = f"{path}?n={n}"
    chunked = rng.random() < 0.5
    parties = ["sender"] + ["receiver"] * n
    rng.shuffle(parties)                         # random arrival order
    what = f"{path} n={n} size={len(data)} {'chunked' if chunked else 'content-length'}"
    tasks = []
    try:
        for role in parties:
            if role == "sender":
                tasks.append(asyncio.ensure_future(soak_sender(port, target, data, chunked, rng)))
            else:
                tasks.append(asyncio.ensure_future(soak_receiver(port, target)))
            await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.002]))
        results = await asyncio.wait_for(asyncio.gather(*tasks), SOAK_TIMEOUT_S)
    except (AssertionError, OSError, ValueError, asyncio.TimeoutError,
            asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise SoakFailure(path, f"{what}: {e!r}") from e
    finally:
        for task in tasks:
            task.cancel()
    got = [r for role, r in zip(parties, results) if role == "receiver"]
    sender_out = next(r for role, r in zip(parties, results) if role == "sender")
    if got != [(want, len(data))] * n:
        raise SoakFailure(path, f"{what}: receivers got {got}, want {(want, len(data))}")
    if b"Sent successfully to %d receiver(s)" % n not in sender_out:
        raise SoakFailure(path, f"{what}: sender saw {sender_out!r}")
    return len(data) * n


async def soak_run(port: int, count: int, seed: int) -> int:
    gate = asyncio.Semaphore(SOAK_CONCURRENCY)

    async def one(i):
        async with gate:
            return await soak_transfer(port, i, seed)
    return sum(await asyncio.gather(*(one(i) for i in range(count))))


def test_soak_of_random_transfers_delivers_every_byte_and_returns_to_baseline(start_relay):
    relay = start_relay(workers=2)
    seed = 20240
    asyncio.run(soak_run(relay.port, SOAK_WARMUP, seed))
    relay.wait_idle()
    rss0, fds0 = daemon_rss(relay), daemon_fds(relay)
    count = max(SOAK_TRANSFERS - SOAK_WARMUP, 1)
    started = time.monotonic()
    try:
        delivered = asyncio.run(soak_run(relay.port, count, seed + 1))
    except SoakFailure as e:
        log = [line for line in relay.stderr_text().splitlines() if f"'{e.path}'" in line]
        raise AssertionError(f"{e}; daemon log: {log}") from e
    took = time.monotonic() - started
    h = relay.wait_idle()
    assert (h["pipes_waiting"], h["pipes_streaming"], h["slots_in_use"]) == (0, 0, 0), h
    wait_for(lambda: daemon_fds(relay) <= fds0 + 2, timeout=10, what="descriptors back")
    rss1, fds1 = daemon_rss(relay), daemon_fds(relay)
    print(f"\nsoak: {SOAK_WARMUP}+{count} transfers, {delivered / MIB:.1f} MiB delivered in "
          f"{took:.1f} s; daemon RSS {rss0 / MIB:.1f} -> {rss1 / MIB:.1f} MiB, "
          f"fds {fds0} -> {fds1}; transfers_done={h['transfers_done']}")
    assert h["transfers_done"] == SOAK_WARMUP + count and h["transfers_aborted"] == 0, h
    assert rss1 <= rss0 + 30 * MIB, (rss0, rss1)


# -- fuzz ------------------------------------------------------------------------------------
FUZZ_CASES = 500
FUZZ_SEED = 1729
# A hang is no answer and no close long after the relay's own 2 s timeouts: these bound a
# broken relay, never its speed (500 cases, 64 at a time, on a loaded 2-core machine).
FUZZ_TIMEOUT_S = 30                # per recv
FUZZ_DEADLINE_S = 60               # per case
FUZZ_ALLOWED_5XX = {501, 503, 505}
HUGE = [b"99999999999999999999", b"18446744073709551616", b"-1", b"0x10", b"1e3", b"",
        b"4294967296", b"00000000000000000001"]
METHODS = [b"GET", b"PUT", b"POST", b"HEAD", b"OPTIONS", b"DELETE", b"PATCH", b"CONNECT",
           b"TRACE", b"PRI", b"get", b"G\x00T", b"\xff\xfe", b"X" * 40]


def fuzz_base(rng: random.Random, i: int) -> bytes:
    path = f"/fz-{i}".encode()
    n = rng.choice([b"1", b"2", b"3", b"256", b"257", b"0", b"abc", b"1&n=2"] + HUGE)
    bases = [
        b"GET /version HTTP/1.1\r\nHost: fz\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: fz\r\nConnection: close\r\n\r\n",
        b"HEAD / HTTP/1.0\r\n\r\n",
        b"GET %s?n=%s HTTP/1.1\r\nHost: fz\r\n\r\n" % (path, n),
        b"PUT %s?n=%s HTTP/1.1\r\nHost: fz\r\nContent-Length: 5\r\n\r\nhello" % (path, n),
        b"POST %s HTTP/1.1\r\nHost: fz\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % path,
        b"OPTIONS %s HTTP/1.1\r\nHost: fz\r\nOrigin: http://x\r\n\r\n" % path,
        b"PUT %s?n=1 HTTP/1.1\r\nHost: fz\r\nContent-Type: text/html\r\n"
        b"X-Piping: a\r\nContent-Length: 3\r\n\r\nabc" % path,
    ]
    return rng.choice(bases)


def fuzz_mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:                                    # flip bits
            p = min(pos, len(b) - 1)
            b[p] ^= 1 << rng.randrange(8)
        elif op == 1:                                        # insert bytes
            b[pos:pos] = rng.choice([b"\r", b"\n", b"\r\n", b"\x00", b":", b" ", b"\t",
                                     bytes([rng.randrange(256)]),
                                     rng.randbytes(rng.randint(1, 20))])
        elif op == 2 and b:                                  # delete a range
            del b[pos:pos + rng.randint(1, 8)]
        elif op == 3:                                        # a huge or odd number
            m = list(re.finditer(rb"\d+", bytes(b)))
            if m:
                g = rng.choice(m)
                b[g.start():g.end()] = rng.choice(HUGE)
        elif op == 4:                                        # another method
            sp = b.find(b" ")
            if sp > 0:
                b[:sp] = rng.choice(METHODS)
        elif op == 5:                                        # repeat a header line
            lines = bytes(b).split(b"\r\n")
            if len(lines) > 2:
                k = rng.randrange(1, len(lines) - 1)
                lines.insert(k, lines[k])
                b = bytearray(b"\r\n".join(lines))
        elif op == 6:                                        # truncate
            del b[pos:]
        else:                                                # random header
            name = rng.choice([b"Content-Length", b"Transfer-Encoding", b"Expect", b"Host",
                               b"Connection", b"Upgrade", rng.randbytes(5)])
            value = rng.choice(HUGE + [b"chunked", b"gzip, chunked", b"100-continue",
                                       b"close", b"Upgrade", b"websocket", rng.randbytes(8)])
            at = bytes(b).find(b"\r\n")
            if at >= 0:
                b[at + 2:at + 2] = name + b": " + value + b"\r\n"
    return bytes(b)


def fuzz_cases() -> list[bytes]:
    rng = random.Random(FUZZ_SEED)
    cases = []
    for i in range(FUZZ_CASES):
        r = rng.random()
        if r < 0.1:                                          # pure noise
            cases.append(rng.randbytes(rng.randint(1, 300)))
        elif r < 0.2:                                        # a random request line
            cases.append(b"%s /fz-%d?n=%s HTTP/1.%d\r\nHost: fz\r\n\r\n" % (
                rng.choice(METHODS), i, rng.choice(HUGE), rng.randrange(3)))
        else:
            cases.append(fuzz_mutate(rng, fuzz_base(rng, i)))
    return cases


async def fuzz_one(port: int, data: bytes) -> tuple[bytes, str]:
    """(all bytes answered, 'closed' | 'hang' | 'reset')."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass
        got = b""
        deadline = time.monotonic() + FUZZ_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), FUZZ_TIMEOUT_S)
            except asyncio.TimeoutError:
                return got, "hang"
            except (ConnectionResetError, BrokenPipeError):
                return got, "reset"
            if not chunk:
                return got, "closed"
            got += chunk
        return got, "hang"
    finally:
        writer.close()


async def fuzz_run(port: int, cases: list[bytes]) -> list[tuple[bytes, str]]:
    gate = asyncio.Semaphore(64)

    async def one(data):
        async with gate:
            return await fuzz_one(port, data)
    return await asyncio.gather(*(one(d) for d in cases))


def test_fuzzed_requests_never_get_a_5xx_never_hang_and_the_relay_serves_on(start_relay,
                                                                           tmp_path):
    relay = start_relay("--head-timeout", "2", "--rendezvous-timeout", "2",
                        "--keepalive-timeout", "2", workers=2)
    pids = {w["pid"] for w in relay.health()["workers"]}
    cases = fuzz_cases()
    results = asyncio.run(fuzz_run(relay.port, cases))
    statuses: dict[int, int] = {}
    problems = []
    for data, (answer, end) in zip(cases, results):
        codes = [int(c) for c in re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ", answer)]
        for c in codes:
            statuses[c] = statuses.get(c, 0) + 1
        if end == "hang" or any(c >= 500 and c not in FUZZ_ALLOWED_5XX for c in codes):
            problems.append((data, end, answer[:200]))
    print(f"\nfuzz: {len(cases)} requests, statuses {dict(sorted(statuses.items()))}")
    assert not problems, f"{len(problems)} bad answers, first: {problems[:3]}"
    assert relay.proc.poll() is None
    h = relay.health()
    assert h["worker_restarts"] == 0 and {w["pid"] for w in h["workers"]} == pids, h
    assert "Traceback" not in relay.stderr_text(), relay.stderr_text()[-3000:]
    curl_transfer_works(relay, tmp_path, "/after-fuzz")

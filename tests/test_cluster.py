"""Several relayd nodes behind HAProxy (deploy/haproxy.cfg as shipped, placeholders filled in),
and behind nginx (deploy/nginx.conf); each test skips only when its own balancer is missing.

One path must always land on one node (its sender and receivers meet there) while paths spread
over every node; streams pass through unbuffered; a node that stops is marked down by the
health check, its paths move, and transfers on the other nodes go on untouched.
"""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httptools
import pytest

from conftest import (curl_receiver, curl_sender, payload, sha256_file, stop_process, wait_all,
                      wait_for)

HAPROXY = shutil.which("haproxy")
NGINX = shutil.which("nginx")
# Each test skips for its own balancer only: the nginx test needs no haproxy, and back.
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (apt-get install -y haproxy)")
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install -y nginx)")

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
NODES = 3
PIPES = 30
RECEIVERS = 5
AT_ONCE = 5                 # pipes in flight together
LINES = 40                  # latency probe: one line every 50 ms
LINE_INTERVAL_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Balancer:
    """HAProxy in the foreground (-db) as our own subprocess, on the shipped config."""

    def __init__(self, tmp: Path, nodes):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"    server relay{i} 127.0.0.1:{node.port} check"
                            for i, node in enumerate(nodes))
        text = CONFIG.read_text()
        for name, value in (("BIND", f"127.0.0.1:{self.port}"), ("MAXCONN", "2000"),
                            ("SERVERS", servers)):
            assert f"@{name}@" in text
            text = text.replace(f"@{name}@", value)
        self.config = tmp / "haproxy.cfg"
        self.config.write_text(text)
        self.stderr_path = tmp / "haproxy.err"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 -- lives with the process
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)],
                                     stdout=self._stderr, stderr=self._stderr)
        wait_for(self._listening, timeout=10, what="haproxy to listen")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.stderr_path.read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)
        self._stderr.close()


@pytest.fixture
def cluster(start_relay, tmp_path):
    nodes = [start_relay(workers=1) for _ in range(NODES)]
    balancer = Balancer(tmp_path, nodes)
    yield nodes, balancer
    balancer.stop()


def status_of(port: int, method: str, target: str) -> int:
    """The status line's code; 0 if the connection was refused or closed without one."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                      .encode())
            head = s.recv(4096)
    except OSError:
        return 0
    return int(head.split()[1]) if head else 0


def node_of(balancer: Balancer, nodes, live, path: str) -> int:
    """Which node the balancer sends `path` to: a waiting receiver shows in that node's health."""
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as s:
        s.sendall(f"GET {path}?n=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        where = wait_for(lambda: [i for i in live if nodes[i].health()["pipes_waiting"]],
                         what=f"{path} waiting on some node")
    assert len(where) == 1, where
    # abortonclose: the receiver we just dropped leaves the node's rendezvous at once.
    wait_for(lambda: not any(nodes[i].health()["pipes_waiting"] for i in live),
             what=f"{path} to leave the rendezvous")
    return where[0]


def run_pipe(url: str, path: str, src: Path, out_dir: Path, receivers_first: bool,
             *sender_args: str) -> tuple[list, subprocess.Popen, list[Path]]:
    outs = [out_dir / f"{path.strip('/')}-{k}.out" for k in range(RECEIVERS)]
    target = f"{url}{path}?n={RECEIVERS}"
    procs = []
    if not receivers_first:
        sender = curl_sender(target, src, *sender_args)
    procs = [curl_receiver(target, out) for out in outs]
    if receivers_first:
        sender = curl_sender(target, src, *sender_args)
    return procs, sender, outs


def check_pipes(started) -> None:
    for procs, sender, outs, src in started:
        codes = wait_all([*procs, sender])
        assert codes == [0] * (RECEIVERS + 1), [p.stderr.read() for p in (*procs, sender)]
        progress = sender.stdout.read()
        assert b"Sent successfully to 5 receiver(s)" in progress, progress
        want = sha256_file(src)
        assert [sha256_file(o) for o in outs] == [want] * RECEIVERS


class LineReceiver:
    """A raw-socket GET that stamps each line as it arrives: [(seq, sent_ns, arrived_ns)]."""

    def __init__(self, port: int, target: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.parser = httptools.HttpResponseParser(self)
        self.pending = b""
        self.lines: list[tuple[int, int, int]] = []
        self.complete = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def on_body(self, data: bytes) -> None:
        now = time.monotonic_ns()
        *whole, self.pending = (self.pending + data).split(b"\n")
        for line in whole:
            seq, sent_ns = line.split()[:2]
            self.lines.append((int(seq), int(sent_ns), now))

    def on_message_complete(self) -> None:
        self.complete = True

    def _run(self) -> None:
        while not self.complete:
            data = self.sock.recv(65536)
            if not data:
                break
            self.parser.feed_data(data)
        self.sock.close()


def line_latencies_ms(port: int, path: str) -> list[float]:
    """One receiver, one chunked sender writing a stamped 64-byte line every 50 ms."""
    receiver = LineReceiver(port, f"{path}?n=1")
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(f"PUT {path}?n=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              f"Connection: close\r\n\r\n".encode())
    progress = b""
    while b"Start sending" not in progress:          # stamp only once the transfer runs
        chunk = s.recv(4096)
        assert chunk, progress
        progress += chunk
    for seq in range(LINES):
        line = f"{seq} {time.monotonic_ns()} ".encode().ljust(63, b".") + b"\n"
        s.sendall(b"%x\r\n%s\r\n" % (len(line), line))
        time.sleep(LINE_INTERVAL_S)
    s.sendall(b"0\r\n\r\n")
    receiver.thread.join(30)
    while chunk:
        chunk = s.recv(4096)
        progress += chunk
    s.close()
    assert b"Sent successfully to 1 receiver(s)" in progress, progress
    assert receiver.complete
    assert [seq for seq, _, _ in receiver.lines] == list(range(LINES))    # all, in order
    return sorted((arrived - sent) / 1e6 for _, sent, arrived in receiver.lines)


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


@needs_haproxy
def test_paths_spread_over_nodes_and_survive_a_node_stopping(cluster, tmp_path):
    nodes, balancer = cluster
    live = list(range(NODES))
    paths = [f"/cluster-{i}" for i in range(PIPES)]
    t0 = time.monotonic()
    home = {path: node_of(balancer, nodes, live, path) for path in paths}
    t1 = time.monotonic()

    # 30 pipes of 1 sender + 5 receivers, AT_ONCE at a time; both arrival orders, and both
    # with curl's default `Expect: 100-continue` and without it.
    rnd = random.Random(5)
    for first in range(0, PIPES, AT_ONCE):
        started = []
        for i in range(first, first + AT_ONCE):
            src = payload(tmp_path, rnd.randrange(1, 600_000), f"p{i}.bin", seed=i)
            expect = () if i % 2 else ("-H", "Expect:")
            started.append((*run_pipe(balancer.url, paths[i], src, tmp_path, i % 4 < 2, *expect),
                            src))
        check_pipes(started)

    t2 = time.monotonic()
    senders = [sum(w["senders"] for w in node.health()["workers"]) for node in nodes]
    expected = [sum(1 for p in paths if home[p] == i) for i in range(NODES)]
    print(f"\nspread of {PIPES} paths over {NODES} nodes (senders served): {senders}")
    assert senders == expected
    assert all(count > 0 for count in senders)

    # Per-line latency through the balancer and direct to a node.
    via = line_latencies_ms(balancer.port, "/latency-balancer")
    direct = line_latencies_ms(nodes[0].port, "/latency-direct")
    p50 = (percentile(via, 50), percentile(direct, 50))
    p99 = (percentile(via, 99), percentile(direct, 99))
    print(f"line latency ms, balancer vs direct: p50 {p50[0]:.2f} / {p50[1]:.2f} "
          f"(ratio {p50[0] / p50[1]:.2f}), p99 {p99[0]:.2f} / {p99[1]:.2f} "
          f"(ratio {p99[0] / p99[1]:.2f})")

    # Long transfers on the two surviving nodes, started before the stop.
    victim = 0
    survivors = [i for i in live if i != victim]
    feeding = threading.Event()
    feeding.set()
    long_runs, long_paths = [], set()
    for i in survivors:
        path = next(p for p in paths if home[p] == i)
        long_paths.add(path)
        outs = [tmp_path / f"long-{i}-{k}.out" for k in range(RECEIVERS)]
        target = f"{balancer.url}{path}?n={RECEIVERS}"
        procs = [curl_receiver(target, out) for out in outs]
        sender = curl_sender(target, None, stdin=subprocess.PIPE)
        sent = tmp_path / f"long-{i}.sent"
        feeder = threading.Thread(target=feed_slowly, args=(sender, sent, feeding, i))
        feeder.start()
        long_runs.append((procs, sender, outs, sent, feeder))
    wait_for(lambda: all(nodes[i].health()["pipes_streaming"] for i in survivors),
             what="the long transfers to stream")

    t3 = time.monotonic()
    assert nodes[victim].stop() == 0
    live = survivors
    moved = next(p for p in paths if home[p] == victim)
    # Until the health check marks the node down, its paths get 503 (connection refused).
    wait_for(lambda: status_of(balancer.port, "OPTIONS", moved) == 200, timeout=20,
             interval=0.1, what="haproxy to mark the stopped node down")
    t4 = time.monotonic()
    new_home = node_of(balancer, nodes, live, moved)
    assert new_home in survivors
    # Consistent hashing: the survivors' paths stay where they were.
    for p in [p for p in paths if home[p] != victim and p not in long_paths][:6]:
        assert node_of(balancer, nodes, live, p) == home[p]
    src = payload(tmp_path, 300_000, "moved.bin", seed=99)
    check_pipes([(*run_pipe(balancer.url, moved, src, tmp_path, True), src)])

    feeding.clear()
    for procs, sender, outs, sent, feeder in long_runs:
        feeder.join(30)
        codes = wait_all([*procs, sender])
        assert codes == [0] * (RECEIVERS + 1), [p.stderr.read() for p in (*procs, sender)]
        assert b"Sent successfully to 5 receiver(s)" in sender.stdout.read()
        assert [sha256_file(o) for o in outs] == [sha256_file(sent)] * RECEIVERS
    for i in survivors:
        nodes[i].wait_idle()
    print(f"phases s: probe {t1 - t0:.1f}, {PIPES} pipes {t2 - t1:.1f}, latency+long start "
          f"{t3 - t2:.1f}, stop until marked down {t4 - t3:.1f}, after {time.monotonic() - t4:.1f}")


def feed_slowly(sender: subprocess.Popen, record: Path, feeding: threading.Event,
                seed: int) -> None:
    """Write 16 KiB every 20 ms into a `curl -T -` until told to stop; keep what was sent."""
    rnd = random.Random(seed)
    with open(record, "wb") as kept:
        while feeding.is_set():
            block = rnd.randbytes(16384)
            sender.stdin.write(block)
            sender.stdin.flush()
            kept.write(block)
            time.sleep(0.02)
    sender.stdin.close()


@needs_nginx
def test_nginx_config_relays_a_pipe_through_one_node(start_relay, tmp_path):
    """deploy/nginx.conf as shipped: a pipe's parties meet on one node, bytes intact."""
    nodes = [start_relay(workers=1) for _ in range(2)]
    port = free_port()
    text = (CONFIG.parent / "nginx.conf").read_text()
    servers = "\n".join(f"        server 127.0.0.1:{node.port} max_fails=1 fail_timeout=5s;"
                        for node in nodes)
    for name, value in (("LISTEN", f"127.0.0.1:{port}"), ("SERVERS", servers)):
        assert f"@{name}@" in text
        text = text.replace(f"@{name}@", value)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    err = open(tmp_path / "nginx.err", "wb")  # noqa: SIM115 -- closed in finally
    proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                            stdout=err, stderr=err)
    try:
        wait_for(lambda: proc.poll() is None and status_of(port, "OPTIONS", "/x") == 200,
                 timeout=10, what="nginx to proxy")
        started = []
        for i in range(4):          # curl's default Expect: 100-continue, both orders
            src = payload(tmp_path, 200_000 + i, f"n{i}.bin", seed=i)
            started.append((*run_pipe(f"http://127.0.0.1:{port}", f"/nginx-{i}", src, tmp_path,
                                      i % 2 == 0), src))
        check_pipes(started)
        served = [sum(w["senders"] for w in node.health()["workers"]) for node in nodes]
        assert sum(served) == 4
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()

"""Metrics, health, logs and configuration sources, against the real daemon."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import (curl_receiver, curl_sender, payload, raw_request, read_response,
                      sha256_file, wait_all, wait_for, waiting_count)


def scrape(relay) -> dict:
    """{(name, labels as a sorted tuple): value} from /metrics."""
    with urllib.request.urlopen(relay.url + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: dict, name: str, **match) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == v2 for k, v2 in match.items()))


def transfer(relay, tmp_path, path: str, n: int, size: int) -> None:
    src = payload(tmp_path, size)
    outs = [tmp_path / f"{path.strip('/')}-{i}" for i in range(n)]
    receivers = [curl_receiver(f"{relay.url}{path}?n={n}", o) for o in outs]
    wait_for(lambda: waiting_count(relay) == 1)
    sender = curl_sender(f"{relay.url}{path}?n={n}", src)
    assert wait_all([sender, *receivers]) == [0] * (n + 1)
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * n


def test_metrics_count_transfers_bytes_and_rejections_over_all_workers(start_relay, tmp_path):
    relay = start_relay(workers=2)
    transfer(relay, tmp_path, "/metered", 3, 300_000)
    status, _, _ = _get(relay.port, "/metered?n=0")
    assert status == 400
    # Workers publish their counters about once a second; wait for the figures, not a time.
    samples = wait_for(lambda: (lambda s: s if total(s, "relayd_sent_bytes_total") >= 900_000
                                and total(s, "relayd_received_bytes_total") >= 300_000
                                and total(s, "relayd_rejected_requests_total", status="400") >= 1
                                else None)(scrape(relay)), what="published counters")
    assert total(samples, "relayd_transfers_total", outcome="ok") == 1
    assert total(samples, "relayd_received_bytes_total") == 300_000
    assert total(samples, "relayd_receivers_joined_total") == 3
    assert total(samples, "relayd_workers_alive") == 2
    assert total(samples, "relayd_pipes", state="waiting") == 0
    for process in ("supervisor", "worker0", "worker1"):
        assert total(samples, "relayd_process_resident_bytes", process=process) > 0
        assert total(samples, "relayd_process_open_fds", process=process) > 0
        assert ("relayd_process_cpu_seconds_total", (("process", process),)) in samples


def test_health_is_json_with_workers_and_pipes(relay):
    h = relay.health()
    assert h["status"] == "ok" and h["workers_alive"] == relay.workers
    assert len(h["workers"]) == relay.workers and h["pipes_waiting"] == 0


def test_health_answers_503_while_draining(start_relay, tmp_path):
    relay = start_relay("--graceful-timeout", "20", workers=1)
    sender = curl_sender(f"{relay.url}/drain?n=1", None, stdin=subprocess.PIPE)
    out = tmp_path / "drain-out"
    receiver = curl_receiver(f"{relay.url}/drain?n=1", out)
    sender.stdin.write(b"first part\n")
    sender.stdin.flush()
    wait_for(lambda: relay.health()["pipes_streaming"] == 1)
    probe = raw_request(relay.port, b"GET /health HTTP/1.1\r\n")   # head not finished yet
    wait_for(lambda: relay.health()["workers"][0]["connections"] >= 3)
    relay.proc.send_signal(signal.SIGTERM)

    def worker_draining() -> bool:      # it closes its listener as it starts draining
        try:
            socket.create_connection(("127.0.0.1", relay.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False
    wait_for(worker_draining, what="the worker draining")
    probe.sendall(b"Host: x\r\n\r\n")
    response = read_response(probe)
    assert response.startswith(b"HTTP/1.1 503"), response[:100]
    assert json.loads(response.partition(b"\r\n\r\n")[2])["status"] == "draining"
    sender.stdin.write(b"second part\n")
    sender.stdin.close()
    assert wait_all([sender, receiver]) == [0, 0]
    assert out.read_bytes() == b"first part\nsecond part\n"
    assert relay.proc.wait(20) == 0


def test_json_log_has_one_line_per_transfer_and_rejection(start_relay, tmp_path):
    relay = start_relay("--log-format", "json", "--access-log", workers=1)
    transfer(relay, tmp_path, "/logged", 2, 10_000)
    _get(relay.port, "/logged?n=999")
    lines = wait_for(lambda: [json.loads(ln) for ln in relay.stderr_text().splitlines()
                              if ln.startswith("{") and '"rejected"' in ln], what="a json line")
    events = [json.loads(ln) for ln in relay.stderr_text().splitlines() if ln.startswith("{")]
    transfers = [e for e in events if e["event"] == "transfer"]
    assert len(transfers) == 1 and transfers[0]["path"] == "/logged"
    assert transfers[0]["bytes"] == 10_000 and transfers[0]["outcome"] == "ok"
    assert lines[0]["status"] == 400 and "n must be" in lines[0]["reason"]
    requests = [e for e in events if e["event"] == "request"]
    assert {e["role"] for e in requests} >= {"sender", "receiver"}


def test_settings_come_from_file_then_environment_then_flags(tmp_path):
    config = tmp_path / "relayd.toml"
    config.write_text('port = 7001\nwindow = "2M"\nworkers = 3\nhead-timeout = 4.5\n')
    env = dict(os.environ, RELAYD_PORT="7002", RELAYD_WORKERS="5")
    out = subprocess.run([sys.executable, "-m", "relayd", "--config", str(config), "--check",
                          "--workers", "2"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[1:]}
    assert rows["port"] == ["7002", "env", "RELAYD_PORT"]
    assert rows["window"] == ["2097152", "file", str(config)]
    assert rows["workers"] == ["2", "flag", "--workers"]
    assert rows["head-timeout"] == ["4.5", "file", str(config)]
    assert rows["max-pipes"] == ["10000", "default"]
    bad = subprocess.run([sys.executable, "-m", "relayd", "--check"], capture_output=True,
                         env=dict(os.environ, RELAYD_WINDOW="1000"), text=True, timeout=30)
    assert bad.returncode == 2 and "--window 1000" in bad.stderr


def test_a_flag_overrides_a_variable_it_need_not_read_and_toml_types_are_strict(tmp_path):
    """RELAYD_PORT=abc with --port given: the flag wins and the variable is not read (it was
    a fatal 'invalid literal'). TOML `port = true` is not port 1, `workers = 2.9` is not 2."""
    out = subprocess.run([sys.executable, "-m", "relayd", "--check", "--port", "7003"],
                         env=dict(os.environ, RELAYD_PORT="abc"), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[1:]}
    assert rows["port"] == ["7003", "flag", "--port"]
    for setting, shown in (("port = true", "True"), ("workers = 2.9", "2.9"),
                           ('window = 1.5', "1.5")):
        config = tmp_path / "bad.toml"
        config.write_text(setting + "\n")
        bad = subprocess.run([sys.executable, "-m", "relayd", "--config", str(config),
                              "--check"], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2, (setting, bad.stdout)
        assert shown in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def _get(port: int, target: str) -> tuple[int, bytes, bytes]:
    s = raw_request(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = read_response(s)
    s.close()
    return int(data.split()[1]), *data.partition(b"\r\n\r\n")[::2]

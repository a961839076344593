"""The command line: version, help, bad flags (exit 2, naming the flag), a busy port, banner."""
from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import time

import pytest

import relayd

RUN_TIMEOUT_S = 20
PORT_IN_USE_EXIT_S = 10


def relayd_cmd() -> list[str]:
    script = shutil.which("relayd")
    return [script] if script else [sys.executable, "-m", "relayd"]


def run(*args: str, cmd: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(cmd or [sys.executable, "-m", "relayd"]), *args],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def read_line(stream, timeout: float = 10) -> bytes:
    """One line from a subprocess pipe without ever blocking past `timeout`."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no complete line within {timeout} s: {line!r}"
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 1)
            assert chunk, f"stream closed after {line!r}"
            line += chunk
    return line


def test_version_prints_the_package_version():
    done = run("--version", cmd=relayd_cmd())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"relayd {relayd.__version__}"


def test_help_mentions_transmit_and_window():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert "--transmit" in done.stdout and "--window" in done.stdout


@pytest.mark.parametrize("flag,value", [
    ("--window", "1000"), ("--workers", "0"), ("--transmit", "nope"), ("--port", "70000"),
    ("--max-connections", "0"), ("--max-connections", "-5"), ("--max-pipes", "0"),
    ("--max-transfers", "0"), ("--spill-limit", "-1"), ("--spill-budget", "-1"),
    ("--rendezvous-timeout", "0"), ("--head-timeout", "-1"), ("--worker-timeout", "0"),
    ("--sendfile-from-n", "0"),
    # nan compares false to everything: it passed "<= 0" and expired every pipe at once
    ("--rendezvous-timeout", "nan"), ("--keepalive-timeout", "inf"),
    # below two heartbeats, healthy workers were killed again and again
    ("--worker-timeout", "1"),
    ("--window", "infk"), ("--spill-budget", "infG")])
def test_a_bad_flag_exits_2_with_a_message_naming_the_flag(flag, value):
    done = run("--host", "127.0.0.1", flag, value)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert flag in done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_in_use_makes_relayd_exit_nonzero_saying_it_cannot_listen():
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 0))             # no SO_REUSEPORT: nobody may share it
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "relayd", "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=PORT_IN_USE_EXIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"relayd still running {PORT_IN_USE_EXIT_S} s on a port in use: {err}")
        assert proc.returncode != 0
        assert "cannot listen" in err, err
        assert str(port) in err
        assert "listening on" not in out
    finally:
        holder.close()


def test_banner_first_line_has_the_url_and_second_line_a_curl_example(start_relay):
    relay = start_relay()
    first = relay.banner.decode()
    assert first.startswith(f"relayd {relayd.__version__} listening on {relay.url}")
    second = read_line(relay.proc.stdout).decode()
    assert "curl" in second and relay.url in second


def test_port_0_gives_a_real_port_that_answers_health(start_relay):
    relay = start_relay("--transmit", "copy", workers=2)
    assert 0 < relay.port < 65536
    health = relay.health()
    assert health["status"] == "ok"
    assert health["workers_alive"] == 2
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5):
        pass


@pytest.mark.parametrize("args,code,message", [
    (["http://127.0.0.1:99999/p", "http://127.0.0.1:9/q"], 1, "Port out of range"),
    (["http://127.0.0.1:abc/p", "http://127.0.0.1:9/q"], 1, "not a usable URL"),
    (["http://[::1/p", "http://127.0.0.1:9/q"], 1, "Invalid IPv6 URL"),
    (["--timeout", "-1", "http://127.0.0.1:9/p", "http://127.0.0.1:9/q"], 2,
     "not a positive number of seconds"),
], ids=["port-range", "port-text", "ipv6", "timeout"])
def test_relayd_forward_refuses_bad_input_with_a_message_not_a_traceback(args, code, message):
    done = run("forward", *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr


def test_relayd_forward_names_the_url_it_could_not_reach():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))                 # bound, never listening: refused
    port = probe.getsockname()[1]
    try:
        done = run("forward", f"http://127.0.0.1:{port}/src?n=1", f"http://127.0.0.1:{port}/d")
    finally:
        probe.close()
    assert done.returncode == 1
    assert f"http://127.0.0.1:{port}/src?n=1" in done.stderr and "Traceback" not in done.stderr

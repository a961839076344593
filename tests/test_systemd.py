"""systemd integration: the sd_notify protocol against real unix datagram sockets, the unit
file, and scripts/install.sh.

The daemon runs as a subprocess with NOTIFY_SOCKET pointing at a socket this test bound, as
systemd would set it for a Type=notify service. The socket has SO_PASSCRED on, so every
datagram carries the sender's pid: systemd (NotifyAccess=main) accepts only the main pid's.
"""
from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from relayd import systemd

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "scripts" / "relayd.service"
INSTALL = REPO / "scripts" / "install.sh"
URL_RE = re.compile(rb"http://[0-9.]+:[0-9]+")
START_TIMEOUT_S = 20
UCRED = struct.Struct("iII")         # struct ucred: pid, uid, gid


class NotifySocket:
    """A bound SOCK_DGRAM unix socket, as systemd's notify socket: `receive()` -> (pid, fields)."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.messages: list[tuple[float, int, list[str]]] = []   # (monotonic, pid, fields)

    def receive(self, timeout: float) -> tuple[int, list[str]] | None:
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return None
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = UCRED.unpack(payload[:UCRED.size])[0]
        fields = data.decode().split("\n")
        self.messages.append((time.monotonic(), pid, fields))
        return pid, fields

    def wait_for(self, field: str, timeout: float = START_TIMEOUT_S) -> tuple[int, list[str]]:
        """The next datagram holding `field` (e.g. READY=1); earlier ones stay in `messages`."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.receive(deadline - time.monotonic())
            if got is None:
                raise AssertionError(f"no {field} within {timeout} s; got {self.messages}")
            if field in got[1]:
                return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket():
    """A path-bound notify socket (sun_path is 108 bytes: a short directory, not tmp_path)."""
    directory = tempfile.mkdtemp(prefix="relayd-notify-")
    s = NotifySocket(os.path.join(directory, "notify"))
    yield s
    s.close()
    shutil.rmtree(directory, ignore_errors=True)


def notified_env(notify_address: str, **env: str) -> dict:
    """The environment systemd gives a Type=notify service (and any extra variables)."""
    environ = dict(os.environ, NOTIFY_SOCKET=notify_address, **env)
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        if name not in env:
            environ.pop(name, None)
    return environ


@pytest.fixture
def start_notified(start_relay):
    """relayd as systemd would start it: NOTIFY_SOCKET (and any extra variables) set."""
    def start(notify_address: str, workers: int = 2, **env: str):
        return start_relay(workers=workers, env=notified_env(notify_address, **env))
    return start


# -- relayd.systemd.notify on its own ---------------------------------------------------------

def test_notify_sends_fields_as_one_datagram_to_an_abstract_address(monkeypatch):
    name = f"relayd-test-{os.getpid()}-{time.monotonic_ns()}"
    s = NotifySocket("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1", "STATUS=serving") is True
        pid, fields = s.wait_for("READY=1", timeout=5)
        assert fields == ["READY=1", "STATUS=serving"]
        assert pid == os.getpid()
    finally:
        s.close()


def test_notify_sends_to_a_path_address(monkeypatch, notify_socket):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.sock.getsockname())
    assert systemd.notify("STOPPING=1") is True
    assert notify_socket.wait_for("STOPPING=1", timeout=5)[1] == ["STOPPING=1"]


def test_notify_is_a_no_op_outside_systemd_and_never_raises(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@relayd-test-nobody-listens-%d" % time.monotonic_ns())
    assert systemd.notify("READY=1") is False


# -- the daemon under a notify socket ---------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2], ids=["W1", "W2"])
def test_ready_with_mainpid_arrives_once_every_worker_listens(notify_socket, start_notified,
                                                              workers):
    relay = start_notified(notify_socket.sock.getsockname(), workers=workers)
    pid, fields = notify_socket.wait_for("READY=1")
    assert pid == relay.proc.pid                      # NotifyAccess=main: from the supervisor
    assert f"MAINPID={relay.proc.pid}" in fields
    health = relay.health()                            # READY=1 means: serving now
    assert health["status"] == "ok"
    assert health["workers_alive"] == workers
    assert all(m[1] == relay.proc.pid for m in notify_socket.messages)
    assert not [m for m in notify_socket.messages if "STOPPING=1" in m[2]]


def test_stopping_arrives_on_sigterm_and_the_daemon_exits_cleanly(notify_socket,
                                                                   start_notified):
    relay = start_notified(notify_socket.sock.getsockname(), workers=2)
    notify_socket.wait_for("READY=1")
    assert relay.health()["status"] == "ok"    # the workers' loops run (see the test below)
    relay.proc.send_signal(signal.SIGTERM)
    pid, _ = notify_socket.wait_for("STOPPING=1", timeout=15)
    assert pid == relay.proc.pid
    assert relay.exited(timeout=15) == 0
    while notify_socket.receive(0.2):                  # whatever else came: all from main
        pass
    assert {m[1] for m in notify_socket.messages} == {relay.proc.pid}
    kinds = [f for m in notify_socket.messages for f in m[2] if f in ("READY=1", "STOPPING=1")]
    assert kinds[0] == "READY=1" and "READY=1" not in kinds[kinds.index("STOPPING=1"):]


def test_sigterm_just_after_ready_always_stops(notify_socket, start_notified):
    """systemd may stop a service the moment it is READY: every SIGTERM must be honoured."""
    for attempt in range(12):
        relay = start_notified(notify_socket.sock.getsockname(), workers=2)
        notify_socket.wait_for("READY=1")
        relay.proc.send_signal(signal.SIGTERM)
        code = relay.exited(timeout=30)               # a bound on a lost SIGTERM, not speed
        relay.stop(signal.SIGKILL)
        assert code == 0, f"attempt {attempt}: exit status {code} (None: SIGTERM ignored)"


def test_abstract_notify_socket_gets_ready_from_the_daemon(start_notified):
    name = f"relayd-test-{os.getpid()}-{time.monotonic_ns()}"
    s = NotifySocket("\0" + name)
    try:
        relay = start_notified("@" + name, workers=1)
        pid, fields = s.wait_for("READY=1")
        assert pid == relay.proc.pid and f"MAINPID={relay.proc.pid}" in fields
        assert relay.health()["status"] == "ok"
    finally:
        s.close()


def test_watchdog_keepalives_keep_coming_from_the_main_pid_more_often_than_watchdog_usec(
        notify_socket, start_notified):
    """systemd kills a service that lets WATCHDOG_USEC pass without a WATCHDOG=1; relayd
    aims at half of it. A long WATCHDOG_USEC (6 s) leaves 3 s between that aim and the kill:
    a missing keepalive fails this, a loaded machine does not."""
    watchdog_usec = 6_000_000
    relay = start_notified(notify_socket.sock.getsockname(), workers=1,
                           WATCHDOG_USEC=str(watchdog_usec))
    notify_socket.wait_for("READY=1")
    beats = []
    for _ in range(3):
        pid, _ = notify_socket.wait_for("WATCHDOG=1", timeout=60)
        assert pid == relay.proc.pid                  # NotifyAccess=main
        beats.append(notify_socket.messages[-1][0])
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert max(gaps) < watchdog_usec / 1e6, gaps
    assert relay.proc.poll() is None


def test_watchdog_meant_for_another_pid_is_not_fed(notify_socket, start_notified):
    """sd_watchdog_enabled(): WATCHDOG_PID names the process systemd watches; not us -> off."""
    relay = start_notified(notify_socket.sock.getsockname(), workers=1,
                           WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    notify_socket.wait_for("READY=1")
    while notify_socket.receive(1.0):          # 1 s is five watchdog intervals
        pass
    assert not [m for m in notify_socket.messages if "WATCHDOG=1" in m[2]]
    assert relay.health()["status"] == "ok"


# -- the unit file and the installer ----------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_is_type_notify_with_the_documented_settings():
    s = unit_settings()
    expected = {"Type": "notify", "ExecStart": "/opt/relayd/venv/bin/relayd --port 8080",
                "ExecReload": "/bin/kill -HUP $MAINPID", "KillSignal": "SIGTERM",
                "Restart": "on-failure", "DynamicUser": "yes", "NoNewPrivileges": "yes",
                "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "LimitNOFILE": "1048576", "NotifyAccess": "main"}
    for key, value in expected.items():
        assert s.get(key) == [value], key
    # relayd feeds the watchdog at half of it (test_watchdog_keepalives_keep_coming_...)
    assert s["WatchdogSec"] == ["30s"]
    # the supervisor waits graceful timeout (30 s) + 5 s before it kills its workers itself
    stop = s["TimeoutStopSec"][0]
    assert int(stop.rstrip("s")) > 35


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (apt-get install -y systemd)")
    # verify insists that ExecStart exists: point it at this Python.
    unit = tmp_path / "relayd.service"
    unit.write_text(UNIT.read_text().replace("/opt/relayd/venv/bin/relayd",
                                             os.path.realpath(sys.executable)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "relayd.service" in line]
    assert not warnings, warnings                     # unknown keys are only warnings


def test_install_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    prefix, units = tmp_path / "opt" / "relayd", tmp_path / "units"
    done = subprocess.run(["bash", str(INSTALL), "--dry-run"], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, RELAYD_PREFIX=str(prefix),
                                               SYSTEMD_DIR=str(units)))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for step in (f"-m venv {prefix}/venv", f"{prefix}/venv/bin/pip install --quiet {REPO}",
                 f"> {units}/relayd.service", "systemctl daemon-reload",
                 "systemctl enable --now relayd"):
        assert step in out, (step, out)
    assert not prefix.exists() and not units.exists()


def test_install_refuses_an_unknown_argument():
    done = subprocess.run(["bash", str(INSTALL), "--yes-really"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "unknown argument" in done.stderr

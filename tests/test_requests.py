"""Parser edge cases as files: `tests/requests/NNN-name.http` holds the exact request bytes
(CRLFs written explicitly), `NNN-name.status` the status the relay must answer.

One relay serves the whole module (two workers, `--head-timeout 2`): every file is sent raw
on its own connection, the first status line is checked, an error must come with a one-line
`[ERROR]` body and the relay must close the connection after it. A client's mistake never
gets a 5xx; only 501 (Transfer-Encoding), 505 (HTTP version) and 503 are allowed, and only
where the file says so. Afterwards a normal curl transfer on the same relay shows it serves on.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from conftest import (Relay, curl_receiver, curl_sender, payload, read_until_closed,
                      sha256_file, wait_all,
                      wait_for, waiting_count)

REQUESTS_DIR = Path(__file__).parent / "requests"
CASES = sorted(p.stem for p in REQUESTS_DIR.glob("*.http"))
HEAD_TIMEOUT_S = 2
READ_TIMEOUT_S = 30                          # bounds a relay that never closes; not speed
ALLOWED_5XX = {501, 503, 505}

# Cases where the daemon is wrong today: expected vs actual, measured on the real daemon.
KNOWN_BUGS: dict[str, str] = {}   # name -> reason, for a case the daemon gets wrong


@pytest.fixture(scope="module")
def module_relay(tmp_path_factory):
    relay = Relay(tmp_path_factory.mktemp("requests"), "--head-timeout", str(HEAD_TIMEOUT_S),
                  workers=2)
    yield relay
    relay.stop()


def send_raw(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send the bytes, read until the relay closes; (everything read, closed by the relay)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass              # the relay may answer and close before a huge head is all sent
        return read_until_closed(s, READ_TIMEOUT_S)
    finally:
        s.close()


def expected_status(name: str) -> int:
    return int((REQUESTS_DIR / f"{name}.status").read_text().strip())


def case_param(name: str):
    marks = [pytest.mark.xfail(reason=KNOWN_BUGS[name], strict=True)] if name in KNOWN_BUGS else []
    return pytest.param(name, id=name, marks=marks)


def test_every_request_file_has_a_status_file_with_one_code():
    assert len(CASES) >= 30
    for name in CASES:
        status = expected_status(name)
        assert 100 <= status <= 599, name
        assert status < 500 or status in ALLOWED_5XX, (name, status)


@pytest.mark.parametrize("name", [case_param(n) for n in CASES])
def test_each_request_file_gets_its_status_and_errors_close_the_connection(module_relay, name):
    want = expected_status(name)
    data, closed = send_raw(module_relay.port, (REQUESTS_DIR / f"{name}.http").read_bytes())
    assert data.startswith(b"HTTP/1."), f"{name}: no response, got {data[:200]!r} " \
                                        f"(closed={closed})"
    status_line, _, rest = data.partition(b"\r\n")
    status = int(status_line.split()[1])
    assert status < 500 or status in ALLOWED_5XX, f"{name}: a 5xx for a client: {status_line!r}"
    assert status == want, f"{name}: expected {want}, got {status_line!r}"
    if status >= 400:
        body = rest.partition(b"\r\n\r\n")[2]
        assert body.startswith(b"[ERROR] ") and body.count(b"\n") == 1, (name, body)
        assert closed, f"{name}: the relay kept the connection open after {status}"


def test_a_sender_rejected_for_its_chunked_body_leaves_no_pipe_waiting(module_relay):
    """A malformed chunk size is seen only after the sender joined its pipe: the 400 must
    also take it out of the rendezvous, or the path is held by a gone sender."""
    for name in ("011-invalid-chunk-size", "012-overflowing-chunk-size"):
        data, _ = send_raw(module_relay.port, (REQUESTS_DIR / f"{name}.http").read_bytes())
        assert data.startswith(b"HTTP/1.1 400"), data[:100]
    wait_for(lambda: waiting_count(module_relay) == 0, timeout=30, what="no pipe waiting")


def test_the_relay_still_serves_a_curl_transfer_after_all_the_bad_requests(module_relay,
                                                                           tmp_path):
    src = payload(tmp_path, 1 << 20, seed=7)
    url = f"{module_relay.url}/requests-after?n=2"
    outs = [tmp_path / f"after-{i}" for i in range(2)]
    receivers = [curl_receiver(url, o) for o in outs]
    sender = curl_sender(url, src)
    assert wait_all([sender, *receivers]) == [0, 0, 0]
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 2
    assert module_relay.proc.poll() is None
    health = module_relay.health()
    assert health["workers_alive"] == 2 and health["worker_restarts"] == 0, health

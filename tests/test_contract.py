"""The HTTP contract (DESIGN §1) against the real daemon: real sockets and real curl.

Every transfer compares each receiver's sha256 with the sender's. Both arrival orders are
exercised wherever order could matter. Nothing here asserts speed; socket timeouts and curl's
--max-time only keep a broken daemon from hanging the run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import relayd
from conftest import (curl_receiver, curl_sender, http, payload, raw_request,
                      parse_head, read_until_closed,
                      sha256_file, wait_all, wait_for, waiting_count)

RECEIVERS_FIRST = "receivers-first"
SENDER_FIRST = "sender-first"
ORDERS = (RECEIVERS_FIRST, SENDER_FIRST)
BAD_N = ("n=0", "n=257", "n=abc", "n=-1", "n=1.5", "n=", "n=1&n=2")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The daemon answers on the rendezvous reply, not on the body: one that waited for the body
# would never answer, as no body byte is sent before the answer. Only a bound on a broken one.
CONTINUE_WAIT_S = 30
ANSWER_TIMEOUT_S = 30          # only keeps a broken daemon from hanging the run


# -- helpers ----------------------------------------------------------------------------------
def parse_head_file(path: Path) -> tuple[int, dict]:
    """The last response head curl -D wrote (a 100 Continue block may precede it)."""
    text = path.read_bytes().decode("latin-1")
    blocks = [b for b in text.split("\r\n\r\n") if b.startswith("HTTP/")]
    assert blocks, f"no response head in {path}: {text!r}"
    status_line, *lines = blocks[-1].split("\r\n")
    headers = {}
    for line in lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"",
               timeout: float = 10) -> bytes:
    """Read until `marker` is in the data; each recv waits at most the socket's timeout."""
    deadline = time.monotonic() + timeout
    while marker not in data:
        assert time.monotonic() < deadline, f"{marker!r} not seen in {data!r}"
        chunk = sock.recv(65536)      # socket.timeout here means the daemon did not answer
        assert chunk, f"connection closed before {marker!r}: {data!r}"
        data += chunk
    return data


def read_one_response(sock: socket.socket, buffered: bytes = b"") -> tuple[int, dict, bytes,
                                                                        bytes]:
    """One Content-Length response from a kept-alive connection: (status, headers, body,
    bytes already read past it, i.e. the start of the next response)."""
    data = read_until(sock, b"\r\n\r\n", buffered)
    status, headers, rest = parse_head(data)
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    return status, headers, rest[:length], rest[length:]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_cors_and_nosniff(headers: dict, what: str) -> None:
    assert headers.get("access-control-allow-origin") == "*", f"{what}: {headers}"
    assert headers.get("x-content-type-options") == "nosniff", f"{what}: {headers}"


@dataclasses.dataclass
class Transfer:
    receiver_heads: list       # [(status, headers)] per receiver
    sender_head: tuple         # (status, headers)
    sender_output: bytes       # the sender's progress lines


def run_transfer(relay, tmp: Path, path: str, *, n: int = 1, size: int = 96 * 1024,
                 order: str = RECEIVERS_FIRST, chunked: bool = False, sender_args=(),
                 seed: int = 0) -> Transfer:
    """One complete transfer with curl on both sides; asserts every receiver's sha256."""
    tag = f"{path.strip('/').replace('/', '_')}-{order}-{seed}-{time.monotonic_ns()}"
    src = payload(tmp, size, name=f"src-{tag}", seed=seed)
    url = f"{relay.url}{path}?n={n}"
    outs = [tmp / f"out-{tag}-{i}" for i in range(n)]
    heads = [tmp / f"head-{tag}-{i}" for i in range(n)]
    sender_head = tmp / f"sender-head-{tag}"
    stdin = open(src, "rb") if chunked else None

    def start_receivers():
        return [curl_receiver(url, out, "--path-as-is", "-D", str(head))
                for out, head in zip(outs, heads)]

    def start_sender():
        return curl_sender(url, None if chunked else src, "--path-as-is", "-D", str(sender_head),
                           *sender_args, stdin=stdin)

    try:
        if order == RECEIVERS_FIRST:
            receivers = start_receivers()
            wait_for(lambda: waiting_count(relay) == 1, what="receivers waiting")
            sender = start_sender()
        else:
            sender = start_sender()
            wait_for(lambda: waiting_count(relay) == 1, what="sender waiting")
            receivers = start_receivers()
        codes = wait_all([sender, *receivers])
    finally:
        if stdin is not None:
            stdin.close()
    output = sender.stdout.read()
    errors = [p.stderr.read() for p in (sender, *receivers)]
    assert codes == [0] * (n + 1), f"curl exits {codes}: {errors} sender said {output!r}"
    expected = sha256_file(src)
    for out in outs:
        assert sha256_file(out) == expected, f"{out.name} differs from what was sent"
    return Transfer([parse_head_file(h) for h in heads], parse_head_file(sender_head), output)


# -- n ----------------------------------------------------------------------------------------
def test_a_bad_n_gets_400_with_an_error_line_for_receivers_and_senders(relay):
    for method in ("GET", "PUT"):
        for query in BAD_N:
            status, headers, body = http(relay.port, method, f"/bad-n?{query}")
            assert status == 400, f"{method} /bad-n?{query} -> {status} {body!r}"
            assert body.startswith(b"[ERROR]"), f"{method} ?{query}: {body!r}"
            assert_cors_and_nosniff(headers, f"{method} ?{query}")
    assert waiting_count(relay) == 0


def test_a_party_whose_n_differs_from_the_waiting_receiver_gets_400_and_the_pipe_still_completes(
        relay, tmp_path):
    src = payload(tmp_path, 300 * 1024)
    url = f"{relay.url}/mismatch?n=3"
    outs = [tmp_path / f"out{i}" for i in range(3)]
    first = curl_receiver(url, outs[0])
    wait_for(lambda: waiting_count(relay) == 1, what="receiver waiting")

    status, _, body = http(relay.port, "PUT", "/mismatch?n=2", body=b"not for you")
    assert status == 400 and body.startswith(b"[ERROR]"), (status, body)
    status, _, body = http(relay.port, "GET", "/mismatch?n=2")
    assert status == 400 and body.startswith(b"[ERROR]"), (status, body)
    assert waiting_count(relay) == 1
    assert first.poll() is None, "the waiting receiver must still be waiting"

    others = [curl_receiver(url, out) for out in outs[1:]]
    sender = curl_sender(url, src)
    codes = wait_all([sender, first, *others])
    assert codes == [0, 0, 0, 0], [p.stderr.read() for p in (sender, first, *others)]
    for out in outs:
        assert sha256_file(out) == sha256_file(src)


# -- 409 --------------------------------------------------------------------------------------
def test_a_second_sender_on_a_path_where_a_sender_waits_gets_409(relay, tmp_path):
    src = payload(tmp_path, 200 * 1024)
    out = tmp_path / "out"
    url = f"{relay.url}/two-senders"
    sender = curl_sender(url, src)
    wait_for(lambda: waiting_count(relay) == 1, what="sender waiting")

    status, headers, body = http(relay.port, "PUT", "/two-senders", body=b"intruder")
    assert status == 409 and body.startswith(b"[ERROR]"), (status, body)
    assert_cors_and_nosniff(headers, "409")

    receiver = curl_receiver(url, out)
    assert wait_all([sender, receiver]) == [0, 0]
    assert sha256_file(out) == sha256_file(src)


def test_a_receiver_beyond_n_gets_409(relay, tmp_path):
    src = payload(tmp_path, 200 * 1024)
    out = tmp_path / "out"
    url = f"{relay.url}/beyond-n?n=1"
    receiver = curl_receiver(url, out)
    wait_for(lambda: waiting_count(relay) == 1, what="receiver waiting")

    status, _, body = http(relay.port, "GET", "/beyond-n?n=1")
    assert status == 409 and body.startswith(b"[ERROR]"), (status, body)

    sender = curl_sender(url, src)
    assert wait_all([sender, receiver]) == [0, 0]
    assert sha256_file(out) == sha256_file(src)


def test_a_receiver_or_sender_of_a_path_whose_transfer_is_streaming_gets_409(relay, tmp_path):
    data = payload(tmp_path, 400 * 1024).read_bytes()
    out = tmp_path / "out"
    url = f"{relay.url}/streaming?n=1"
    receiver = curl_receiver(url, out)
    sender = curl_sender(url, None, stdin=subprocess.PIPE)        # chunked, we feed it
    try:
        sender.stdin.write(data[:16 * 1024])                       # under a pipe buffer
        sender.stdin.flush()
        wait_for(lambda: relay.health()["pipes_streaming"] == 1, what="transfer streaming")

        for method in ("GET", "PUT"):
            status, _, body = http(relay.port, method, "/streaming?n=1")
            assert status == 409 and body.startswith(b"[ERROR]"), (method, status, body)
        assert receiver.poll() is None and sender.poll() is None

        sender.stdin.write(data[16 * 1024:])
    finally:
        sender.stdin.close()
    assert wait_all([sender, receiver]) == [0, 0], receiver.stderr.read()
    assert sha256_file(out) == sha256_bytes(data)


# -- methods ----------------------------------------------------------------------------------
def test_delete_and_patch_on_a_pipe_path_get_405_with_allow(relay):
    for method in ("DELETE", "PATCH"):
        status, headers, body = http(relay.port, method, "/methods?n=1")
        assert status == 405, (method, status, body)
        assert "GET" in headers.get("allow", "") and "PUT" in headers["allow"], headers
        assert body.startswith(b"[ERROR]")
        assert_cors_and_nosniff(headers, method)
    assert waiting_count(relay) == 0


def test_options_preflight_answers_200_with_cors_headers(relay):
    status, headers, _ = http(relay.port, "OPTIONS", "/preflight?n=2",
                              {"Origin": "http://example.test",
                               "Access-Control-Request-Method": "PUT"})
    assert status == 200
    assert headers.get("access-control-allow-origin") == "*"
    methods = headers.get("access-control-allow-methods", "")
    assert "PUT" in methods and "GET" in methods, headers
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "content-disposition", "authorization"} <= allowed, headers
    assert waiting_count(relay) == 0


def test_connect_gets_405_with_allow_and_an_error_line_then_close(relay):
    for target in ("127.0.0.1:80", "/connect"):
        sock = raw_request(relay.port, f"CONNECT {target} HTTP/1.1\r\n"
                                       f"Host: 127.0.0.1\r\n\r\n".encode())
        data, closed = read_until_closed(sock, timeout=30)
        sock.close()
        status, headers, body = parse_head(data)
        assert status == 405, (target, data)
        allowed = {m.strip() for m in headers.get("allow", "").split(",")}
        assert {"GET", "PUT", "POST"} <= allowed and "CONNECT" not in allowed, (target, headers)
        assert_cors_and_nosniff(headers, f"CONNECT {target}")
        assert body.startswith(b"[ERROR]") and closed
    assert waiting_count(relay) == 0


# -- CORS and nosniff -------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_every_pipe_response_carries_cors_and_nosniff(relay, tmp_path, order):
    t = run_transfer(relay, tmp_path, "/cors", order=order)
    (status, headers), = t.receiver_heads
    assert status == 200
    assert_cors_and_nosniff(headers, "receiver 200")
    status, headers = t.sender_head
    assert status == 200
    assert_cors_and_nosniff(headers, "sender 200")
    for method, target in (("GET", "/cors?n=0"), ("PUT", "/cors?n=x"), ("DELETE", "/cors"),
                           ("PUT", "/health")):
        status, headers, _ = http(relay.port, method, target)
        assert 400 <= status < 500
        assert_cors_and_nosniff(headers, f"{method} {target} -> {status}")


def test_the_connection_limit_503_carries_an_error_line_cors_and_nosniff(start_relay):
    relay = start_relay("--max-connections", "1", workers=1)
    held = raw_request(relay.port, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        assert read_one_response(held)[0] == 200     # accepted, kept alive: the one connection
        status, headers, body = http(relay.port, "GET", "/limit?n=1")
        assert status == 503
        assert body.startswith(b"[ERROR]"), body
        assert_cors_and_nosniff(headers, "503")
    finally:
        held.close()


# -- header forwarding ------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_an_html_content_type_reaches_receivers_as_text_plain_keeping_its_charset(
        relay, tmp_path, order):
    for i, (sent, seen) in enumerate([("text/html; charset=utf-8", "text/plain; charset=utf-8"),
                                      ("text/html", "text/plain")]):
        t = run_transfer(relay, tmp_path, "/html", order=order, seed=i, n=2,
                         sender_args=("-H", f"Content-Type: {sent}"))
        for status, headers in t.receiver_heads:
            assert status == 200
            assert headers["content-type"] == seen, (sent, headers)


@pytest.mark.parametrize("order", ORDERS)
def test_json_content_type_content_disposition_and_x_piping_headers_pass_through(
        relay, tmp_path, order):
    t = run_transfer(relay, tmp_path, "/forward", order=order, n=2, sender_args=(
        "-H", "Content-Type: application/json",
        "-H", 'Content-Disposition: attachment; filename="a.txt"',
        "-H", "X-Piping-Foo: bar"))
    for status, headers in t.receiver_heads:
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert headers["content-disposition"] == 'attachment; filename="a.txt"'
        assert headers["x-piping-foo"] == "bar"


@pytest.mark.parametrize("order", ORDERS)
def test_a_content_length_sender_gives_receivers_that_content_length(relay, tmp_path, order):
    size = 123_457
    t = run_transfer(relay, tmp_path, "/length", order=order, size=size, n=2)
    for status, headers in t.receiver_heads:
        assert status == 200
        assert headers.get("content-length") == str(size), headers
        assert "transfer-encoding" not in headers


@pytest.mark.parametrize("order", ORDERS)
def test_a_chunked_sender_gives_receivers_chunked_transfer_encoding(relay, tmp_path, order):
    t = run_transfer(relay, tmp_path, "/chunked", order=order, size=777_777, n=2, chunked=True)
    for status, headers in t.receiver_heads:
        assert status == 200
        assert headers.get("transfer-encoding") == "chunked", headers
        assert "content-length" not in headers


@pytest.mark.parametrize("order", ORDERS)
def test_a_sender_without_content_type_gives_receivers_application_octet_stream(
        relay, tmp_path, order):
    for chunked in (False, True):
        t = run_transfer(relay, tmp_path, "/octets", order=order, chunked=chunked)
        (status, headers), = t.receiver_heads
        assert status == 200
        assert headers["content-type"] == "application/octet-stream", headers


# -- Expect: 100-continue ---------------------------------------------------------------------
def continue_head(path: str, length: int) -> bytes:
    return (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_expect_100_continue_is_answered_before_the_body_when_a_receiver_waits(relay, tmp_path):
    body = b"hello"
    out = tmp_path / "out"
    receiver = curl_receiver(f"{relay.url}/continue-r?n=1", out)
    wait_for(lambda: waiting_count(relay) == 1, what="receiver waiting")

    sock = raw_request(relay.port, continue_head("/continue-r?n=1", len(body)),
                       timeout=CONTINUE_WAIT_S)
    try:
        data = read_until(sock, CONTINUE)           # no body byte has been sent yet
        assert data.startswith(CONTINUE), data
        sock.sendall(body)
        rest, closed = read_until_closed(sock)
    finally:
        sock.close()
    status, _, progress = parse_head(data[len(CONTINUE):] + rest)
    assert status == 200 and closed
    assert b"Sent successfully to 1 receiver(s)" in progress, progress
    assert wait_all([receiver]) == [0]
    assert sha256_file(out) == sha256_bytes(body)


def test_expect_100_continue_and_the_waiting_line_arrive_before_the_body_when_the_sender_is_first(
        relay, tmp_path):
    body = b"world"
    out = tmp_path / "out"
    sock = raw_request(relay.port, continue_head("/continue-s?n=1", len(body)),
                       timeout=CONTINUE_WAIT_S)
    try:
        data = read_until(sock, b"[INFO] Waiting")   # no body byte has been sent yet
        assert data.startswith(CONTINUE + b"HTTP/1.1 200 "), data
        status, headers, _ = parse_head(data[len(CONTINUE):])
        assert status == 200 and headers["content-type"].startswith("text/plain")

        receiver = curl_receiver(f"{relay.url}/continue-s?n=1", out)
        sock.settimeout(10)
        data = read_until(sock, b"Start sending", data)
        sock.sendall(body)
        rest, closed = read_until_closed(sock)
    finally:
        sock.close()
    assert closed and b"Sent successfully to 1 receiver(s)" in data + rest, data + rest
    assert wait_all([receiver]) == [0]
    assert sha256_file(out) == sha256_bytes(body)


# -- the sender's progress lines --------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_the_senders_response_reports_waiting_start_and_success(relay, tmp_path, order):
    t = run_transfer(relay, tmp_path, "/progress", n=2, order=order)
    lines = t.sender_output.decode()
    if order == SENDER_FIRST:
        assert "Waiting for 2 receiver(s)" in lines, lines
    assert "Start sending to 2 receiver(s)" in lines, lines
    assert "Sent successfully to 2 receiver(s)" in lines, lines
    assert lines.index("Start sending") < lines.index("Sent successfully")


# -- reserved paths ---------------------------------------------------------------------------
def test_the_root_page_help_and_version_are_served(relay):
    status, headers, body = http(relay.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"relayd" in body

    sock = raw_request(relay.port, b"GET /help HTTP/1.1\r\nHost: relay.example:8123\r\n"
                                   b"Connection: close\r\n\r\n")
    data, _ = read_until_closed(sock)
    sock.close()
    status, headers, body = parse_head(data)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"curl" in body and b"http://relay.example:8123/" in body, body

    status, headers, body = http(relay.port, "GET", "/version")
    assert status == 200
    assert body.decode().strip() == f"relayd {relayd.__version__}"


def test_health_says_ok_with_every_worker_alive_and_no_pipe_waiting(relay):
    status, headers, body = http(relay.port, "GET", "/health")
    assert status == 200 and headers["content-type"].startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["workers_alive"] == relay.workers
    assert health["pipes_waiting"] == 0


def test_put_to_a_reserved_path_gets_405_with_allow_and_head_of_the_root_has_no_body(relay):
    for path in ("/health", "/", "/version"):
        status, headers, body = http(relay.port, "PUT", path, body=b"x")
        assert status == 405 and body.startswith(b"[ERROR]"), (path, status, body)
        assert headers["allow"] == "GET, HEAD, OPTIONS"
    status, headers, body = http(relay.port, "HEAD", "/")
    assert status == 200 and body == b""
    assert int(headers["content-length"]) > 0
    assert waiting_count(relay) == 0


def test_head_on_a_pipe_path_gets_405_with_allow_and_headers_only(relay):
    s = raw_request(relay.port, b"HEAD /a-pipe?n=2 HTTP/1.1\r\nHost: relay\r\n\r\n")
    data, closed = read_until_closed(s)
    s.close()
    status, headers, body = parse_head(data)
    assert closed and status == 405
    assert "PUT" in headers["allow"] and "GET" in headers["allow"]
    assert int(headers["content-length"]) > 0      # what a GET would have carried ...
    assert body == b""                              # ... but a HEAD answer has no body
    assert waiting_count(relay) == 0


# -- paths ------------------------------------------------------------------------------------
def test_one_path_carries_three_transfers_one_after_another(relay, tmp_path):
    for i, order in enumerate((RECEIVERS_FIRST, SENDER_FIRST, RECEIVERS_FIRST)):
        run_transfer(relay, tmp_path, "/reuse", n=2, size=(i + 1) * 150_001, order=order,
                     chunked=i == 1, seed=i)
    assert waiting_count(relay) == 0


def test_slash_a_and_double_slash_a_are_different_pipes(relay, tmp_path):
    one = payload(tmp_path, 100_000, "one", seed=1)
    two = payload(tmp_path, 100_000, "two", seed=2)
    out_double, out_single = tmp_path / "out-double", tmp_path / "out-single"
    receiver_double = curl_receiver(f"{relay.url}//a?n=1", out_double, "--path-as-is")
    sender_single = curl_sender(f"{relay.url}/a?n=1", one, "--path-as-is")
    wait_for(lambda: waiting_count(relay) == 2, what="two separate waiting pipes")
    assert receiver_double.poll() is None and sender_single.poll() is None

    receiver_single = curl_receiver(f"{relay.url}/a?n=1", out_single, "--path-as-is")
    sender_double = curl_sender(f"{relay.url}//a?n=1", two, "--path-as-is")
    codes = wait_all([sender_single, receiver_single, sender_double, receiver_double])
    assert codes == [0, 0, 0, 0]
    assert sha256_file(out_single) == sha256_file(one)
    assert sha256_file(out_double) == sha256_file(two)


# -- connections ------------------------------------------------------------------------------
def test_two_version_requests_on_one_connection_are_both_answered(relay):
    request = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock = raw_request(relay.port, request)
    try:
        for _ in range(2):
            status, headers, body, extra = read_one_response(sock)
            assert status == 200 and "close" not in headers.get("connection", "")
            assert body.decode().strip() == f"relayd {relayd.__version__}"
            assert extra == b""
            sock.sendall(request)
        status, _, body, extra = read_one_response(sock)     # the third, just sent
        assert status == 200 and extra == b""
    finally:
        sock.close()


def test_pipelined_version_requests_are_answered_in_order(relay):
    request = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock = raw_request(relay.port, request * 2)
    try:
        buffered = b""
        for _ in range(2):
            status, _, body, buffered = read_one_response(sock, buffered)
            assert status == 200 and body.decode().strip() == f"relayd {relayd.__version__}"
        assert buffered == b""
    finally:
        sock.close()



def test_a_client_that_pipelines_requests_and_reads_no_reply_cannot_grow_the_worker(
        start_relay):
    """5,000 pipelined requests for the 22 KiB browser page (110 MB of answers) from a client
    that reads nothing at first: the worker parses while its answers go out, then leaves the
    rest unread (TCP holds it), so its memory stays put (before: every answer queued, +100
    MB); once the client reads, every request is answered, in order."""
    import psutil
    relay = start_relay(workers=1)
    (pid,) = [w["pid"] for w in relay.health()["workers"]]
    worker = psutil.Process(pid)
    rss_before = worker.memory_info().rss
    count = 5000
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    last = b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=60)
    sender = threading.Thread(target=sock.sendall, args=(request * (count - 1) + last,))
    sender.start()
    try:
        time.sleep(1.0)                   # the worker takes what it will while nobody reads
        grown = worker.memory_info().rss - rss_before
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
        sender.join(60)
    finally:
        sock.close()
    assert grown < 32 * 1024 * 1024, f"the worker grew {grown / 2**20:.0f} MiB"
    assert received.count(b"HTTP/1.1 200 OK") == count
    assert received.count(b"<!doctype html>") == count - 1
    assert received.endswith(f"relayd {relayd.__version__}\n".encode())

MALFORMED = [
    # (what, request bytes, acceptable statuses, must close)
    ("garbage bytes", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xde\xad\r\n\r\n",
     {400}, True),
    ("request line ended by a bare LF", b"GET / HTTP/1.1\nHost: 127.0.0.1\n\n", {400}, True),
    ("a header with NUL", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n",
     {400}, True),
    ("Content-Length and Transfer-Encoding",
     b"PUT /malformed?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nhello", {400}, True),
    ("Transfer-Encoding: gzip",
     b"PUT /malformed?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n",
     {501, 400}, True),
    ("Expect: something",
     b"PUT /malformed?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: something\r\n"
     b"Content-Length: 0\r\n\r\n", {417}, False),
    ("HTTP/1.1 without Host", b"GET /version HTTP/1.1\r\n\r\n", {400}, True),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", {505}, False),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: 127.0.0.1\r\n\r\n", {505}, False),
    ("a 9 KiB URI", b"GET /" + b"u" * (9 * 1024) + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
     {414}, False),
    ("200 headers", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", {431}, False),
]


def read_answer(sock: socket.socket, must_close: bool) -> tuple[bytes, bool]:
    """(the response, whether the relay closed): where it must close, everything until it
    does; else until a whole Content-Length response is in (the connection may stay open)."""
    if must_close:
        return read_until_closed(sock, timeout=ANSWER_TIMEOUT_S)
    sock.settimeout(ANSWER_TIMEOUT_S)
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and len(body) >= int(parse_head(data)[1].get("content-length", 0)):
            return data, False
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def test_malformed_requests_get_a_4xx_line_and_the_relay_keeps_working(relay, tmp_path):
    problems = []
    for what, request, statuses, must_close in MALFORMED:
        sock = raw_request(relay.port, request, timeout=ANSWER_TIMEOUT_S)
        data, closed = read_answer(sock, must_close)
        sock.close()
        if not data.startswith(b"HTTP/1."):
            problems.append(f"{what}: no response: {data[:200]!r}")
            continue
        status, _, body = parse_head(data)
        if status not in statuses:
            problems.append(f"{what}: status {status}, expected {sorted(statuses)}")
        if status >= 500 and status not in (501, 505):
            problems.append(f"{what}: a client mistake got {status}")
        if not body.startswith(b"[ERROR]"):
            problems.append(f"{what}: body {body[:200]!r}")
        if must_close and not closed:
            problems.append(f"{what}: the connection stayed open")
    assert not problems, "\n".join(problems)
    assert relay.health()["workers_alive"] == relay.workers
    run_transfer(relay, tmp_path, "/after-malformed", n=2, size=300_000)


# -- replies that leave something unread, and HTTP/1.0 rules ----------------------------------
def read_all(sock: socket.socket) -> bytes:
    data, closed = read_until_closed(sock, timeout=20)
    assert closed, data
    return data


def test_a_request_that_offered_h2c_is_answered_and_the_connection_closes(relay):
    """The offer is ignored, but httptools cannot step past it: before, the next request on
    the connection got `400 protocol upgrade is not supported`."""
    offer = (b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
             b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    data = read_all(raw_request(relay.port, offer + b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1 ") == 1, data
    assert b"Connection: close" in data


def test_a_body_sent_to_a_reserved_path_is_never_read_as_the_next_request(relay):
    """GET /version with a 40,000-byte body arriving after the head: one 200 that closes the
    connection (before: a 431 `head too large` followed, the body parsed as a head)."""
    sock = raw_request(relay.port, b"GET /version HTTP/1.1\r\nHost: x\r\nContent-Length: 40000"
                                   b"\r\n\r\n")
    for _ in range(4):
        try:
            sock.sendall(b"b" * 10_000)
        except OSError:
            break                                 # the relay closed: it reads no more
    data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1 ") == 1, data
    assert b"Connection: close" in data


def test_a_refusal_after_a_kept_alive_head_request_still_has_its_body(relay):
    """The parser still holds the previous request's method until the next one's is parsed:
    a bad method after a HEAD is a 400 with its [ERROR] line, not headers only."""
    data = read_all(raw_request(relay.port, b"HEAD /version HTTP/1.1\r\nHost: x\r\n\r\n"
                                            b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n"))
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200"), data
    status, headers, body = parse_head(rest)
    assert status == 400 and body.startswith(b"[ERROR] ") and body.endswith(b"\n"), rest
    assert int(headers["content-length"]) == len(body)


def test_a_204_carries_no_content_length(relay):
    status, headers, body = http(relay.port, "GET", "/favicon.ico")
    assert status == 204 and "content-length" not in headers and body == b""


@pytest.mark.parametrize("what,request_bytes,status", [
    ("a URI over the limit", b"HEAD /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("too many header fields",
     b"HEAD /version HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101))
     + b"\r\n", 431),
], ids=["uri", "header-count"])
def test_a_head_refused_before_its_head_completes_gets_headers_only(relay, what, request_bytes,
                                                                    status):
    data = read_all(raw_request(relay.port, request_bytes))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), data
    assert body == b"", f"{what}: a HEAD answer with a body"


def test_an_http10_sender_that_expects_100_continue_gets_no_1xx(relay):
    receiver = raw_request(relay.port, b"GET /old-expect HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: waiting_count(relay) == 1, what="the receiver waiting")
    sender = raw_request(relay.port, b"PUT /old-expect HTTP/1.0\r\nExpect: 100-continue\r\n"
                                     b"Content-Length: 5\r\n\r\nhello")
    answer = read_all(sender)
    assert answer.startswith(b"HTTP/1.0 200") and b"100 Continue" not in answer, answer
    assert read_all(receiver).endswith(b"\r\n\r\nhello")


def test_an_http10_request_framed_with_transfer_encoding_gets_400(relay):
    data = read_all(raw_request(relay.port, b"PUT /te10 HTTP/1.0\r\nTransfer-Encoding: chunked"
                                            b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
    assert data.startswith(b"HTTP/1.0 400") or data.startswith(b"HTTP/1.1 400"), data
    assert waiting_count(relay) == 0


def test_parties_refused_at_their_join_are_not_counted_as_joined(start_relay):
    """A second receiver of an n = 1 pipe (409), a different n (400), a pipe beyond
    --max-pipes (503, receiver and sender): refused, so /health's and /metrics' joined
    parties stay at the one receiver that waits (they counted 4 receivers, 1 sender)."""
    relay = start_relay("--max-pipes", "1", workers=1)
    waiting = raw_request(relay.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: waiting_count(relay) == 1, what="the receiver waiting")
    for method, target, status in (("GET", "/a", 409), ("GET", "/a?n=3", 400),
                                   ("GET", "/b", 503), ("PUT", "/b", 503)):
        assert http(relay.port, method, target)[0] == status, (method, target)
    (worker,) = relay.health()["workers"]
    assert (worker["senders"], worker["receivers"]) == (0, 1), worker
    waiting.close()

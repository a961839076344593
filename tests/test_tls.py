"""TLS the standard way: HAProxy (deploy/haproxy-tls.cfg) terminates HTTPS in front of relayd.

A self-signed certificate made here with openssl; curl `--cacert` as sender and receivers,
relayd with access control on, so credentials pass through the proxy too. Needs `haproxy`
and `openssl` on PATH (.ci/run installs them); skipped with the reason otherwise.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (CURL, CLIENT_TIMEOUT_S, curl_receiver, curl_sender, payload,
                      sha256_file, stop_process, wait_all, wait_for, waiting_count)

HAPROXY = shutil.which("haproxy")
OPENSSL = shutil.which("openssl")
TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "haproxy-tls.cfg"
KEY = secrets.token_hex(32)
TOKEN = secrets.token_hex(24)
LINE_TIMEOUT_S = 10

pytestmark = pytest.mark.skipif(
    HAPROXY is None or OPENSSL is None,
    reason="needs haproxy and openssl on PATH (apt-get install -y haproxy openssl)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsFront:
    """relayd (--secret-file) behind HAProxy terminating TLS; `url` is https://127.0.0.1:P."""

    def __init__(self, tmp_path: Path, start_relay):
        secret = tmp_path / "secrets.toml"
        secret.write_text(f'trusted_proxies = ["127.0.0.1"]\n\n[keys]\nk1 = "{KEY}"\n\n'
                          f'[[tokens]]\ntoken = "{TOKEN}"\nroles = ["send", "recv"]\n'
                          f'prefixes = ["/tokens/"]\n')
        os.chmod(secret, 0o600)
        self.secret = secret
        self.relay = start_relay("--secret-file", str(secret), workers=2)
        self.cert = tmp_path / "cert.pem"
        key = tmp_path / "key.pem"
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(self.cert)],
                       check=True, capture_output=True, timeout=30)
        pem = tmp_path / "relay.pem"
        pem.write_bytes(self.cert.read_bytes() + key.read_bytes())
        os.chmod(pem, 0o600)
        port = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(TEMPLATE.read_text()
                       .replace("@BIND@", f"127.0.0.1:{port}").replace("@PEM@", str(pem))
                       .replace("@RELAYD@", f"127.0.0.1:{self.relay.port}")
                       .replace("@MAXCONN@", "1000"))
        assert "@" not in "".join(line.split("#")[0] for line in cfg.read_text().splitlines())
        self.haproxy_log = tmp_path / "haproxy.log"
        self._log = open(self.haproxy_log, "wb")
        self.proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"https://127.0.0.1:{port}"

        def serving():
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited: {self.haproxy_log.read_text()}")
            return subprocess.run([CURL, "-sS", "--cacert", str(self.cert), "-o", os.devnull,
                                   "-w", "%{http_code}", self.url + "/health"],
                                  capture_output=True, text=True).stdout == "200"
        wait_for(serving, timeout=15, interval=0.1, what="haproxy serving TLS")

    def sign(self, role: str, target: str) -> str:
        from relayd import secretfile, sign
        return sign.sign_url(secretfile.load_secrets(str(self.secret)), role, target, 600)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def front(tmp_path, start_relay):
    f = TlsFront(tmp_path, start_relay)
    yield f
    f.stop()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_line(proc: subprocess.Popen, buffer: bytearray) -> bytes:
    """The next line from proc's stdout, waiting at most LINE_TIMEOUT_S for it."""
    deadline = time.monotonic() + LINE_TIMEOUT_S
    fd = proc.stdout.fileno()
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0, left))
        if not ready:
            raise AssertionError(f"no line within {LINE_TIMEOUT_S} s (have {bytes(buffer)!r})")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"stream ended before a line (have {bytes(buffer)!r})")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line + b"\n"


def test_one_sender_and_five_receivers_over_tls_get_identical_bytes(front, tmp_path):
    send, recv = front.sign("send", "/tls?n=5"), front.sign("recv", "/tls?n=5")
    src = payload(tmp_path, 8 << 20)
    outs = [tmp_path / f"r{i}.bin" for i in range(5)]
    tls = ("--cacert", str(front.cert))
    receivers = [curl_receiver(front.url + recv, out, *tls) for out in outs]
    wait_for(lambda: waiting_count(front.relay) >= 1, what="receivers waiting")
    sender = curl_sender(front.url + send, src, *tls)
    codes = wait_all([sender, *receivers])
    assert codes == [0] * 6, (codes, [p.stderr.read() for p in receivers])
    assert b"Sent successfully to 5 receiver(s)" in sender.stdout.read()
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * 5
    # Credentials still hold through the proxy; no plain-HTTP shortcut is needed to test it.
    refused = subprocess.run([CURL, "-sS", *tls, "-o", os.devnull, "-w", "%{http_code}",
                              "-X", "PUT", "--data-binary", "x", front.url + recv],
                             capture_output=True, text=True, timeout=20)
    assert refused.stdout == "403"


def test_each_line_reaches_the_receivers_over_tls_before_the_sender_writes_the_next(front):
    tls = ("--cacert", str(front.cert), "-H", f"Authorization: Bearer {TOKEN}")
    url = front.url + "/tokens/stream?n=2"
    receivers = [subprocess.Popen([CURL, "-sS", "-N", "--max-time", str(CLIENT_TIMEOUT_S), *tls,
                                   url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    wait_for(lambda: waiting_count(front.relay) >= 1, what="receivers waiting")
    sender = curl_sender(url, None, *tls, stdin=subprocess.PIPE)        # chunked, fed by us
    buffers = [bytearray() for _ in receivers]
    got = [b"" for _ in receivers]
    sent = b""
    for i in range(20):
        line = f'{{"token": {i}, "delta": "word{i} "}}\n'.encode()
        sender.stdin.write(line)
        sender.stdin.flush()
        sent += line
        # Arrival at every receiver before the next line exists: nothing buffers on the way.
        for k, (r, buf) in enumerate(zip(receivers, buffers)):
            got[k] += read_line(r, buf)
            assert got[k] == sent, i
    sender.stdin.close()
    codes = wait_all([sender, *receivers])
    assert codes == [0, 0, 0]
    got = [g + bytes(b) + r.stdout.read() for g, b, r in zip(got, buffers, receivers)]
    assert [sha256(g) for g in got] == [sha256(sent)] * 2

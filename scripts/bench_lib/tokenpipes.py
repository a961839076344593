"""Many token streams at once: P concurrent pipes x n receivers, every producer sending one
100-byte line (one HTTP chunk) per period -- the fleet's shape when every query has its own
pipe and a model writes tokens into each. The figure is the server's CPU per line sent (each
line reaches n receivers), which shows whether a line's cost grows with the number of pipes
open beside it.

The client is this process (selectors): every receiver's GET, then every producer's chunked
PUT with TCP_NODELAY; the lines start once every producer has been answered (all pipes
stream). Every receiver must get every line of its pipe, in order, and a well-formed end;
any other outcome raises WorkloadError.
"""
from __future__ import annotations

import selectors
import socket
import time

from bench_lib.http_body import ProtocolError, ResponseDecoder

LINE_BYTES = 100
CONNECT_BATCH = 64            # connects between drains of the accept queue


class WorkloadError(RuntimeError):
    pass


def line(pipe: int, seq: int) -> bytes:
    text = b"%d %d " % (pipe, seq)
    return text + b"." * (LINE_BYTES - 1 - len(text)) + b"\n"


class Receiver:
    def __init__(self, sock: socket.socket, pipe: int):
        self.sock = sock
        self.pipe = pipe
        self.body = bytearray()
        self.decoder = ResponseDecoder(self.body.extend)
        self.closed = False


def _connect(port: int, request: bytes, nodelay: bool = False) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(request)
    sock.setblocking(False)
    return sock


def run_token_pipes(server, pipes: int, n: int, period_s: float, seconds: float,
                    prefix: str) -> dict:
    sel = selectors.DefaultSelector()
    receivers: list[Receiver] = []
    producers: list[socket.socket] = []
    answered = bytearray(pipes)        # a producer's 200 head seen
    try:
        for i in range(pipes):
            for _ in range(n):
                r = Receiver(_connect(server.port, b"GET /%s/%d?n=%d HTTP/1.1\r\nHost: bench"
                                      b"\r\n\r\n" % (prefix.encode(), i, n)), i)
                receivers.append(r)
                sel.register(r.sock, selectors.EVENT_READ, r)
            if len(receivers) % CONNECT_BATCH == 0:
                time.sleep(0.001)
        for i in range(pipes):
            p = _connect(server.port, b"PUT /%s/%d?n=%d HTTP/1.1\r\nHost: bench\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" % (prefix.encode(), i, n), True)
            producers.append(p)
            sel.register(p, selectors.EVENT_READ, i)

        def drain(timeout: float) -> None:
            for key, _ in sel.select(timeout):
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if isinstance(key.data, int):          # a producer's progress lines
                    if data.startswith(b"HTTP/1.1 200"):
                        answered[key.data] = 1
                    if not data:
                        sel.unregister(key.fileobj)
                    continue
                r = key.data
                if not data:
                    r.decoder.feed_eof()
                    r.closed = True
                    sel.unregister(r.sock)
                    continue
                try:
                    r.decoder.feed(data)
                except ProtocolError as e:
                    raise WorkloadError(f"pipe {r.pipe}: {e}") from None

        deadline = time.monotonic() + 30
        while sum(answered) < pipes:
            if time.monotonic() > deadline:
                raise WorkloadError(f"{pipes - sum(answered)} producers never answered 200")
            drain(0.05)
        cpu_before = server.cpu_seconds()
        start = time.monotonic()
        sent = 0
        due = start
        while due - start < seconds:
            seq = sent // pipes
            for i, p in enumerate(producers):
                payload = line(i, seq)
                p.sendall(b"%x\r\n%s\r\n" % (len(payload), payload))
            sent += pipes
            due += period_s
            while (now := time.monotonic()) < due:
                drain(due - now)
        for p in producers:
            p.sendall(b"0\r\n\r\n")
        deadline = time.monotonic() + 30
        while not all(r.closed or r.decoder.complete for r in receivers):
            if time.monotonic() > deadline:
                break
            drain(0.05)
        cpu_used = server.cpu_seconds() - cpu_before
        verify(receivers, sent // pipes)
        return {"pipes": pipes, "n": n, "lines": sent, "cpu_s": cpu_used,
                "CPU us/line": cpu_used / sent * 1e6, "seconds": time.monotonic() - start}
    finally:
        for r in receivers:
            r.sock.close()
        for p in producers:
            p.close()
        sel.close()


def verify(receivers: list[Receiver], lines_each: int) -> None:
    """Every receiver has a well-formed end and exactly its pipe's lines, in order."""
    bad = [r for r in receivers
           if not r.decoder.complete
           or bytes(r.body) != b"".join(line(r.pipe, s) for s in range(lines_each))]
    if bad:
        r = bad[0]
        raise WorkloadError(f"{len(bad)}/{len(receivers)} receivers without exactly their "
                            f"lines, e.g. pipe {r.pipe}: {len(r.body)} B, complete="
                            f"{r.decoder.complete}")

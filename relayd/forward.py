"""`relayd forward SOURCE_URL DEST_URL [--dest URL ...]`: one branch of a fan-out tree.

Receives the pipe at SOURCE_URL (as one of its n receivers) and sends the same bytes, as they
arrive, to the pipe at each DEST_URL (as its sender), so one stream can reach more receivers
than one node should serve:

    node-a/p?n=3  ->  3 x `relayd forward node-a/p?n=3 node-X/p?n=200`  ->  600 receivers

The destinations get the source's Content-Type, Content-Disposition and X-Piping* headers and a
chunked body, one chunk per read of the source (nothing is held back). Truncation propagates:
if the source body ends short, the destination bodies end without their last chunk, so every
receiver down the tree sees a short body, and this command exits 1. Standard library and
httptools only; blocking sockets, one thread.
"""
from __future__ import annotations

import argparse
import math
import socket
import ssl
import sys
from urllib.parse import urlsplit

import httptools

FORWARDED_HEADERS = (b"content-type", b"content-disposition")
READ_BYTES = 1 << 16
TIMEOUT_S = 600.0        # > relayd's rendezvous wait (300 s): either side may wait that long


class Failed(Exception):
    """A source or destination that did not do its part; the message says which and why."""


def connect(url: str, timeout: float) -> tuple[socket.socket, bytes, bytes]:
    """A connected socket (TLS for https), the request target and the Host value."""
    try:
        u = urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)     # ValueError: a bad port
    except ValueError as e:
        raise Failed(f"not a usable URL: {url} ({e})") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise Failed(f"not an http(s) URL: {url}")
    try:
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
    except OSError as e:
        raise Failed(f"{url}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if u.scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return sock, target.encode(), u.netloc.encode()


class Response:
    """httptools callbacks for one response: status, headers, body chunks, completeness."""

    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.body = bytearray()           # kept until a sink is set
        self.sink = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # A 100 Continue is an interim head: the final one follows.
        if self.status == 100:
            self.headers.clear()
            return
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        if self.sink is not None and self.status != 100:
            self.sink(data)
        else:
            self.body += data

    def on_message_complete(self) -> None:
        if self.status != 100:
            self.complete = True

    def feed(self, sock: socket.socket, until) -> bool:
        """Read until `until()` holds; False if the peer closed first."""
        while not until():
            data = sock.recv(READ_BYTES)
            if not data:
                return False
            self.parser.feed_data(data)
        return True


class Destination:
    """One destination pipe: its socket, its chunked body, its progress lines."""

    def __init__(self, url: str, headers: list[tuple[bytes, bytes]], timeout: float):
        self.url = url
        self.sock, target, host = connect(url, timeout)
        head = [b"PUT %s HTTP/1.1" % target, b"Host: " + host,
                b"Transfer-Encoding: chunked", b"User-Agent: relayd-forward"]
        head += [name + b": " + value for name, value in headers]
        self.sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        self.error: str | None = None

    def send(self, data: bytes) -> None:
        if self.error is None:
            try:
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            except OSError as e:
                self.error = f"send failed: {e}"

    def finish(self) -> None:
        """Terminate the body and read the relay's answer to the end: error or None."""
        self.send(b"")                    # "0\r\n\r\n": the body is complete
        response = Response()
        try:
            response.feed(self.sock, lambda: response.complete)
        except (OSError, httptools.HttpParserError) as e:
            self.error = self.error or f"reading the answer failed: {e}"
        text = bytes(response.body).decode("utf-8", "replace")
        sys.stderr.write("".join(f"{self.url}: {line}\n" for line in text.splitlines()))
        if response.status != 200 or "[ERROR]" in text or not response.complete:
            ended = "complete" if response.complete else "cut short"
            self.error = self.error or f"status {response.status}, answer {ended}"
        self.close()

    def close(self) -> None:
        self.sock.close()


def forward(source_url: str, dest_urls: list[str], timeout: float = TIMEOUT_S) -> int:
    """Relay SOURCE into every DEST; 0 when the whole body reached every destination."""
    sock, target, host = connect(source_url, timeout)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: relayd-forward\r\n"
                 b"Connection: close\r\n\r\n" % (target, host))
    dests: list[Destination] = []
    response = Response()
    try:
        # The head arrives when the source's transfer starts (its sender and n receivers met).
        if not response.feed(sock, lambda: response.headers_done) or response.status != 200:
            if response.headers_done:       # an error answer: read its one [ERROR] line
                response.feed(sock, lambda: response.complete)
            raise Failed(f"source {source_url}: status {response.status or 'none'} "
                         f"{bytes(response.body).decode('utf-8', 'replace').strip()}")
        headers = [(name, value) for name, value in response.headers
                   if name in FORWARDED_HEADERS or name.startswith(b"x-piping")]
        dests = [Destination(url, headers, timeout) for url in dest_urls]
        # Body bytes that came with the head waited in `response.body`; the rest streams.
        for d in dests:
            if response.body:
                d.send(bytes(response.body))
        response.sink = lambda data: [d.send(data) for d in dests]
        if not response.feed(sock, lambda: response.complete):
            raise Failed(f"source {source_url}: body ended short")
    except (Failed, OSError, httptools.HttpParserError) as e:
        # Close without the last chunk: each destination's receivers see a short body.
        for d in dests:
            d.close()
        print(f"relayd forward: {e}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    failed = 0
    for d in dests:
        d.finish()
        if d.error:
            print(f"relayd forward: destination {d.url}: {d.error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="relayd forward",
        description="Receive the pipe SOURCE_URL and send it on to DEST_URL (and every --dest): "
                    "a branch of a fan-out tree. Exit 0 when the whole body reached every "
                    "destination; 1 otherwise (a short source leaves the destinations short).",
        epilog="example: relayd forward 'http://node-a:8080/p?n=3' 'http://node-b:8080/p?n=200'")
    p.add_argument("source", metavar="SOURCE_URL", help="the pipe to receive, with its ?n=")
    p.add_argument("dest", metavar="DEST_URL", help="a pipe to send into, with its ?n=")
    p.add_argument("--dest", dest="more", action="append", default=[], metavar="DEST_URL",
                   help="another destination (repeatable); each gets the same bytes")
    p.add_argument("--timeout", type=positive_seconds, default=TIMEOUT_S,
                   help="seconds any one connect, read or write may wait")
    args = p.parse_args(argv)
    try:
        return forward(args.source, [args.dest, *args.more], args.timeout)
    except (Failed, OSError) as e:
        print(f"relayd forward: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

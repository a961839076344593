"""HTTP/1.x on a raw non-blocking socket: httptools callbacks -> route -> rendezvous; replies.

One `Connection` per accepted socket, driven by `loop.add_reader`/`add_writer` on its own fd
(uvloop transports refuse sendfile and refuse add_writer on their fds, DESIGN §3). It reads
and parses the request head, enforces the limits httptools does not (URI, header bytes and
count, head deadline), answers reserved paths itself, and hands pipe requests to the worker
(`worker.join_pipe`). Once a connection is a pipe's sender or receiver the data path in
`streaming.py` drives its socket; this module still owns closing it.

Client mistakes raise `HttpError(status, reason)` anywhere in parsing and become one
response with a one-line `[ERROR] …` body, then a lingering close. Never a 5xx for them.
"""
from __future__ import annotations

import json
import socket
import urllib.parse
from typing import TYPE_CHECKING

import httptools

from relayd import __version__, metrics, pages
from relayd.config import MAX_RECEIVERS

if TYPE_CHECKING:
    from relayd.worker import Worker

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
COMMON_HEADERS = (b"Access-Control-Allow-Origin: *\r\n"
                  b"X-Content-Type-Options: nosniff\r\n")
RESERVED_PATHS = {b"/", b"/help", b"/version", b"/health", b"/metrics", b"/favicon.ico",
                  b"/robots.txt"}
# Headers a sender may pass on to its receivers (besides Content-Type and Content-Length).
FORWARDED_HEADERS = (b"content-disposition",)
LINGER_S = 2.0                  # how long a closing connection's unread input is drained
READ_BYTES = 64 * 1024


class HttpError(Exception):
    """A client's mistake: one response with this status and reason, then close."""

    def __init__(self, status: int, reason: str, headers: bytes = b""):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


def response_head(status: int, headers: bytes = b"", version: str = "1.1") -> bytes:
    return (f"HTTP/{version} {status} {REASONS.get(status, 'Unknown')}\r\n".encode()
            + headers + COMMON_HEADERS + b"\r\n")


def simple_response(status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
                    close: bool = True, extra: bytes = b"", head_only: bool = False) -> bytes:
    headers = (b"Content-Type: " + content_type + b"\r\n"
               + b"Content-Length: %d\r\n" % len(body) + extra
               + (b"Connection: close\r\n" if close else b""))
    return response_head(status, headers) + (b"" if head_only else body)


def parse_n(query: bytes | None) -> int:
    """The receiver count from the query string: strictly digits, 1..256, at most once."""
    if not query:
        return 1
    values = [v for k, v in urllib.parse.parse_qsl(query.decode("latin-1"),
                                                     keep_blank_values=True) if k == "n"]
    if not values:
        return 1
    if len(values) > 1:
        raise HttpError(400, "give n once: repeated n parameters are ambiguous")
    v = values[0]
    if not v.isascii() or not v.isdigit() or len(v) > 3 or not 1 <= int(v) <= MAX_RECEIVERS:
        raise HttpError(400, f"n must be an integer from 1 to {MAX_RECEIVERS}, got {v!r}")
    return int(v)


def parse_slow(query: bytes | None) -> str | None:
    """A sender's policy for receivers beyond the spill limit: ?slow=block|drop."""
    if not query or b"slow=" not in query:
        return None
    values = [v for k, v in urllib.parse.parse_qsl(query.decode("latin-1")) if k == "slow"]
    if len(values) != 1 or values[0] not in ("block", "drop"):
        raise HttpError(400, "slow must be given once, as block or drop")
    return values[0]


class Connection:
    """An accepted socket, from request head to close."""

    # phases
    HEAD, JOINING, WAITING, STREAMING, CLOSING, CLOSED = range(6)

    def __init__(self, worker: "Worker", sock: socket.socket, conn_id: int, peer: str = ""):
        # lifetime: the socket
        self.worker = worker
        self.loop = worker.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.id = conn_id
        self.peer = peer
        self.phase = self.HEAD
        self.outbuf = bytearray()
        self.close_after_flush = False
        self.timer = None
        self.stream = None               # streaming.SenderStream / Receiver once streaming
        self.requests = 0
        self.first_line: bytes | None = b""   # the connection's first request line, until seen
        self.recent = b""                # the last 4 bytes read
        # lifetime: one request
        self.parser = httptools.HttpRequestParser(self)
        self._reset_request()
        self.loop.add_reader(self.fd, self.on_readable)
        self._arm_timer(worker.config.head_timeout_s, self.on_head_timeout)

    def _reset_request(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.headers_done = False
        self.message_done = False
        self.role = None                 # "sender" | "receiver" once a pipe party
        self.version = "1.1"
        self.path = b""
        self.n = 1
        self.expect_continue = False
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.pending_body: list[bytes] = []   # sender body bytes read with the head
        self.chunk_seen = False               # the parser met a chunk size line
        self.body_untouched = False           # a chunked body none of which came with the head
        self.slow: str | None = None          # the sender's ?slow=block|drop
        self.head_sent = False

    # -- transport callbacks ---------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.lost()
            return
        if not data:
            self.lost()
            return
        if self.phase == self.HEAD:
            self.feed(data)
        # JOINING/WAITING: a receiver sends nothing more; input is discarded, EOF is leaving.

    def feed(self, data: bytes) -> None:
        if not self.headers_done:
            self.head_bytes += len(data)
        try:
            if self.first_line is not None:
                self._check_first_line(data)
            self.recent = (self.recent + data[-4:])[-4:]
            self.parser.feed_data(data)
            if self.role == "sender" and self.chunked:
                # Nothing read past the head: the body can pass through as it arrives.
                self.body_untouched = (not self.chunk_seen and not self.message_done
                                       and self.recent == b"\r\n\r\n")
            if not self.headers_done and self.head_bytes > (self.worker.config.max_uri_bytes
                                                           + self.worker.config.max_header_bytes):
                raise HttpError(431, "the request head is too large")
        except HttpError as e:
            self.fail(e)
        except httptools.HttpParserUpgrade:
            if not self.headers_done:
                self.fail(HttpError(400, "protocol upgrade is not supported"))
            # A bodyless GET that offered h2c: the offer is ignored, HTTP/1.1 served.
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self.fail(cause if isinstance(cause, HttpError)
                      else HttpError(400, f"malformed request: {e}"))
        except httptools.HttpParserError as e:
            if self.role is not None and self.message_done:
                return   # junk after a complete pipe request: that connection closes after
            self.fail(HttpError(400, f"malformed request: {e}"))

    def _check_first_line(self, data: bytes) -> None:
        """HTTP/0.9 (`GET /` with no version) would wait for headers forever in llhttp:
        refuse it as soon as the first line is in."""
        self.first_line += data[:self.worker.config.max_uri_bytes + 64]
        end = self.first_line.find(b"\n")
        if end < 0:
            return
        line, self.first_line = self.first_line[:end], None
        parts = line.strip().split(b" ")
        if len(parts) == 2 and parts[1].startswith(b"/"):
            raise HttpError(505, "HTTP/0.9 is not supported; use HTTP/1.1")
        if b" HTTP/" not in line:
            raise HttpError(400, "malformed request line")

    # -- parser callbacks, in wire order ---------------------------------------------------
    def on_message_begin(self) -> None:
        if self.role is not None:
            return
        head_bytes = self.head_bytes      # counted before the parser saw the message begin
        self._reset_request()
        self.head_bytes = head_bytes

    def on_url(self, url: bytes) -> None:
        if self.role is not None:
            return
        self.url += url
        if len(self.url) > self.worker.config.max_uri_bytes:
            raise HttpError(414, f"the URI is longer than {self.worker.config.max_uri_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.role is not None:
            return
        self.headers.append((name.lower(), value))
        if len(self.headers) > self.worker.config.max_header_count:
            raise HttpError(431, f"more than {self.worker.config.max_header_count} header fields")
        if sum(len(k) + len(v) + 4 for k, v in self.headers) > self.worker.config.max_header_bytes:
            raise HttpError(431, f"header fields exceed {self.worker.config.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        if self.role is not None or self.phase != self.HEAD:
            return
        self.headers_done = True
        self._cancel_timer()
        self.route()

    def on_body(self, body: bytes) -> None:
        if self.role == "sender":
            if self.stream is not None:
                self.stream.on_body(body)
            else:
                self.pending_body.append(body)

    def on_chunk_header(self) -> None:
        self.chunk_seen = True

    def on_message_complete(self) -> None:
        if self.message_done and self.role is not None:
            return
        self.message_done = True
        if self.role == "sender" and self.stream is not None:
            self.stream.on_message_complete()

    # -- routing ---------------------------------------------------------------------------
    def route(self) -> None:
        self.requests += 1
        self.method = method = self.parser.get_method()
        self.version = self.parser.get_http_version()
        if self.version not in ("1.0", "1.1"):
            raise HttpError(505, f"HTTP/{self.version} is not supported; use HTTP/1.1")
        if method == b"CONNECT":
            raise HttpError(405, "CONNECT is not supported", b"Allow: GET, PUT, POST, OPTIONS\r\n")
        self.keep_alive = self.parser.should_keep_alive()
        headers = self.headers
        hosts = [v for k, v in headers if k == b"host"]
        if len(hosts) > 1 or (self.version == "1.1" and not hosts):
            raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
        te = [v.strip().lower() for k, v in headers if k == b"transfer-encoding"]
        if te and te != [b"chunked"]:
            raise HttpError(501, "only Transfer-Encoding: chunked is supported")
        self.chunked = bool(te)
        cl = [v for k, v in headers if k == b"content-length"]
        if cl:
            self.content_length = int(cl[0])          # llhttp validated it
        expect = [v.strip().lower() for k, v in headers if k == b"expect"]
        if expect and expect != [b"100-continue"]:
            raise HttpError(417, "only Expect: 100-continue is supported")
        self.expect_continue = bool(expect)
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise HttpError(400, "the request target is not a valid URL") from None
        # Match pipes on the raw path bytes: `//a` and `/a` are different pipes.
        self.path = parsed.path or b"/"
        if not self.path.startswith(b"/"):
            raise HttpError(400, "the request target must be an absolute path")

        if self.path in RESERVED_PATHS:
            self.serve_reserved(method, parsed.query)
            return
        if method == b"OPTIONS":
            self.reply(200, b"", extra=(b"Access-Control-Allow-Methods: GET, PUT, POST, OPTIONS\r\n"
                                        b"Access-Control-Allow-Headers: Content-Type, "
                                        b"Content-Disposition, X-Piping\r\n"
                                        b"Access-Control-Max-Age: 86400\r\n"),
                       close=not self.keep_alive)
            return
        if method not in (b"GET", b"PUT", b"POST"):
            raise HttpError(405, f"{method.decode()} is not a pipe method: GET receives, "
                                 "PUT or POST sends", b"Allow: GET, PUT, POST, OPTIONS\r\n")
        self.n = parse_n(parsed.query)
        if self.worker.auth is not None:     # raises HttpError(401/403/429) when refused
            self.worker.auth.check(self, b"GET" if method == b"GET" else b"PUT", parsed.query)
        if method == b"GET":
            self.role = "receiver"
            info = {"version": self.version}
        else:
            if any(k == b"upgrade" for k, _ in headers):
                raise HttpError(400, "a sender cannot ask for a protocol upgrade")
            self.role = "sender"
            self.slow = parse_slow(parsed.query)
            info = self.receiver_headers()
        self.phase = self.JOINING
        self.worker.join_pipe(self, info)

    def receiver_headers(self) -> dict:
        """What the receivers' response carries from this sender's request."""
        content_type = b"application/octet-stream"
        forwarded = []
        for k, v in self.headers:
            if k == b"content-type":
                content_type = v
            elif k in FORWARDED_HEADERS or k.startswith(b"x-piping"):
                forwarded.append((k, v))
        # A sender's page must not run in the relay's origin.
        if content_type.split(b";")[0].strip().lower() in (b"text/html", b"application/xhtml+xml"):
            content_type = b"text/plain" + content_type[len(content_type.split(b";")[0]):]
        length = None if self.chunked else (self.content_length or 0)
        return {"content_type": content_type, "headers": forwarded, "length": length}

    def serve_reserved(self, method: bytes, query: bytes | None) -> None:
        if method in (b"PUT", b"POST"):
            raise HttpError(400, f"{self.path.decode()} is a reserved path; choose another "
                                 "path to send to")
        if method == b"OPTIONS":
            self.reply(200, b"", extra=b"Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n",
                       close=not self.keep_alive)
            return
        if method not in (b"GET", b"HEAD"):
            raise HttpError(405, f"{self.path.decode()} answers GET and HEAD only",
                            b"Allow: GET, HEAD, OPTIONS\r\n")
        host = next((v for k, v in self.headers if k == b"host"), b"localhost:8080")
        head_only = method == b"HEAD"
        close = not self.keep_alive
        if self.path == b"/":
            self.reply(200, pages.index_page(host), b"text/html; charset=utf-8", close,
                       head_only=head_only)
        elif self.path == b"/help":
            self.reply(200, pages.help_text(host), close=close, head_only=head_only)
        elif self.path == b"/version":
            self.reply(200, f"relayd {__version__}\n".encode(), close=close, head_only=head_only)
        elif self.path == b"/health":
            health = self.worker.health()
            body = json.dumps(health, indent=1).encode() + b"\n"
            # 503 while draining: a balancer's health check moves new pipes elsewhere.
            self.reply(200 if health["status"] == "ok" else 503, body, b"application/json",
                       close, head_only=head_only)
        elif self.path == b"/favicon.ico":
            self.reply(204, b"", close=close, head_only=head_only)
        elif self.path == b"/robots.txt":
            self.reply(200, b"User-agent: *\nDisallow: /\n", close=close, head_only=head_only)
        else:                                   # /metrics
            if self.worker.auth is not None:   # a token with the metrics role (401/403/429)
                self.worker.auth.check_metrics(self)
            self.reply(200, metrics.render(self.worker), metrics.CONTENT_TYPE, close,
                       head_only=head_only)

    # -- writing ---------------------------------------------------------------------------
    def reply(self, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
              close: bool = True, extra: bytes = b"", head_only: bool = False) -> None:
        self.worker.access(self, status)
        close = close or self.worker.retiring or self.worker.draining   # no new keep-alive
        self.write(simple_response(status, body, content_type, close, extra, head_only))
        if close:
            self.close_gracefully()
        else:                      # kept alive: ready for the next request, within the idle limit
            self._reset_request()
            self._arm_timer(self.worker.config.keepalive_timeout_s, self.on_idle_timeout)

    def fail(self, error: HttpError) -> None:
        """Answer a client's mistake once and close; a response already begun just closes."""
        if self.phase >= self.CLOSING:
            return
        if self.phase in (self.JOINING, self.WAITING):
            # e.g. a waiting sender whose body turned out malformed: leave the rendezvous.
            self.worker.report("leave", self.id)
        if self.head_sent:
            self.close()
            return
        self.worker.count_rejection(self, error.status, error.reason)
        body = f"[ERROR] {error.reason}\n".encode()
        self.write(simple_response(error.status, body, extra=error.headers))
        self.close_gracefully()

    def write(self, data: bytes) -> None:
        if self.phase == self.CLOSED:
            return
        if not self.outbuf:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.lost()
                return
            data = data[sent:]
            if not data:
                return
            self.loop.add_writer(self.fd, self.on_writable)
        self.outbuf += data

    def on_writable(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.lost()
            return
        del self.outbuf[:sent]
        if not self.outbuf:
            self.loop.remove_writer(self.fd)
            if self.close_after_flush:
                self._linger()

    # -- closing ---------------------------------------------------------------------------
    def close_gracefully(self) -> None:
        """Flush what is queued, then half-close and drain input briefly (nginx's lingering
        close): closing with unread input would reset the connection and could destroy the
        response before the client reads it."""
        if self.phase >= self.CLOSING:
            return
        self.phase = self.CLOSING
        self.close_after_flush = True
        if not self.outbuf:
            self._linger()

    def _linger(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.loop.add_reader(self.fd, self._drain_and_close)
        self._arm_timer(LINGER_S, self.close)

    def _drain_and_close(self) -> None:
        try:
            if self.sock.recv(READ_BYTES):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.close()

    def lost(self) -> None:
        """The peer went away (EOF, reset)."""
        if self.phase == self.CLOSED:
            return
        self.worker.connection_lost(self)
        self.close()

    def close(self, reset: bool = False) -> None:
        """Release everything; safe twice."""
        if self.phase == self.CLOSED:
            return
        self.phase = self.CLOSED
        self._cancel_timer()
        self.worker.forget(self)
        try:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        except (ValueError, OSError):
            pass
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            except OSError:
                pass
        self.sock.close()
        self.fd = -1
        # The parser holds this connection as its protocol: break the cycle so the pair is
        # freed now, not at the collector's next full pass.
        self.parser = None
        self.stream = None

    # -- timers ----------------------------------------------------------------------------
    def _arm_timer(self, seconds: float, callback) -> None:
        self._cancel_timer()
        self.timer = self.loop.call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- a sender's own response: progress lines -----------------------------------------
    def accept_sender(self) -> None:
        """The rendezvous took this sender: 100-continue (if asked), 200 and a first line."""
        if self.head_sent:
            return
        self.head_sent = True
        head = b"HTTP/1.1 100 Continue\r\n\r\n" if self.expect_continue else b""
        framing = b"Transfer-Encoding: chunked\r\n" if self.version == "1.1" else b""
        self.write(head + response_head(200, b"Content-Type: text/plain; charset=utf-8\r\n"
                                             + framing + b"Connection: close\r\n",
                                        self.version))

    def write_progress(self, line: str, last: bool = False) -> None:
        if not self.head_sent or self.phase >= self.CLOSING:
            return
        data = line.encode()
        if self.version == "1.1":
            data = b"%x\r\n%s\r\n" % (len(data), data) + (b"0\r\n\r\n" if last else b"")
        self.write(data)

    def close_after_progress(self) -> None:
        """Close once the progress lines are out (a sender's body may be left unread)."""
        self.close_gracefully()

    def on_head_timeout(self) -> None:
        self.timer = None
        if self.phase == self.HEAD:
            if self.head_bytes == 0 and not self.headers_done:
                self.close()     # an idle connection that never spoke: nothing to answer
            else:
                self.fail(HttpError(408, f"the request head did not arrive within "
                                         f"{self.worker.config.head_timeout_s:g} s"))

    def on_idle_timeout(self) -> None:
        """Keep-alive idle limit; a next request begun but not finished by then gets 408."""
        self.timer = None
        if self.phase != self.HEAD:
            return
        if self.head_bytes == 0:
            self.close()
        else:
            self.fail(HttpError(408, "the request head did not arrive in time"))

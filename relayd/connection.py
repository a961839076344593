"""One accepted socket, from request head to close: parsing, limits, replies, a sender's
progress lines, and closing.

Driven by `loop.add_reader`/`add_writer` on its own fd (uvloop transports refuse sendfile and
refuse add_writer on their fds, DESIGN §3). It reads and parses request heads with httptools,
enforces the limits httptools does not (URI, header bytes and count, head deadline), hands
each head to `route` (routing.py) and then either writes the reply or hands the pipe request
to `hooks.pipe` -- one callback. Once a stream takes the connection (`attach`) the data path
drives its socket; this module still owns closing it.

Phases are data: `PHASES` holds every move, `_move` is the only writer of `phase`, and
`attach` the only way into STREAMING.

Client mistakes raise `HttpError(status, reason)` anywhere in parsing and become one response
with a one-line `[ERROR] …` body (headers only for HEAD), then a lingering close. Never a 5xx
for them.
"""
from __future__ import annotations

import dataclasses
import fcntl
import socket
import struct
import termios
import traceback
from typing import Callable

import httptools

from relayd import logs
from relayd.auth import redact
from relayd.chunked import ChunkScanner, MalformedChunk
from relayd.config import Config
from relayd.http import HttpError, error_body, response_head, simple_response
from relayd.producer import Body
from relayd.routing import PipeRequest, Reply, Request
from relayd.states import State

LINGER_S = 2.0                  # how long a closing connection's unread input is drained
READ_BYTES = 64 * 1024
# Pipelined requests are parsed a slice at a time, and input is left unread (TCP holds it)
# while this much of their answers waits: a client that sends requests and never reads the
# replies cannot grow the worker's memory (one read of tiny requests is ~2,400 replies).
HEAD_SLICE = 4096
ANSWERS_HIGH = 64 * 1024


class Phase(State):
    HEAD = "head"               # reading a request head, or idle between kept-alive requests
    JOINING = "joining"         # a pipe party; its join is with the supervisor
    WAITING = "waiting"         # a sender the rendezvous took: answered, body unread
    STREAMING = "streaming"     # a stream drives the socket
    CLOSING = "closing"         # the last response is going out; input is drained
    CLOSED = "closed"


class Move(State):
    joined = "joined"
    accepted = "accepted"
    attached = "attached"
    closing = "closing"
    closed = "closed"


P, M = Phase, Move
PHASES: dict[Phase, dict[Move, Phase]] = {
    P.HEAD: {M.joined: P.JOINING, M.closing: P.CLOSING, M.closed: P.CLOSED},
    P.JOINING: {M.accepted: P.WAITING, M.attached: P.STREAMING, M.closing: P.CLOSING,
                M.closed: P.CLOSED},
    P.WAITING: {M.attached: P.STREAMING, M.closing: P.CLOSING, M.closed: P.CLOSED},
    P.STREAMING: {M.closing: P.CLOSING, M.closed: P.CLOSED},
    P.CLOSING: {M.closed: P.CLOSED},
    P.CLOSED: {},
}
PARTY = (P.JOINING, P.WAITING)


@dataclasses.dataclass
class ConnectionHooks:
    """What a connection tells (and asks) whoever accepted it."""
    route: Callable[[Request], Reply | PipeRequest]
    pipe: Callable[["Connection", PipeRequest], None]     # a pipe party: join the rendezvous
    left: Callable[["Connection"], None]                   # a party gone before streaming
    closed: Callable[["Connection"], None]
    answered: Callable[["Connection", int], None]          # a reply went out (access log)
    refused: Callable[["Connection", int, str], None]      # a client's mistake was answered
    may_keep_alive: Callable[[], bool]                     # False while retiring or draining


class Connection:
    """An accepted socket, from request head to close."""

    def __init__(self, sock: socket.socket, conn_id: int, peer: str, loop, config: Config,
                 hooks: ConnectionHooks):
        # lifetime: the socket
        self.loop = loop
        self.config = config
        self.hooks = hooks
        self.sock = sock
        self.fd = sock.fileno()
        self.id = conn_id
        self.peer = peer
        self.phase = Phase.HEAD
        self.outbuf = bytearray()
        self.flushing = False            # a send of outbuf is scheduled or waits for room
        self.writer_armed = False
        self.close_after_flush = False
        self.response_broken = False     # a streaming sender's peer reset: no more writes
        self.timer = None
        self.stream = None               # the stream driving the socket once attached
        self.gone: Callable[[], None] | None = None   # its news of the peer hanging up
        self.requests = 0
        self.first_line: bytes | None = b""   # the connection's first request line, until seen
        self.held_input = b""            # read, not yet parsed: its answers wait (ANSWERS_HIGH)
        self.sent_bytes = 0              # answer bytes the client has taken, ever
        self.sent_at_arm = 0             # ... when the idle timer was armed
        self.recent = b""                # the last 4 bytes read
        # lifetime: one request
        self.parser = httptools.HttpRequestParser(self)
        self._reset_request()
        self.loop.add_reader(self.fd, self.on_readable)
        self._arm_timer(config.head_timeout_s, self.on_head_timeout)

    def _reset_request(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.head_bytes = 0
        self.headers_done = False
        self.message_done = False
        self.role = None                 # "sender" | "receiver" once a pipe party
        self.version = "1.1"
        self.path = b""
        self.n = 1
        self.pipe: PipeRequest | None = None
        self.pending_body: list[bytes] = []   # sender body bytes read with the head
        self.chunk_seen = False               # the parser met a chunk size line
        self.body_untouched = False           # a chunked body none of which came with the head
        self.head_sent = False

    def _move(self, move: Move) -> Phase:
        """The only writer of `phase`; a move the table lacks is a bug (KeyError)."""
        self.phase = PHASES[self.phase][move]
        return self.phase

    @property
    def log_url(self) -> bytes:
        return redact(self.url)

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
        if self.phase is Phase.HEAD:
            self._parse_heads(data)
        # JOINING: a receiver sends nothing more; input is discarded, EOF is leaving.

    def _parse_heads(self, data: bytes) -> None:
        """Parse what was read a slice at a time while its answers are sent; once they pile
        up, hold the rest and stop reading until the client has taken them (on_writable)."""
        pos = 0
        while pos < len(data):
            # (A slice of all of a bytes object is that object: a short read is not copied.)
            if self.phase is not Phase.HEAD:      # a pipe party, or closing: the rest at once
                self.feed(data[pos:])
                return
            if len(self.outbuf) >= ANSWERS_HIGH:
                self.held_input = data[pos:]
                self.loop.remove_reader(self.fd)
                return
            self.feed(data[pos:pos + HEAD_SLICE])
            pos += HEAD_SLICE

    def _resume_heads(self) -> None:
        """The client took its answers: parse what was held, then read again."""
        held, self.held_input = self.held_input, b""
        if self.phase is not Phase.HEAD:
            return
        self.loop.add_reader(self.fd, self.on_readable)
        self._parse_heads(held)

    def feed(self, data: bytes) -> None:
        c = self.config
        if not self.headers_done:
            self.head_bytes += len(data)
        try:
            if self.first_line is not None:
                self._check_first_line(data)
            self.recent = (self.recent + data[-4:])[-4:]
            self.parser.feed_data(data)
            if self.role == "sender" and self.pipe.chunked:
                # Nothing read past the head: the body can pass through as it arrives.
                self.body_untouched = (not self.chunk_seen and not self.message_done
                                       and self.recent == b"\r\n\r\n")
            if not self.headers_done and self.head_bytes > c.max_uri_bytes + c.max_header_bytes:
                raise HttpError(431, "the request head is too large")
        except HttpError as e:
            self.fail(e)
        except httptools.HttpParserUpgrade:
            if not self.headers_done:
                self.fail(HttpError(400, "protocol upgrade is not supported"))
            # A bodyless GET that offered h2c: the offer is ignored, HTTP/1.1 served.
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if not isinstance(cause, HttpError):
                # Not a refusal we raised: a fault of ours in handling this request. It is
                # still answered 400 (the request is what met it), but never silently.
                text = "".join(traceback.format_exception(cause)).strip().replace("\n", " | ")
                logs.message(f"error handling a request from {self.peer} (answered 400): "
                             + redact(text.encode("utf-8", "replace")).decode("utf-8"))
            self.fail(cause if isinstance(cause, HttpError)
                      else HttpError(400, f"malformed request: {e}"))
        except httptools.HttpParserError as e:
            if self.role is not None and self.message_done:
                return   # junk after a complete pipe request: that connection closes after
            if str(e) == "Invalid HTTP version":       # llhttp knows only 1.0 and 1.1 (and 0.9)
                self.fail(HttpError(505, "this HTTP version is not supported; use HTTP/1.1"))
                return
            self.fail(HttpError(400, f"malformed request: {e}"))

    def _check_first_line(self, data: bytes) -> None:
        """HTTP/0.9 (`GET /` with no version) would wait for headers forever in llhttp:
        refuse it as soon as the first line is in."""
        self.first_line += data[:self.config.max_uri_bytes + 64]
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
        if len(self.url) > self.config.max_uri_bytes:
            raise HttpError(414, f"the URI is longer than {self.config.max_uri_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.role is not None:
            return
        self.headers.append((name.lower(), value))
        self.header_bytes += len(name) + len(value) + 4
        c = self.config
        if len(self.headers) > c.max_header_count:
            raise HttpError(431, f"more than {c.max_header_count} header fields")
        if self.header_bytes > c.max_header_bytes:
            raise HttpError(431, f"header fields exceed {c.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        if self.role is not None or self.phase is not Phase.HEAD:
            return
        self.headers_done = True
        self._cancel_timer()
        self.requests += 1
        self.method = self.parser.get_method()
        self.version = self.parser.get_http_version()
        request = Request(self.method, self.url, self.version, self.headers,
                          self.parser.should_keep_alive(), self.peer.rsplit(":", 1)[0])
        decided = self.hooks.route(request)         # HttpError: the client's mistake
        if isinstance(decided, Reply):
            self.reply(decided)
            return
        self.pipe = decided
        self.role, self.path, self.n = decided.role, decided.path, decided.n
        self._move(Move.joined)
        self.hooks.pipe(self, decided)

    def on_body(self, body: bytes) -> None:
        # Once the sender's message is complete, the parser goes on through whatever follows
        # (a pipelined request, junk): none of that is this pipe's body.
        if self.role == "sender" and not self.message_done:
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

    # -- a sender's body ---------------------------------------------------------------------
    def stop_reading(self) -> None:
        """A waiting sender: its body stays unread (TCP holds it) until the transfer starts."""
        self.loop.remove_reader(self.fd)

    def body(self) -> Body:
        """The sender's body as far as the head parser has seen it, for its stream."""
        p = self.pipe
        return Body(chunked=p.chunked, length=p.content_length or 0,
                    pending=self.pending_body, complete=self.message_done,
                    untouched=self.body_untouched,
                    feed=self.parser.feed_data if p.chunked else None)

    def _unread(self) -> int:
        """Bytes the client sent that sit unread in the socket (-1 if it cannot tell)."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return -1

    def holds_whole_body(self) -> bool:
        """A waiting sender hung up: is its whole body already here (read with the head, or
        queued in the socket)? Then it has handed the body over; a half-close after the last
        byte is not a departure."""
        if self.message_done:
            return True
        queued = self._unread()
        if queued < 0:
            return False
        p = self.pipe
        if not p.chunked:
            return sum(map(len, self.pending_body)) + queued >= (p.content_length or 0)
        try:
            data = self.sock.recv(queued, socket.MSG_PEEK) if queued else b""
        except OSError:
            return False
        if not self.body_untouched:
            # httptools is mid-body and cannot be asked without consuming: a body ends with
            # its last chunk and an empty trailer line.
            return data.endswith(b"\r\n\r\n")
        scanner = ChunkScanner()
        try:
            scanner.feed(memoryview(data), lambda i, j: data.find(b"\n", i, j))
        except MalformedChunk:
            return False
        return scanner.done

    # -- handing over ----------------------------------------------------------------------
    def accepted(self) -> None:
        """The rendezvous took this sender: 100-continue (if asked), 200 and its head."""
        if self.phase is Phase.JOINING:
            self._move(Move.accepted)
        if self.head_sent:
            return
        self.head_sent = True
        head = b"HTTP/1.1 100 Continue\r\n\r\n" if self.pipe.expect_continue else b""
        framing = b"Transfer-Encoding: chunked\r\n" if self.version == "1.1" else b""
        self.write(head + response_head(200, b"Content-Type: text/plain; charset=utf-8\r\n"
                                             + framing + b"Connection: close\r\n",
                                        self.version))

    def attach(self, stream, gone: Callable[[], None] | None = None) -> None:
        """A stream drives this socket from now on: the only way into STREAMING. With `gone`,
        this connection keeps reading (input discarded) and calls it when the peer hangs up
        -- one registration fewer than the stream reading for itself."""
        self.stream = stream
        self.gone = gone
        self._move(Move.attached)

    @property
    def is_party(self) -> bool:
        """A pipe party still waiting for its transfer to start."""
        return self.phase in PARTY

    # -- writing ---------------------------------------------------------------------------
    def reply(self, reply: Reply) -> None:
        close = not (reply.keep_alive and self.hooks.may_keep_alive())
        self.hooks.answered(self, reply.status)
        self.write(simple_response(reply.status, reply.body, reply.content_type, close,
                                   reply.extra, reply.head_only))
        if close:
            self.close_gracefully()
        else:                      # kept alive: ready for the next request, within the idle limit
            self._reset_request()
            self._arm_timer(self.config.keepalive_timeout_s, self.on_idle_timeout)

    def fail(self, error: HttpError) -> None:
        """Answer a client's mistake once and close; a response already begun just closes."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return
        if self.is_party:
            # e.g. a waiting sender whose body turned out malformed: leave the rendezvous.
            self.hooks.left(self)
        if self.head_sent:
            self.close()
            return
        self.hooks.refused(self, error.status, error.reason)
        # The method is known once the request line is, before the head completes (a URI or
        # header limit refuses it earlier): a HEAD is answered headers only.
        self.write(simple_response(error.status, error_body(error.reason), extra=error.headers,
                                   head_only=self._method() == b"HEAD"))
        self.close_gracefully()

    def _method(self) -> bytes:
        """This request's method as far as it is known: once its URL has begun, the parser
        has it (before that, get_method() still answers the previous request's)."""
        if self.method:
            return self.method
        return self.parser.get_method() if self.url else b""

    def write(self, data: bytes) -> None:
        """Queue bytes for the client. They leave at the end of this loop pass, so the lines
        one event writes (a head and two progress lines, say) take one send."""
        if self.phase is Phase.CLOSED or self.response_broken:
            return
        self.outbuf += data
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.on_writable)

    def on_writable(self) -> None:
        """Send what is queued; wait for writability while the socket is full."""
        if self.phase is Phase.CLOSED or not self.outbuf:
            self.flushing = False
            return
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.lost()
            return
        del self.outbuf[:sent]
        self.sent_bytes += sent
        if self.outbuf:
            if not self.writer_armed:
                self.writer_armed = True
                self.loop.add_writer(self.fd, self.on_writable)
            return
        self.flushing = False
        if self.writer_armed:
            self.writer_armed = False
            self.loop.remove_writer(self.fd)
        if self.close_after_flush:
            self._linger()
        elif self.held_input:
            self._resume_heads()

    # -- a sender's own response: progress lines -----------------------------------------
    def write_progress(self, line: str, last: bool = False) -> None:
        if not self.head_sent or self.phase in (Phase.CLOSING, Phase.CLOSED):
            return
        data = line.encode()
        if self.version == "1.1":
            data = b"%x\r\n%s\r\n" % (len(data), data) + (b"0\r\n\r\n" if last else b"")
        self.write(data)

    # -- closing ---------------------------------------------------------------------------
    def close_gracefully(self) -> None:
        """Flush what is queued, then half-close and drain input briefly (nginx's lingering
        close): closing with unread input would reset the connection and could destroy the
        response before the client reads it."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return
        if self.response_broken:
            self.close()
            return
        self._move(Move.closing)
        self.close_after_flush = True
        if not self.outbuf:
            self._linger()

    def _linger(self) -> None:
        if self.message_done and self._unread() == 0:
            self.close()           # nothing the client sent is left unread: no reset to fear
            return
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
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.STREAMING and self.gone is not None:
            self.gone()                    # its stream decides (and closes it)
            return
        if self.phase is Phase.STREAMING and self.role == "sender":
            # Unread body bytes may still sit in the socket: its stream reads them and ends
            # the transfer short only if the body turns out incomplete.
            self.response_broken = True
            self.outbuf.clear()
            if self.writer_armed:
                self.writer_armed = False
                self.loop.remove_writer(self.fd)
            return
        if self.is_party:
            self.hooks.left(self)
        self.close()

    def detach(self) -> int:
        """Give the socket up (to pass it to another worker): this connection is over here,
        its descriptor is the caller's to close."""
        fd = self.fd
        self._move(Move.closed)
        self._cancel_timer()
        try:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        except (ValueError, OSError):
            pass
        self.hooks.closed(self)
        self.sock.detach()
        self.fd = -1
        self.parser = None
        self.stream = None
        self.gone = None
        return fd

    def close(self, reset: bool = False) -> None:
        """Release everything; safe twice."""
        if self.phase is Phase.CLOSED:
            return
        self._move(Move.closed)
        self._cancel_timer()
        try:
            self.loop.remove_reader(self.fd)
            if self.writer_armed:          # a stream removes its own writer before this
                self.loop.remove_writer(self.fd)
        except (ValueError, OSError):
            pass
        self.hooks.closed(self)
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            except OSError:
                pass
        self.sock.close()
        self.fd = -1
        # The parser holds this connection as its protocol, and a stream's `gone` callback
        # holds the stream that holds it: break the cycles so they are freed now, not by the
        # cyclic collector (whose full passes cost a worker tens of ms after a crowd).
        self.parser = None
        self.stream = None
        self.gone = None

    # -- timers ----------------------------------------------------------------------------
    def _arm_timer(self, seconds: float, callback) -> None:
        self._cancel_timer()
        self.sent_at_arm = self.sent_bytes
        self.timer = self.loop.call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_head_timeout(self) -> None:
        self.timer = None
        if self.phase is Phase.HEAD:
            if self.head_bytes == 0 and not self.headers_done:
                self.close()     # an idle connection that never spoke: nothing to answer
            else:
                self.fail(HttpError(408, f"the request head did not arrive within "
                                         f"{self.config.head_timeout_s:g} s"))

    def on_idle_timeout(self) -> None:
        """Keep-alive idle limit; a next request begun but not finished by then gets 408."""
        self.timer = None
        if self.phase is not Phase.HEAD:
            return
        if self.outbuf and self.sent_bytes > self.sent_at_arm:
            # Not idle: it is still taking the answers to what it pipelined.
            self._arm_timer(self.config.keepalive_timeout_s, self.on_idle_timeout)
        elif self.head_bytes == 0:
            self.close()
        else:
            self.fail(HttpError(408, "the request head did not arrive in time"))

"""A pipe with one receiver, moved by the kernel: sender socket -> pipe -> receiver socket.

With n = 1 the ring buys nothing: the bytes have one reader, so cursors, spill checks and
cross-worker wake-ups are pure cost. The rendezvous brings both sockets into the sender's
worker (the receiver's socket is passed with SCM_RIGHTS when it landed elsewhere) and this
stream moves the body with os.splice through a pipe grown to SPLICE_PIPE_BYTES: the bytes
never enter Python.

- A Content-Length body is spliced by length.
- A chunked body for an HTTP/1.1 receiver that arrived after its head passes as it came, in
  large blocks whose framing chunked.py judges in place. The last chunk and any trailer
  become a plain `0\\r\\n\\r\\n`.
- A chunked body partly read with its head is mid-parse in httptools, which cannot hand its
  framing over, and an HTTP/1.0 receiver gets the data without the framing: both are relayed
  through the parser (recv, parse, send), as the ring does. (Peeking at each frame to splice
  only its data spun the loop on a frame that had only partly arrived.)

The receiver's output is an ordered queue of bytes (head, framing) and counts of bytes to take
from the pipe, so framing and spliced data leave in wire order. A lone receiver holds the
producer: when the pipe is full the sender is no longer read (TCP holds it), as piping-server
does. Every guarantee of the contract holds: progress lines, a short body on any failure
(a Content-Length body closed early, a chunked body without its terminator, a reset for
HTTP/1.0), stall and idle timeouts, counters, the transfer's control messages.
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import os
import socket
import traceback
from typing import Callable

import httptools

from relayd import control, logs
from relayd.chunked import ChunkScanner, MalformedChunk
from relayd.control import Outcome, SenderInfo
from relayd.delivery import response_for
from relayd.producer import finished_line
from relayd.states import State
from relayd.stats import WorkerCounters

SPLICE_PIPE_BYTES = 1 << 20       # pipe capacity (F_SETPIPE_SZ; /proc/sys/fs/pipe-max-size)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
READ_BYTES = 256 * 1024           # a parsed chunked body: one recv
SCAN_BLOCK = 1 << 20              # a chunked body sent as it came: one recv
TERMINATOR = b"0\r\n\r\n"


def make_pipe() -> tuple[int, int, int]:
    """(read end, write end, capacity) of a non-blocking pipe, grown as far as allowed."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SPLICE_PIPE_BYTES)
    except OSError:
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, size


class Splice(State):
    WAITING = "waiting"           # the receiver's socket is on its way from another worker
    MOVING = "moving"             # bytes flow
    ENDED = "ended"               # the body is complete and queued to the receiver
    ABORTED = "aborted"           # the body will not complete; the receiver's end is short
    CLOSED = "closed"


class SpliceEvent(State):
    receiver_arrived = "receiver_arrived"
    body_ended = "body_ended"
    failed = "failed"
    receiver_lost = "receiver_lost"
    finished = "finished"


Sp, Ev = Splice, SpliceEvent
SPLICE_TRANSITIONS: dict[Splice, dict[SpliceEvent, Splice]] = {
    Sp.WAITING: {Ev.receiver_arrived: Sp.MOVING, Ev.failed: Sp.ABORTED,
                 Ev.receiver_lost: Sp.CLOSED},
    Sp.MOVING: {Ev.body_ended: Sp.ENDED, Ev.failed: Sp.ABORTED, Ev.receiver_lost: Sp.CLOSED},
    Sp.ENDED: {Ev.finished: Sp.CLOSED, Ev.receiver_lost: Sp.CLOSED},
    Sp.ABORTED: {Ev.finished: Sp.CLOSED, Ev.receiver_lost: Sp.CLOSED},
    Sp.CLOSED: {},
}


@dataclasses.dataclass
class SpliceHooks:
    progress: Callable[[str, bool], None]        # a line of the sender's response (, last)
    close_sender: Callable[[], None]             # the sender's response is over
    report: Callable[[object], None]             # a control message to the supervisor
    released: Callable[["SpliceStream"], None]   # the stream holds nothing any more


class Receiver:
    """The one receiver: its socket, how to close it, and what it is still owed."""

    def __init__(self, sock: socket.socket, conn_id: int, version: str,
                 close: Callable[[bool], None]):
        self.sock = sock
        self.fd = sock.fileno()
        self.id = conn_id
        self.version = version
        self.close = close                       # close(reset)


class SpliceStream:
    """One n = 1 transfer, sender and receiver both in this worker."""

    def __init__(self, sender: socket.socket, body, info: SenderInfo, loop, slot: int,
                 gen: int, hooks: SpliceHooks, counters: WorkerCounters, path: bytes = b""):
        self.sock = sender
        self.fd = sender.fileno()
        self.loop = loop
        self.slot, self.gen = slot, gen
        self.info = info
        self.hooks = hooks
        self.counters = counters
        self.path = path
        self.state = Splice.WAITING
        self.receiver: Receiver | None = None
        self.pipe_r = self.pipe_w = -1
        self.pipe_size = 0
        self.in_pipe = 0                         # bytes spliced in, not yet out
        self.out: collections.deque = collections.deque()   # bytes, or an int: from the pipe
        self.body = body
        self.chunked = body.chunked
        self.remaining = 0 if body.chunked else body.length  # Content-Length bytes to read
        self.body_bytes = 0
        self.received_all = False
        self.scanner: ChunkScanner | None = None  # a chunked body sent as it came
        self.block = self.block_view = None
        self.held = 0                             # block bytes read, not yet sent
        self.sent_upto = 0                        # block bytes queued to the receiver
        self.deframe = False
        # httptools has begun this chunked body (or read all of it with the head)
        self.parsed = body.chunked and not body.untouched
        self.pieces: list = []
        self.message_done = body.complete
        self.reading = False
        self.writing = False
        self.progress_at = loop.time()           # the sender's last byte
        self.sent_at = loop.time()               # the receiver's last progress

    def _apply(self, event: SpliceEvent) -> Splice:
        self.state = SPLICE_TRANSITIONS[self.state][event]
        return self.state

    def guarded(self, step: Callable[[], None]) -> None:
        """An exception aborts this transfer only, visibly, logged with its path."""
        try:
            step()
        except Exception:
            logs.message(f"transfer {self.path!r} (slot {self.slot}, splice) failed in the "
                         "relay: " + traceback.format_exc().strip().replace("\n", " | "))
            self.abort("the relay failed on this transfer (see its log)", Outcome.RELAY_ERROR)

    # -- start -----------------------------------------------------------------------------
    def attach(self, receiver: Receiver) -> None:
        """The receiver is here: its head goes out, then the body."""
        if self.state is not Splice.WAITING:      # the sender is gone already
            receiver.close(True)
            self.hooks.report(control.ReceiverEnded(self.slot, self.gen, receiver.id, False))
            return
        self.receiver = receiver
        self._apply(Ev.receiver_arrived)
        self.pipe_r, self.pipe_w, self.pipe_size = make_pipe()
        head, self.deframe = response_for(self.info, receiver.version)
        self.parsed = self.parsed or self.chunked and self.deframe
        if self.chunked and not self.parsed:
            self.scanner = ChunkScanner()
            self.block = bytearray(SCAN_BLOCK)
            self.block_view = memoryview(self.block)
        self.out.append(head)
        for piece in self.body.pending:
            if self.parsed:
                self.pieces.append(piece)
            else:
                self._queue_data(piece)
        self.body.pending = []
        if self.parsed:
            self._frame_pieces()
        if not self.chunked and self.remaining == 0 or self.message_done and self.parsed:
            self._body_complete()
        # Still read: a receiver that hangs up while nothing flows must be seen to leave.
        self.loop.add_reader(receiver.fd, self._on_receiver_readable)
        self._pump()

    def _queue_data(self, data: bytes) -> None:
        """Body bytes read with the head (Content-Length): out as they are."""
        if data:
            self.out.append(bytes(data))
            self.body_bytes += len(data)
            self.remaining -= len(data)

    # -- the pump --------------------------------------------------------------------------
    def on_sender_readable(self) -> None:
        self.progress_at = self.loop.time()
        self.guarded(self._pump)

    def on_receiver_writable(self) -> None:
        self.sent_at = self.loop.time()
        self.guarded(self._pump)

    def _pump(self) -> None:
        """Move what can move now, in wire order; arm the events that will move the rest."""
        progressed = True
        while progressed and self.receiver is not None and \
                self.state in (Splice.MOVING, Splice.ENDED):
            progressed = self._drain_out()
            if self.state is not Splice.MOVING or self.received_all:
                continue
            progressed = self._fill() or progressed
        self._arm()
        if self.state is Splice.ENDED and not self.out and self.receiver is not None:
            self._delivered()

    def _fill(self) -> bool:
        """Take from the sender what the pipe and the framing allow; True if anything came."""
        if self.scanner is not None:
            return self._read_scanned()
        if self.parsed:
            return self._read_parsed()
        return self._splice_in(self.remaining)

    def _take(self, read: Callable[[], object]):
        """One read of the sender's socket: what came (bytes, or a count), else None -- for
        now (EAGAIN), or for good (the sender failed or closed early: the pipe aborted)."""
        try:
            got = read()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self.abort(f"the sender's connection failed: {os.strerror(e.errno or 0)}")
            return None
        if not got:
            self.abort("the sender closed its connection before the body ended")
            return None
        return got

    def _splice_in(self, most: int) -> bool:
        room = self.pipe_size - self.in_pipe
        if room <= 0 or most <= 0:
            return False
        got = self._take(lambda: os.splice(self.fd, self.pipe_w, min(room, most),
                                           flags=SPLICE_FLAGS))
        if got is None:
            return False
        self.in_pipe += got
        self.body_bytes += got
        self.counters.bytes_in += got
        if self.out and isinstance(self.out[-1], int):
            self.out[-1] += got
        else:
            self.out.append(got)
        self.remaining -= got
        if self.remaining == 0:
            self._body_complete()
        return True

    def _read_scanned(self) -> bool:
        """A chunked body for an HTTP/1.1 receiver: its framing is already the receiver's, so
        it is read in large blocks, its size lines judged in place (chunked.py), and sent as
        it came -- a size line per 4 KiB chunk (curl -T - from a pipe) would cost a splice
        and a peek each. One block is in flight at a time; a size line or trailer still
        being judged is held back for the next."""
        if self.out:
            return False                          # the last block is still going out
        view, held = self.block_view, self.held
        if self.sent_upto:                        # what went out leaves; the rest moves up
            view[:held - self.sent_upto] = view[self.sent_upto:held]
            held -= self.sent_upto
            self.sent_upto = 0
        self.held = held
        got = self._take(lambda: self.sock.recv_into(view[held:]))
        if got is None:
            return False
        self.counters.bytes_in += got
        scanner, base, block = self.scanner, self.scanner.position - held, self.block

        def find(i: int, j: int) -> int:         # the scanner's LF search, in place
            k = block.find(b"\n", held + i, held + j)
            return k - held if k >= 0 else -1

        try:
            scanner.feed(view[held:held + got], find)
        except MalformedChunk as e:
            self.held = held + got
            self._send_block(scanner.visible - base)
            self.abort(f"the sender's chunked body is malformed: {e}")
            return False
        self.held = held + got
        self.body_bytes = scanner.data_bytes
        self._send_block(scanner.visible - base)
        if scanner.done:
            self._body_complete()
        return True

    def _send_block(self, length: int) -> None:
        """The first `length` bytes of the block are judged: out they go (no copy)."""
        if length > 0:
            self.out.append(self.block_view[:length])
            self.sent_upto = length

    def _has_room(self) -> bool:
        """Whether to take more from the sender: the pipe (or, parsing, the queue) has room.
        When it has none, the sender is not read: TCP holds it."""
        if self.scanner is not None:
            return not self.out
        if self.parsed:
            return sum(len(x) for x in self.out if not isinstance(x, int)) <= self.pipe_size
        return self.in_pipe < self.pipe_size

    def _read_parsed(self) -> bool:
        """A chunked body httptools is in the middle of: read, parse, send framed."""
        if not self._has_room():
            return False
        data = self._take(lambda: self.sock.recv(READ_BYTES))
        if data is None:
            return False
        try:
            self.body.feed(data)
        except httptools.HttpParserError:
            self._frame_pieces()
            if not self.message_done:         # else: junk after the body, which is whole
                self.abort("the sender's chunked body is malformed")
                return False
        self._frame_pieces()
        if self.message_done:
            self._body_complete()
        return True

    def on_body(self, body: bytes) -> None:           # the head parser's callbacks
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.message_done = True

    def _frame_pieces(self) -> None:
        data = b"".join(self.pieces)
        self.pieces = []
        if data:
            self.body_bytes += len(data)
            self.counters.bytes_in += len(data)
            self.out.append(data if self.deframe else b"%x\r\n%s\r\n" % (len(data), data))

    def _body_complete(self) -> None:
        self.received_all = True
        if self.chunked and not self.deframe:
            # The last chunk's own line and any trailer are held back; a plain end instead.
            self.out.append(TERMINATOR)
        self._apply(Ev.body_ended)
        self.hooks.report(control.BodyEnded(self.slot, self.gen, self.body_bytes))
        self.hooks.progress(f"[INFO] Received {self.body_bytes} bytes; "
                            "waiting for every receiver to take them.\n", False)

    def _drain_out(self) -> bool:
        """Send what is queued for the receiver, in order; True if anything went out."""
        moved = False
        r = self.receiver
        while self.out and r is not None:
            item = self.out[0]
            try:
                if isinstance(item, int):
                    if not item:
                        self.out.popleft()
                        continue
                    sent = os.splice(self.pipe_r, r.fd, item, flags=SPLICE_FLAGS)
                    self.in_pipe -= sent
                    rest = item - sent
                else:
                    if not item:
                        self.out.popleft()
                        continue
                    sent = r.sock.send(item)
                    rest = item[sent:]
            except (BlockingIOError, InterruptedError):
                return moved
            except OSError:
                self.receiver_lost()
                return False
            if sent:
                moved = True
                self.sent_at = self.loop.time()
                self.counters.bytes_out += sent
            if rest:
                self.out[0] = rest
                if not sent:
                    return moved
            else:
                self.out.popleft()
        return moved

    def _arm(self) -> None:
        """Read the sender while the pipe has room; watch the receiver while it owes bytes."""
        # A receiver gone: nothing more is read; the supervisor ends the sender's part.
        present = self.receiver is not None
        want_read = (present and self.state is Splice.MOVING and not self.received_all
                     and self._has_room())
        want_write = present and self.state in (Splice.MOVING, Splice.ENDED) and bool(self.out)
        if want_read != self.reading:
            self.reading = want_read
            if want_read:
                self.loop.add_reader(self.fd, self.on_sender_readable)
            else:
                self.loop.remove_reader(self.fd)
        if want_write != self.writing:
            self.writing = want_write
            if want_write:
                self.loop.add_writer(self.receiver.fd, self.on_receiver_writable)
            else:
                self.loop.remove_writer(self.receiver.fd)

    # -- endings ---------------------------------------------------------------------------
    def _delivered(self) -> None:
        """Every byte is queued in the receiver's socket: it is done."""
        r, self.receiver = self.receiver, None
        self._unwatch(r)
        r.close(False)
        self.hooks.report(control.ReceiverEnded(self.slot, self.gen, r.id, True))

    def _on_receiver_readable(self) -> None:
        r = self.receiver
        try:
            if r.sock.recv(4096):
                return                           # input from a receiver is discarded
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.guarded(self._pump)                 # it may have all it wanted
        if self.receiver is r:
            self.receiver_lost()

    def receiver_lost(self) -> None:
        """The receiver left (EOF, reset, a stall): its body ends short."""
        r, self.receiver = self.receiver, None
        if r is None:
            return
        self._stop_reading()
        self._unwatch(r)
        r.close(self.deframe)
        self.hooks.report(control.ReceiverEnded(self.slot, self.gen, r.id, False))

    def _unwatch(self, r: Receiver) -> None:
        for remove in (self.loop.remove_reader, self.loop.remove_writer):
            try:
                remove(r.fd)
            except (ValueError, OSError):
                pass
        self.writing = False

    def abort(self, reason: str, outcome: Outcome = Outcome.SENDER_LOST) -> None:
        """The body will not complete: the receiver gets what was queued, then a short end."""
        if self.state not in (Splice.WAITING, Splice.MOVING):
            return
        self._apply(Ev.failed)
        self._stop_reading()
        self.hooks.report(control.SenderLost(self.slot, self.gen, outcome, reason,
                                             self.body_bytes))
        self.hooks.progress(f"[ERROR] {reason}\n", False)
        if self.receiver is not None:
            # What is queued and in the pipe is a prefix of the body; the end stays short.
            self._drain_out()
            self.receiver_lost()
        self.close()

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def finished(self, ok: int, lost: int) -> None:
        """The supervisor says the receiver is resolved."""
        if self.state is Splice.CLOSED:
            return
        self.hooks.progress(finished_line(ok, lost), True)
        self._apply(Ev.finished)
        self.close()

    def receivers_gone(self, reason: str) -> None:
        if self.state is Splice.CLOSED:
            return
        self._stop_reading()
        if self.receiver is not None:
            self.receiver_lost()
        self._apply(Ev.receiver_lost)
        self.hooks.progress(f"[ERROR] {reason}\n", False)
        self.close()

    def check_timeouts(self, now: float, stall_s: float, idle_s: float) -> None:
        """The receiver took nothing for stall_s while owed bytes; the sender sent nothing for
        idle_s while we read it."""
        if self.writing and now - self.sent_at > stall_s:
            self.receiver_lost()
        elif self.reading and self.state is Splice.MOVING and now - self.progress_at > idle_s:
            self.abort(f"the sender sent nothing for {idle_s:g} s")

    def close(self) -> None:
        """Release everything; safe twice."""
        self._stop_reading()
        if self.receiver is not None:
            self.receiver_lost()
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1
        self.hooks.released(self)
        self.hooks.close_sender()

"""The producer side of one transfer, in the sender's worker: the sender's body into the ring
(and the spill file), published to the receivers' workers.

Theory of operation (DESIGN §3-§4):
- The ring holds exactly the bytes every receiver socket sees. A Content-Length body is
  received straight into the ring; so is a chunked body whose first byte had not arrived with
  the head: its framing is already the receivers' wire format, and chunked.py only checks the
  size lines in place. A chunked body that came partly with the head goes through httptools
  instead, each read's pieces written as one fixed-width chunk `%08x\\r\\n<data>\\r\\n`.
  Either way `0\\r\\n\\r\\n` ends it, only cleanly.
- The producer publishes `tail` once per pass (data first, then tail, then state), then kicks
  the eventfd of each receiver worker whose `waiting` flag is set (ring.RingWriter). When the
  window is full it stops reading its socket (TCP holds the sender), posts `wake_at` and
  sleeps until a receiver worker's cursor crosses it.
- Lag beyond the window spills to a file once the window fills and the pipe has more than
  one receiver (spill.py); a lone receiver holds the producer, as piping-server does.
- A sender's socket at EOF is a departure only while its body is incomplete: a sender that
  half-closes after its last byte has handed the whole body over.

The stream is built from what it uses -- a RingWriter, its socket, the loop, a description of
the body, the spill plan, counters and a few callbacks -- never the worker that owns it.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import traceback
from typing import Callable

import httptools

from relayd import control, logs, ring
from relayd.chunked import ChunkScanner, MalformedChunk
from relayd.control import Outcome
from relayd.fileio import SYSCALLS, Syscalls
from relayd.spill import NO_LIMIT, Spill, SpillBudget, SpillWriter
from relayd.states import State
from relayd.stats import WorkerCounters

READ_BUDGET = 1024 * 1024         # bytes one sender pass takes from its socket
CHUNK_READ = 256 * 1024           # one recv of a parsed chunked body (at most one frame)
FRAME_OVERHEAD = 12               # b"%08x\r\n" + b"\r\n"
TERMINATOR = b"0\r\n\r\n"
MIN_SPACE = 4096                  # below this free ring space the producer sleeps
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX"))   # buffers one pwritev takes


def finished_line(ok: int, lost: int) -> str:
    """A sender's last progress line(s), once every receiver is resolved."""
    if not ok:
        return f"[ERROR] All {lost} receiver(s) left before the end.\n"
    line = f"[INFO] Sent successfully to {ok} receiver(s).\n"
    if lost:
        line += f"[WARN] {lost} receiver(s) left before the end.\n"
    return line


class SenderState(State):
    READING = "reading"           # taking the body from the socket
    PAUSED = "paused"             # the window is full: not reading until a cursor moves
    ENDED = "ended"               # the body ended cleanly: DONE published
    ABORTED = "aborted"           # the body will not complete: ABORTED published
    CLOSED = "closed"             # its part is over: released, the response closing


class SenderEvent(State):
    window_full = "window_full"
    window_freed = "window_freed"
    body_ended = "body_ended"
    failed = "failed"             # the sender left, its body was malformed, or a relay error
    receivers_gone = "receivers_gone"
    finished = "finished"         # every receiver resolved (the supervisor says so)


S, E = SenderState, SenderEvent
SENDER_TRANSITIONS: dict[SenderState, dict[SenderEvent, SenderState]] = {
    S.READING: {E.window_full: S.PAUSED, E.body_ended: S.ENDED, E.failed: S.ABORTED,
                E.receivers_gone: S.CLOSED},
    S.PAUSED: {E.window_freed: S.READING, E.failed: S.ABORTED, E.receivers_gone: S.CLOSED},
    S.ENDED: {E.finished: S.CLOSED, E.receivers_gone: S.CLOSED},
    S.ABORTED: {E.finished: S.CLOSED, E.receivers_gone: S.CLOSED, E.failed: S.CLOSED},
    S.CLOSED: {},
}
BODY_OPEN = (S.READING, S.PAUSED)


@dataclasses.dataclass
class Body:
    """How the sender's body arrives, as the HTTP front parsed its head."""
    chunked: bool
    length: int                   # Content-Length (0 when chunked)
    pending: list                 # body bytes read with the head
    complete: bool                # the whole body came with the head
    untouched: bool               # chunked, and none of it came with the head
    feed: Callable[[bytes], None] | None = None   # the head parser, mid-body (chunked)


@dataclasses.dataclass
class SpillPlan:
    """What a pipe may spill, should its window fill."""
    directory: str
    limit: int                    # bytes the slowest may lag (0: no spill)
    drop: bool                    # past a bound: cut the slowest instead of holding
    budget: SpillBudget
    calls: Syscalls = SYSCALLS    # the file calls (tests inject faults here)


@dataclasses.dataclass
class SenderHooks:
    """News from the stream to whoever owns it."""
    progress: Callable[[str, bool], None]       # a line of the sender's response (, last)
    close: Callable[[], None]                   # the response is over: close it
    report: Callable[[object], None]            # a control message to the supervisor
    released: Callable[["SenderStream"], None]  # the stream holds nothing any more


class SenderStream:
    """The sender's body, from its socket into one slot's ring."""

    def __init__(self, ring_writer: ring.RingWriter, sock: socket.socket, loop, body: Body,
                 spill: SpillPlan, n: int, gen: int, hooks: SenderHooks,
                 counters: WorkerCounters, path: bytes = b""):
        self.ring = ring_writer
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.slot, self.gen, self.n = ring_writer.slot, gen, n
        self.hooks = hooks
        self.counters = counters
        self.path = path
        self.state = SenderState.READING
        self.wake_space = ring_writer.capacity // 4
        self.body_bytes = 0
        self.counted = 0                # body bytes already added to the counters
        self.remaining = 0 if body.chunked else body.length
        self.pending = body.pending
        self.complete = body.complete
        self.chunked = body.chunked
        # A chunked body none of which came with the head is received into the ring as it is
        # (chunked.py). Otherwise httptools is mid-body: it parses the rest, from one reused
        # buffer, and the pieces are framed again.
        self.scanner = ChunkScanner() if body.chunked and body.untouched else None
        self.feed = body.feed if body.chunked and self.scanner is None else None
        if self.scanner is not None:
            self.remaining = NO_LIMIT       # the scanner finds the end
        self.scratch = bytearray(CHUNK_READ) if self.feed else None
        self.scratch_view = memoryview(self.scratch) if self.feed else None
        self.pieces: list = []
        self.message_done = False
        self.progress_at = loop.time()
        self.plan = spill
        self.spill: SpillWriter | None = None
        self.spill_refused = spill.limit == 0 or n == 1
        self.disk_refused = False       # a spill file could not be made, or stopped growing

    def _apply(self, event: SenderEvent) -> SenderState:
        """The only writer of `state`; a move the table lacks is a bug (KeyError)."""
        self.state = SENDER_TRANSITIONS[self.state][event]
        return self.state

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        pending, self.pending = self.pending, []
        if self.feed is not None:
            self.pieces = pending
            self._frame_pieces()
        else:
            for piece in pending:
                self._write_raw(piece)
        if self.complete or (not self.chunked and self.remaining == 0):
            self.end()
        else:
            self.loop.add_reader(self.fd, self.on_readable)
            self.on_readable()
        self.publish()

    # -- parser callbacks (a parsed chunked body) --------------------------------------------
    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.message_done = True

    # -- reading ---------------------------------------------------------------------------
    def on_readable(self) -> None:
        self.guarded(self._read_pass)

    def guarded(self, step: Callable[[], None]) -> None:
        """Run a step of this stream; an exception aborts this pipe only, visibly, and is
        logged with the pipe it hit."""
        try:
            step()
        except Exception:
            logs.message(f"transfer {self.path!r} (slot {self.slot}) failed in the relay: "
                         + traceback.format_exc().strip().replace("\n", " | "))
            self.abort("the relay failed on this transfer (see its log)", Outcome.RELAY_ERROR)

    def _read_pass(self) -> None:
        budget = READ_BUDGET
        sock = self.sock
        while budget > 0 and self.state is SenderState.READING:
            space = self.writable(MIN_SPACE)
            if space < MIN_SPACE:
                self.pause()
                break
            try:
                if self.scratch is not None:
                    got = sock.recv_into(self.scratch, min(space - FRAME_OVERHEAD
                                                           - len(TERMINATOR), budget,
                                                           CHUNK_READ))
                else:
                    position = self.ring.tail
                    got = sock.recv_into(self.ring.recv_buffer(min(self.remaining, budget,
                                                                   space)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.abort(f"the sender's connection failed: {os.strerror(e.errno or 0)}")
                break
            if got == 0:
                self.abort("the sender closed its connection before the body ended")
                break
            budget -= got
            self.progress_at = self.loop.time()
            if self.scratch is not None:
                self._parse(self.scratch_view[:got])
                continue
            # Received into the ring at tail.
            if self.spill is not None:
                self.spill.write(position, self.ring.bytes_at(position, position + got))
            self.ring.advance(got)
            if self.scanner is not None:
                self._scan(position, got)
            else:
                self.body_bytes += got
                self.remaining -= got
                if self.remaining == 0:
                    self.end()
        if budget <= 0 and self.state is SenderState.READING:
            # Bytes may still be queued. On a socket error (the sender reset) uvloop runs a
            # reader once more and then drops it, so arm it again: else the rest of the body
            # and the ECONNRESET behind it are never read.
            self.loop.remove_reader(self.fd)
            self.loop.add_reader(self.fd, self.on_readable)
        self.publish()

    def _parse(self, data: memoryview) -> None:
        try:
            self.feed(data)
        except httptools.HttpParserError:
            self._frame_pieces()
            if not self.message_done:         # else: junk after the body, which is whole
                self.abort("the sender's chunked body is malformed")
                return
        self._frame_pieces()
        if self.message_done:
            self.end()

    def _scan(self, position: int, got: int) -> None:
        """Judge the chunked framing of `got` bytes just received at `position`."""
        scanner = self.scanner
        try:
            scanner.feed(self.ring.bytes_at(position, position + got),
                         self.ring.finder(position, b"\n"))
        except MalformedChunk as e:
            self.ring.tail = scanner.visible     # receivers never see the bad line
            self.body_bytes = scanner.data_bytes
            self.abort(f"the sender's chunked body is malformed: {e}")
            return
        self.body_bytes = scanner.data_bytes
        if scanner.done:
            self.ring.tail = scanner.visible     # the last chunk's line is rewritten plainly
            self.end()

    def visible(self) -> int:
        """Ring bytes receivers may take: all received, but for a chunked size line or
        trailer section still being judged."""
        scanner = self.scanner
        return self.ring.tail if scanner is None or scanner.done else scanner.visible

    def _store(self, data) -> None:
        """Bytes at tail: into the ring and, once spilling, the spill file too."""
        position = self.ring.tail
        self.ring.write(data)
        if self.spill is not None:
            self.spill.write(position, data)

    def _write_raw(self, data: bytes) -> None:
        self._store(data)
        self.body_bytes += len(data)
        self.remaining -= len(data)

    def _frame_pieces(self) -> None:
        """The body pieces of one read become one fixed-width chunk, written with one
        pwritev (no join: one copy fewer per byte) unless it wraps the ring's end."""
        if not self.pieces:
            return
        size = sum(map(len, self.pieces))
        if size:
            frame = [b"%08x\r\n" % size, *self.pieces, b"\r\n"]
            length = size + FRAME_OVERHEAD
            if len(frame) > IOV_MAX:          # many tiny pieces: one buffer instead
                frame = [b"".join(frame)]
            position = self.ring.tail
            self.ring.writev(frame, length)
            if self.spill is not None:
                self.spill.writev(position, frame, length)
            self.body_bytes += size
        self.pieces = []

    # -- space -----------------------------------------------------------------------------
    def writable(self, need: int) -> int:
        """Bytes writable at tail now, as the ring and the spill file allow."""
        spill = self.spill
        if spill is not None and spill.state is Spill.STOPPED:
            self._hold_for_stopped_spill()
        space = self.ring.writable(need)
        if spill is not None and spill.state is Spill.GROWING:
            # File cursors are re-read every time: a receiver that moves onto the file may
            # lower the lowest file cursor below what a cached limit would assume.
            space = min(space, spill.file_space(self.ring.tail, self.ring.lowest))
        elif space < need and spill is None and not self.spill_refused:
            self._start_spill()
        if space < need and self.plan.drop and (
                self.disk_refused or spill is None and not self.spill_refused
                and self.plan.budget.left() <= 0):
            # A bound is met: the disk, or the budget (for a pipe that would have spilled:
            # a lone receiver, or --spill-limit 0, holds the producer whatever the budget).
            self._cut_slowest()
        return space

    def _cut_slowest(self) -> None:
        """--slow drop, and the disk refused the spill or the node's spill budget is spent:
        the slowest receivers, which hold the producer, are cut (a visible short body)
        instead of holding everyone."""
        lowest = self.ring.lowest
        if self.spill is not None:
            lowest = min(lowest, self.spill.lowest_reader())
        if lowest < self.ring.tail:
            self.ring.cut_below(lowest + 1)

    def _hold_for_stopped_spill(self) -> None:
        """The spill file stopped at `end`: file readers come back to the ring there, so the
        ring keeps every byte from `end` until none is left in the file. File cursors are
        loaded before the ring's (their workers store the ring cursor first when a reader
        comes back), so a returning reader is never missing from both."""
        spill = self.spill
        file_lowest = spill.lowest_reader()
        spill.release_below(min(self.ring.lowest, file_lowest))
        self.ring.hold_at = None if file_lowest == ring.NONE else spill.end
        self.ring.refresh()

    def _start_spill(self) -> None:
        """The window is full: copy the ring from the lowest cursor into a new spill file and
        tell the receivers' workers, which move their laggards onto it."""
        if self.plan.budget.left() <= 0:
            return
        start = self.ring.lowest                # lowest ring cursor, just refreshed
        try:
            spill = SpillWriter(self.ring, self.plan.directory, start, self.plan.limit,
                                self.plan.drop, self.plan.budget, self.plan.calls)
        except OSError as e:
            self._refused_by_disk(e)
            return
        position = start
        while position < self.ring.tail and spill.state is Spill.GROWING:
            data = self.ring.bytes_at(position, self.ring.tail)
            spill.write(position, data)
            position += len(data)
        if spill.state is not Spill.GROWING:
            spill.close()
            self._refused_by_disk(spill.failure)
            return
        self.spill = spill
        spill.announce()

    def _refused_by_disk(self, error: OSError) -> None:
        logs.message(f"spill unavailable for {self.path!r}: {error.strerror}; " + (
            "the slowest receivers are cut (--slow drop)" if self.plan.drop else
            "the slowest receiver holds the producer (--slow block)"))
        self.counters.spill_failures += 1
        self.spill_refused = self.disk_refused = True

    def _note_spill_failure(self) -> None:
        spill = self.spill
        if spill is not None and spill.state is Spill.STOPPED and spill.failure is not None:
            logs.message(f"spill write failed for {self.path!r} at {spill.end}: "
                         f"{spill.failure.strerror}; its readers return to the ring there, "
                         + ("and the slowest receivers are cut (--slow drop)" if self.plan.drop
                            else "and the slowest holds the producer (--slow block)"))
            self.counters.spill_failures += 1
            self.disk_refused = True
            self.ring.hold_at = spill.end
            spill.failure = None

    def pause(self) -> None:
        """Stop reading (TCP holds the sender) until a quarter of the window is free."""
        f, a = self.ring.f, self.ring.arena
        self.ring.post_wake(self.ring.wake_mark(self.wake_space))
        if self.spill is not None:
            # Held for a stopped file, the ring frees only once no reader is left in it
            # (NONE crosses every mark); a growing one, once the slowest is within the limit.
            a.store(f.file_wake_at, ring.NONE if self.spill.state is Spill.STOPPED else
                    max(1, self.ring.tail + self.wake_space - self.plan.limit))
        ring.fence()
        if self.writable(self.wake_space) >= self.wake_space:
            self.ring.post_wake(0)
            a.store(f.file_wake_at, 0)
            return                     # the cursors moved meanwhile; the caller reads on
        if self.state is SenderState.READING:
            self._apply(E.window_full)
            self.loop.remove_reader(self.fd)

    def on_kick(self) -> None:
        if self.state is SenderState.PAUSED:
            self.guarded(self._resume)

    def _resume(self) -> None:
        self._apply(E.window_freed)
        if self.writable(self.wake_space) < self.wake_space:
            self.pause()               # re-arm: the laggard has not crossed yet
            if self.state is SenderState.PAUSED:
                return
        self.ring.post_wake(0)
        self.ring.arena.store(self.ring.f.file_wake_at, 0)
        self.progress_at = self.loop.time()   # backpressure was ours, not its idleness
        self.loop.add_reader(self.fd, self.on_readable)
        self._read_pass()

    def check_idle(self, now: float, limit: float) -> None:
        if self.state is SenderState.READING and now - self.progress_at > limit:
            self.abort(f"the sender sent nothing for {limit:g} s")

    # -- publishing ------------------------------------------------------------------------
    def publish(self) -> None:
        self._note_spill_failure()
        self._count_body()
        self.ring.publish(self.visible())

    def _count_body(self) -> None:
        self.counters.bytes_in += self.body_bytes - self.counted
        self.counted = self.body_bytes

    def end(self) -> None:
        """The body ended cleanly: terminator, then DONE."""
        if self.state not in BODY_OPEN:
            return
        self._apply(E.body_ended)
        if self.chunked:
            self._store(TERMINATOR)
        self._note_spill_failure()
        self._count_body()
        self.ring.finish(self.visible(), ring.DONE)
        self.loop.remove_reader(self.fd)
        self.hooks.report(control.BodyEnded(self.slot, self.gen, self.body_bytes))
        self.hooks.progress(f"[INFO] Received {self.body_bytes} bytes; "
                            "waiting for every receiver to take them.\n", False)

    def abort(self, reason: str, outcome: Outcome = Outcome.SENDER_LOST) -> None:
        """The body will not complete: receivers get what was published, then a short end."""
        if self.state not in BODY_OPEN:
            return
        self._apply(E.failed)
        self._count_body()
        self.ring.finish(self.visible(), ring.ABORTED)
        self.hooks.report(control.SenderLost(self.slot, self.gen, outcome, reason,
                                             self.body_bytes))
        self.hooks.progress(f"[ERROR] {reason}\n", False)
        self.close()

    # -- end of the sender's part ----------------------------------------------------------
    def finished(self, ok: int, lost: int) -> None:
        """The supervisor says every receiver is resolved."""
        if self.state is SenderState.CLOSED:
            return
        self.hooks.progress(finished_line(ok, lost), True)
        self._apply(E.finished)
        self.close()

    def receivers_gone(self, reason: str) -> None:
        """Every receiver left before the end (the supervisor says so)."""
        if self.state is SenderState.CLOSED:
            return
        if self.state in BODY_OPEN:
            self.ring.finish(self.visible(), ring.ABORTED)
        self._apply(E.receivers_gone)
        self.hooks.progress(f"[ERROR] {reason}\n", False)
        self.close()

    def close(self) -> None:
        """Release the slot's producer side and close the response; safe twice."""
        if self.spill is not None:       # readers elsewhere keep their own descriptors
            self.spill.close()
            self.spill = None
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass
        self.hooks.released(self)
        self.hooks.close()

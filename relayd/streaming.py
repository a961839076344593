"""The data path: SenderStream writes a body into the ring; ReceiverGroup drains it to sockets.

Theory of operation (DESIGN §3-§4):
- The ring holds exactly the bytes every receiver socket sees. A Content-Length body is
  received straight into the ring; so is a chunked body whose first byte had not arrived with
  the head: its framing is already the receivers' wire format, and chunked.py only checks the
  size lines in place. A chunked body that came partly with the head goes through httptools
  instead, each read's pieces written as one fixed-width chunk `%08x\\r\\n<data>\\r\\n`.
  Either way `0\\r\\n\\r\\n` ends it, only cleanly.
- The producer publishes `tail` once per pass (data first, then tail, then state), then kicks
  the eventfd of each receiver worker whose `waiting` flag is set. Writable space is bounded
  by the lowest published cursor + capacity, and in sendfile mode by the punched blocks.
  When the window is full it stops reading its socket (TCP holds the sender), posts
  `wake_at` and sleeps until a receiver worker's cursor crosses it.
- A receiver worker sends each receiver one span per call, rotating who goes first, then
  publishes its lowest cursor once. A caught-up receiver makes it set `waiting`, fence and
  re-check before it sleeps, so no wake-up is lost.
- Sendfile hazard: the socket keeps references to ring pages until the peer read them, so a
  block is punched out of the memfd (MADV_REMOVE) before it is written again; in-flight
  sockets keep the old pages. Copy mode needs no punching while streaming.
"""
from __future__ import annotations

import fcntl
import os
import struct
import termios
import traceback
from typing import TYPE_CHECKING

import httptools

from relayd import logs, ring, spill
from relayd.chunked import MAX_LINE, ChunkScanner, MalformedChunk
from relayd.protocol import response_head
from relayd.spill import SpillFile

if TYPE_CHECKING:
    from relayd.protocol import Connection
    from relayd.worker import Worker

READ_BUDGET = 1024 * 1024         # bytes one sender pass takes from its socket
CHUNK_READ = 256 * 1024           # one recv of a chunked body (becomes at most one frame)
FRAME_OVERHEAD = 12               # b"%08x\r\n" + b"\r\n"
TERMINATOR = b"0\r\n\r\n"
MIN_SPACE = 4096                  # below this free ring space the producer sleeps
NO_LIMIT = 1 << 62
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX"))   # buffers one pwritev takes


class SenderStream:
    """The producer side of one transfer, in the sender's worker."""

    def __init__(self, worker: "Worker", conn: "Connection", slot: int, gen: int, mode: str,
                 n: int, receiver_workers: list[int]):
        self.worker = worker
        self.conn = conn
        self.arena = a = worker.arena
        self.f = ring.SlotFields(a, slot)
        self.slot, self.gen, self.n = slot, gen, n
        self.sendfile = mode == "sendfile"
        self.receiver_workers = receiver_workers
        self.capacity = a.capacity
        self.block = worker.config.punch_block
        self.base = a.ring_base(slot)
        self.tail = 0
        self.published = 0
        self.limit = a.capacity         # cached: lowest cursor + capacity
        self.punched_end = a.capacity   # first lap: the slot's pages are fresh
        self.wake_space = a.capacity // 4
        self.paused = False
        self.ended = False              # body ended cleanly or aborted
        self.chunked = conn.chunked
        self.remaining = 0 if conn.chunked else (conn.content_length or 0)
        self.body_bytes = 0
        self.counted = 0                # body bytes already added to the worker's stats
        self.pieces: list[bytes] = []
        self.message_done = False
        self.progress_at = worker.loop.time()
        # A chunked body none of which came with the head is received into the ring as it is
        # (chunked.py). Otherwise httptools is mid-body: it parses the rest, from one reused
        # buffer, and the pieces are framed again.
        self.scanner = ChunkScanner() if conn.chunked and conn.body_untouched else None
        parsed = self.chunked and self.scanner is None
        if self.scanner is not None:
            self.remaining = NO_LIMIT       # the scanner finds the end
        self.scratch = bytearray(CHUNK_READ) if parsed else None
        self.scratch_view = memoryview(self.scratch) if parsed else None
        # Spill (spill.py): lag beyond the window goes to a file once the window is full.
        c = worker.config
        self.slow = conn.slow or c.slow
        self.spill: SpillFile | None = None
        self.spill_limit = c.spill_limit
        self.spill_failed = c.spill_limit == 0
        self.file_limit = NO_LIMIT       # cached: lowest file cursor + spill limit (block)
        self.spill_consumed = 0          # every reader is past this position

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.sendfile:
            self.arena.punch(self.slot, 0, self.capacity)
        self.conn.stream = self
        self.conn.phase = self.conn.STREAMING
        pending, self.conn.pending_body = self.conn.pending_body, []
        if self.chunked:
            self.pieces = pending
            self._frame_pieces()
        else:
            for piece in pending:
                self._write_raw(piece)
        if self.conn.message_done or (not self.chunked and self.remaining == 0):
            self.end()
        else:
            self.worker.loop.add_reader(self.conn.fd, self.on_readable)
            self.on_readable()
        self.publish()

    # -- parser callbacks (chunked bodies) -------------------------------------------------
    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.message_done = True

    # -- reading ---------------------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            self._read_pass()
        except Exception:
            # A bug must end this transfer visibly, not leave it hanging until a timeout.
            logs.message("sender stream failed: "
                         + traceback.format_exc().strip().replace("\n", " | "))
            self.abort("the relay failed on this transfer (see its log)")

    def _read_pass(self) -> None:
        budget = READ_BUDGET
        sock = self.conn.sock
        while budget > 0 and not self.ended:
            space = self.writable(MIN_SPACE)
            if space < MIN_SPACE:
                self.pause()
                break
            try:
                if self.scratch is not None:
                    got = sock.recv_into(self.scratch, min(space - FRAME_OVERHEAD
                                                           - len(TERMINATOR), budget,
                                                           CHUNK_READ))
                    data = self.scratch_view[:got]
                else:
                    off = self.tail & self.arena.mask
                    span = min(space, self.capacity - off, self.remaining, budget)
                    got = sock.recv_into(self.arena.view[self.base + off:self.base + off + span])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.abort(f"the sender's connection failed: {os.strerror(e.errno or 0)}")
                break
            if got == 0:
                self.abort("the sender closed its connection before the body ended")
                break
            budget -= got
            self.progress_at = self.worker.loop.time()
            if self.scratch is not None:
                try:
                    self.conn.parser.feed_data(data)
                except httptools.HttpParserError:
                    self._frame_pieces()
                    self.abort("the sender's chunked body is malformed")
                    break
                self._frame_pieces()
                if self.message_done:
                    self.end()
                continue
            # Received into the ring at tail.
            if self.spill is not None:
                self.spill.write(self.tail, self.arena.view[self.base + off:
                                                            self.base + off + got])
            if self.scanner is not None:
                self._scan(off, got)
            else:
                self.tail += got
                self.body_bytes += got
                self.remaining -= got
                if self.remaining == 0:
                    self.end()
        self.publish()

    def _scan(self, off: int, got: int) -> None:
        """Judge the chunked framing of `got` bytes just received at ring offset `off`."""
        scanner, mm, start = self.scanner, self.arena.mm, self.base + off

        def find_lf(i: int, j: int) -> int:
            found = mm.find(b"\n", start + i, start + j)
            return found - start if found >= 0 else -1

        try:
            scanner.feed(self.arena.view[start:start + got], find_lf)
        except MalformedChunk as e:
            self.tail = scanner.visible          # receivers never see the bad line
            self.body_bytes = scanner.data_bytes
            self.abort(f"the sender's chunked body is malformed: {e}")
            return
        self.tail += got
        self.body_bytes = scanner.data_bytes
        if scanner.done:
            self.tail = scanner.visible          # the last chunk's line is rewritten plainly
            self.end()

    def visible(self) -> int:
        """Ring bytes receivers may take: all received, but for a chunked size line or
        trailer section still being judged."""
        scanner = self.scanner
        return self.tail if scanner is None or scanner.done else scanner.visible

    def _store(self, data) -> None:
        """Bytes at tail: into the ring and, once spilling, the spill file too."""
        self.arena.write(self.slot, self.tail, data)
        if self.spill is not None:
            self.spill.write(self.tail, data)
        self.tail += len(data)

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
            if not self.arena.writev(self.slot, self.tail, frame, length):
                frame = [b"".join(frame)]
                self.arena.write(self.slot, self.tail, frame[0])
            if self.spill is not None:
                self.spill.writev(self.tail, frame)
            self.tail += length
            self.body_bytes += size
        self.pieces = []

    # -- space -----------------------------------------------------------------------------
    def writable(self, need: int) -> int:
        """Bytes writable at tail now; the cursors are re-read only when the cached limits
        say fewer than `need` (Disruptor style: W loads, not one per receiver)."""
        space = min(self.limit, self.punched_end, self.file_limit) - self.tail
        if space >= need and self.spill is None:
            return space
        # While spilling, file cursors are re-read every time: a receiver that moves onto the
        # file may lower the lowest file cursor below what the cached limit assumed.
        self._refresh_limits()
        space = min(self.limit, self.punched_end, self.file_limit) - self.tail
        if space < need and self.spill is None and not self.spill_failed and self.n > 1:
            # Laggards move to the file; the ring's cursors rise. A lone receiver holds the
            # producer instead: nobody would gain, and the file would add a write and a
            # read per byte (at N = 1: 29% of worker time in pwrite, 26% in sendfile).
            self._start_spill()
        return space

    def _refresh_limits(self) -> None:
        a, f = self.arena, self.f
        lowest = min(a.load(f.cursor(w)) for w in self.receiver_workers)
        if lowest == ring.NONE:
            lowest = self.tail          # no ring reader left to protect
        self.limit = lowest + self.capacity
        if not self.sendfile:
            self.punched_end = self.limit
        else:
            # Punch block k only once the lowest cursor has passed the end of its last lap.
            while self.punched_end + self.block <= self.limit:
                self.arena.punch(self.slot, self.punched_end & self.arena.mask, self.block)
                self.punched_end += self.block
        if self.spill is not None:
            self._refresh_file_limit(lowest)

    def _refresh_file_limit(self, ring_lowest: int) -> None:
        a, f = self.arena, self.f
        file_lowest = min(a.load(f.file_cursor(w)) for w in self.receiver_workers)
        self.spill_consumed = min(ring_lowest, file_lowest)
        self.spill.release_below(self.spill_consumed)
        if file_lowest == ring.NONE:
            self.file_limit = NO_LIMIT
            return
        limit = self.spill_limit
        if self.worker.spill_in_use() > self.worker.spill_share:
            limit = min(limit, self.tail - file_lowest)     # over budget: do not grow
        self.file_limit = file_lowest + limit
        if self.slow == "drop" and self.tail - file_lowest >= limit:
            # Cut the slowest (every file reader at the lowest position); the producer waits
            # only until their workers have done it, so nobody else lags past the limit.
            a.store(f.drop_below, file_lowest + 1)
            ring.fence()
            for w in self.receiver_workers:
                self.worker.kick(w)

    def spill_bytes(self) -> int:
        return self.tail - self.spill_consumed if self.spill is not None else 0

    def _start_spill(self) -> None:
        """The window is full: copy the ring from the lowest cursor into a new spill file and
        tell the receivers' workers, which move their laggards onto it."""
        if self.worker.spill_in_use() >= self.worker.spill_share:
            return
        a, f = self.arena, self.f
        start = self.limit - self.capacity          # lowest ring cursor, just refreshed
        try:
            self.spill = SpillFile(self.worker.config.spill_dir, start)
            position = start
            while position < self.tail:
                off = position & self.arena.mask
                span = min(self.tail - position, self.capacity - off)
                self.spill.write(position, a.view[self.base + off:self.base + off + span])
                position += span
        except OSError as e:
            logs.message(f"spill unavailable for {self.conn.path!r}: {e.strerror}; "
                         "the slowest receiver holds the producer")
            if self.spill is not None:
                self.spill.close()
                self.spill = None
            self.spill_failed = True
            return
        self.spill_consumed = start
        a.store(f.spill_start, start)
        a.store(f.spill_fd, self.spill.fd)
        a.store(f.spill_pid, os.getpid())
        a.store(f.spill_active, 1)
        ring.fence()
        for w in self.receiver_workers:
            self.worker.kick(w)

    def pause(self) -> None:
        """Stop reading (TCP holds the sender) until a quarter of the window is free."""
        a, f = self.arena, self.f
        wake_at = self.tail + self.wake_space - self.capacity + (self.block if self.sendfile else 0)
        a.store(f.wake_at, max(1, wake_at))
        if self.spill is not None:
            a.store(f.file_wake_at, max(1, self.tail + self.wake_space - self.spill_limit))
        ring.fence()
        if self.writable(self.wake_space) >= self.wake_space:
            a.store(f.wake_at, 0)
            a.store(f.file_wake_at, 0)
            return                     # the cursors moved meanwhile; the caller reads on
        if not self.paused:
            self.paused = True
            self.worker.loop.remove_reader(self.conn.fd)

    def on_kick(self) -> None:
        if not self.paused or self.ended:
            return
        a, f = self.arena, self.f
        if self.writable(self.wake_space) < self.wake_space:
            self.paused = False
            self.pause()               # re-arm: the laggard has not crossed yet
            if self.paused:
                return
        a.store(f.wake_at, 0)
        a.store(f.file_wake_at, 0)
        self.paused = False
        self.progress_at = self.worker.loop.time()   # backpressure was ours, not its idleness
        self.worker.loop.add_reader(self.conn.fd, self.on_readable)
        self.on_readable()

    def check_idle(self, now: float, limit: float) -> None:
        if not self.paused and not self.ended and now - self.progress_at > limit:
            self.abort(f"the sender sent nothing for {limit:g} s")

    # -- publishing ------------------------------------------------------------------------
    def publish(self) -> None:
        visible = self.visible()
        if visible == self.published:
            return
        a, f = self.arena, self.f
        self._count_body()
        self.published = visible
        a.store(f.tail, visible)
        ring.fence()
        for w in self.receiver_workers:
            if a.load(f.waiting(w)):
                self.worker.kick(w)

    def _count_body(self) -> None:
        self.worker.stats.bytes_in += self.body_bytes - self.counted
        self.counted = self.body_bytes

    def _finish_state(self, state: int) -> None:
        a, f = self.arena, self.f
        self._count_body()
        self.published = self.visible()
        a.store(f.tail, self.published)
        a.store(f.state, state)
        ring.fence()
        for w in self.receiver_workers:
            self.worker.kick(w)

    def end(self) -> None:
        """The body ended cleanly: terminator, then DONE."""
        if self.ended:
            return
        self.ended = True
        if self.chunked:
            self._store(TERMINATOR)
        self._finish_state(ring.DONE)
        self.worker.loop.remove_reader(self.conn.fd)
        self.worker.report("body_ended", self.slot, self.gen, self.body_bytes)
        self.conn.write_progress(f"[INFO] Received {self.body_bytes} bytes; "
                                 "waiting for every receiver to take them.\n")

    def abort(self, reason: str) -> None:
        """The body will not complete: receivers get what was published, then a short end."""
        if self.ended:
            return
        self.ended = True
        self._finish_state(ring.ABORTED)
        self.worker.report("sender_lost", self.slot, self.gen, reason, self.body_bytes)
        self.conn.write_progress(f"[ERROR] {reason}\n")
        self.close()

    # -- end of the sender's part ----------------------------------------------------------
    def finished(self, ok: int, lost: int) -> None:
        """The supervisor says every receiver is resolved."""
        line = f"[INFO] Sent successfully to {ok} receiver(s).\n"
        if not ok:
            line = f"[ERROR] All {lost} receiver(s) left before the end.\n"
        elif lost:
            line += f"[WARN] {lost} receiver(s) left before the end.\n"
        self.conn.write_progress(line, last=True)
        self.close()

    def receivers_gone(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self._finish_state(ring.ABORTED)
        self.conn.write_progress(f"[ERROR] {reason}\n")
        self.close()

    def close(self) -> None:
        if self.spill is not None:       # readers elsewhere keep their own descriptors
            self.spill.close()
        self.worker.drop_sender(self)
        self.conn.close_after_progress()


class Receiver:
    __slots__ = ("conn", "sock", "fd", "cursor", "blocked", "head", "deframe", "frame_left",
                 "skip", "progress_at", "outq", "in_file")

    def __init__(self, conn: "Connection", head: bytes, deframe: bool):
        self.conn = conn
        self.sock = conn.sock
        self.fd = conn.fd
        self.cursor = 0
        self.blocked = False
        self.head = memoryview(head)
        self.deframe = deframe          # an HTTP/1.0 receiver of a chunked body
        self.frame_left = 0
        self.skip = 0
        self.progress_at = conn.loop.time()
        self.outq = -1
        self.in_file = False            # lagging: sent from the spill file from now on


class ReceiverGroup:
    """This worker's receivers of one transfer, and the worker's cursor for it."""

    def __init__(self, worker: "Worker", slot: int, gen: int, mode: str, info: dict):
        self.worker = worker
        self.loop = worker.loop
        self.arena = a = worker.arena
        self.f = ring.SlotFields(a, slot)
        self.slot, self.gen = slot, gen
        self.sendfile = mode == "sendfile"
        self.info = info
        self.length = info["length"]        # body bytes when the sender gave Content-Length
        self.base = a.ring_base(slot)
        self.mask = a.mask
        self.capacity = a.capacity
        self.me = worker.index
        self.receivers: list[Receiver] = []
        self.published = 0
        self.published_file = ring.NONE
        self.waiting = False
        self.last_kicked_wake = 0
        self.last_kicked_file_wake = 0
        self.spill_fd = -1              # our own descriptor of the pipe's spill file
        self.spill_start = 0
        # A receiver this far behind moves to the spill file (half the usable window).
        self.switch_lag = (a.capacity - worker.config.punch_block) // 2
        self.rotate = 0
        self.producer = a.load(self.f.producer)

    def head_for(self, conn: "Connection") -> tuple[bytes, bool]:
        info = self.info
        headers = b"Content-Type: " + info["content_type"] + b"\r\n"
        for k, v in info["headers"]:
            headers += k + b": " + v + b"\r\n"
        deframe = False
        if info["length"] is not None:
            headers += b"Content-Length: %d\r\n" % info["length"]
        elif conn.version == "1.1":
            headers += b"Transfer-Encoding: chunked\r\n"
        else:
            deframe = True              # HTTP/1.0 has no chunked: the end is the close
        headers += (b"Access-Control-Expose-Headers: Content-Length, Content-Type, "
                    b"Content-Disposition, X-Piping\r\nConnection: close\r\n")
        return response_head(200, headers, conn.version), deframe

    def add(self, conn: "Connection") -> None:
        head, deframe = self.head_for(conn)
        r = Receiver(conn, head, deframe)
        conn.stream = r
        conn.phase = conn.STREAMING
        # Still read: an idle pipe sends nothing, so only a read sees a receiver hang up.
        self.loop.add_reader(conn.fd, self._on_readable, r)
        self.receivers.append(r)

    # -- the pass --------------------------------------------------------------------------
    def on_kick(self) -> None:
        if self.waiting:
            self.arena.store(self.f.waiting(self.me), 0)
            self.waiting = False
        self.service()

    def service(self) -> None:
        a, f = self.arena, self.f
        while True:
            state = a.load(f.state)         # state before tail: DONE implies the final tail
            tail = a.load(f.tail)
            recvs = self.receivers
            if self.spill_fd != -2 and a.load(f.spill_active):
                self._use_spill(tail)
            count = len(recvs)
            if count:
                first = self.rotate % count
                self.rotate += 1
                for r in recvs[first:] + recvs[:first]:
                    if not r.blocked:
                        self._send(r, tail)
                if self.spill_fd >= 0:
                    self._drop_slowest()
                for r in [r for r in recvs if not r.blocked and r.cursor == tail]:
                    if state != ring.STREAMING:
                        self._finish(r, ok=state == ring.DONE)
                    elif r.cursor == self.length and not r.head:
                        # Its Content-Length is met: it may close before DONE is published.
                        self._finish(r, ok=True)
            self._publish()
            if not self.receivers:
                return
            hungry = state == ring.STREAMING and any(
                not r.blocked and r.cursor == tail for r in self.receivers)
            if not hungry:
                if self.waiting:
                    a.store(f.waiting(self.me), 0)
                    self.waiting = False
                return
            if self._sleep(tail, state):
                return

    def _use_spill(self, tail: int) -> None:
        """The producer spills: open the file once, move laggards onto it."""
        a, f = self.arena, self.f
        if self.spill_fd == -1:
            try:
                self.spill_fd = spill.reopen(a.load(f.spill_pid), a.load(f.spill_fd))
            except OSError:
                self.spill_fd = -2      # gone (the producer ended): stay on the ring
                return
            self.spill_start = a.load(f.spill_start)
        for r in self.receivers:
            self._maybe_to_file(r, tail)

    def _maybe_to_file(self, r: Receiver, tail: int) -> None:
        if (not r.in_file and not r.deframe and tail - r.cursor > self.switch_lag
                and r.cursor >= self.spill_start):
            r.in_file = True

    def _drop_slowest(self) -> None:
        """Policy drop: the producer marked the slowest position past the spill limit. Cut
        file readers there whose socket is full: one merely not yet served this pass is not
        slow, it only waited for its turn."""
        drop_below = self.arena.load(self.f.drop_below)
        tail, limit = self.arena.load(self.f.tail), self.worker.config.spill_limit
        for r in [r for r in self.receivers if r.in_file and r.blocked
                  and r.cursor < drop_below and tail - r.cursor >= limit]:
            self._finish(r, ok=False)

    def _send(self, r: Receiver, tail: int) -> None:
        try:
            if r.head:
                sent = r.sock.send(r.head)
                r.head = r.head[sent:]
                if r.head:
                    self._block(r)
                    return
            if r.deframe:
                self._send_deframed(r, tail)
                return
            if r.in_file:
                while r.cursor < tail:
                    span = tail - r.cursor
                    sent = os.sendfile(r.fd, self.spill_fd, r.cursor, span)
                    r.cursor += sent
                    self.worker.stats.bytes_out += sent
                    if sent < span:
                        self._block(r)
                        return
                return
            a = self.arena
            while r.cursor < tail:
                off = r.cursor & self.mask
                span = min(tail - r.cursor, self.capacity - off)
                if self.sendfile:
                    sent = os.sendfile(r.fd, a.fd, self.base + off, span)
                else:
                    sent = r.sock.send(a.view[self.base + off:self.base + off + span])
                r.cursor += sent
                self.worker.stats.bytes_out += sent
                if sent < span:
                    self._block(r)
                    return
        except (BlockingIOError, InterruptedError):
            self._block(r)
        except OSError:
            self._finish(r, ok=False)

    def _send_deframed(self, r: Receiver, tail: int) -> None:
        """Strip the ring's chunk framing for an HTTP/1.0 receiver (copy path)."""
        a = self.arena
        while r.cursor < tail:
            if r.skip:
                step = min(r.skip, tail - r.cursor)
                r.cursor += step
                r.skip -= step
                continue
            if r.frame_left:
                off = r.cursor & self.mask
                span = min(r.frame_left, tail - r.cursor, self.capacity - off)
                sent = r.sock.send(a.view[self.base + off:self.base + off + span])
                r.cursor += sent
                r.frame_left -= sent
                self.worker.stats.bytes_out += sent
                if not r.frame_left:
                    r.skip = 2
                if sent < span:
                    self._block(r)
                    return
                continue
            # A size line is published whole: either the relay's fixed-width one or, for a
            # body passed through, the sender's (extensions and all; the last one is plain).
            line = self._peek(r.cursor, min(tail - r.cursor, 32))
            if b"\n" not in line:
                line = self._peek(r.cursor, min(tail - r.cursor, MAX_LINE))
            size = int(line[:line.index(b"\n")].partition(b";")[0], 16)
            if not size:
                r.cursor += len(TERMINATOR)
                continue
            r.frame_left = size
            r.cursor += line.index(b"\n") + 1

    def _peek(self, position: int, length: int) -> bytes:
        off = position & self.mask
        first = min(length, self.capacity - off)
        data = bytes(self.arena.view[self.base + off:self.base + off + first])
        if first < length:
            data += bytes(self.arena.view[self.base:self.base + length - first])
        return data

    def _block(self, r: Receiver) -> None:
        r.blocked = True
        self.loop.add_writer(r.fd, self._on_writable, r)

    def _on_writable(self, r: Receiver) -> None:
        """One socket drained: serve it alone. A pass over every receiver here would make
        each of N writable events cost O(N) (quadratic at N = 256); the others are served
        when they drain or when the producer kicks."""
        self.loop.remove_writer(r.fd)
        r.blocked = False
        r.progress_at = self.loop.time()      # its socket drained: it is reading
        a, f = self.arena, self.f
        state = a.load(f.state)
        tail = a.load(f.tail)
        before, was_in_file = r.cursor, r.in_file
        if self.spill_fd >= 0:
            self._maybe_to_file(r, tail)
        elif self.spill_fd == -1 and a.load(f.spill_active):
            self.service()                    # first sight of the spill: everyone is checked
            return
        self._send(r, tail)
        if r.blocked or r.cursor != tail:
            self._publish_moved(r, before, was_in_file)
            return
        if state != ring.STREAMING or (r.cursor == self.length and not r.head):
            self.service()                    # it is done: the full pass finishes it
            return
        self._publish_moved(r, before, was_in_file)
        if not self._sleep(tail, state):
            self.service()

    def _sleep(self, tail: int, state: int) -> bool:
        """A receiver here is caught up. Sleep protocol: flag, fence, re-check; True when
        nothing moved and the worker may sleep until a kick."""
        a, f = self.arena, self.f
        if not self.waiting:
            a.store(f.waiting(self.me), 1)
            self.waiting = True
            ring.fence()
        return a.load(f.tail) == tail and a.load(f.state) == state

    def _publish_moved(self, r: Receiver, before: int, was_in_file: bool) -> None:
        """Publish after one receiver moved from `before`: the lowest cursor can only have
        changed if it was the lowest one (or it changed sides, ring to file)."""
        if r.in_file == was_in_file and before > (self.published_file if was_in_file
                                                  else self.published):
            return
        self._publish()

    def close_stalled(self, now: float, limit: float) -> None:
        """Close receivers whose socket has stayed full for `limit` seconds: one that stopped
        reading would otherwise hold the producer, and so everyone, once the window is full."""
        stalled = []
        for r in self.receivers:
            if not r.blocked:
                continue
            # A slow reader drains its socket queue without making it writable for long
            # (writability waits for half the buffer): a shrinking queue is progress too.
            try:
                outq = struct.unpack("i", fcntl.ioctl(r.fd, termios.TIOCOUTQ, b"\0" * 4))[0]
            except OSError:
                outq = -1
            if outq != r.outq:
                r.outq = outq
                r.progress_at = now
            elif now - r.progress_at > limit:
                stalled.append(r)
        for r in stalled:
            self._finish(r, ok=False)
        if stalled:
            self._publish()

    def _on_readable(self, r: Receiver) -> None:
        """Input from a streaming receiver is discarded; EOF or a reset means it left.
        (A client that half-closes after its request is taken as gone, as piping-server does.)"""
        try:
            if r.sock.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.service()       # it may have all it wanted: a Content-Length client closes at once
        if r in self.receivers:
            self._finish(r, ok=False)
            self._publish()

    def _finish(self, r: Receiver, ok: bool) -> None:
        """A receiver is done (every byte queued) or lost; an aborted body ends short."""
        if r not in self.receivers:
            return
        self.receivers.remove(r)
        # An HTTP/1.0 body has no length: only a reset can tell its client about a cut.
        r.conn.close(reset=not ok and r.deframe)
        self.worker.report("receiver_ended", self.slot, self.gen, r.conn.id, ok)

    def _publish(self) -> None:
        """Publish this worker's lowest ring cursor and lowest spill-file cursor; kick the
        producer if it sleeps on a mark one of them crossed."""
        a, f = self.arena, self.f
        lowest = min((r.cursor for r in self.receivers if not r.in_file), default=ring.NONE)
        lowest_file = min((r.cursor for r in self.receivers if r.in_file), default=ring.NONE)
        if lowest == self.published and lowest_file == self.published_file:
            return
        self.published, self.published_file = lowest, lowest_file
        # File cursor first: a receiver moving ring -> file must never be missing from both
        # as the producer loads cursor, then file_cursor (x86 keeps stores in order).
        a.store(f.file_cursor(self.me), lowest_file)
        a.store(f.cursor(self.me), lowest)
        ring.fence()
        wake_at = a.load(f.wake_at)
        if wake_at and lowest >= wake_at and wake_at != self.last_kicked_wake:
            self.last_kicked_wake = wake_at
            self.worker.kick(self.producer)
        file_wake_at = a.load(f.file_wake_at)
        if (file_wake_at and lowest_file >= file_wake_at
                and file_wake_at != self.last_kicked_file_wake):
            self.last_kicked_file_wake = file_wake_at
            self.worker.kick(self.producer)
        if lowest == ring.NONE and lowest_file == ring.NONE:
            if self.spill_fd >= 0:
                os.close(self.spill_fd)
                self.spill_fd = -2
            self.worker.drop_group(self)

    def max_lag(self) -> int:
        """Bytes the slowest receiver here is behind the producer (for /metrics)."""
        if not self.receivers:
            return 0
        return max(0, self.arena.load(self.f.tail) - min(r.cursor for r in self.receivers))

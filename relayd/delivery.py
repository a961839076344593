"""The receiver side of one transfer, in one worker: ring (or spill file) -> its receivers'
sockets, each on its own cursor.

Theory of operation (DESIGN §4):
- A pass sends each receiver one span per call, rotating who goes first, then publishes the
  worker's lowest cursors once (ring.RingReader). A caught-up receiver makes the worker set
  `waiting`, fence and re-check the tail before it sleeps on its eventfd, so no wake-up is
  lost. A socket that drains is served alone (a pass over every receiver per writable event
  would make N events cost O(N²)).
- copy mode sends from the mapped ring (the kernel copies at send time); sendfile mode sends
  the memfd's pages (zero-copy; the producer's punch rule keeps them intact, ring.py).
- A receiver lagging more than half the usable window moves to the pipe's spill file while
  it grows, and is sent from it with sendfile; when the file stopped growing (the disk
  refused a write, spill.py), it is served up to the file's end and comes back to the ring.
- An HTTP/1.0 receiver of a chunked body gets the plain body: the ring's (or file's) chunk
  framing is stripped on the way out, and a cut is a reset (the only signal 1.0 has).
- ABORTED reaches every receiver as a short body: what was published, then a close without
  the terminator (a Content-Length body simply stops short).

A group is built from what it uses -- a RingReader, the loop, the sender's response info,
limits, counters and two callbacks -- never the worker that owns it.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import struct
import termios
import traceback
from typing import Callable

from relayd import control, logs, ring
from relayd.chunked import MAX_LINE
from relayd.control import SenderInfo
from relayd.http import response_head
from relayd.spill import SpillReader
from relayd.stats import WorkerCounters

TERMINATOR = b"0\r\n\r\n"
DROP_GRACE_S = 1.0        # --slow drop without spill: a full socket this long is slow


@dataclasses.dataclass
class DeliveryLimits:
    switch_lag: int               # a receiver this far behind moves to the spill file
    spill_limit: int              # --spill-limit: the lag --slow drop cuts at


@dataclasses.dataclass
class GroupHooks:
    report: Callable[[object], None]             # a control message to the supervisor
    released: Callable[["ReceiverGroup"], None]  # no receiver left here


class Receiver:
    __slots__ = ("conn", "sock", "fd", "cursor", "blocked", "head", "deframe", "frame_left",
                 "skip", "progress_at", "outq", "in_file")

    def __init__(self, conn, head: bytes, deframe: bool, now: float):
        self.conn = conn
        self.sock = conn.sock
        self.fd = conn.fd
        self.cursor = 0
        self.blocked = False
        self.head = memoryview(head)
        self.deframe = deframe          # an HTTP/1.0 receiver of a chunked body
        self.frame_left = 0
        self.skip = 0
        self.progress_at = now
        self.outq = -1
        self.in_file = False            # lagging: sent from the spill file


def response_for(info: SenderInfo, version: str) -> tuple[bytes, bool]:
    """A receiver's response head, and whether its body must be deframed (HTTP/1.0 of a
    chunked body: the end is the close)."""
    headers = b"Content-Type: " + info.content_type + b"\r\n"
    for k, v in info.headers:
        headers += k + b": " + v + b"\r\n"
    deframe = False
    if info.length is not None:
        headers += b"Content-Length: %d\r\n" % info.length
    elif version == "1.1":
        headers += b"Transfer-Encoding: chunked\r\n"
    else:
        deframe = True
    headers += (b"Access-Control-Expose-Headers: Content-Length, Content-Type, "
                b"Content-Disposition, X-Piping\r\nConnection: close\r\n")
    return response_head(200, headers, version), deframe


class ReceiverGroup:
    """This worker's receivers of one transfer, and the worker's cursors for it."""

    def __init__(self, reader: ring.RingReader, loop, gen: int, sendfile: bool,
                 info: SenderInfo, limits: DeliveryLimits, hooks: GroupHooks,
                 counters: WorkerCounters):
        self.reader = reader
        self.loop = loop
        self.slot, self.gen = reader.slot, gen
        self.sendfile = sendfile
        self.info = info
        self.length = info.length       # body bytes when the sender gave Content-Length
        self.limits = limits
        self.hooks = hooks
        self.counters = counters
        self.receivers: list[Receiver] = []
        self.spill: SpillReader | None = None
        self.spill_gone = False         # the file vanished before we opened it: ring only
        self.rotate = 0
        self.released = False
        self.drop_timer = None          # --slow drop: a grace deadline being waited on

    def add(self, conn) -> Receiver:
        """A receiver joins; its connection keeps reading (an idle pipe sends nothing, so
        only a read sees a receiver hang up) and tells `_receiver_gone`."""
        head, deframe = response_for(self.info, conn.version)
        r = Receiver(conn, head, deframe, self.loop.time())
        self.receivers.append(r)
        conn.attach(r, gone=lambda: self._receiver_gone(r))
        return r

    def guarded(self, step: Callable[[], None]) -> None:
        """An exception in this group's work cuts its receivers short (visibly) and is logged
        with the pipe; the worker and its other pipes go on."""
        try:
            step()
        except Exception:
            logs.message(f"receivers of slot {self.slot} failed in the relay: "
                         + traceback.format_exc().strip().replace("\n", " | "))
            for r in list(self.receivers):
                self._finish(r, ok=False)
            self._publish()

    # -- the pass --------------------------------------------------------------------------
    def on_kick(self) -> None:
        self.guarded(self._woken)

    def _woken(self) -> None:
        self.reader.sleep_flag(False)
        self.service()

    def service(self) -> None:
        while True:
            state, tail = self.reader.state_and_tail()
            recvs = self.receivers
            if self.spill is None and not self.spill_gone and \
                    self.reader.arena.load(self.reader.f.spill_active):
                self._open_spill()
            if self.spill is not None:
                for r in recvs:
                    self._maybe_move(r, tail)
            self._drop_slowest(tail)
            count = len(recvs)
            if count:
                first = self.rotate % count
                self.rotate += 1
                for r in recvs[first:] + recvs[:first]:
                    if not r.blocked:
                        self._send(r, tail)
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
                self.reader.sleep_flag(False)
                return
            if self._sleep(tail, state):
                return

    def _open_spill(self) -> None:
        self.spill = SpillReader.open(self.reader.arena, self.reader.f)
        if self.spill is None:
            self.spill_gone = True      # the producer ended already: stay on the ring

    def _maybe_move(self, r: Receiver, tail: int) -> None:
        """Onto the file when lagging while it grows; back to the ring at the file's end
        once it stopped."""
        spill = self.spill
        if not r.in_file:
            if (tail - r.cursor > self.limits.switch_lag and r.cursor >= spill.start
                    and spill.growing()):
                r.in_file = True
        elif r.cursor >= spill.stopped_at():
            r.in_file = False

    def _drop_slowest(self, tail: int) -> None:
        """--slow drop: the producer marked the position below which receivers hold it.
        Cut those below it whose socket was full when last served (one merely not yet
        served is not slow). While the spill file grows, that is only file readers a spill
        limit behind. When the disk refused the spill, the window is all the lag there is:
        a receiver holding the producer (with a full socket, or still in a stopped file) is
        cut once its socket has not drained for DROP_GRACE_S."""
        drop_below = self.reader.drop_below()
        if not drop_below:
            return
        growing = self.spill is not None and self.spill.growing()
        limit = self.reader.drop_lag() or self.limits.spill_limit
        now = self.loop.time()
        waiting = []
        for r in [r for r in self.receivers if r.cursor < drop_below]:
            if growing:
                if r.in_file and r.blocked and tail - r.cursor >= limit:
                    self._finish(r, ok=False)
            elif r.in_file or r.blocked:
                if r.progress_at <= now - DROP_GRACE_S:
                    self._finish(r, ok=False)
                else:
                    waiting.append(r.progress_at + DROP_GRACE_S)
        if waiting and self.drop_timer is None:
            # Look again when the first of them has had its grace: no tick needed.
            self.drop_timer = self.loop.call_at(min(waiting), self._drop_check)

    def _drop_check(self) -> None:
        self.drop_timer = None
        self.guarded(self.service)

    # -- sending ---------------------------------------------------------------------------
    def _send(self, r: Receiver, tail: int) -> None:
        try:
            if r.head:
                if not (self.sendfile or r.in_file or r.deframe) and r.cursor < tail:
                    if not self._send_head_and_bytes(r, tail):
                        self._block(r)
                        return
                else:
                    sent = r.sock.send(r.head)
                    r.head = r.head[sent:]
                if r.head:
                    self._block(r)
                    return
            while True:
                end = self.spill.end(tail) if r.in_file else tail
                if r.deframe:
                    self._send_deframed(r, end, tail)
                else:
                    self._send_raw(r, end, end)
                if r.blocked or not r.in_file or r.cursor < end:
                    return
                self._maybe_move(r, tail)   # at the end of a stopped file: the ring goes on
                if r.in_file:
                    return
        except (BlockingIOError, InterruptedError):
            self._block(r)
        except OSError:
            self._finish(r, ok=False)

    def _send_head_and_bytes(self, r: Receiver, tail: int) -> bool:
        """The head with the first span of the ring in one send: a small pipe's receiver
        then costs one segment and one wake-up of its client, not two. False if the socket
        took less than all of it (what is left goes on as any span does)."""
        data = self.reader.bytes_at(r.cursor, tail)
        offered = len(r.head) + len(data)
        sent = r.sock.sendmsg([r.head, data])
        head_sent = min(sent, len(r.head))
        r.head = r.head[head_sent:]
        r.cursor += sent - head_sent
        self.counters.bytes_out += sent - head_sent
        return sent == offered

    def _send_raw(self, r: Receiver, end: int, frame_end: int) -> None:
        """Send r's bytes from its cursor up to min(end, frame_end), one span per call."""
        stop = min(end, frame_end)
        while r.cursor < stop:
            if r.in_file:
                sent = self.spill.send(r.fd, r.cursor, stop)
                span = stop - r.cursor
            elif self.sendfile:
                at, span = self.reader.span(r.cursor, stop)
                sent = os.sendfile(r.fd, self.reader.fd, at, span)
            else:
                data = self.reader.bytes_at(r.cursor, stop)
                span = len(data)
                sent = r.sock.send(data)
            r.cursor += sent
            if r.frame_left:
                r.frame_left -= sent
            self.counters.bytes_out += sent
            if sent < span:
                self._block(r)
                return

    def _peek(self, r: Receiver, length: int, tail: int) -> bytes:
        """Published bytes at r's cursor. A file reader's size line may cross the end of a
        file that stopped growing: the ring holds everything from there on."""
        if not r.in_file:
            return self.reader.peek(r.cursor, length)
        end = self.spill.end(tail)
        data = self.spill.peek(r.cursor, min(length, end - r.cursor))
        if len(data) < length and r.cursor + len(data) == end:
            data += self.reader.peek(end, length - len(data))
        return data

    def _send_deframed(self, r: Receiver, end: int, tail: int) -> None:
        """Strip the chunk framing for an HTTP/1.0 receiver."""
        while r.cursor < end and not r.blocked:
            if r.skip:
                step = min(r.skip, end - r.cursor)
                r.cursor += step
                r.skip -= step
                continue
            if r.frame_left:
                self._send_raw(r, end, r.cursor + r.frame_left)
                if not r.frame_left:
                    r.skip = 2               # the CRLF after the chunk's data
                continue
            # A size line is published whole: either the relay's fixed-width one or, for a
            # body passed through, the sender's (extensions and all; the last one is plain).
            line = self._peek(r, min(tail - r.cursor, 32), tail)
            if b"\n" not in line:
                line = self._peek(r, min(tail - r.cursor, MAX_LINE), tail)
            size = int(line[:line.index(b"\n")].partition(b";")[0], 16)
            if not size:
                r.cursor += len(TERMINATOR)
                continue
            r.frame_left = size
            r.cursor += line.index(b"\n") + 1

    def _block(self, r: Receiver) -> None:
        r.blocked = True
        # Its socket is full from now: stall and --slow drop's grace count from here (a
        # receiver that never blocked has been keeping up, however long ago it started).
        r.progress_at = self.loop.time()
        self.loop.add_writer(r.fd, self._on_writable, r)

    def _on_writable(self, r: Receiver) -> None:
        self.guarded(lambda: self._drained(r))

    def _drained(self, r: Receiver) -> None:
        """One socket drained: serve it alone; the others are served when they drain or when
        the producer kicks."""
        self.loop.remove_writer(r.fd)
        r.blocked = False
        r.progress_at = self.loop.time()      # its socket drained: it is reading
        state, tail = self.reader.state_and_tail()
        if self.spill is None and not self.spill_gone and \
                self.reader.arena.load(self.reader.f.spill_active):
            self.service()                    # first sight of the spill: everyone is checked
            return
        before, was_in_file = r.cursor, r.in_file
        if self.spill is not None:
            self._maybe_move(r, tail)
        self._send(r, tail)
        if r not in self.receivers:
            self._publish()
            return
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
        self.reader.sleep_flag(True)
        return not self.reader.moved(tail, state)

    def _publish_moved(self, r: Receiver, before: int, was_in_file: bool) -> None:
        """Publish after one receiver moved from `before`: the lowest cursors can only have
        changed if it was the lowest one (or it changed sides, ring to file)."""
        published = self.reader.published_file if was_in_file else self.reader.published
        if r.in_file == was_in_file and before > published:
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

    def _receiver_gone(self, r: Receiver) -> None:
        """EOF or a reset from a streaming receiver: it left. (A client that half-closes after
        its request is taken as gone, as piping-server does.)"""
        # It may have all it wanted: a Content-Length client closes at once.
        self.guarded(self.service)
        if r in self.receivers:
            self._finish(r, ok=False)
            self._publish()

    def _finish(self, r: Receiver, ok: bool) -> None:
        """A receiver is done (every byte queued) or lost; an aborted body ends short."""
        if r not in self.receivers:
            return
        self.receivers.remove(r)
        if r.blocked:
            self.loop.remove_writer(r.fd)
        # An HTTP/1.0 body has no length: only a reset can tell its client about a cut.
        r.conn.close(reset=not ok and r.deframe)
        self.hooks.report(control.ReceiverEnded(self.slot, self.gen, r.conn.id, ok))

    def _publish(self) -> None:
        """Publish this worker's lowest ring and file cursors; when no receiver is left,
        release the group."""
        lowest = min((r.cursor for r in self.receivers if not r.in_file), default=ring.NONE)
        lowest_file = min((r.cursor for r in self.receivers if r.in_file), default=ring.NONE)
        self.reader.publish(lowest, lowest_file)
        if not self.receivers:
            self.close()

    def close(self) -> None:
        """Nothing left here: give up the spill descriptor and the slot; safe twice."""
        if self.released:
            return
        self.released = True
        if self.drop_timer is not None:
            self.drop_timer.cancel()
            self.drop_timer = None
        for r in list(self.receivers):
            self._finish(r, ok=False)
        self.reader.sleep_flag(False)
        self.reader.publish(ring.NONE, ring.NONE)
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.hooks.released(self)

    def max_lag(self) -> int:
        """Bytes the slowest receiver here is behind the producer (for /metrics)."""
        if not self.receivers:
            return 0
        return max(0, self.reader.state_and_tail()[1] - min(r.cursor for r in self.receivers))

"""An in-process bench for the data path: a real arena, a real uvloop loop, real eventfds and
socketpairs, the real rendezvous registry -- and no daemon, no worker process, no mocks.

    test code                     the bench (one loop, driven by the test)
    ---------                     -----------------------------------------------------------
    SenderPeer.sock  <-socketpair->  Connection -> SenderStream ----+        worker index p
                                                                    | arena (memfd): ring,
    ReceiverPeer.sock <-socketpair-> Connection -> ReceiverGroup <--+ positions, spill file
                                                   (one per worker index, eventfd each)

Each `WorkerPart` is what one worker index holds, wired exactly as relayd/worker.py wires it
(on_start_sender, on_start_receivers, on_kick): Connections built with a Config and
ConnectionHooks, `group.add(conn)`, SenderStream from `conn.body()`. Every worker
index has its own eventfd; `kick(w)` writes it and the loop's reader for it runs the
worker's own `kick_marked` over that index's groups and streams, as Worker.on_kick does.
Control messages the parts report go, one loop turn later (as over the control socket),
to a real `rendezvous.Registry` -- the supervisor's
bookkeeping: it initialises the slot (`SlotFields.reset`) before any start, answers
Finished/AbortSender, and punches the slot on release. Every message is kept in
`bench.reports` for the tests to assert on.

Clients' sockets are socketpairs (AF_UNIX: sendfile still lends them the ring's pages, as
TCP does), or TCP over 127.0.0.1 where TCP's own behaviour is the point (a reset). uvloop
fact the clients respect: on a socket error it runs a reader once, then drops it -- so each
client read drains its socket.

What the bench leaves out on purpose: the worker's once-a-second tick, which re-runs every
pipe "so a lost wake-up costs a second". Here a lost wake-up hangs the transfer, and the
test fails on its timeout instead of passing slowly.

Tests drive the loop with `bench.run_until(predicate, what)`: it fails, with the state of
every part, after TIMEOUT_S -- a broken data path fails rather than hangs.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import socket
import struct
import termios
import types
from typing import Callable

import uvloop

from relayd import control, logs, ring, stats
from relayd.config import Config
from relayd.connection import Connection, ConnectionHooks
from relayd.delivery import DeliveryLimits, GroupHooks, ReceiverGroup
from relayd.fileio import Syscalls
from relayd.producer import SenderHooks, SenderState, SenderStream, SpillPlan
from relayd.rendezvous import Registry
from relayd.routing import route
from relayd.spill import SpillBudget
from relayd.worker import kick_marked

KIB, MIB = 1024, 1024 * 1024
CAPACITY = 512 * KIB              # the smallest window Config accepts: two punch blocks
TIMEOUT_S = 30.0
POLL_S = 0.001                    # how often a waiting test looks (the data path never polls)
PATH = b"/p"
SITE = types.SimpleNamespace(authorizer=None)     # routing's Site: no access control


def fionread(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# -- the data path's parts, per worker index --------------------------------------------------
class WorkerPart:
    """What worker index `index` holds, wired as relayd/worker.py wires it."""

    def __init__(self, bench: "Bench", index: int):
        self.bench = bench
        self.index = index
        self.loop = bench.loop
        self.counters = stats.WorkerCounters()
        self.spill_budget = SpillBudget(bench.arena, stats.WorkerBlock(bench.arena, index),
                                        bench.config.spill_budget)
        self.conns: dict[int, Connection] = {}
        self.senders: dict[int, SenderStream] = {}
        self.groups: dict[int, ReceiverGroup] = {}
        self.connection_hooks = ConnectionHooks(
            route=lambda request: route(request, SITE), pipe=self.join_pipe,
            left=lambda conn: self.report(control.Leave(conn.id)),
            closed=lambda conn: self.conns.pop(conn.id, None),
            answered=lambda conn, status: None,
            refused=lambda conn, status, reason: bench.refusals.append((status, reason)),
            may_keep_alive=lambda: True)
        self.handlers = {
            control.Progress: self.on_progress, control.StartSender: self.on_start_sender,
            control.StartReceivers: self.on_start_receivers,
            control.Finished: self.on_finished, control.AbortSender: self.on_abort_sender,
            control.Rejected: self.on_refused, control.Expired: self.on_refused,
        }

    def accept(self, sock: socket.socket) -> Connection:
        sock.setblocking(False)
        conn_id = self.bench.next_conn_id
        self.bench.next_conn_id += 1
        conn = Connection(sock, conn_id, f"127.0.0.1:{conn_id}", self.loop, self.bench.config,
                          self.connection_hooks)
        self.conns[conn_id] = conn
        return conn

    def report(self, message) -> None:
        self.bench.to_supervisor(self.index, message)

    # -- as Worker.join_pipe / on_* ------------------------------------------------------------
    def join_pipe(self, conn: Connection, pipe) -> None:
        if pipe.role == "sender":
            conn.stop_reading()          # its body stays unread until the transfer starts
        self.report(control.Join(conn.id, pipe.role, pipe.path, pipe.n, pipe.info))

    def handle(self, message) -> None:
        control.dispatch(self.handlers, message)

    def _party(self, conn_id: int) -> Connection | None:
        conn = self.conns.get(conn_id)
        return conn if conn is not None and conn.is_party else None

    def on_refused(self, m) -> None:
        self.bench.refusals.append(m)

    def on_progress(self, m: control.Progress) -> None:
        conn = self._party(m.conn)
        if conn is not None:
            if not conn.head_sent:
                conn.accepted()
            conn.write_progress(f"[INFO] {m.connected} of {m.n} receiver(s) connected.\n")

    def on_start_sender(self, m: control.StartSender) -> None:
        bench, c = self.bench, self.bench.config
        conn = self._party(m.conn)
        writer = ring.RingWriter(bench.arena, m.slot, m.receiver_workers, m.mode == "sendfile",
                                 c.punch_block, bench.kick)
        assert conn is not None, "the bench's sender left before its start"
        conn.accepted()
        conn.write_progress(f"[INFO] Start sending to {m.n} receiver(s)!\n")
        slow = conn.pipe.slow or c.slow
        stream = SenderStream(
            writer, conn.sock, self.loop, conn.body(),
            SpillPlan(c.spill_dir, c.spill_limit, slow == "drop", self.spill_budget,
                      bench.spill_calls),
            m.n, m.gen,
            SenderHooks(progress=conn.write_progress, close=conn.close_gracefully,
                        report=self.report, released=self.sender_released),
            self.counters, conn.path)
        conn.attach(stream)
        self.senders[m.slot] = stream
        bench.streams[conn.id] = stream
        stream.guarded(stream.start)

    def on_start_receivers(self, m: control.StartReceivers) -> None:
        bench, c = self.bench, self.bench.config
        group = ReceiverGroup(
            ring.RingReader(bench.arena, m.slot, self.index, bench.kick), self.loop, m.gen,
            m.mode == "sendfile", m.info,
            DeliveryLimits(switch_lag=(c.window - c.punch_block) // 2,
                           spill_limit=c.spill_limit),
            GroupHooks(report=self.report, released=self.group_released), self.counters)
        self.groups[m.slot] = group
        for conn_id in m.conns:
            conn = self._party(conn_id)
            if conn is None:
                self.report(control.ReceiverEnded(m.slot, m.gen, conn_id, False))
            else:
                bench.receivers[conn_id] = group.add(conn)
        group.guarded(group.service)
        if not group.receivers:
            group.close()

    def on_finished(self, m: control.Finished) -> None:
        stream = self.senders.get(m.slot)
        if stream is not None and stream.gen == m.gen:
            stream.guarded(lambda: stream.finished(m.ok, m.lost))

    def on_abort_sender(self, m: control.AbortSender) -> None:
        stream = self.senders.get(m.slot)
        if stream is not None and stream.gen == m.gen:
            stream.guarded(lambda: stream.receivers_gone(m.reason))

    def sender_released(self, stream: SenderStream) -> None:
        if self.senders.get(stream.slot) is stream:
            del self.senders[stream.slot]
            self.report(control.Released(stream.slot, stream.gen, "sender"))

    def group_released(self, group: ReceiverGroup) -> None:
        if self.groups.get(group.slot) is group:
            del self.groups[group.slot]
            self.report(control.Released(group.slot, group.gen, "receivers"))

    def on_kick(self) -> None:
        try:
            os.eventfd_read(self.bench.eventfds[self.index])
        except BlockingIOError:
            pass
        kick_marked(self.bench.arena, self.index, self.groups, self.senders)


# -- the test's ends of the sockets -----------------------------------------------------------
class ReceiverPeer:
    """The client end of a receiver: reads whatever arrives unless stalled."""

    def __init__(self, bench: "Bench", sock: socket.socket, conn: Connection, worker: int):
        self.bench = bench
        self.sock = sock
        self.conn_id = conn.id
        self.worker = worker
        self.data = bytearray()
        self.eof = False
        self.reset = False
        self.stalled = False
        self.at: list[tuple[int, Callable[[], None]]] = []   # (bytes read, then do this)
        self.sip: tuple[int, float] | None = None
        sock.setblocking(False)
        bench.loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def receiver(self):
        """Its relayd.delivery.Receiver once the transfer started."""
        return self.bench.receivers.get(self.conn_id)

    def ended(self) -> control.ReceiverEnded | None:
        found = [m for _, m in self.bench.reports
                 if isinstance(m, control.ReceiverEnded) and m.conn == self.conn_id]
        return found[0] if found else None

    def _on_readable(self) -> None:
        # Read until the socket is empty: on an error (a TCP reset) uvloop runs a reader
        # once and drops it, so data queued before the reset must not leave the error unseen.
        while not self.stalled and not self.eof:
            try:
                chunk = self.sock.recv(self.sip[0] if self.sip else 256 * KIB)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                self.reset, chunk = True, b""
            if not chunk:
                self.eof = True
                self.bench.loop.remove_reader(self.sock.fileno())
                return
            self.data += chunk
            while self.at and len(self.data) >= self.at[0][0]:
                self.at.pop(0)[1]()
            if self.sip and not self.stalled and not self.eof:
                self.stall()
                self.bench.loop.call_later(self.sip[1], self.resume)

    def stall(self) -> None:
        """Stop reading: the socket fills and the relay's sends block."""
        if not self.stalled and not self.eof:
            self.stalled = True
            self.bench.loop.remove_reader(self.sock.fileno())

    def resume(self) -> None:
        if self.stalled and self.sock.fileno() >= 0:
            self.stalled = False
            self.bench.loop.add_reader(self.sock.fileno(), self._on_readable)

    def vanish(self) -> None:
        """Close the socket (with unread bytes queued, the relay's side sees a reset)."""
        if self.sock.fileno() >= 0:
            if not self.stalled and not self.eof:
                self.bench.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.eof = True

    def half_close(self) -> None:
        """shutdown(SHUT_WR): the relay reads EOF; this end goes on reading."""
        self.sock.shutdown(socket.SHUT_WR)

    def response(self) -> "Response":
        return parse_response(bytes(self.data), self.reset)


class SenderPeer:
    """The client end of the sender: its request head (and any body bytes sent with it) is
    written at once; `feed` writes the rest once the transfer has started."""

    def __init__(self, bench: "Bench", sock: socket.socket, conn: Connection):
        self.bench = bench
        self.sock = sock
        self.conn = conn
        self.conn_id = conn.id
        self.relay_fd = conn.fd
        self.response = bytearray()
        self.tails: list[int] = []     # the ring's tail after each paced piece
        sock.setblocking(False)
        bench.loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def stream(self) -> SenderStream | None:
        return self.bench.streams.get(self.conn_id)

    def _on_readable(self) -> None:
        while True:                     # to the end: see ReceiverPeer._on_readable
            try:
                chunk = self.sock.recv(64 * KIB)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.bench.loop.remove_reader(self.sock.fileno())
                return
            self.response += chunk

    def vanish(self) -> None:
        """Close the sender's socket (the loop must stop watching it first)."""
        if self.sock.fileno() >= 0:
            try:
                self.bench.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self.sock.close()

    def reset(self) -> None:
        """Close with SO_LINGER 0: over TCP the relay gets a reset."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.vanish()

    def progress(self) -> str:
        """The sender's response body (its progress lines), de-chunked."""
        return parse_response(bytes(self.response), False).body.decode()

    def idle(self) -> bool:
        """The producer took every byte written so far and every receiver has sent every
        published byte: the next piece starts with a window as empty as it gets."""
        stream = self.stream
        if stream is None or stream.state not in (SenderState.READING, SenderState.PAUSED):
            return True
        if fionread(self.relay_fd) or stream.state is SenderState.PAUSED:
            return False
        published = stream.ring.published
        return all(r.cursor == published for part in self.bench.parts
                   for g in part.groups.values() for r in g.receivers)

    def feed(self, pieces: list[bytes], pace: bool = False, gap_s: float = 0.0,
             then: Callable[[], None] | None = None) -> None:
        """Write pieces of the body (in the loop, as the socket takes them). pace: each
        piece only once the last is taken and delivered, so the producer's reads (and its
        frames) follow the pieces' boundaries; the ring's tail is recorded after each.
        Pacing also refreshes the producer's cached limit (RingWriter.refresh, which it runs
        itself only once the cache says the window is full): else a read stops at a limit
        cached laps ago -- a parsed chunked read keeps 17 bytes short of it."""
        async def run():
            await self.bench.until(lambda: self.stream is not None)
            for piece in pieces:
                if pace and self.stream.state is SenderState.READING:
                    self.stream.ring.refresh()
                try:
                    await self.bench.loop.sock_sendall(self.sock, piece)
                except OSError:
                    return                 # the relay closed on the rest of the body
                if pace:
                    await self.bench.until(self.idle)
                    self.tails.append(self.stream.ring.tail)
                if gap_s:
                    await asyncio.sleep(gap_s)
            if then is not None:
                then()
        self.bench.tasks.append(self.bench.loop.create_task(run()))


# -- faults at the fd boundary --------------------------------------------------------------
def _truncated(buffers: list, most: int) -> list:
    out, left = [], most
    for b in buffers:
        v = memoryview(b).cast("B")
        if left <= 0:
            break
        out.append(v[:left])
        left -= len(out[-1])
    return out


class ShortWrites(Syscalls):
    """Every pwrite/pwritev takes at most `most` bytes and says so in its count."""

    def __init__(self, most: int = 1000):
        self.most = most
        self.short = 0                # calls that wrote less than they were given

    def pwrite(self, fd, data, offset):
        view = memoryview(data).cast("B")
        self.short += len(view) > self.most
        return os.pwrite(fd, view[:self.most], offset)

    def pwritev(self, fd, buffers, offset):
        self.short += sum(len(memoryview(b).cast("B")) for b in buffers) > self.most
        return os.pwritev(fd, _truncated(buffers, self.most), offset)


class FullDisk(Syscalls):
    """The file takes `budget` bytes, then every write raises ENOSPC (a short count first,
    as a filling disk does)."""

    def __init__(self, budget: int):
        self.left = budget
        self.refused = 0

    def _take(self, want: int) -> int:
        if self.left <= 0:
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return min(want, self.left)

    def pwrite(self, fd, data, offset):
        view = memoryview(data).cast("B")
        n = os.pwrite(fd, view[:self._take(len(view))], offset)
        self.left -= n
        return n

    def pwritev(self, fd, buffers, offset):
        total = sum(len(memoryview(b).cast("B")) for b in buffers)
        n = os.pwritev(fd, _truncated(buffers, self._take(total)), offset)
        self.left -= n
        return n


# -- the bench -------------------------------------------------------------------------------
class Bench:
    def __init__(self, tmp_path, monkeypatch, *, transmit: str = "copy", workers: int = 3,
                 capacity: int = CAPACITY, spill_limit: int = 64 * MIB,
                 spill_budget: int = 1 << 30, spill_dir: str | None = None):
        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.errors: list = []
        self.log: list[str] = []
        write = logs._write
        monkeypatch.setattr(logs, "_write", lambda line: (self.log.append(line), write(line)))
        self.config = Config(window=capacity, transmit=transmit, workers=1,
                             spill_dir=spill_dir or str(tmp_path), spill_limit=spill_limit,
                             spill_budget=spill_budget).validate()
        self.arena = ring.Arena(slots=1, capacity=capacity, worker_slots=workers)
        self.capacity = capacity
        self.block = self.config.punch_block
        self.spill_calls: Syscalls = Syscalls()
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(workers)]
        self.parts = [WorkerPart(self, w) for w in range(workers)]
        for w, part in enumerate(self.parts):
            self.loop.add_reader(self.eventfds[w], part.on_kick)
        self.registry = Registry(self.config, self.arena, self.kick)
        self.reports: list = []          # (worker index, message), in the order sent
        self.refusals: list = []
        self.streams: dict[int, SenderStream] = {}
        self.receivers: dict = {}        # conn id -> delivery.Receiver
        self.next_conn_id = 1
        self.socks: list[socket.socket] = []
        self.tasks: list[asyncio.Task] = []
        self.peers: list[ReceiverPeer] = []
        self.sender_peer: SenderPeer | None = None

    # -- the supervisor's side --------------------------------------------------------------
    def kick(self, worker: int) -> None:
        os.eventfd_write(self.eventfds[worker], 1)

    def to_supervisor(self, worker: int, message) -> None:
        self.reports.append((worker, message))
        self.loop.call_soon(self._supervise, worker, message)

    def _supervise(self, w: int, m) -> None:
        r = self.registry
        if isinstance(m, control.Join):
            out = r.join(w, m.conn, m.role, m.path, m.n, m.info)
        elif isinstance(m, control.Leave):
            out = r.leave(w, m.conn)
        elif isinstance(m, control.ReceiverEnded):
            out = r.receiver_ended(w, m.slot, m.gen, m.conn, m.ok)
        elif isinstance(m, control.BodyEnded):
            out = r.body_ended(w, m.slot, m.gen, m.nbytes)
        elif isinstance(m, control.SenderLost):
            out = r.sender_lost(w, m.slot, m.gen, m.outcome, m.reason, m.nbytes)
        elif isinstance(m, control.Released):
            r.released(w, m.slot, m.gen, m.role)
            out = []
        else:
            raise AssertionError(f"unexpected control message {m!r}")
        for worker, message in out:
            self.loop.call_soon(self.parts[worker].handle, message)

    def messages(self, kind) -> list:
        return [m for _, m in self.reports if isinstance(m, kind)]

    # -- parties ----------------------------------------------------------------------------
    def _pair(self, tcp: bool = False, rcvbuf: int | None = None
              ) -> tuple[socket.socket, socket.socket]:
        """(relay's end, test's end): a socketpair, or a TCP connection over 127.0.0.1 where
        TCP's own behaviour matters (a reset); rcvbuf: the relay end's receive buffer."""
        if not tcp:
            relay_end, test_end = socket.socketpair()
        else:
            with socket.socket() as listener:
                if rcvbuf:              # before listen: the window scale is agreed at connect
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                test_end = socket.create_connection(listener.getsockname())
                relay_end, _ = listener.accept()
            relay_end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socks += [relay_end, test_end]
        return relay_end, test_end

    def sender(self, n: int, *, worker: int = 0, length: int | None = None,
               with_head: bytes = b"", query: bytes = b"", tcp: bool = False,
               rcvbuf: int | None = None) -> SenderPeer:
        """A sender of a Content-Length body (length given) or a chunked one; with_head:
        body bytes written together with the head, so the head parser reads them too."""
        relay_end, test_end = self._pair(tcp, rcvbuf)
        framing = (b"Content-Length: %d\r\n" % length if length is not None
                   else b"Transfer-Encoding: chunked\r\n")
        head = (b"PUT %s?n=%d%s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-bench"
                b"\r\n%s\r\n" % (PATH, n, query, framing))
        test_end.sendall(head + with_head)
        conn = self.parts[worker].accept(relay_end)
        self.sender_peer = SenderPeer(self, test_end, conn)
        return self.sender_peer

    def receiver(self, n: int, *, worker: int, version: str = "1.1",
                 sndbuf: int | None = None, tcp: bool = False) -> ReceiverPeer:
        relay_end, test_end = self._pair(tcp)
        if sndbuf:
            relay_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        host = b"Host: bench\r\n" if version == "1.1" else b""
        test_end.sendall(b"GET %s?n=%d HTTP/%s\r\n%s\r\n" % (PATH, n, version.encode(), host))
        conn = self.parts[worker].accept(relay_end)
        peer = ReceiverPeer(self, test_end, conn, worker)
        self.peers.append(peer)
        return peer

    # -- running ----------------------------------------------------------------------------
    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await asyncio.sleep(POLL_S)

    def run_until(self, predicate: Callable[[], bool], what: str,
                  timeout: float = TIMEOUT_S) -> None:
        async def wait():
            while not predicate():
                if self.errors:
                    raise AssertionError(f"an error in a loop callback: {self.errors[0]}")
                for task in self.tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()
                await asyncio.sleep(POLL_S)
        try:
            self.loop.run_until_complete(asyncio.wait_for(wait(), timeout))
        except asyncio.TimeoutError:
            raise AssertionError(f"no {what} within {timeout:g} s:\n{self.describe()}") from None

    def run_for(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def all_ended(self) -> bool:
        """Every receiver reported and its client saw the end of its response."""
        return all(p.ended() is not None and p.eof for p in self.peers)

    def finished(self) -> bool:
        """All of the above, and every worker index gave its slot back."""
        return self.all_ended() and self.registry.slots.in_use == 0

    def describe(self) -> str:
        lines = []
        a = self.arena
        f = ring.SlotFields(a, 0)
        lines.append(f"slot: tail={a.load(f.tail)} state={a.load(f.state)} "
                     f"wake_at={a.load(f.wake_at)} spill_active={a.load(f.spill_active)} "
                     f"spill_end={a.load(f.spill_end)} drop_below={a.load(f.drop_below)} "
                     + " ".join(f"w{w}:cursor={a.load(f.cursor(w))},"
                                f"file={a.load(f.file_cursor(w))},"
                                f"waiting={a.load(f.waiting(w))}" for w in range(a.worker_slots)))
        for part in self.parts:
            for s in part.senders.values():
                lines.append(f"w{part.index} sender: {s.state} tail={s.ring.tail} "
                             f"published={s.ring.published} lowest={s.ring.lowest} "
                             f"limit={s.ring.limit} punched_end={s.ring.punched_end} "
                             f"hold_at={s.ring.hold_at} spill={getattr(s.spill, 'state', None)}")
            for g in part.groups.values():
                lines.append(f"w{part.index} group: published={g.reader.published} "
                             f"published_file={g.reader.published_file}")
                for r in g.receivers:
                    lines.append(f"w{part.index} receiver {r.conn.id}: cursor={r.cursor} "
                                 f"blocked={r.blocked} in_file={r.in_file}")
        for p in self.peers:
            lines.append(f"peer {p.conn_id}@w{p.worker}: {len(p.data)} bytes eof={p.eof} "
                         f"stalled={p.stalled} ended={p.ended()}")
        lines.append(f"reports: {[m for _, m in self.reports][-12:]}")
        lines.extend(self.log[-5:])
        return "\n".join(lines)

    # -- checking ---------------------------------------------------------------------------
    def relay_failures(self) -> list[str]:
        return [line for line in self.log if "failed in the relay" in line]

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for part in self.parts:
            for stream in part.senders.values():
                if stream.spill is not None:
                    stream.spill.close()
            for group in part.groups.values():
                if group.spill is not None:
                    group.spill.close()
            for conn in list(part.conns.values()):
                conn.close()
        for fd in self.eventfds:
            self.loop.remove_reader(fd)
        for sock in self.socks:
            if sock.fileno() >= 0:
                try:
                    self.loop.remove_reader(sock.fileno())
                    self.loop.remove_writer(sock.fileno())
                except (ValueError, OSError):
                    pass
                sock.close()
        if self.tasks:
            self.loop.run_until_complete(asyncio.gather(*self.tasks, return_exceptions=True))
        self.loop.close()
        for fd in self.eventfds:
            os.close(fd)
        self.arena.close()


# -- what a client sees -----------------------------------------------------------------------
class Response(types.SimpleNamespace):
    """status, version, headers (lowercased names), raw (the body bytes on the wire), body
    (de-chunked), complete (terminator seen / Content-Length reached / closed without a
    reset), frames [(start, end)] of each chunk in raw."""


def parse_response(data: bytes, reset: bool) -> Response:
    head, sep, raw = data.partition(b"\r\n\r\n")
    if not sep:
        return Response(status=0, version="", headers={}, raw=b"", body=b"", complete=False,
                        frames=[])
    lines = head.split(b"\r\n")
    version, status = lines[0].split(b" ")[0].decode(), int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        return Response(status=status, version=version, headers=headers, raw=raw,
                        body=raw[:length], complete=len(raw) == length, frames=[])
    if headers.get(b"transfer-encoding") != b"chunked":
        return Response(status=status, version=version, headers=headers, raw=raw, body=raw,
                        complete=not reset, frames=[])
    body, frames, complete = dechunk(raw)
    return Response(status=status, version=version, headers=headers, raw=raw, body=body,
                    complete=complete, frames=frames)


def dechunk(raw: bytes) -> tuple[bytes, list[tuple[int, int]], bool]:
    """Strictly: (data, [(start, end)] of each chunk frame, whether `0\\r\\n\\r\\n` ended it
    with nothing after it). Stops at the first byte that is not valid framing."""
    out, frames, i = [], [], 0
    while True:
        j = raw.find(b"\r\n", i)
        if j < 0:
            return b"".join(out), frames, False
        size_text = raw[i:j].split(b";")[0]
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            return b"".join(out), frames, False
        size = int(size_text, 16)
        if size == 0:
            return b"".join(out), frames, raw[j:] == b"\r\n\r\n"
        end = j + 2 + size + 2
        if len(raw) < end or raw[end - 2:end] != b"\r\n":
            out.append(raw[j + 2:j + 2 + size])
            return b"".join(out), frames, False
        out.append(raw[j + 2:j + 2 + size])
        frames.append((i, end))
        i = end


# -- bodies and how they are cut -------------------------------------------------------------
def payload(size: int, seed: int = 1) -> bytes:
    import random
    return random.Random(seed).randbytes(size)


def cut(data: bytes, ends: list[int], start: int = 0) -> list[bytes]:
    """data[start:] in pieces ending at each of `ends` (positions in data)."""
    pieces, at = [], start
    for end in ends:
        pieces.append(data[at:end])
        at = end
    assert at == len(data), (at, len(data))
    return pieces


def stepped(targets: list[int], start: int, step: int) -> list[int]:
    """Piece ends from start: every target, and points between them no more than `step`
    apart."""
    ends, at = [], start
    for target in targets:
        count = -(-(target - at) // step)
        ends += [at + (target - at) * i // count for i in range(1, count + 1)]
        at = target
    return ends


def chunked_wire(body_rng, total: int, seed: int = 2) -> tuple[bytes, bytes]:
    """A sender's chunked framing of exactly `total` bytes, terminator included: chunk sizes
    from 1 byte to 40 KiB, size lines in either case, some with extensions. Returns (wire,
    the body it carries)."""
    import random
    rng = random.Random(seed)
    wire, body = [], []
    length = 0
    while True:
        left = total - length - 5
        if left < 70_000:
            break
        size = rng.choice([rng.randint(1, 64), rng.randint(1000, 40_000)])
        line = (b"%X" if rng.random() < 0.5 else b"%x") % size
        if rng.random() < 0.1:
            line += b";bench=1"
        data = body_rng(size)
        wire += [line, b"\r\n", data, b"\r\n"]
        body.append(data)
        length += len(line) + 4 + size
    data = body_rng(left - 12)                # the last chunk fills the rest exactly
    wire += [b"%08x\r\n" % len(data), data, b"\r\n", b"0\r\n\r\n"]
    body.append(data)
    wire = b"".join(wire)
    assert len(wire) == total
    return wire, b"".join(body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)

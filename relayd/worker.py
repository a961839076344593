"""One worker process: its own SO_REUSEPORT listener, a uvloop loop, its connections, and its
half of each pipe's data path. It talks to the supervisor over a SOCK_SEQPACKET control
socket (rare messages: joins, starts, outcomes) and to other workers only through the shared
arena and their eventfds (every byte).

Lifecycle: forked by the supervisor; dies with it (PR_SET_PDEATHSIG, then a getppid check,
and EOF on the control socket). SIGTERM: stop accepting, let transfers finish within the
graceful timeout, then abort the rest visibly. SIGQUIT: exit at once. SIGINT is the
supervisor's to handle (a terminal sends it to the whole process group).
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback

import uvloop

from relayd import __version__, logs, ring
from relayd.config import Config
from relayd.protocol import Connection, HttpError, simple_response
from relayd.streaming import ReceiverGroup, SenderStream

PR_SET_PDEATHSIG = 1
ACCEPT_BATCH = 64
STATS_INTERVAL_S = 1.0
EXIT_BOOT_FAILURE = 3          # the supervisor stops respawning on this code


class WorkerStats:
    """Counted locally on the data path, published to the arena about once a second."""

    __slots__ = ("bytes_in", "bytes_out", "senders", "receivers")

    def __init__(self):
        self.bytes_in = self.bytes_out = self.senders = self.receivers = 0


TRIM_AFTER_CLOSED = 1000        # connections gone since the last trim
AUTH_STATUSES = (401, 403, 429)


def trim_heap() -> None:
    """Return free heap pages to the kernel: glibc keeps them after 10,000 connections close,
    and the RSS would stay at its peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:      # the parent died before prctl took effect
        os._exit(0)


def bind_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class Worker:
    def __init__(self, config: Config, arena: ring.Arena, index: int, eventfds: list[int],
                 control: socket.socket, port: int, parent_pid: int):
        self.config = config
        self.arena = arena
        self.index = index
        self.eventfds = eventfds
        self.control = control
        self.port = port
        self.parent_pid = parent_pid
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listener: socket.socket | None = None
        self.conns: dict[int, Connection] = {}
        self.next_conn_id = 1
        self.conn_peak = 0
        self.senders: dict[int, SenderStream] = {}
        self.groups: dict[int, ReceiverGroup] = {}
        self.waiting_senders: dict[int, Connection] = {}      # fd -> sender watched for hang-up
        self.epoll = select.epoll()
        self.outbox: list[bytes] = []
        self.stats = WorkerStats()
        self.rejections: dict[int, int] = {}
        self.draining = False           # SIGTERM: waiting parties are told 503, then exit
        self.retiring = False           # reload: stop accepting, exit when the last pipe ends
        self.started = time.time()
        self.auth = None
        # Spill budget: the daemon's, split evenly between the workers.
        self.spill_share = config.spill_budget // max(1, config.workers)
        if config.secret_file:
            from relayd.auth import Authorizer
            self.auth = Authorizer.from_file(config.secret_file)

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        die_with_parent(self.parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.listener = bind_listener(self.config.host, self.port)
        except OSError as e:
            print(f"relayd worker {self.index}: cannot listen on {self.config.host}:{self.port}: "
                  f"{e.strerror}", file=sys.stderr)
            return EXIT_BOOT_FAILURE
        a = self.arena
        a.store(a.stat_index(self.index, ring.STAT_PID), os.getpid())
        self.control.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self.on_accept)
        self.loop.add_reader(self.eventfds[self.index], self.on_kick)
        self.loop.add_reader(self.control.fileno(), self.on_control)
        self.loop.add_reader(self.epoll.fileno(), self.on_epoll)
        self.loop.add_signal_handler(signal.SIGTERM, self.handle_term)
        self.loop.add_signal_handler(signal.SIGQUIT, self.handle_quit)
        self.loop.call_later(STATS_INTERVAL_S, self.publish_stats)
        # Only once the loop runs: uvloop installs its signal wake-up pipe when run_forever
        # starts, and a SIGTERM arriving between "ready" and then would be lost.
        self.loop.call_soon(self.report, "ready", os.getpid())
        # Everything built so far lives as long as the worker: keep it out of the cyclic
        # collector's full passes, which would otherwise walk it on the data path's time.
        gc.freeze()
        try:
            self.loop.run_forever()
        finally:
            self.publish_stats(reschedule=False)
        return 0

    def handle_term(self) -> None:
        """Graceful: stop accepting, close idle and waiting parties, finish transfers."""
        if self.draining:
            return
        self.draining = True
        self.stop_accepting()
        for conn in list(self.conns.values()):
            if conn.phase in (Connection.HEAD, Connection.JOINING, Connection.WAITING):
                if conn.phase == Connection.HEAD:
                    if conn.requests and conn.head_bytes == 0:
                        conn.close()      # idle keep-alive; a fresh one is still served
                elif conn.role == "sender" and conn.head_sent:
                    conn.write_progress("[ERROR] the relay is shutting down\n")
                    conn.close_after_progress()
                else:
                    conn.fail(HttpError(503, "the relay is shutting down; retry",
                                        b"Retry-After: 1\r\n"))
        self.loop.call_later(self.config.graceful_timeout_s, self.abort_all)
        self.exit_when_idle()

    def on_retire(self) -> None:
        """Reload: a new generation listens. Stop accepting and close idle keep-alive
        connections, but keep waiting parties (the registry still matches them with parties
        at the new workers) and transfers; exit when the last one has ended."""
        if self.retiring or self.draining:
            return
        self.retiring = True
        self.stop_accepting()
        for conn in list(self.conns.values()):
            if conn.phase == Connection.HEAD and conn.requests and conn.head_bytes == 0:
                conn.close()
        self.exit_when_idle()

    def exit_when_idle(self) -> None:
        """Called whenever a connection or a stream goes: stop once nothing is left."""
        if (self.retiring or self.draining) and not (self.senders or self.groups or self.conns):
            self.loop.call_soon(self.loop.stop)

    def abort_all(self) -> None:
        for stream in list(self.senders.values()):
            stream.abort("the relay shut down before the body ended")
        for conn in list(self.conns.values()):
            conn.close(reset=True)
        self.loop.stop()

    def handle_quit(self) -> None:
        os._exit(0)

    def stop_accepting(self) -> None:
        """Close the listener after taking what is queued on it: connections still queued
        on a closing listener are reset, not migrated to another worker's."""
        if self.listener is not None:
            self.on_accept(batch=1 << 30)
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None

    # -- accepting -------------------------------------------------------------------------
    def on_accept(self, batch: int = ACCEPT_BATCH) -> None:
        for _ in range(batch):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return      # out of descriptors: the backlog holds them until we can
                raise
            if len(self.conns) >= self.config.max_connections:
                sock.setblocking(False)
                try:
                    sock.send(simple_response(
                        503, b"[ERROR] the relay is at its connection limit; retry\n",
                        extra=b"Retry-After: 1\r\n"))
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn_id = self.next_conn_id
            self.next_conn_id += 1
            self.conns[conn_id] = Connection(self, sock, conn_id, f"{peer[0]}:{peer[1]}")
            self.conn_peak = max(self.conn_peak, len(self.conns))

    def forget(self, conn: Connection) -> None:
        self.conns.pop(conn.id, None)
        if self.waiting_senders.pop(conn.fd, None) is not None:
            try:
                self.epoll.unregister(conn.fd)
            except OSError:
                pass
        self.exit_when_idle()

    # -- rendezvous (control plane) --------------------------------------------------------
    def join_pipe(self, conn: Connection, info: dict) -> None:
        if self.draining:
            raise HttpError(503, "the relay is shutting down; retry", b"Retry-After: 1\r\n")
        if conn.role == "sender":
            # Its body stays unread until the transfer starts; watch it for hang-ups only.
            self.loop.remove_reader(conn.fd)
            self.waiting_senders[conn.fd] = conn
            self.epoll.register(conn.fd, select.EPOLLRDHUP | select.EPOLLET)
            self.stats.senders += 1
        else:
            self.stats.receivers += 1
        # Party counts are rare events: published at once, so /health is exact.
        a = self.arena
        a.store(a.stat_index(self.index, ring.STAT_SENDERS), self.stats.senders)
        a.store(a.stat_index(self.index, ring.STAT_RECEIVERS), self.stats.receivers)
        self.access(conn, 200, conn.role)
        self.report("join", conn.id, conn.role, conn.path, conn.n, info)

    def connection_lost(self, conn: Connection) -> None:
        if conn.phase in (Connection.JOINING, Connection.WAITING):
            self.report("leave", conn.id)
        elif conn.phase == Connection.STREAMING and isinstance(conn.stream, SenderStream):
            conn.stream.abort("the sender's connection was lost")

    def on_epoll(self) -> None:
        for fd, events in self.epoll.poll(0):
            conn = self.waiting_senders.get(fd)
            if conn is None:
                continue
            if events & (select.EPOLLHUP | select.EPOLLERR):
                conn.lost()
            elif events & select.EPOLLRDHUP:
                # Half-closed or gone? A line to a gone peer draws a reset (EPOLLERR).
                conn.write_progress("[INFO] Still waiting for receivers.\n")

    def report(self, *message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if not self.outbox:
            try:
                self.control.send(data)
                return
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.control.fileno(), self.flush_control)
            except OSError:
                self.handle_quit()
        self.outbox.append(data)

    def flush_control(self) -> None:
        while self.outbox:
            try:
                self.control.send(self.outbox[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.handle_quit()
            self.outbox.pop(0)
        self.loop.remove_writer(self.control.fileno())

    def on_control(self) -> None:
        while True:
            try:
                data = self.control.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:             # the supervisor is gone: so are we
                os._exit(0)
            message = pickle.loads(data)
            try:
                getattr(self, "on_" + message[0])(*message[1:])
            except Exception:        # a bug in one message must not strand the ones after it
                logs.message(f"worker {self.index}: error handling {message[0]}: "
                             + traceback.format_exc().strip().replace("\n", " | "))

    def _party(self, conn_id: int) -> Connection | None:
        conn = self.conns.get(conn_id)
        if conn is None or conn.phase not in (Connection.JOINING, Connection.WAITING):
            return None
        return conn

    def on_rejected(self, conn_id: int, status: int, reason: str) -> None:
        conn = self._party(conn_id)
        if conn is None:
            return
        if conn.head_sent:
            conn.write_progress(f"[ERROR] {reason}\n")
            conn.close_after_progress()
        else:
            conn.fail(HttpError(status, reason))

    def on_expired(self, conn_id: int, reason: str) -> None:
        self.on_rejected(conn_id, 408, reason)

    def on_progress(self, conn_id: int, connected: int, n: int) -> None:
        conn = self._party(conn_id)
        if conn is None:
            return
        if conn.phase == Connection.JOINING:
            conn.phase = Connection.WAITING
            conn.accept_sender()
            conn.write_progress(f"[INFO] Waiting for {n} receiver(s)...\n")
        conn.write_progress(f"[INFO] {connected} of {n} receiver(s) connected.\n")

    def on_start_sender(self, conn_id: int, slot: int, gen: int, mode: str, n: int,
                        receiver_workers: list[int]) -> None:
        conn = self._party(conn_id)
        if conn is not None:
            if self.waiting_senders.pop(conn.fd, None) is not None:
                self.epoll.unregister(conn.fd)
            if conn.phase == Connection.JOINING:
                conn.accept_sender()
            conn.write_progress(f"[INFO] Start sending to {n} receiver(s)!\n")
        if conn is None or conn.phase == Connection.CLOSED:
            # It left as the rendezvous completed: the receivers see an empty, aborted body.
            f = ring.SlotFields(self.arena, slot)
            self.arena.store(f.state, ring.ABORTED)
            ring.fence()
            for w in receiver_workers:
                self.kick(w)
            self.report("sender_lost", slot, gen, "the sender left as the transfer started", 0)
            self.report("released", slot, gen, "sender")
            return
        stream = SenderStream(self, conn, slot, gen, mode, n, receiver_workers)
        self.senders[slot] = stream
        stream.start()

    def on_start_receivers(self, slot: int, gen: int, mode: str, conn_ids: list[int],
                           info: dict) -> None:
        group = ReceiverGroup(self, slot, gen, mode, info)
        self.groups[slot] = group
        for conn_id in conn_ids:
            conn = self._party(conn_id)
            if conn is None:
                self.report("receiver_ended", slot, gen, conn_id, False)
            else:
                group.add(conn)
        group.service()

    def on_finished(self, slot: int, gen: int, ok: int, lost: int) -> None:
        stream = self.senders.get(slot)
        if stream is not None and stream.gen == gen:
            stream.finished(ok, lost)

    def on_abort_sender(self, slot: int, gen: int, reason: str) -> None:
        stream = self.senders.get(slot)
        if stream is not None and stream.gen == gen:
            stream.receivers_gone(reason)

    def spill_in_use(self) -> int:
        """Spill bytes this worker's producers hold (the lag they keep on disk)."""
        return sum(s.spill_bytes() for s in self.senders.values())

    def drop_sender(self, stream: SenderStream) -> None:
        if self.senders.get(stream.slot) is stream:
            del self.senders[stream.slot]
            self.report("released", stream.slot, stream.gen, "sender")
            self.exit_when_idle()

    def drop_group(self, group: ReceiverGroup) -> None:
        if self.groups.get(group.slot) is group:
            del self.groups[group.slot]
            self.report("released", group.slot, group.gen, "receivers")
            self.exit_when_idle()

    # -- data plane wake-ups ---------------------------------------------------------------
    def kick(self, worker: int) -> None:
        os.eventfd_write(self.eventfds[worker], 1)

    def on_kick(self) -> None:
        try:
            os.eventfd_read(self.eventfds[self.index])
        except BlockingIOError:
            pass
        for group in list(self.groups.values()):
            group.on_kick()
        for stream in list(self.senders.values()):
            stream.on_kick()

    # -- observability ---------------------------------------------------------------------
    def count_rejection(self, conn: Connection, status: int, reason: str) -> None:
        """Every refused request: counted for /metrics and logged once (access control's
        refusals are logged by relayd/auth.py, with what it knows of the credential)."""
        if status not in AUTH_STATUSES:
            # The path only: a query may carry a signature, which no log should hold.
            logs.event("rejected", status=status, method=conn.method,
                       path=conn.url.split(b"?")[0][:200], peer=conn.peer, worker=self.index,
                       reason=reason)
        if status not in ring.REJECTION_STATUSES:
            status = 0
        self.rejections[status] = self.rejections.get(status, 0) + 1

    def access(self, conn: Connection, status: int, role: str = "") -> None:
        if self.config.access_log:
            logs.event("request", method=conn.method, path=conn.url[:200], status=status,
                       peer=conn.peer, worker=self.index, role=role or "-")

    def publish_stats(self, reschedule: bool = True) -> None:
        a, i, s = self.arena, self.index, self.stats
        a.store(a.stat_index(i, ring.STAT_CONNECTIONS), len(self.conns))
        a.store(a.stat_index(i, ring.STAT_SENDERS), s.senders)
        a.store(a.stat_index(i, ring.STAT_RECEIVERS), s.receivers)
        a.store(a.stat_index(i, ring.STAT_BYTES_IN), s.bytes_in)
        a.store(a.stat_index(i, ring.STAT_BYTES_OUT), s.bytes_out)
        a.store(a.stat_index(i, ring.STAT_HEARTBEAT), int(time.time()))
        a.store(a.stat_index(i, ring.STAT_PIPES_ACTIVE), len(self.senders) + len(self.groups))
        a.store(a.stat_index(i, ring.STAT_SENDERS_STREAMING), len(self.senders))
        a.store(a.stat_index(i, ring.STAT_RECEIVERS_STREAMING),
                sum(len(g.receivers) for g in self.groups.values()))
        a.store(a.stat_index(i, ring.STAT_MAX_LAG),
                max((g.max_lag() for g in self.groups.values()), default=0))
        for k, status in enumerate(ring.REJECTION_STATUSES):
            a.store(a.stat_index(i, ring.STAT_REJECTED0 + k), self.rejections.get(status, 0))
        a.store(a.stat_index(i, ring.STAT_SPILL_BYTES), self.spill_in_use())
        if reschedule:
            self.check_timeouts()
            self.loop.call_later(STATS_INTERVAL_S, self.publish_stats)

    def check_timeouts(self) -> None:
        """Once a second, not on the data path: stalled receivers, idle senders, and memory
        handed back after a crowd of connections left."""
        if self.conn_peak - len(self.conns) > TRIM_AFTER_CLOSED:
            gc.collect()
            trim_heap()
            self.conn_peak = len(self.conns)
        now, c = self.loop.time(), self.config
        for group in list(self.groups.values()):
            group.close_stalled(now, c.receiver_stall_timeout_s)
            group.service()      # belt and braces: a lost wake-up costs a second, not a hang
        for stream in list(self.senders.values()):
            stream.check_idle(now, c.sender_idle_timeout_s)
            stream.on_kick()

    def health(self) -> dict:
        self.publish_stats(reschedule=False)
        a = self.arena
        workers = []
        for i in range(a.worker_slots):
            pid = a.load(a.stat_index(i, ring.STAT_PID))
            if not pid:
                continue
            stat = lambda field: a.load(a.stat_index(i, field))  # noqa: E731
            workers.append({
                "index": i, "pid": pid, "connections": stat(ring.STAT_CONNECTIONS),
                "senders": stat(ring.STAT_SENDERS), "receivers": stat(ring.STAT_RECEIVERS),
                "bytes_in": stat(ring.STAT_BYTES_IN), "bytes_out": stat(ring.STAT_BYTES_OUT),
                "active_transfers": stat(ring.STAT_PIPES_ACTIVE),
                "receiver_lag_max_bytes": stat(ring.STAT_MAX_LAG),
                "spill_bytes": stat(ring.STAT_SPILL_BYTES)})
        sup = lambda field: a.load(a.sup_index(field))  # noqa: E731
        return {
            "status": "draining" if self.draining else "ok",
            "version": __version__,
            "uptime_s": round(time.time() - sup(ring.SUP_STARTED_AT), 3),
            "answered_by": self.index,
            "workers_alive": len(workers),
            "pipes_waiting": sup(ring.SUP_PIPES_WAITING),
            "pipes_streaming": sup(ring.SUP_PIPES_STREAMING),
            "slots_in_use": sup(ring.SUP_SLOTS_IN_USE),
            "transfers_done": sup(ring.SUP_TRANSFERS_DONE),
            "transfers_aborted": sup(ring.SUP_TRANSFERS_ABORTED),
            "worker_restarts": sup(ring.SUP_RESTARTS),
            "arena_resident_bytes": a.resident_bytes(),
            "workers": workers,
        }

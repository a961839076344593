"""One worker process: its seat's SO_REUSEPORT listener (listeners.py), a uvloop loop, its
connections, and its half of each pipe's data path. It talks to the supervisor over its
control channel (rare messages: joins, starts, outcomes; control.py) and to other workers
only through the shared arena and their eventfds (every byte).

The worker wires parts that know nothing of it: each Connection, SenderStream and
ReceiverGroup gets what it uses and a few callbacks (hooks), never the worker.

Lifecycle: forked by the supervisor; dies with it (PR_SET_PDEATHSIG, then a getppid check,
and EOF on the control channel). Retire (a reload's new generation listens): stop accepting
(the successor on the same seat takes the queue), keep waiting parties and transfers, exit
when the last one ends. SIGTERM: stop accepting, answer waiting parties 503, let transfers
finish within the graceful timeout, then abort the rest visibly. SIGQUIT: exit at once.
SIGINT and SIGHUP are the supervisor's.

Every callback that runs a piece of one pipe is guarded: an exception is logged with that
pipe and aborts it alone; the once-a-second tick beats the heartbeat first and guards each
step, so the worker never stops beating because one pipe failed.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import os
import signal
import socket
import traceback

import uvloop

from relayd import control, logs, metrics, ring, stats
from relayd.auth import Authorizer
from relayd.config import Config
from relayd.connection import Connection, ConnectionHooks, Phase
from relayd.delivery import DeliveryLimits, GroupHooks, ReceiverGroup
from relayd.hangups import HangupWatch
from relayd.http import HttpError, error_body, simple_response
from relayd.producer import SenderHooks, SenderStream, SpillPlan
from relayd.routing import PipeRequest, health_json, route
from relayd.spill import SpillBudget
from relayd.splice import SpliceHooks, SpliceStream
from relayd.splice import Receiver as SplicedReceiver

PR_SET_PDEATHSIG = 1
ACCEPT_BATCH = 64
ACCEPT_BACKOFF_S = 0.1          # out of descriptors: accept again after this
TICK_S = 1.0                    # heartbeat, counters, timeouts
TRIM_AFTER_CLOSED = 1000        # connections gone since the last trim
AUTH_STATUSES = (401, 403, 429)
RETRY_AFTER = b"Retry-After: 1\r\n"


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


def kick_marked(arena: ring.Arena, index: int, groups: dict, senders: dict) -> None:
    """Worker `index` was kicked: run the receiver group and the producer of each slot marked
    for it -- only those, so a pass costs the pipes that moved, not all of the worker's.
    The marks are cleared before the parts run, so one part's exception (past its own guard)
    must not end the loop and spend the other slots' kicks: each part runs on its own. The
    failed one is looked at again by the tick's pass over every pipe, not re-kicked at once
    (a part that kept failing would spin the loop)."""
    for slot in arena.take_marks(index):
        for part in (groups.get(slot), senders.get(slot)):
            if part is None:
                continue
            try:
                part.on_kick()
            except Exception:
                logs.message(f"worker {index}: error in a kick of slot {slot}: " + trace())


def trace() -> str:
    return traceback.format_exc().strip().replace("\n", " | ")


class Worker:
    def __init__(self, config: Config, arena: ring.Arena, index: int, eventfds: list[int],
                 control_sock: socket.socket, listener: socket.socket | None, parent_pid: int):
        self.config = config
        self.arena = arena
        self.index = index
        self.eventfds = eventfds
        self.control_sock = control_sock
        self.parent_pid = parent_pid
        self.loop: asyncio.AbstractEventLoop | None = None
        self.channel: control.Channel | None = None
        self.listener = listener        # its seat, inherited from the supervisor
        self.accept_paused = False
        self.accept_failures = 0
        self.conns: dict[int, Connection] = {}
        self.next_conn_id = 1
        self.conn_peak = 0
        self.senders: dict[int, SenderStream] = {}     # slot -> stream
        self.groups: dict[int, ReceiverGroup] = {}     # slot -> group
        self.splices: dict[int, SpliceStream] = {}     # slot -> n = 1 stream
        self.adopted = 0                # receivers' sockets handed over by other workers
        self.hangups = HangupWatch(self.on_sender_hangup)
        self.counters = stats.WorkerCounters()
        self.block = stats.WorkerBlock(arena, index)
        self.spill_budget = SpillBudget(arena, self.block, config.spill_budget)
        self.draining = False           # SIGTERM: waiting parties are told 503, then exit
        self.retiring = False           # reload: stop accepting, exit when the last pipe ends
        self.authorizer = Authorizer.from_file(config.secret_file) if config.secret_file \
            else None
        self.handlers: control.Handlers = {
            control.Rejected: self.on_rejected, control.Expired: self.on_expired,
            control.Progress: self.on_progress, control.StartSender: self.on_start_sender,
            control.StartReceivers: self.on_start_receivers,
            control.Finished: self.on_finished, control.AbortSender: self.on_abort_sender,
            control.Retire: self.on_retire, control.StartSplice: self.on_start_splice,
            control.HandOver: self.on_hand_over, control.AttachReceiver: self.on_attach_receiver,
        }

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        die_with_parent(self.parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.block.claim(os.getpid())
        self.control_sock.setblocking(False)
        self.channel = control.Channel(self.control_sock,
                                       lambda: self.loop.call_soon(self.flush_control),
                                       self.want_control_write)
        self.loop.add_reader(self.listener.fileno(), self.on_accept)
        self.loop.add_reader(self.eventfds[self.index], self.on_kick)
        self.loop.add_reader(self.channel.fileno(), self.on_control)
        self.loop.add_reader(self.hangups.fileno(), self.hangups.poll)
        self.loop.add_signal_handler(signal.SIGTERM, self.handle_term)
        self.loop.add_signal_handler(signal.SIGQUIT, self.handle_quit)
        self.loop.call_later(TICK_S, self.tick)
        # Only once the loop runs: uvloop installs its signal wake-up pipe when run_forever
        # starts, and a SIGTERM arriving between "ready" and then would be lost.
        self.loop.call_soon(self.report, control.Ready(os.getpid()))
        # Everything built so far lives as long as the worker: keep it out of the cyclic
        # collector's full passes, which would otherwise walk it on the data path's time.
        gc.freeze()
        try:
            self.loop.run_forever()
        finally:
            self.publish_stats()
            self.channel.flush()
        return 0

    def handle_term(self) -> None:
        """Graceful: stop accepting, close idle and waiting parties, finish transfers."""
        if self.draining:
            return
        self.draining = True
        self.stop_accepting()
        for conn in list(self.conns.values()):
            if conn.phase is Phase.HEAD:
                if conn.requests and conn.head_bytes == 0:
                    conn.close()      # idle keep-alive; a fresh one is still served
            elif conn.is_party:
                if conn.role == "sender" and conn.head_sent:
                    conn.write_progress("[ERROR] the relay is shutting down\n")
                    self.party_left(conn)
                    conn.close_gracefully()
                else:
                    conn.fail(HttpError(503, "the relay is shutting down; retry", RETRY_AFTER))
        self.loop.call_later(self.config.graceful_timeout_s, self.abort_all)
        self.exit_when_idle()

    def on_retire(self, message: control.Retire) -> None:
        """Reload: a new generation listens. Stop accepting and close idle keep-alive
        connections, but keep waiting parties (the registry still matches them with parties
        at the new workers) and transfers; exit when the last one has ended."""
        if self.retiring or self.draining:
            return
        self.retiring = True
        self.stop_accepting()
        for conn in list(self.conns.values()):
            if conn.phase is Phase.HEAD and conn.requests and conn.head_bytes == 0:
                conn.close()
        self.exit_when_idle()

    def exit_when_idle(self) -> None:
        """Called whenever a connection or a stream goes: stop once nothing is left."""
        if (self.retiring or self.draining) and not (self.senders or self.groups or self.conns
                                                     or self.splices or self.adopted):
            self.loop.call_soon(self.loop.stop)

    def abort_all(self) -> None:
        for stream in [*self.senders.values(), *self.splices.values()]:
            stream.abort("the relay shut down before the body ended", control.Outcome.SHUTDOWN)
        for conn in list(self.conns.values()):
            conn.close(reset=True)
        self.loop.stop()

    def handle_quit(self) -> None:
        os._exit(0)

    def stop_accepting(self) -> None:
        """Stop taking connections from this worker's seat, after taking what is queued: on
        a stop this copy is the last (the supervisor closed its own), and closing the last
        resets the queue. On a retirement the successor would take it; taking it here costs
        nothing."""
        if self.listener is not None:
            self.on_accept(batch=1 << 30)
            if not self.accept_paused:
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
                if e.errno == errno.ECONNABORTED:
                    continue             # gone before we took it
                self.pause_accepting(e)
                return
            if len(self.conns) >= self.config.max_connections:
                sock.setblocking(False)
                reason = "the relay is at its connection limit; retry"
                try:
                    sock.send(simple_response(503, error_body(reason), extra=RETRY_AFTER))
                except OSError:
                    pass
                sock.close()
                # Counted and logged as every refusal is (no request was read: no path).
                logs.event("rejected", status=503, peer=f"{peer[0]}:{peer[1]}",
                           worker=self.index, reason=reason)
                self.counters.reject(503)
                continue
            sock.setblocking(False)           # TCP_NODELAY comes from the listener
            conn_id = self.next_conn_id
            self.next_conn_id += 1
            self.conns[conn_id] = Connection(sock, conn_id, f"{peer[0]}:{peer[1]}", self.loop,
                                             self.config, self.connection_hooks)
            self.conn_peak = max(self.conn_peak, len(self.conns))

    def pause_accepting(self, error: OSError) -> None:
        """Out of descriptors (EMFILE, ENFILE) or memory: the backlog holds new connections
        while we stop accepting for a moment, as nginx does; one log line per episode."""
        if self.accept_paused or self.listener is None:
            return
        self.accept_paused = True
        self.accept_failures += 1
        if self.accept_failures == 1:
            logs.message(f"worker {self.index}: accept failed ({error.strerror}); pausing "
                         f"accepts for {ACCEPT_BACKOFF_S:g} s at a time until it succeeds")
        self.loop.remove_reader(self.listener.fileno())
        self.loop.call_later(ACCEPT_BACKOFF_S, self.resume_accepting)

    def resume_accepting(self) -> None:
        self.accept_paused = False
        if self.listener is None:
            return
        self.loop.add_reader(self.listener.fileno(), self.on_accept)
        before = self.accept_failures
        self.on_accept()
        if not self.accept_paused and before:
            logs.message(f"worker {self.index}: accepting again")
            self.accept_failures = 0

    # -- connections -----------------------------------------------------------------------
    @property
    def connection_hooks(self) -> ConnectionHooks:
        hooks = getattr(self, "_hooks", None)
        if hooks is None:
            hooks = self._hooks = ConnectionHooks(
                route=lambda request: route(request, self), pipe=self.join_pipe,
                left=self.party_left, closed=self.forget, answered=self.access,
                refused=self.count_rejection,
                may_keep_alive=lambda: not (self.retiring or self.draining))
        return hooks

    def forget(self, conn: Connection) -> None:
        self.conns.pop(conn.id, None)
        self.hangups.discard(conn)
        self.exit_when_idle()

    # -- the site: what reserved paths show ------------------------------------------------
    def health(self) -> tuple[bool, bytes]:
        self.publish_stats()
        document = metrics.health(stats.read(self.arena), self.draining, self.index)
        return not self.draining, health_json(document)

    def metrics(self) -> bytes:
        self.publish_stats()                       # this worker's figures are exact
        return metrics.prometheus(stats.read(self.arena), self.parent_pid)

    # -- rendezvous (control plane) --------------------------------------------------------
    def join_pipe(self, conn: Connection, pipe: PipeRequest) -> None:
        if self.draining:
            raise HttpError(503, "the relay is shutting down; retry", RETRY_AFTER)
        if pipe.role == "sender":
            # Its body stays unread until the transfer starts; watch it for hang-ups only.
            conn.stop_reading()
            self.hangups.add(conn)
            self.counters.senders += 1
        else:
            self.counters.receivers += 1
        self.block.parties(self.counters)       # rare events: published at once (/health)
        self.access(conn, 200, pipe.role)
        self.report(control.Join(conn.id, pipe.role, pipe.path, pipe.n, pipe.info))

    def party_left(self, conn: Connection) -> None:
        self.hangups.discard(conn)
        self.report(control.Leave(conn.id))

    def on_sender_hangup(self, conn: Connection, error: bool) -> None:
        """A waiting sender's peer half-closed or went. With its whole body already here it
        has handed the body over and stays in the rendezvous; else it has left."""
        if conn.holds_whole_body():
            self.hangups.discard(conn)
        else:
            conn.lost()

    def report(self, message) -> None:
        self.channel.send(message)

    def flush_control(self) -> None:
        self.channel.flush()
        if self.channel.broken:
            self.handle_quit()        # the supervisor is gone: so are we

    def want_control_write(self, on: bool) -> None:
        if on:
            self.loop.add_writer(self.channel.fileno(), self.flush_control)
        else:
            self.loop.remove_writer(self.channel.fileno())

    def on_control(self) -> None:
        messages = self.channel.receive()
        if messages is None:             # the supervisor is gone: so are we
            os._exit(0)
        for message in messages:
            try:
                control.dispatch(self.handlers, message)
            except Exception:        # a bug in one message must not strand the ones after it
                logs.message(f"worker {self.index}: error handling {type(message).__name__}: "
                             + trace())

    def _party(self, conn_id: int) -> Connection | None:
        conn = self.conns.get(conn_id)
        return conn if conn is not None and conn.is_party else None

    def on_rejected(self, m: control.Rejected) -> None:
        conn = self._party(m.conn)
        if conn is not None:             # refused at its join: it never joined
            if conn.role == "sender":
                self.counters.senders -= 1
            else:
                self.counters.receivers -= 1
            self.block.parties(self.counters)
        self._refuse(m.conn, m.status, m.reason)

    def on_expired(self, m: control.Expired) -> None:
        self._refuse(m.conn, 408, m.reason)

    def _refuse(self, conn_id: int, status: int, reason: str) -> None:
        conn = self._party(conn_id)
        if conn is None:
            return
        self.hangups.discard(conn)
        if conn.head_sent:
            # Its 200 went out already (a sender told it waits): the refusal is a progress
            # line, counted and logged as any other.
            self.count_rejection(conn, status, reason)
            conn.write_progress(f"[ERROR] {reason}\n")
            conn.close_gracefully()
        else:
            conn.fail(HttpError(status, reason))

    def on_progress(self, m: control.Progress) -> None:
        conn = self._party(m.conn)
        if conn is None:
            return
        if not conn.head_sent:
            conn.accepted()
            conn.write_progress(f"[INFO] Waiting for {m.n} receiver(s)...\n")
        conn.write_progress(f"[INFO] {m.connected} of {m.n} receiver(s) connected.\n")

    def _starting_sender(self, conn_id: int, slot: int, gen: int, n: int) -> Connection | None:
        """The sender of a transfer that starts: answered and told, or -- it left as the
        rendezvous completed -- reported lost (its receivers see an empty, aborted body)."""
        conn = self._party(conn_id)
        if conn is None:
            self.report(control.SenderLost(slot, gen, control.Outcome.SENDER_LOST,
                                           "the sender left as the transfer started", 0))
            self.report(control.Released(slot, gen, "sender"))
            return None
        self.hangups.discard(conn)
        conn.accepted()
        conn.write_progress(f"[INFO] Start sending to {n} receiver(s)!\n")
        return conn

    def on_start_sender(self, m: control.StartSender) -> None:
        writer = ring.RingWriter(self.arena, m.slot, m.receiver_workers, m.mode == "sendfile",
                                 self.config.punch_block, self.kick)
        conn = self._starting_sender(m.conn, m.slot, m.gen, m.n)
        if conn is None:
            writer.finish(0, ring.ABORTED)
            return
        c = self.config
        slow = conn.pipe.slow or c.slow
        stream = SenderStream(
            writer, conn.sock, self.loop, conn.body(),
            SpillPlan(c.spill_dir, c.spill_limit, slow == "drop", self.spill_budget),
            m.n, m.gen,
            SenderHooks(progress=conn.write_progress, close=conn.close_gracefully,
                        report=self.report, released=self.sender_released),
            self.counters, conn.path)
        conn.attach(stream)
        self.senders[m.slot] = stream
        stream.guarded(stream.start)

    def on_start_receivers(self, m: control.StartReceivers) -> None:
        c = self.config
        group = ReceiverGroup(
            ring.RingReader(self.arena, m.slot, self.index, self.kick), self.loop, m.gen,
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
                group.add(conn)
        group.guarded(group.service)
        if not group.receivers:
            group.close()

    def on_start_splice(self, m: control.StartSplice) -> None:
        """n = 1: this worker moves the body from the sender's socket to the receiver's."""
        conn = self._starting_sender(m.conn, m.slot, m.gen, 1)
        if conn is None:
            return
        stream = SpliceStream(
            conn.sock, conn.body(), m.info, self.loop, m.slot, m.gen,
            SpliceHooks(progress=conn.write_progress, close_sender=conn.close_gracefully,
                        report=self.report, released=self.splice_released),
            self.counters, conn.path)
        conn.attach(stream)
        self.splices[m.slot] = stream
        if m.receiver is None:
            return                       # its socket comes with AttachReceiver
        receiver = self._party(m.receiver)
        if receiver is None:
            self.report(control.ReceiverEnded(m.slot, m.gen, m.receiver, False))
            return
        receiver.attach(stream)
        stream.guarded(lambda: stream.attach(SplicedReceiver(
            receiver.sock, receiver.id, receiver.version,
            lambda reset: receiver.close(reset=reset))))

    def on_hand_over(self, m: control.HandOver) -> None:
        """Our receiver's pipe is spliced in the sender's worker: pass its socket there."""
        conn = self._party(m.conn)
        if conn is None:
            self.report(control.Handed(m.conn, m.slot, m.gen, "1.1", -1))
            return
        version = conn.version
        self.counters.handed_over += 1
        self.report(control.Handed(m.conn, m.slot, m.gen, version, conn.detach()))

    def on_attach_receiver(self, m: control.AttachReceiver) -> None:
        stream = self.splices.get(m.slot)
        if m.fd < 0 or stream is None or stream.gen != m.gen:
            if m.fd >= 0:
                os.close(m.fd)
            # The socket was lost on the way (this worker was out of descriptors) or the
            # pipe is gone: the receiver is lost, and its pipe resolves.
            self.report(control.ReceiverEnded(m.slot, m.gen, m.conn, False))
            return
        sock = socket.socket(fileno=m.fd)
        sock.setblocking(False)
        self.adopted += 1

        def close(reset: bool) -> None:
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01" + b"\0" * 7)
                except OSError:
                    pass
            sock.close()
            self.adopted -= 1
            self.exit_when_idle()
        stream.guarded(lambda: stream.attach(SplicedReceiver(sock, m.conn, m.version, close)))

    def splice_released(self, stream: SpliceStream) -> None:
        if self.splices.get(stream.slot) is stream:
            del self.splices[stream.slot]
            self.report(control.Released(stream.slot, stream.gen, "sender"))
            self.exit_when_idle()

    def _stream(self, slot: int, gen: int):
        stream = self.senders.get(slot) or self.splices.get(slot)
        return stream if stream is not None and stream.gen == gen else None

    def on_finished(self, m: control.Finished) -> None:
        stream = self._stream(m.slot, m.gen)
        if stream is not None:
            stream.guarded(lambda: stream.finished(m.ok, m.lost))

    def on_abort_sender(self, m: control.AbortSender) -> None:
        stream = self._stream(m.slot, m.gen)
        if stream is not None:
            stream.guarded(lambda: stream.receivers_gone(m.reason))

    def sender_released(self, stream: SenderStream) -> None:
        if self.senders.get(stream.slot) is stream:
            del self.senders[stream.slot]
            self.report(control.Released(stream.slot, stream.gen, "sender"))
            self.exit_when_idle()

    def group_released(self, group: ReceiverGroup) -> None:
        if self.groups.get(group.slot) is group:
            del self.groups[group.slot]
            self.report(control.Released(group.slot, group.gen, "receivers"))
            self.exit_when_idle()

    # -- data plane wake-ups ---------------------------------------------------------------
    def kick(self, worker: int) -> None:
        """Wake a worker (this one too) about the slots marked for it; ring.py marks them
        first. (Skipping the eventfd for our own kicks with call_soon was measured: no CPU
        saved at 1000 token pipes, p50/p99 latency at n = 50 a little worse; not kept.)"""
        os.eventfd_write(self.eventfds[worker], 1)

    def on_kick(self) -> None:
        try:
            os.eventfd_read(self.eventfds[self.index])
        except BlockingIOError:
            pass
        kick_marked(self.arena, self.index, self.groups, self.senders)

    # -- observability ---------------------------------------------------------------------
    def count_rejection(self, conn: Connection, status: int, reason: str) -> None:
        """Every refused request: counted for /metrics and logged once (access control's
        refusals are logged by relayd/auth.py, with what it knows of the credential)."""
        if status not in AUTH_STATUSES:
            # The path only: a query may carry a signature, which no log should hold.
            logs.event("rejected", status=status, method=conn.method,
                       path=conn.url.split(b"?")[0][:200], peer=conn.peer, worker=self.index,
                       reason=reason)
        self.counters.reject(status)

    def access(self, conn: Connection, status: int, role: str = "") -> None:
        if self.config.access_log:
            logs.event("request", method=conn.method, path=conn.log_url[:200], status=status,
                       peer=conn.peer, worker=self.index, role=role or "-")

    def gauges(self) -> stats.WorkerGauges:
        return stats.WorkerGauges(
            connections=len(self.conns) + self.adopted,
            pipes_active=len(self.senders) + len(self.groups) + len(self.splices),
            senders_streaming=len(self.senders) + len(self.splices),
            receivers_streaming=sum(len(g.receivers) for g in self.groups.values())
            + sum(s.receiver is not None for s in self.splices.values()),
            max_lag=max((g.max_lag() for g in self.groups.values()), default=0),
            spill_bytes=self.spill_budget.mine)

    def publish_stats(self) -> None:
        self.block.publish(self.counters, self.gauges())

    # -- the once-a-second tick ------------------------------------------------------------
    def tick(self) -> None:
        """Heartbeat first, then each chore guarded on its own: a failing pipe is aborted,
        and the next tick comes regardless."""
        self.loop.call_later(TICK_S, self.tick)
        self.block.beat()
        for chore in (self.publish_stats, self.trim, self.check_pipes):
            try:
                chore()
            except Exception:
                logs.message(f"worker {self.index}: error in {chore.__name__}: " + trace())

    def trim(self) -> None:
        """Memory handed back once a crowd of connections has left: three quarters of the
        peak gone, not while thousands are still open -- the collection walks every live
        object (26 ms at 5,500 connections), a stall of the loop for every pipe."""
        gone = self.conn_peak - len(self.conns)
        if gone > TRIM_AFTER_CLOSED and len(self.conns) * 3 <= gone:
            gc.collect()
            trim_heap()
            self.conn_peak = len(self.conns)

    def check_pipes(self) -> None:
        """Stalled receivers, idle senders; and a pass over each pipe (belt and braces: a
        lost wake-up costs a second, not a hang). Each pipe is guarded on its own."""
        now, c = self.loop.time(), self.config
        for group in list(self.groups.values()):
            group.guarded(lambda: group.close_stalled(now, c.receiver_stall_timeout_s))
            group.guarded(group.service)
        for stream in list(self.senders.values()):
            stream.guarded(lambda: stream.check_idle(now, c.sender_idle_timeout_s))
            stream.on_kick()
        for splice in list(self.splices.values()):
            splice.guarded(lambda: splice.check_timeouts(now, c.receiver_stall_timeout_s,
                                                         c.sender_idle_timeout_s))

"""The supervisor: forks workers, owns the rendezvous registry, the arena and the eventfds.
It never touches a client socket.

Shape (after gunicorn's arbiter): signal handlers only queue the signal and wake the main
loop; `run()` dispatches `handle_<sig>`; `reap_workers()` loops `waitpid(WNOHANG)`; a worker
that keeps dying at once is respawned after a growing backoff. The supervisor owns one
SO_REUSEPORT listener per --workers seat (listeners.py: connections spread evenly over the
seats, and a seat's queue outlives the worker serving it, so no reload or respawn resets a
queued connection); each worker inherits its seat's at fork. One more bound, non-listening
socket keeps the port reserved while a seat is closed.
Every control message, signal handler and loop step runs in its own try: an exception is
logged with what was being done, and the supervisor keeps serving (a supervisor that exits
takes every worker and transfer with it).

Reload (SIGHUP), as nginx does it: a new generation of workers starts, each on an old
worker's seat; once a new worker listens, the old one on its seat is told to retire: it stops
accepting (the queue is the new one's) but keeps its waiting parties (still registered, still
matched with parties that arrive at the new workers) and its transfers, and exits when the
last one ends. A seat whose new worker cannot start keeps its old one. Worker indexes are
bounded (2W, made before the first fork); a SIGHUP that finds no room for a whole new
generation is queued, and every further one coalesces into it, until an old generation has
retired.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import platform
import resource
import selectors
import signal
import socket
import sys
import time
import traceback

from relayd import __version__, control, listeners, logs, ring, spill, stats, systemd
from relayd.config import Config
from relayd.rendezvous import Registry
from relayd.worker import TRIM_AFTER_CLOSED, Worker, trim_heap

RESPAWN_BACKOFF_MAX_S = 5.0
QUICK_DEATH_S = 1.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)


def url_host(host: str) -> str:
    """A host as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


class StartupError(Exception):
    """The daemon cannot start; the message tells the user why."""


class WorkerHandle:
    def __init__(self, index: int, seat: int, pid: int, channel: control.Channel):
        self.index = index
        self.seat = seat                 # the listener it accepts from (listeners.Seats)
        self.pid = pid
        self.channel = channel
        self.ready = False
        self.spawned = time.monotonic()
        self.retiring = False
        self.told_to_retire = False
        self.killed = False


log = logs.message


class Supervisor:
    def __init__(self, config: Config):
        self.config = config
        self.pid = os.getpid()
        self.port = config.port
        self.reserved: socket.socket | None = None
        self.seats: listeners.Seats | None = None
        self.arena: ring.Arena | None = None
        self.eventfds: list[int] = []
        self.workers: dict[int, WorkerHandle] = {}       # index -> handle
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.announced = False
        self.backoff_s = 0.0
        self.respawn_at = 0.0
        self.registry: Registry | None = None
        self.exit_code = 0
        self.pipes_peak = 0
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_s = (int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(self.pid))
                           else 0.0)
        self.watchdog_next = 0.0
        self.reload_pending = False
        self.reload_queued_logged = False
        self.dirty: set[WorkerHandle] = set()      # channels with messages to flush
        self.handlers: control.Handlers = {
            control.Ready: self.on_ready, control.Join: self.on_join,
            control.Leave: self.on_leave, control.ReceiverEnded: self.on_receiver_ended,
            control.BodyEnded: self.on_body_ended, control.SenderLost: self.on_sender_lost,
            control.Released: self.on_released, control.Handed: self.on_handed,
        }

    # -- setup -----------------------------------------------------------------------------
    def reserve_port(self) -> None:
        """Refuse a port someone else holds, then keep it reserved for our workers."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            # Without SO_REUSEPORT this bind fails if anyone, even another relayd, has the port.
            probe.bind((self.config.host, self.port))
            self.port = probe.getsockname()[1]
        except OSError as e:
            raise StartupError(f"cannot listen on {self.config.host}:{self.config.port}: "
                               f"{e.strerror}") from None
        finally:
            probe.close()
        self.reserved = socket.socket(family, socket.SOCK_STREAM)
        self.reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.reserved.bind((self.config.host, self.port))
        except OSError as e:
            raise StartupError(f"cannot reserve {self.config.host}:{self.port}: {e.strerror}")
        self.seats = listeners.Seats(self.config.host, self.port, self.config.workers)
        for seat in range(self.config.workers):
            try:
                self.seats.open(seat)
            except OSError as e:
                raise StartupError(f"cannot listen on {self.config.host}:{self.port}: "
                                   f"{e.strerror}") from None

    def setup(self) -> None:
        logs.configure(self.config.log_format)
        if platform.machine() not in ("x86_64", "AMD64"):
            raise StartupError("relayd's shared-memory ordering relies on x86-64 (TSO); "
                               f"this machine is {platform.machine()}")
        # Every waiting party holds a descriptor: take all the hard limit allows, as nginx does.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        c = self.config
        if c.transmit != "copy" and ring.shmem_huge_pages_possible():
            log("shmem may use huge pages here (transparent_hugepage/shmem_enabled): "
                "the sendfile ring is unsafe, so every pipe uses --transmit copy")
            self.config = c = dataclasses.replace(c, transmit="copy")
        if c.secret_file:          # refuse a bad secret file before any worker trips on it
            from relayd.auth import Authorizer
            try:
                Authorizer.from_file(c.secret_file)
            except (OSError, ValueError) as e:
                raise StartupError(f"--secret-file {c.secret_file}: {e}") from None
        if c.spill_limit:
            removed = spill.sweep(c.spill_dir)
            if removed:
                log(f"removed {removed} spill file(s) left by a crash in {c.spill_dir}")
        self.reserve_port()
        self.arena = ring.Arena(c.max_transfers, c.window, c.worker_slots)
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                         for _ in range(c.worker_slots)]
        stats.mark_started(self.arena)
        self.registry = Registry(c, self.arena, self.kick)
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup_r, self.wakeup_w = rfd, wfd
        signal.set_wakeup_fd(wfd)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self.queue_signal)
        self.selector.register(rfd, selectors.EVENT_READ, None)

    def queue_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        self.setup()
        for index in range(self.config.workers):
            self.spawn_worker(index, seat=index)
        while True:
            self.guarded("waiting for events", self.wait_for_events)
            self.guarded("sending to workers", self.flush_channels)
            while self.signals:
                name = signal.Signals(self.signals.pop(0)).name
                self.guarded(f"handling {name}", getattr(self, "handle_" + name[3:].lower()))
            self.guarded("reaping workers", self.reap_workers)
            self.guarded("expiring pipes",
                         lambda: self.send_all(self.registry.expire(time.monotonic())))
            self.guarded("publishing stats", self.publish_stats)
            self.guarded("checking heartbeats", self.check_heartbeats)
            self.guarded("feeding the watchdog", self.feed_watchdog)
            self.guarded("sending to workers", self.flush_channels)
            if self.stopping:
                if not self.workers:
                    break
                if time.monotonic() > self.stop_deadline:
                    for w in self.workers.values():
                        self._signal(w, signal.SIGKILL)
                continue
            if self.respawn_at and time.monotonic() >= self.respawn_at:
                self.respawn_at = 0.0
                self.guarded("respawning workers", self.respawn)
            if self.reload_pending:
                self.guarded("reloading", self.reload)
        systemd.notify("STOPPING=1")
        log("stopped")
        return self.exit_code

    def guarded(self, doing: str, step) -> None:
        """Run one step of the loop; an exception is logged, never the supervisor's end."""
        try:
            step()
        except Exception:
            log(f"supervisor error while {doing} (still serving): "
                + traceback.format_exc().strip().replace("\n", " | "))

    def wait_for_events(self) -> None:
        for key, events in self.selector.select(self.next_timeout()):
            if key.data is None:
                try:
                    os.read(self.wakeup_r, 4096)
                except BlockingIOError:
                    pass
            else:
                self.on_control(key.data, events)

    def next_timeout(self) -> float:
        deadlines = [1.0]
        if self.watchdog_s:
            deadlines.append(self.watchdog_next - time.monotonic())
        expiry = self.registry.next_expiry()
        if expiry is not None:
            deadlines.append(expiry - time.monotonic() + 0.01)
        if self.respawn_at:
            deadlines.append(self.respawn_at - time.monotonic())
        return max(0.0, min(deadlines))

    # -- workers ---------------------------------------------------------------------------
    def free_indexes(self) -> list[int]:
        """Worker indexes (each with its eventfd and arena lines) no live worker holds."""
        return [i for i in range(self.config.worker_slots) if i not in self.workers]

    def active(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if not w.retiring]

    def respawn(self) -> None:
        """Bring the serving generation back to --workers after a death: a new worker on
        each seat the serving generation lacks."""
        held = {w.seat for w in self.active()}
        empty = [seat for seat in range(self.config.workers) if seat not in held]
        for seat, index in zip(empty, self.free_indexes()):
            try:
                self.spawn_worker(index, seat)
            except OSError as e:         # fork, or binding a closed seat again
                log(f"cannot start a worker for seat {seat}: {e}; trying again")
        if len(self.active()) < self.config.workers:
            # An index is missing (a retiring generation holds them) or a start failed.
            self.respawn_at = time.monotonic() + max(self.backoff_s, 0.1)

    def spawn_worker(self, index: int, seat: int) -> None:
        self.seats.open(seat)           # bound again if a crash loop closed it
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            code = 1
            try:
                # A worker keeps none of the supervisor's descriptors but the arena, the
                # eventfds and its seat: a copy of a receiver's socket waiting in a
                # channel's outbox would keep that connection open as long as the worker.
                signal.set_wakeup_fd(-1)
                os.close(self.wakeup_r)
                os.close(self.wakeup_w)
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                ours.close()
                for w in self.workers.values():
                    w.channel.close()
                self.reserved.close()
                self.selector.close()
                listener = self.seats.keep_only(seat)
                code = Worker(self.config, self.arena, index, self.eventfds, theirs, listener,
                              self.pid).run()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        handle = WorkerHandle(index, seat, pid, None)
        handle.channel = control.Channel(ours, lambda: self.dirty.add(handle),
                                         lambda on: self.want_write(handle, on))
        self.workers[index] = handle
        self.selector.register(ours, selectors.EVENT_READ, handle)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = next((w for w in self.workers.values() if w.pid == pid), None)
            if handle is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self.worker_gone(handle)
            if self.stopping or handle.retiring:
                if handle.retiring and not self.stopping:
                    log(f"worker {handle.index} (pid {pid}) retired" if code == 0 else
                        f"worker {handle.index} (pid {pid}) of a retiring generation exited "
                        f"with {code}; its transfers ended short")
                    self.close_if_unserved(handle.seat)
                continue
            log(f"worker {handle.index} (pid {pid}) exited with {code}; respawning")
            stats.count_restart(self.arena)
            quick = time.monotonic() - handle.spawned < QUICK_DEATH_S
            self.backoff_s = min(RESPAWN_BACKOFF_MAX_S, self.backoff_s * 2 or 0.1) if quick else 0
            self.respawn_at = time.monotonic() + self.backoff_s
            self.close_if_unserved(handle.seat)

    def close_if_unserved(self, seat: int) -> None:
        """A seat no process holds, whose respawn waits out a backoff: close it, so its share
        of new connections goes to the live seats meanwhile (what queued on it is reset).
        While any worker holds it, even one retiring, the seat stays as it is."""
        if (not self.stopping and self.respawn_at > time.monotonic()
                and not any(w.seat == seat for w in self.workers.values())):
            self.seats.close(seat)

    def feed_watchdog(self) -> None:
        """WATCHDOG=1 to systemd (WatchdogSec=) at half its interval, while workers beat."""
        if not self.watchdog_s or time.monotonic() < self.watchdog_next:
            return
        self.watchdog_next = time.monotonic() + self.watchdog_s / 2
        if self.announced and self.workers:
            systemd.notify("WATCHDOG=1")

    def check_heartbeats(self) -> None:
        """A stopped or hung worker still gets its share of new connections (measured):
        kill it once its heartbeat is older than --worker-timeout; reaping replaces it.
        Heartbeats are CLOCK_MONOTONIC: a step of the wall clock kills nobody."""
        limit = self.config.worker_timeout_s
        now = time.monotonic()
        for w in self.workers.values():
            if not w.ready or w.killed or now - w.spawned < limit:
                continue
            age = stats.heartbeat_age_s(self.arena, w.index)
            if age > limit:
                log(f"worker {w.index} (pid {w.pid}) missed its heartbeat for "
                    f"{age:.0f} s; killing it")
                w.killed = True
                self._signal(w, signal.SIGKILL)

    def worker_gone(self, handle: WorkerHandle) -> None:
        del self.workers[handle.index]
        self.dirty.discard(handle)
        self.selector.unregister(handle.channel.sock)
        handle.channel.close()
        stats.WorkerBlock(self.arena, handle.index).vacate()
        try:
            os.eventfd_read(self.eventfds[handle.index])      # drain stale kicks
        except BlockingIOError:
            pass
        self.arena.take_marks(handle.index)                   # and their marks
        self.send_all(self.registry.worker_died(handle.index))

    def kick(self, index: int) -> None:
        os.eventfd_write(self.eventfds[index], 1)

    # -- control plane ---------------------------------------------------------------------
    def on_control(self, handle: WorkerHandle, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            handle.channel.flush()
        if not events & selectors.EVENT_READ:
            return
        messages = handle.channel.receive()
        for message in messages or ():     # None: the worker is dying; reaping cleans up
            try:
                self.handlers[type(message)](handle, message)
            except Exception:
                log(f"error handling {type(message).__name__} from worker {handle.index} "
                    f"(still serving): {message!r:.300} | "
                    + traceback.format_exc().strip().replace("\n", " | "))

    def send_all(self, outbox: list) -> None:
        for index, message in outbox:
            handle = self.workers.get(index)
            if handle is not None:
                handle.channel.send(message)
            elif isinstance(message, control.CARRIES_FD) and message.fd >= 0:
                os.close(message.fd)      # its worker is gone: so is the connection

    def flush_channels(self) -> None:
        """Everything a pass of the loop queued goes out, one datagram per worker."""
        while self.dirty:
            self.dirty.pop().channel.flush()

    def want_write(self, handle: WorkerHandle, on: bool) -> None:
        if self.workers.get(handle.index) is handle:
            self.selector.modify(handle.channel.sock,
                                 selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0),
                                 handle)

    def on_ready(self, handle: WorkerHandle, m: control.Ready) -> None:
        handle.ready = True
        if not handle.retiring and not self.stopping:
            # Reload: an old worker stops accepting only once its successor on the seat
            # listens, so no seat is ever without a worker taking its queue.
            for w in self.workers.values():
                if w.seat == handle.seat and w.retiring and not w.told_to_retire:
                    w.told_to_retire = True
                    self.send_all([(w.index, control.Retire())])
        if not self.announced and sum(w.ready for w in self.workers.values()) \
                >= self.config.workers:
            self.announced = True
            self.announce()

    def on_join(self, handle: WorkerHandle, m: control.Join) -> None:
        self.send_all(self.registry.join(handle.index, m.conn, m.role, m.path, m.n, m.info))

    def on_leave(self, handle: WorkerHandle, m: control.Leave) -> None:
        self.send_all(self.registry.leave(handle.index, m.conn))

    def on_receiver_ended(self, handle: WorkerHandle, m: control.ReceiverEnded) -> None:
        self.send_all(self.registry.receiver_ended(handle.index, m.slot, m.gen, m.conn, m.ok))

    def on_body_ended(self, handle: WorkerHandle, m: control.BodyEnded) -> None:
        self.send_all(self.registry.body_ended(handle.index, m.slot, m.gen, m.nbytes))

    def on_sender_lost(self, handle: WorkerHandle, m: control.SenderLost) -> None:
        self.send_all(self.registry.sender_lost(handle.index, m.slot, m.gen, m.outcome,
                                                m.reason, m.nbytes))

    def on_handed(self, handle: WorkerHandle, m: control.Handed) -> None:
        out = self.registry.handed(handle.index, m)
        if m.fd >= 0 and not any(isinstance(x, control.AttachReceiver) for _, x in out):
            os.close(m.fd)                # nobody takes it: the receiver's connection ends
        self.send_all(out)

    def on_released(self, handle: WorkerHandle, m: control.Released) -> None:
        self.send_all(self.registry.released(handle.index, m.slot, m.gen, m.role))

    def publish_stats(self) -> None:
        r = self.registry
        waiting, streaming = r.counts()
        self.pipes_peak = max(self.pipes_peak, waiting + streaming)
        if self.pipes_peak - waiting - streaming > TRIM_AFTER_CLOSED:
            trim_heap()                  # 10,000 pipes gone: give their memory back
            self.pipes_peak = waiting + streaming
        stats.publish_supervisor(self.arena, stats.SupervisorFigures(
            pipes_waiting=waiting, pipes_streaming=streaming, slots_in_use=r.slots.in_use,
            workers_alive=len(self.workers), transfers_done=r.transfers_done,
            transfers_aborted=r.transfers_aborted, outcomes=r.outcomes))

    def announce(self) -> None:
        c = self.config
        shown = "localhost" if c.host in ("0.0.0.0", "::") else c.host
        url = f"http://{url_host(shown)}:{self.port}"
        print(f"relayd {__version__} listening on http://{url_host(c.host)}:{self.port} "
              f"({c.workers} worker{'s' if c.workers != 1 else ''}, "
              f"window {c.window // 1024} KiB, transmit {c.transmit})", flush=True)
        print(f"  try: seq 1000000 | curl -T - '{url}/hello?n=2'   and twice:   "
              f"curl '{url}/hello?n=2'", flush=True)
        systemd.notify("READY=1", f"MAINPID={os.getpid()}")

    # -- signals ---------------------------------------------------------------------------
    def _signal(self, handle: WorkerHandle, sig: int) -> None:
        try:
            os.kill(handle.pid, sig)
        except ProcessLookupError:
            pass

    def begin_stop(self, graceful: bool) -> None:
        if not self.stopping:
            self.stopping = True
            self.seats.close_all()      # each worker's copy is the last: it takes its queue
            self.stop_deadline = time.monotonic() + (self.config.graceful_timeout_s + 5
                                                     if graceful else 0)
            systemd.notify("STOPPING=1")
        for w in self.workers.values():
            self._signal(w, signal.SIGTERM if graceful else signal.SIGQUIT)

    def handle_term(self) -> None:
        log("SIGTERM: graceful stop")
        self.begin_stop(graceful=True)

    def handle_int(self) -> None:
        log("SIGINT: graceful stop")
        self.begin_stop(graceful=True)

    def handle_quit(self) -> None:
        log("SIGQUIT: immediate stop")
        self.begin_stop(graceful=False)

    def handle_hup(self) -> None:
        """Reload: start fresh workers first (the port never closes), then retire the old."""
        if self.stopping:
            return
        if self.reload_pending:
            log("SIGHUP: a reload is already queued; this one joins it")
            return
        self.reload_pending = True
        self.reload()

    def reload(self) -> None:
        """Start a new generation if there is room for all of it; else stay queued."""
        free = self.free_indexes()
        if len(free) < self.config.workers:
            if not self.reload_queued_logged:
                self.reload_queued_logged = True
                retiring = sum(w.retiring for w in self.workers.values())
                log(f"SIGHUP: reload queued until a retiring generation ends "
                    f"({retiring} worker(s) still finishing their transfers)")
            return
        self.reload_pending = self.reload_queued_logged = False
        if self.config.secret_file:     # new workers read it: refuse a broken one now
            from relayd.auth import Authorizer
            try:
                Authorizer.from_file(self.config.secret_file)
            except (OSError, ValueError) as e:
                log(f"SIGHUP ignored: --secret-file {self.config.secret_file}: {e}")
                return
        log("SIGHUP: reloading workers")
        for seat, index in enumerate(free[:self.config.workers]):
            old = [w for w in self.active() if w.seat == seat]
            try:
                self.spawn_worker(index, seat)
            except OSError as e:         # out of descriptors, or fork failed
                log(f"SIGHUP: cannot start a worker for seat {seat}: {e}; the old one "
                    f"keeps serving it")
                continue
            for w in old:
                w.retiring = True

    def handle_chld(self) -> None:
        pass    # reap_workers runs after every loop pass


def serve(config: Config) -> int:
    supervisor = Supervisor(config)
    try:
        return supervisor.run()
    except StartupError as e:
        print(f"relayd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno == errno.EMFILE:
            print("relayd: out of file descriptors; raise the limit (ulimit -n)", file=sys.stderr)
            return 1
        raise

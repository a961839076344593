"""The rendezvous registry: path -> Pipe across all workers, and the ring slots. Supervisor only.

Workers report connection events (join, leave, a receiver's end, the body's end, a release);
every method here returns the messages to send as a list of (worker index, message). The
registry never does I/O itself, apart from initialising and punching ring slots in the arena,
so a transfer's start cannot race a producer past a receiver that has not published a cursor
(the slot is initialised before any start message is sent). What happens to a pipe follows
from its state machine (pipe.py): the registry applies a fact, lets the pipe settle, and acts
on where it landed.

A complete pipe that finds every ring slot busy waits for one, first come first served
(MATCHED), bounded like any rendezvous by --rendezvous-timeout and --max-pipes; a pipe of
n = 1 is spliced and needs no ring slot at all. Every supervisor loop pass reads the oldest
waiting pipe and the counts, so the book keeps them in order rather than scanning.
"""
from __future__ import annotations

import time
from typing import Callable

from relayd import control, logs, ring
from relayd.config import Config
from relayd.control import Outcome, SenderInfo
from relayd.pipe import Event, Party, Pipe, PipeState

Outbox = list  # [(worker index, message)]
HANDED_ID0 = 1 << 48
# A free slot whose last transfer sent by copy and wrote no more than this keeps its pages for
# the next one: no punch (a shmem punch unmaps the page in every worker) and no fault to
# refill it. At most slots x this stays resident (64 MiB at the default 1024 slots).
KEEP_PAGES = 64 * 1024


class SlotTable:
    """Ring slots: free list, generation, and which workers still hold each one."""

    def __init__(self, arena: ring.Arena):
        self.arena = arena
        self.free = list(range(arena.slots - 1, -1, -1))
        self.gen = [0] * arena.slots
        # Who still holds each slot: ("sender", w) and ("receivers", w) count apart, because
        # one worker may hold both, and its producer may finish (abort) while its receivers
        # still send from the ring: the ring must not be punched under them.
        self.holders: dict[int, set[tuple[str, int]]] = {}
        self.lent = [False] * arena.slots     # its transfer lends ring pages (sendfile)

    def assign(self, producer: int, receiver_workers: set[int],
               lends_pages: bool = False) -> tuple[int, int] | None:
        if not self.free:
            return None
        slot = self.free.pop()
        self.lent[slot] = lends_pages
        self.gen[slot] += 1
        gen = self.gen[slot]
        ring.SlotFields(self.arena, slot).reset(self.arena, producer, receiver_workers, gen)
        self.holders[slot] = {("sender", producer)} | {("receivers", w)
                                                       for w in receiver_workers}
        return slot, gen

    def release(self, worker: int, slot: int, gen: int, role: str | None = None) -> bool:
        """Worker is done with the slot in `role` (None: in every role, as when it died);
        True when that freed it."""
        holders = self.holders.get(slot)
        if holders is None or self.gen[slot] != gen:
            return False
        for r in ("sender", "receivers") if role is None else (role,):
            holders.discard((r, worker))
        if holders:
            return False
        del self.holders[slot]
        # Sendfile lent the pages to sockets that may still send them: always punched, the
        # sockets keep the old pages. Copy mode lent none (send copies): a small transfer's
        # pages stay for the next one, a large one's go back (else they stay resident).
        self.arena.punch_written(slot, keep=0 if self.lent[slot] else KEEP_PAGES)
        self.arena.store(ring.SlotFields(self.arena, slot).state, ring.IDLE)
        self.free.append(slot)
        return True

    @property
    def in_use(self) -> int:
        return len(self.holders)


class Registry:
    """Every pipe the daemon knows, keyed by raw path bytes."""

    def __init__(self, config: Config, arena: ring.Arena, kick: Callable[[int], None]):
        self.config = config
        self.arena = arena
        self.kick = kick
        self.slots = SlotTable(arena)
        self.pipes: dict[bytes, Pipe] = {}
        self.rendezvous: dict[bytes, Pipe] = {}     # WAITING or MATCHED, oldest first
        self.slot_queue: dict[bytes, Pipe] = {}     # MATCHED, waiting for a slot, FIFO
        self.waiting_party: dict[Party, Pipe] = {}
        self.transfers: dict[tuple[int, int], Pipe] = {}
        # Ended cleanly before the producer's count arrived: logged when it does.
        self.unlogged: dict[tuple[int, int], tuple[Pipe, str]] = {}
        self.transfers_done = 0
        self.transfers_aborted = 0
        self.outcomes: dict[Outcome, int] = {}
        # Connection ids for receivers handed to another worker: far above any id a worker
        # gives its own connections. Spliced transfers are keyed above every ring slot.
        self.handed_ids = HANDED_ID0
        self.splice_ids = arena.slots

    # -- rendezvous ------------------------------------------------------------------------
    def join(self, worker: int, conn: int, role: str, path: bytes, n: int,
             info: SenderInfo | None) -> Outbox:
        party = (worker, conn)
        pipe = self.pipes.get(path)
        if pipe is None:
            if len(self.pipes) >= self.config.max_pipes:
                return [(worker, control.Rejected(
                    conn, 503, f"the relay holds its limit of {self.config.max_pipes} pipes; "
                               "retry later"))]
            pipe = self.pipes[path] = self.rendezvous[path] = Pipe(path, n)
        refusal = self._refusal(pipe, role, n)
        if refusal:
            if not pipe.receivers and pipe.sender is None:
                self._forget(pipe)
            return [(worker, control.Rejected(conn, *refusal))]
        self.waiting_party[party] = pipe
        pipe.join(party, role, info)
        if pipe.state is PipeState.MATCHED:
            # Started -- or in line for a slot, which the sender hears as "n of n connected".
            return self._start(pipe) or self._progress(pipe)
        return self._progress(pipe)

    @staticmethod
    def _refusal(pipe: Pipe, role: str, n: int) -> tuple[int, str] | None:
        if pipe.state is not PipeState.WAITING:
            return 409, "a transfer is in progress on this path; retry when it has finished"
        if n != pipe.n:
            return 400, f"n={n} does not match n={pipe.n} of the parties already waiting here"
        if role == "sender" and pipe.sender is not None:
            return 409, "another sender is already waiting on this path"
        if role == "receiver" and len(pipe.receivers) >= pipe.n:
            return 409, f"this pipe already has its {pipe.n} receiver(s)"
        return None

    def _progress(self, pipe: Pipe) -> Outbox:
        if pipe.sender is None:
            return []
        w, conn = pipe.sender
        return [(w, control.Progress(conn, len(pipe.receivers), pipe.n))]

    def _forget(self, pipe: Pipe) -> None:
        """The path is free again."""
        if self.pipes.get(pipe.path) is pipe:
            del self.pipes[pipe.path]
        if self.rendezvous.get(pipe.path) is pipe:
            del self.rendezvous[pipe.path]
        if self.slot_queue.get(pipe.path) is pipe:
            del self.slot_queue[pipe.path]

    def _start(self, pipe: Pipe) -> Outbox:
        """Everyone is here: a slot and the start messages, or the queue for a slot."""
        pipe.transmit = self.config.transmit_for(pipe.n)
        if pipe.transmit == "splice":
            # A spliced pipe never touches a ring: its key lies above every slot.
            self.splice_ids += 1
            assigned = (self.splice_ids, 1)
        else:
            assigned = self.slots.assign(pipe.sender[0], {w for w, _ in pipe.receivers},
                                         lends_pages=pipe.transmit == "sendfile")
            if assigned is None:
                self.slot_queue[pipe.path] = pipe   # first come, first served
                return []
        for party in [pipe.sender, *pipe.receivers]:
            self.waiting_party.pop(party, None)
        del self.rendezvous[pipe.path]
        self.slot_queue.pop(pipe.path, None)
        pipe.slot, pipe.gen = assigned
        pipe.started = time.monotonic()
        pipe.apply(Event.slot_assigned)
        self.transfers[assigned] = pipe
        if pipe.transmit == "splice":
            return self._start_splice(pipe)
        by_worker: dict[int, list[int]] = {}
        for w, c in pipe.receivers:
            by_worker.setdefault(w, []).append(c)
        # The sender first: a worker that holds both ends then has the bytes that came with
        # the head in the ring when its receivers start, and sends each its head with them.
        sw, sc = pipe.sender
        out: Outbox = [(sw, control.StartSender(sc, pipe.slot, pipe.gen, pipe.transmit, pipe.n,
                                                sorted(by_worker)))]
        for w, conns in by_worker.items():
            out.append((w, control.StartReceivers(pipe.slot, pipe.gen, pipe.transmit, conns,
                                                  pipe.sender_info)))
        return out

    def _start_queued(self) -> Outbox:
        """Slots came free: start the pipes that waited longest for one."""
        out: Outbox = []
        while self.slot_queue and self.slots.free:
            out += self._start(next(iter(self.slot_queue.values())))
        return out

    def _start_splice(self, pipe: Pipe) -> Outbox:
        """n = 1: the sender's worker moves the body itself. A receiver on another worker is
        handed over (its socket passed along); until it arrives it stays registered where it
        landed, so that worker's death still resolves it."""
        (sw, sc), (rw, rc) = pipe.sender, pipe.receivers[0]
        local = rc if rw == sw else None
        out: Outbox = [(sw, control.StartSplice(sc, pipe.slot, pipe.gen, local,
                                                pipe.sender_info))]
        if local is None:
            out.append((rw, control.HandOver(rc, pipe.slot, pipe.gen)))
        return out

    def handed(self, worker: int, m: control.Handed) -> Outbox:
        """A receiver's socket arrives from its worker: on to the sender's worker, under a
        new party there. Gone (fd -1), or its pipe no longer streaming: the receiver is lost,
        and a descriptor nobody takes is the caller's to close (no message carries it)."""
        pipe = self.transfers.get((m.slot, m.gen))
        party = (worker, m.conn)
        if pipe is None or party not in pipe.receivers or party in pipe.resolved:
            return []
        if m.fd < 0 or pipe.state is not PipeState.STREAMING:
            return self.receiver_ended(worker, m.slot, m.gen, m.conn, ok=False)
        sw = pipe.sender[0]
        self.handed_ids += 1
        moved = (sw, self.handed_ids)
        pipe.receivers[pipe.receivers.index(party)] = moved
        return [(sw, control.AttachReceiver(m.slot, m.gen, moved[1], m.version, m.fd))]

    def leave(self, worker: int, conn: int) -> Outbox:
        """A waiting party disconnected: it no longer counts toward n (a pipe queued for a
        slot waits for its parties again)."""
        party = (worker, conn)
        pipe = self.waiting_party.pop(party, None)
        if pipe is None or pipe.state not in (PipeState.WAITING, PipeState.MATCHED):
            return []      # already started: the worker resolves it through its start
        self.slot_queue.pop(pipe.path, None)
        pipe.leave(party)
        if pipe.state is PipeState.CLOSED:
            self._forget(pipe)
            return []
        return self._progress(pipe)

    def expire(self, now: float) -> Outbox:
        """Close pipes that waited longer than the rendezvous timeout (for their parties or
        for a slot); tell their parties. Oldest first: it stops at the first still young."""
        limit = self.config.rendezvous_timeout_s
        out: Outbox = []
        while self.rendezvous:
            pipe = next(iter(self.rendezvous.values()))
            if now - pipe.created <= limit:
                break
            pipe.apply(Event.wait_timed_out)
            self._forget(pipe)
            what = (f"{len(pipe.receivers)} of {pipe.n} receivers, "
                    f"{'a' if pipe.sender else 'no'} sender")
            if pipe.closed_from is PipeState.MATCHED:
                what = "every transfer slot stayed busy"
            reason = f"no complete rendezvous within {limit:g} s ({what})"
            for party in [pipe.sender, *pipe.receivers]:
                if party is not None:
                    self.waiting_party.pop(party, None)
                    out.append((party[0], control.Expired(party[1], reason)))
        return out

    def next_expiry(self) -> float | None:
        if not self.rendezvous:
            return None
        return next(iter(self.rendezvous.values())).created + self.config.rendezvous_timeout_s

    # -- transfer outcomes -----------------------------------------------------------------
    def receiver_ended(self, worker: int, slot: int, gen: int, conn: int, ok: bool) -> Outbox:
        pipe = self.transfers.get((slot, gen))
        if pipe is None or (worker, conn) in pipe.resolved:
            return []
        return self._settled(pipe, pipe.receiver_ended((worker, conn), ok))

    def body_ended(self, worker: int, slot: int, gen: int, nbytes: int) -> Outbox:
        pipe = self.transfers.get((slot, gen))
        if pipe is None:
            late = self.unlogged.pop((slot, gen), None)
            if late is not None:
                late[0].body_bytes = nbytes
                self._log_transfer(*late)
            return []
        pipe.body_bytes, pipe.body_reported = nbytes, True
        if pipe.state is PipeState.STREAMING:
            pipe.apply(Event.body_ended)
        return []

    def sender_lost(self, worker: int, slot: int, gen: int, outcome: Outcome, reason: str,
                    nbytes: int = 0) -> Outbox:
        pipe = self.transfers.get((slot, gen))
        if pipe is None:
            return []
        pipe.body_bytes = max(pipe.body_bytes, nbytes)
        return self._settled(pipe, pipe.sender_lost(outcome, reason))

    def _in_ring(self, pipe: Pipe) -> bool:
        return pipe.slot < self.arena.slots

    def _settled(self, pipe: Pipe, fired: list[Event]) -> Outbox:
        """Act on where the pipe's counts took it: only a closed pipe needs anything."""
        if pipe.state is not PipeState.CLOSED:
            return []
        sw, _ = pipe.sender
        out: Outbox = []
        if pipe.closed_from is PipeState.STREAMING:          # last_receiver_lost
            if self._in_ring(pipe):
                # The producer has not reported its count: log the bytes published so far.
                pipe.body_bytes = self.arena.load(ring.SlotFields(self.arena, pipe.slot).tail)
            out.append((sw, control.AbortSender(pipe.slot, pipe.gen, "all receivers left")))
            outcome, text = Outcome.RECEIVERS_LEFT, "aborted: all receivers left"
        elif pipe.closed_from is PipeState.DRAINING:
            out.append((sw, control.Finished(pipe.slot, pipe.gen, pipe.done_receivers,
                                             pipe.lost_receivers)))
            if pipe.lost_receivers:
                outcome, text = Outcome.OK_SOME_RECEIVERS_LEFT, "ok, some receivers left"
            else:
                outcome, text = Outcome.OK, "ok"
        else:
            outcome, text = pipe.outcome, "aborted: " + pipe.abort_reason
        if outcome.aborted:
            self.transfers_aborted += 1
        else:
            self.transfers_done += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        del self.transfers[(pipe.slot, pipe.gen)]
        self._forget(pipe)
        if pipe.closed_from is PipeState.DRAINING and not pipe.body_reported:
            # Every receiver saw the ring's DONE before the producer's BodyEnded (from
            # another worker) reached us: the line waits for its byte count.
            self.unlogged[(pipe.slot, pipe.gen)] = (pipe, text)
        else:
            self._log_transfer(pipe, text)
        return out

    def _log_transfer(self, pipe: Pipe, outcome: str) -> None:
        by_worker: dict[int, int] = {}
        for w, _ in pipe.receivers:
            by_worker[w] = by_worker.get(w, 0) + 1
        logs.event("transfer", path=pipe.path, n=pipe.n, bytes=pipe.body_bytes,
                   seconds=f"{time.monotonic() - pipe.started:.3f}", transmit=pipe.transmit,
                   receivers_done=pipe.done_receivers, receivers_lost=pipe.lost_receivers,
                   sender=f"w{pipe.sender[0]}",
                   workers=",".join(f"w{w}:{c}" for w, c in sorted(by_worker.items())),
                   outcome=outcome)

    def released(self, worker: int, slot: int, gen: int, role: str | None = None) -> Outbox:
        """A worker is done with a slot; a slot that came free starts a queued pipe."""
        if slot >= self.arena.slots or not self.slots.release(worker, slot, gen, role):
            return []
        return self._start_queued()

    # -- faults ----------------------------------------------------------------------------
    def worker_died(self, worker: int) -> Outbox:
        """Resolve everything the dead worker held, as if each of its parties had left."""
        out: Outbox = []
        for key, (pipe, text) in list(self.unlogged.items()):
            if pipe.sender[0] == worker:      # its count will not come
                del self.unlogged[key]
                self._log_transfer(pipe, text)
        for party in [p for p in self.waiting_party if p[0] == worker]:
            out += self.leave(*party)
        for (slot, gen), pipe in list(self.transfers.items()):
            in_ring = self._in_ring(pipe)
            f = ring.SlotFields(self.arena, slot) if in_ring else None
            if pipe.sender[0] == worker and pipe.state is PipeState.STREAMING:
                if in_ring:
                    if self.arena.load(f.state) == ring.STREAMING:
                        self.arena.store(f.state, ring.ABORTED)
                    for w in {w for w, _ in pipe.receivers} - {worker}:
                        self.arena.mark(w, slot)
                        self.kick(w)
                out += self.sender_lost(worker, slot, gen, Outcome.WORKER_DIED,
                                        "the sender's worker died")
            mine = [c for w, c in pipe.receivers if w == worker and (w, c) not in pipe.resolved]
            if mine and in_ring:
                self.arena.store(f.cursor(worker), ring.NONE)
                self.arena.store(f.file_cursor(worker), ring.NONE)
                if pipe.sender[0] != worker:
                    self.arena.mark(pipe.sender[0], slot)
                    self.kick(pipe.sender[0])
            for conn in mine:
                out += self.receiver_ended(worker, slot, gen, conn, ok=False)
        freed = False
        for slot in [s for s, h in self.slots.holders.items() if any(w == worker for _, w in h)]:
            freed = self.slots.release(worker, slot, self.slots.gen[slot]) or freed
        if freed:
            out += self._start_queued()
        return [(w, m) for w, m in out if w != worker]

    def counts(self) -> tuple[int, int]:
        """(pipes waiting for their parties or a slot, transfers streaming)."""
        return len(self.rendezvous), len(self.transfers)

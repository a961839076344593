"""The rendezvous registry: path -> Pipe across all workers, and the ring slots. Supervisor only.

Workers report connection events (join, leave, a receiver's end, the body's end, a release);
every method here returns the messages to send as a list of (worker index, message). The
registry never does I/O itself, apart from initialising and punching ring slots in the arena,
so a transfer's start cannot race a producer past a receiver that has not published a cursor
(DESIGN §3: the slot is initialised before any start message is sent). What happens to a
pipe follows from its state machine (pipe.py): the registry applies a fact, lets the pipe
settle, and acts on where it landed.
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

    def assign(self, producer: int, receiver_workers: set[int]) -> tuple[int, int] | None:
        if not self.free:
            return None
        slot = self.free.pop()
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
        # Punch in both modes: copy-mode pages would stay resident forever; in sendfile mode
        # sockets still sending old pages keep them, the next transfer gets fresh ones.
        self.arena.punch(slot, 0, self.arena.capacity)
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
        self.waiting_party: dict[Party, Pipe] = {}
        self.transfers: dict[tuple[int, int], Pipe] = {}
        self.transfers_done = 0
        self.transfers_aborted = 0
        self.outcomes: dict[Outcome, int] = {}
        # Connection ids for receivers handed to another worker: far above any id a worker
        # gives its own connections.
        self.handed_ids = HANDED_ID0

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
            pipe = self.pipes[path] = Pipe(path, n)
        refusal = self._refusal(pipe, role, n)
        if refusal:
            if not pipe.receivers and pipe.sender is None:
                del self.pipes[path]
            return [(worker, control.Rejected(conn, *refusal))]
        self.waiting_party[party] = pipe
        pipe.join(party, role, info)
        if pipe.state is PipeState.MATCHED:
            return self._start(pipe)
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

    def _start(self, pipe: Pipe) -> Outbox:
        for party in [pipe.sender, *pipe.receivers]:
            self.waiting_party.pop(party, None)
        pipe.transmit = self.config.transmit_for(pipe.n)
        splice = pipe.transmit == "splice"
        # A spliced pipe never touches its slot's ring: only the sender's worker holds it.
        receiver_workers = set() if splice else {w for w, _ in pipe.receivers}
        assigned = self.slots.assign(pipe.sender[0], receiver_workers)
        if assigned is None:
            pipe.apply(Event.no_slot)
            del self.pipes[pipe.path]
            reason = (f"the relay is at its limit of {self.arena.slots} concurrent transfers; "
                      "retry later")
            return [(w, control.Rejected(c, 503, reason))
                    for w, c in [pipe.sender, *pipe.receivers]]
        pipe.slot, pipe.gen = assigned
        pipe.started = time.monotonic()
        pipe.apply(Event.slot_assigned)
        self.transfers[assigned] = pipe
        if splice:
            return self._start_splice(pipe)
        out: Outbox = []
        by_worker: dict[int, list[int]] = {}
        for w, c in pipe.receivers:
            by_worker.setdefault(w, []).append(c)
        for w, conns in by_worker.items():
            out.append((w, control.StartReceivers(pipe.slot, pipe.gen, pipe.transmit, conns,
                                                  pipe.sender_info)))
        sw, sc = pipe.sender
        out.append((sw, control.StartSender(sc, pipe.slot, pipe.gen, pipe.transmit, pipe.n,
                                            sorted(by_worker))))
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
        """A waiting party disconnected: it no longer counts toward n."""
        party = (worker, conn)
        pipe = self.waiting_party.pop(party, None)
        if pipe is None or pipe.state is not PipeState.WAITING:
            return []      # already started: the worker resolves it through its start
        pipe.leave(party)
        if pipe.state is PipeState.CLOSED:
            del self.pipes[pipe.path]
            return []
        return self._progress(pipe)

    def expire(self, now: float) -> Outbox:
        """Close pipes that waited longer than the rendezvous timeout; tell their parties."""
        limit = self.config.rendezvous_timeout_s
        out: Outbox = []
        for pipe in [p for p in self.pipes.values()
                     if p.state is PipeState.WAITING and now - p.created > limit]:
            pipe.apply(Event.wait_timed_out)
            del self.pipes[pipe.path]
            reason = (f"no complete rendezvous within {limit:g} s "
                      f"({len(pipe.receivers)} of {pipe.n} receivers, "
                      f"{'a' if pipe.sender else 'no'} sender)")
            for party in [pipe.sender, *pipe.receivers]:
                if party is not None:
                    self.waiting_party.pop(party, None)
                    out.append((party[0], control.Expired(party[1], reason)))
        return out

    def next_expiry(self) -> float | None:
        waiting = [p.created for p in self.pipes.values() if p.state is PipeState.WAITING]
        return min(waiting) + self.config.rendezvous_timeout_s if waiting else None

    # -- transfer outcomes -----------------------------------------------------------------
    def receiver_ended(self, worker: int, slot: int, gen: int, conn: int, ok: bool) -> Outbox:
        pipe = self.transfers.get((slot, gen))
        if pipe is None or (worker, conn) in pipe.resolved:
            return []
        return self._settled(pipe, pipe.receiver_ended((worker, conn), ok))

    def body_ended(self, worker: int, slot: int, gen: int, nbytes: int) -> Outbox:
        pipe = self.transfers.get((slot, gen))
        if pipe is None:
            return []
        pipe.body_bytes = nbytes
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

    def _settled(self, pipe: Pipe, fired: list[Event]) -> Outbox:
        """Act on where the pipe's counts took it: only a closed pipe needs anything."""
        if pipe.state is not PipeState.CLOSED:
            return []
        sw, _ = pipe.sender
        out: Outbox = []
        if pipe.closed_from is PipeState.STREAMING:          # last_receiver_lost
            # The producer has not reported its count: log the bytes it published so far.
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
        if self.pipes.get(pipe.path) is pipe:
            del self.pipes[pipe.path]
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

    def released(self, worker: int, slot: int, gen: int, role: str | None = None) -> None:
        self.slots.release(worker, slot, gen, role)

    # -- faults ----------------------------------------------------------------------------
    def worker_died(self, worker: int) -> Outbox:
        """Resolve everything the dead worker held, as if each of its parties had left."""
        out: Outbox = []
        for party in [p for p in self.waiting_party if p[0] == worker]:
            out += self.leave(*party)
        for (slot, gen), pipe in list(self.transfers.items()):
            f = ring.SlotFields(self.arena, slot)
            if pipe.sender[0] == worker and pipe.state is PipeState.STREAMING:
                if self.arena.load(f.state) == ring.STREAMING:
                    self.arena.store(f.state, ring.ABORTED)
                for w in {w for w, _ in pipe.receivers}:
                    self.kick(w)
                out += self.sender_lost(worker, slot, gen, Outcome.WORKER_DIED,
                                        "the sender's worker died")
            mine = [c for w, c in pipe.receivers if w == worker and (w, c) not in pipe.resolved]
            if mine:
                self.arena.store(f.cursor(worker), ring.NONE)
                self.arena.store(f.file_cursor(worker), ring.NONE)
                self.kick(pipe.sender[0])
            for conn in mine:
                out += self.receiver_ended(worker, slot, gen, conn, ok=False)
        for slot in [s for s, h in self.slots.holders.items() if any(w == worker for _, w in h)]:
            self.slots.release(worker, slot, self.slots.gen[slot])
        return [(w, m) for w, m in out if w != worker]

    def counts(self) -> tuple[int, int]:
        """(pipes waiting, pipes streaming)."""
        waiting = sum(1 for p in self.pipes.values() if p.state is PipeState.WAITING)
        return waiting, len(self.transfers)

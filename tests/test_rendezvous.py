"""The rendezvous registry on a real shared-memory arena (no mocks).

`Registry` is the supervisor's book of pipes: joins, leaves, refusals, starting a transfer
(initialising its ring slot *before* any start message), slot release, a dead worker and the
rendezvous timeout. Its `kick` and `log` are plain recorders; the arena is a real memfd.
"""
from __future__ import annotations

import re
import time

import pytest

from relayd import ring
from relayd.config import Config
from relayd import control
from relayd.control import Outcome
from relayd.pipe import PipeState
from relayd.rendezvous import Registry, SlotTable

RECEIVER_INFO = {"version": "1.1"}
SENDER_INFO = {"content_type": b"application/octet-stream", "headers": [], "length": 5}


class Recorder:
    def __init__(self):
        self.kicks: list[int] = []
        self._lines: list[str] = []
        self.capsys = None

    def kick(self, worker: int) -> None:
        self.kicks.append(worker)

    @property
    def lines(self) -> list[str]:
        """The registry's log lines (it writes them to stderr through relayd.logs)."""
        self._lines += [ln for ln in self.capsys.readouterr().err.splitlines() if ln]
        return self._lines


@pytest.fixture
def arena():
    a = ring.Arena(slots=2, capacity=1 << 19, worker_slots=2)
    yield a
    a.close()


@pytest.fixture
def rec(capsys) -> Recorder:
    r = Recorder()
    r.capsys = capsys
    return r


class PlainRegistry(Registry):
    """The real Registry, its outboxes written as plain tuples: (message name, *fields)."""

    def _plain(self, outbox):
        return [(w, m if type(m) is tuple else   # already plain (a nested call)
                 (re.sub(r"(?<!^)([A-Z])", r"_\1", type(m).__name__).lower(), *m))
                for w, m in outbox]

    def join(self, *args):
        return self._plain(super().join(*args))

    def leave(self, *args):
        return self._plain(super().leave(*args))

    def expire(self, *args):
        return self._plain(super().expire(*args))

    def receiver_ended(self, *args, **kw):
        return self._plain(super().receiver_ended(*args, **kw))

    def sender_lost(self, *args):
        return self._plain(super().sender_lost(*args))

    def worker_died(self, *args):
        return self._plain(super().worker_died(*args))

    def handed(self, *args):
        return self._plain(super().handed(*args))

    def released(self, *args):
        return self._plain(super().released(*args))


def make_registry(arena, rec, **config) -> Registry:
    config.setdefault("workers", 1)          # worker_slots = 2, as the arena
    config.setdefault("transmit", "copy")    # the ring's start (n = 1 would splice)
    return PlainRegistry(Config(**config), arena, rec.kick)


@pytest.fixture
def registry(arena, rec) -> Registry:
    return make_registry(arena, rec)


def messages(outbox, kind):
    return [(w, m) for w, m in outbox if m[0] == kind]


def start_of(outbox):
    """(slot, gen) from the start_sender message of an outbox."""
    (_, m), = messages(outbox, "start_sender")
    return m[2], m[3]


def dirty(arena: ring.Arena) -> None:
    """Scribble over every slot field so initialisation is visible."""
    for slot in range(arena.slots):
        f = ring.SlotFields(arena, slot)
        for index in (f.tail, f.state, f.wake_at, f.producer):
            arena.store(index, 12345)
        for w in range(arena.worker_slots):
            arena.store(f.cursor(w), 777)
            arena.store(f.waiting(w), 1)


def start_transfer(registry, path=b"/t", sender=(0, 1), receivers=((1, 2),)):
    n = len(receivers)
    for w, c in receivers:
        registry.join(w, c, "receiver", path, n, RECEIVER_INFO)
    out = registry.join(*sender, "sender", path, n, SENDER_INFO)
    return out, start_of(out)


# -- rendezvous in both orders ---------------------------------------------------------------
def test_receivers_first_then_sender_produces_start_receivers_and_start_sender(registry):
    assert registry.join(0, 10, "receiver", b"/both", 2, RECEIVER_INFO) == []
    assert registry.join(1, 11, "receiver", b"/both", 2, RECEIVER_INFO) == []
    out = registry.join(0, 12, "sender", b"/both", 2, SENDER_INFO)

    starts = dict(messages(out, "start_receivers"))
    assert set(starts) == {0, 1}
    (sw, sender_msg), = messages(out, "start_sender")
    _, conn, slot, gen, transmit, n, receiver_workers = sender_msg
    assert (sw, conn, n, receiver_workers) == (0, 12, 2, [0, 1])
    assert transmit == registry.config.transmit_for(2)
    for w, conns in ((0, [10]), (1, [11])):
        assert starts[w] == ("start_receivers", slot, gen, transmit, conns, SENDER_INFO)
    assert len(out) == 3
    assert registry.pipes[b"/both"].state is PipeState.STREAMING
    assert registry.counts() == (0, 1)


def test_sender_first_then_receivers_gets_progress_then_starts(registry):
    assert registry.join(1, 20, "sender", b"/sf", 2, SENDER_INFO) == [(1, ("progress", 20, 0, 2))]
    assert registry.counts() == (1, 0)
    assert registry.join(0, 21, "receiver", b"/sf", 2, RECEIVER_INFO) == \
        [(1, ("progress", 20, 1, 2))]
    out = registry.join(0, 22, "receiver", b"/sf", 2, RECEIVER_INFO)
    (w, start), = messages(out, "start_receivers")
    assert w == 0 and start[4] == [21, 22]
    (sw, sender_msg), = messages(out, "start_sender")
    assert sw == 1 and sender_msg[1] == 20 and sender_msg[6] == [0]
    assert registry.counts() == (0, 1)


@pytest.mark.parametrize("receiver_workers,sender_worker", [((0,), 0), ((1,), 0), ((0, 1), 1)],
                         ids=["same-worker", "other-worker", "both-workers"])
def test_slot_fields_are_initialised_before_the_start_messages_are_returned(
        arena, registry, receiver_workers, sender_worker):
    dirty(arena)
    receivers = [(w, 100 + i) for i, w in enumerate(receiver_workers)]
    out, (slot, gen) = start_transfer(registry, b"/init", (sender_worker, 99), receivers)
    # Nothing has been sent yet: the outbox is only returned. The slot must already be ready.
    f = ring.SlotFields(arena, slot)
    assert gen >= 1
    assert arena.load(f.gen) == gen
    assert arena.load(f.tail) == 0
    assert arena.load(f.state) == ring.STREAMING
    assert arena.load(f.wake_at) == 0
    assert arena.load(f.producer) == sender_worker
    for w in range(arena.worker_slots):
        expected = 0 if w in receiver_workers else ring.NONE
        assert arena.load(f.cursor(w)) == expected, f"cursor[{w}]"
        assert arena.load(f.waiting(w)) == 0, f"waiting[{w}]"
    # The sender first: a worker holding both ends has the head's bytes in the ring when
    # its receivers start (they get their head and those bytes in one send).
    assert [m[0] for _, m in out] == ["start_sender"] + \
        ["start_receivers"] * len(set(receiver_workers))


def test_a_reassigned_slot_gets_a_new_generation(arena, registry):
    _, (slot, gen) = start_transfer(registry, b"/gen1")
    registry.body_ended(0, slot, gen, 5)
    registry.receiver_ended(1, slot, gen, 2, ok=True)
    registry.released(0, slot, gen)
    registry.released(1, slot, gen)
    _, (slot2, gen2) = start_transfer(registry, b"/gen2", (0, 3), ((1, 4),))
    _, (slot3, gen3) = start_transfer(registry, b"/gen3", (0, 5), ((1, 6),))
    again = {slot2: gen2, slot3: gen3}
    assert again[slot] == gen + 1
    assert arena.load(ring.SlotFields(arena, slot).gen) == gen + 1


# -- refusals ---------------------------------------------------------------------------------
def test_a_second_sender_on_a_waiting_path_is_refused_with_409(registry):
    registry.join(0, 1, "sender", b"/dup", 1, SENDER_INFO)
    out = registry.join(1, 2, "sender", b"/dup", 1, SENDER_INFO)
    assert len(out) == 1
    w, (kind, conn, status, reason) = out[0]
    assert (w, kind, conn, status) == (1, "rejected", 2, 409) and reason
    assert registry.pipes[b"/dup"].sender == (0, 1)


def test_a_receiver_beyond_n_is_refused_with_409(registry):
    registry.join(0, 1, "receiver", b"/full", 1, RECEIVER_INFO)
    out = registry.join(1, 2, "receiver", b"/full", 1, RECEIVER_INFO)
    assert [(w, m[:3]) for w, m in out] == [(1, ("rejected", 2, 409))]
    assert registry.pipes[b"/full"].receivers == [(0, 1)]


@pytest.mark.parametrize("role", ["sender", "receiver"])
def test_a_party_with_a_different_n_is_refused_with_400_and_the_waiting_pipe_is_kept(
        registry, role):
    registry.join(0, 1, "receiver", b"/n", 3, RECEIVER_INFO)
    info = SENDER_INFO if role == "sender" else RECEIVER_INFO
    out = registry.join(1, 2, role, b"/n", 2, info)
    assert [(w, m[:3]) for w, m in out] == [(1, ("rejected", 2, 400))]
    pipe = registry.pipes[b"/n"]
    assert pipe.n == 3 and pipe.receivers == [(0, 1)] and pipe.sender is None


@pytest.mark.parametrize("role", ["sender", "receiver"])
def test_any_party_on_a_streaming_path_is_refused_with_409(registry, role):
    start_transfer(registry, b"/busy")
    info = SENDER_INFO if role == "sender" else RECEIVER_INFO
    out = registry.join(0, 50, role, b"/busy", 1, info)
    assert [(w, m[:3]) for w, m in out] == [(0, ("rejected", 50, 409))]
    assert registry.pipes[b"/busy"].state is PipeState.STREAMING


def test_a_refused_first_party_leaves_no_pipe_behind(arena, rec):
    registry = make_registry(arena, rec, max_pipes=1)
    registry.join(0, 1, "receiver", b"/one", 1, RECEIVER_INFO)
    out = registry.join(0, 2, "receiver", b"/two", 1, RECEIVER_INFO)
    assert [(w, m[:3]) for w, m in out] == [(0, ("rejected", 2, 503))]
    assert set(registry.pipes) == {b"/one"}


# -- leaving ----------------------------------------------------------------------------------
def test_a_waiting_receiver_that_leaves_no_longer_counts_toward_n(registry):
    registry.join(0, 1, "sender", b"/leave", 2, SENDER_INFO)
    registry.join(1, 2, "receiver", b"/leave", 2, RECEIVER_INFO)
    assert registry.leave(1, 2) == [(0, ("progress", 1, 0, 2))]
    assert registry.join(1, 3, "receiver", b"/leave", 2, RECEIVER_INFO) == \
        [(0, ("progress", 1, 1, 2))]
    out = registry.join(0, 4, "receiver", b"/leave", 2, RECEIVER_INFO)
    started = sorted(c for _, m in messages(out, "start_receivers") for c in m[4])
    assert started == [3, 4], "the receiver that left must not be started"


def test_a_waiting_sender_that_leaves_frees_the_path_for_another_sender(registry):
    registry.join(0, 3, "receiver", b"/sleave", 2, RECEIVER_INFO)
    registry.join(1, 4, "sender", b"/sleave", 2, SENDER_INFO)
    assert registry.leave(1, 4) == []          # nobody to tell: receivers get no progress
    pipe = registry.pipes[b"/sleave"]
    assert pipe.sender is None and pipe.state is PipeState.WAITING
    out = registry.join(0, 5, "sender", b"/sleave", 2, SENDER_INFO)
    assert out == [(0, ("progress", 5, 1, 2))]


def test_the_last_waiting_party_leaving_closes_the_pipe(registry):
    registry.join(0, 1, "receiver", b"/last", 2, RECEIVER_INFO)
    assert registry.counts() == (1, 0)
    assert registry.leave(0, 1) == []
    assert b"/last" not in registry.pipes
    assert registry.counts() == (0, 0)
    # The path is free again, even with another n.
    assert registry.join(0, 2, "receiver", b"/last", 3, RECEIVER_INFO) == []
    assert registry.pipes[b"/last"].n == 3


def test_leave_of_a_party_already_streaming_changes_nothing(registry):
    start_transfer(registry, b"/late", (0, 1), ((1, 2),))
    assert registry.leave(1, 2) == []
    assert registry.pipes[b"/late"].state is PipeState.STREAMING


# -- slots ------------------------------------------------------------------------------------
def fill_slots(registry):
    """Both of the arena's slots busy with a transfer each; their (slot, gen)."""
    return [start_transfer(registry, p, (0, s), ((1, s + 1),))[1]
            for p, s in ((b"/s1", 1), (b"/s2", 3))]


def test_a_complete_pipe_with_no_free_slot_waits_in_line_and_starts_when_one_is_freed(
        arena, registry):
    busy = fill_slots(registry)
    registry.join(1, 5, "receiver", b"/s3", 2, RECEIVER_INFO)
    registry.join(0, 6, "receiver", b"/s3", 2, RECEIVER_INFO)
    out = registry.join(1, 7, "sender", b"/s3", 2, SENDER_INFO)
    assert out == [(1, ("progress", 7, 2, 2))]            # told: all here, no refusal
    assert registry.pipes[b"/s3"].state is PipeState.MATCHED
    assert registry.counts() == (1, 2)
    # The first transfer ends; its slot starts the waiting pipe.
    slot, gen = busy[0]
    registry.body_ended(0, slot, gen, 5)
    registry.receiver_ended(1, slot, gen, 2, ok=True)
    assert registry.released(0, slot, gen, "sender") == []
    out = registry.released(1, slot, gen, "receivers")
    assert sorted(m[0] for _, m in out) == ["start_receivers", "start_receivers",
                                            "start_sender"]
    assert registry.pipes[b"/s3"].state is PipeState.STREAMING
    assert registry.counts() == (0, 2)


def test_pipes_waiting_for_a_slot_start_first_come_first_served(arena, registry):
    busy = fill_slots(registry)                  # receivers (1, 2) and (1, 4)
    for k, path in enumerate((b"/q1", b"/q2")):
        registry.join(1, 10 + k, "receiver", path, 1, RECEIVER_INFO)
        registry.join(0, 20 + k, "sender", path, 1, SENDER_INFO)
    started = []
    for (slot, gen), receiver in zip(busy, (2, 4)):
        registry.sender_lost(0, slot, gen, Outcome.SENDER_LOST, "test")
        registry.receiver_ended(1, slot, gen, receiver, ok=False)
        registry.released(0, slot, gen, "sender")
        started += [m[1] for _, m in registry.released(1, slot, gen, "receivers")
                    if m[0] == "start_sender"]
    assert started == [20, 21]


def test_a_party_leaving_a_pipe_in_line_for_a_slot_makes_it_wait_for_its_parties_again(
        arena, registry):
    fill_slots(registry)
    registry.join(1, 5, "receiver", b"/s3", 1, RECEIVER_INFO)
    registry.join(1, 7, "sender", b"/s3", 1, SENDER_INFO)
    assert registry.pipes[b"/s3"].state is PipeState.MATCHED
    assert registry.leave(1, 5) == [(1, ("progress", 7, 0, 1))]
    assert registry.pipes[b"/s3"].state is PipeState.WAITING
    assert b"/s3" not in registry.slot_queue


def test_a_pipe_in_line_for_a_slot_expires_with_the_rendezvous_timeout(arena, rec):
    registry = make_registry(arena, rec, rendezvous_timeout_s=5)
    fill_slots(registry)
    registry.join(1, 5, "receiver", b"/s3", 1, RECEIVER_INFO)
    registry.join(0, 7, "sender", b"/s3", 1, SENDER_INFO)
    out = registry.expire(time.monotonic() + 6)
    assert sorted((w, m[0], m[1]) for w, m in out) == [(0, "expired", 7), (1, "expired", 5)]
    assert all("slot" in m[2] for _, m in out)
    assert b"/s3" not in registry.pipes and not registry.slot_queue


def test_released_by_every_holder_frees_the_slot(arena, registry, rec):
    out, (slot, gen) = start_transfer(registry, b"/rel", (0, 1), ((1, 2),))
    f = ring.SlotFields(arena, slot)
    assert slot not in registry.slots.free
    assert registry.body_ended(0, slot, gen, 5) == []
    assert registry.receiver_ended(1, slot, gen, 2, ok=True) == \
        [(0, ("finished", slot, gen, 1, 0))]
    assert b"/rel" not in registry.pipes
    assert len(rec.lines) == 1 and "outcome=ok" in rec.lines[0] and "bytes=5" in rec.lines[0]

    registry.released(0, slot, gen - 1)          # a stale generation is ignored
    registry.released(0, slot, gen)
    assert slot not in registry.slots.free and registry.slots.in_use == 1
    assert arena.load(f.state) == ring.STREAMING
    registry.released(1, slot, gen)
    assert slot in registry.slots.free and registry.slots.in_use == 0
    assert arena.load(f.state) == ring.IDLE


def test_a_transfer_whose_receivers_end_before_the_producers_count_logs_it_when_it_comes(
        arena, registry, rec):
    """The receivers' worker saw the ring's DONE and reported first: the line waits for the
    producer's BodyEnded (it said bytes=0 before), and a second transfer is not held up."""
    _, (slot, gen) = start_transfer(registry, b"/early", (0, 1), ((1, 2), (1, 3)))
    assert registry.receiver_ended(1, slot, gen, 2, ok=True) == []
    assert registry.receiver_ended(1, slot, gen, 3, ok=True) == \
        [(0, ("finished", slot, gen, 2, 0))]
    assert b"/early" not in registry.pipes and rec.lines == []
    assert registry.body_ended(0, slot, gen, 5) == []
    assert len(rec.lines) == 1 and "path='/early'" in rec.lines[0]
    assert "bytes=5" in rec.lines[0] and "outcome=ok" in rec.lines[0]
    assert registry.unlogged == {}


def test_a_line_waiting_for_its_count_is_written_when_the_producers_worker_dies(
        arena, registry, rec):
    _, (slot, gen) = start_transfer(registry, b"/orphan", (0, 1), ((1, 2),))
    registry.receiver_ended(1, slot, gen, 2, ok=True)
    assert rec.lines == []
    registry.worker_died(0)
    assert len(rec.lines) == 1 and "path='/orphan'" in rec.lines[0]
    assert "outcome=ok" in rec.lines[0] and registry.unlogged == {}


def test_a_worker_holding_sender_and_receivers_frees_the_slot_only_after_both(arena, registry):
    """One worker's producer may abort and release while its receivers still send what was
    published: the ring must not be punched (zeroed) under them."""
    _, (slot, gen) = start_transfer(registry, b"/both", (0, 1), ((0, 2),))
    f = ring.SlotFields(arena, slot)
    registry.sender_lost(0, slot, gen, Outcome.SENDER_LOST, "test")
    registry.released(0, slot, gen, "sender")
    assert slot not in registry.slots.free and arena.load(f.state) != ring.IDLE
    registry.receiver_ended(0, slot, gen, 2, ok=False)
    registry.released(0, slot, gen, "receivers")
    assert slot in registry.slots.free and arena.load(f.state) == ring.IDLE


def test_a_freed_slot_takes_the_next_transfer_when_the_table_was_full(arena, registry):
    _, (slot1, gen1) = start_transfer(registry, b"/f1", (0, 1), ((1, 2),))
    start_transfer(registry, b"/f2", (0, 3), ((1, 4),))
    registry.sender_lost(0, slot1, gen1, Outcome.SENDER_LOST, "test")
    registry.receiver_ended(1, slot1, gen1, 2, ok=False)
    registry.released(0, slot1, gen1)
    registry.released(1, slot1, gen1)
    _, (slot3, _) = start_transfer(registry, b"/f3", (1, 5), ((0, 6),))
    assert slot3 == slot1


# -- faults -----------------------------------------------------------------------------------
def test_death_of_the_senders_worker_aborts_the_slot_and_kicks_receiver_workers(
        arena, registry, rec):
    out, (slot, gen) = start_transfer(registry, b"/died", (0, 1), ((1, 2),))
    f = ring.SlotFields(arena, slot)
    out = registry.worker_died(0)
    assert arena.load(f.state) == ring.ABORTED
    assert 1 in rec.kicks and arena.take_marks(1) == [slot]   # the kick names the slot
    assert 0 not in rec.kicks and arena.take_marks(0) == []   # nothing for the dead index
    assert all(w != 0 for w, _ in out), "nothing may be sent to the dead worker"
    pipe = registry.pipes[b"/died"]
    assert pipe.state is PipeState.ABORTED
    assert all(w != 0 for _, w in registry.slots.holders[slot])

    assert registry.receiver_ended(1, slot, gen, 2, ok=False) == []
    assert b"/died" not in registry.pipes
    assert "outcome=aborted" in rec.lines[-1]
    registry.released(1, slot, gen)
    assert slot in registry.slots.free and arena.load(f.state) == ring.IDLE


def test_death_of_a_receivers_worker_drops_its_cursor_and_kicks_the_producer(
        arena, registry, rec):
    _, (slot, gen) = start_transfer(registry, b"/rdied", (0, 1), ((1, 2), (0, 3)))
    f = ring.SlotFields(arena, slot)
    registry.worker_died(1)
    assert arena.load(f.cursor(1)) == ring.NONE
    assert arena.load(f.cursor(0)) == 0
    assert arena.load(f.state) == ring.STREAMING
    assert 0 in rec.kicks and arena.take_marks(0) == [slot]   # the producer's slot named
    assert 1 not in rec.kicks and arena.take_marks(1) == []
    pipe = registry.pipes[b"/rdied"]
    assert pipe.lost_receivers == 1 and pipe.state is PipeState.STREAMING


def test_death_of_a_worker_that_held_both_ends_kicks_only_the_living(arena, registry, rec):
    """Worker 0 sent a pipe whose receivers were on 0 and 1: worker 1 is told, the dead
    index gets neither a kick nor a mark (its replacement would make a pass for nothing)."""
    _, (slot, gen) = start_transfer(registry, b"/both", (0, 1), ((0, 2), (1, 3)))
    registry.worker_died(0)
    assert rec.kicks == [1] and arena.take_marks(1) == [slot]
    assert arena.take_marks(0) == []


def test_death_of_a_worker_with_waiting_parties_makes_them_leave(registry):
    registry.join(1, 1, "sender", b"/wdied", 3, SENDER_INFO)
    registry.join(0, 2, "receiver", b"/wdied", 3, RECEIVER_INFO)
    registry.join(1, 3, "receiver", b"/wdied", 3, RECEIVER_INFO)
    out = registry.worker_died(1)
    assert out == []                      # the only one to tell (the sender) died with it
    pipe = registry.pipes[b"/wdied"]
    assert pipe.sender is None and pipe.receivers == [(0, 2)]


def test_expire_closes_pipes_past_the_rendezvous_timeout(arena, rec):
    registry = make_registry(arena, rec, rendezvous_timeout_s=0.01, workers=1)
    registry.join(0, 1, "receiver", b"/old", 2, RECEIVER_INFO)
    registry.join(1, 2, "sender", b"/old", 2, SENDER_INFO)
    created = registry.pipes[b"/old"].created
    assert registry.expire(created) == []            # not yet past the timeout
    assert registry.next_expiry() == pytest.approx(created + 0.01)

    time.sleep(0.02)
    out = registry.expire(time.monotonic())
    assert sorted((w, m[:2]) for w, m in out) == [(0, ("expired", 1)), (1, ("expired", 2))]
    assert all("1 of 2 receivers" in m[2] for _, m in out)
    assert b"/old" not in registry.pipes and registry.counts() == (0, 0)
    assert registry.next_expiry() is None
    assert registry.leave(0, 1) == []                # the party is no longer registered


def test_expire_leaves_streaming_pipes_alone(arena, rec):
    registry = make_registry(arena, rec, rendezvous_timeout_s=0.01, workers=1)
    start_transfer(registry, b"/streaming")
    assert registry.expire(time.monotonic() + 60) == []
    assert registry.pipes[b"/streaming"].state is PipeState.STREAMING


# -- splice (n = 1) ----------------------------------------------------------------------------
def test_an_n1_pipe_on_one_worker_starts_a_splice_there_and_touches_no_ring(arena, rec):
    registry = make_registry(arena, rec, transmit="auto")
    registry.join(0, 10, "receiver", b"/one", 1, RECEIVER_INFO)
    out = registry.join(0, 11, "sender", b"/one", 1, SENDER_INFO)
    (w, m), = out
    assert w == 0 and m[0] == "start_splice" and m[1] == 11 and m[4] == 10
    assert m[2] >= arena.slots and registry.slots.in_use == 0


def test_an_n1_pipe_across_workers_hands_the_receiver_over_and_rehomes_it(arena, rec):
    registry = make_registry(arena, rec, transmit="auto")
    registry.join(1, 10, "receiver", b"/two", 1, RECEIVER_INFO)
    out = dict(registry.join(0, 11, "sender", b"/two", 1, SENDER_INFO))
    start, hand_over = out[0], out[1]
    assert start[0] == "start_splice" and start[4] is None
    assert hand_over[0] == "hand_over" and hand_over[1] == 10
    slot, gen = start[2], start[3]
    (w, attach), = registry.handed(1, control.Handed(10, slot, gen, "1.1", 7))
    assert w == 0 and attach[0] == "attach_receiver" and attach[5] == 7
    new_id = attach[3]
    assert registry.pipes[b"/two"].receivers == [(0, new_id)]
    # The receiver now lives in the sender's worker: its death resolves everything.
    registry.worker_died(0)
    assert b"/two" not in registry.pipes and registry.slots.in_use == 0


def test_a_receiver_gone_before_its_hand_over_aborts_the_sender_visibly(arena, rec):
    registry = make_registry(arena, rec, transmit="auto")
    registry.join(1, 10, "receiver", b"/gone", 1, RECEIVER_INFO)
    out = dict(registry.join(0, 11, "sender", b"/gone", 1, SENDER_INFO))
    slot, gen = out[0][2], out[0][3]
    (w, abort), = registry.handed(1, control.Handed(10, slot, gen, "1.1", -1))
    assert w == 0 and abort[0] == "abort_sender" and "receivers left" in abort[3]


@pytest.mark.parametrize("lends,written,kept", [(False, 1024, True), (False, 128 * 1024, False),
                                                 (True, 1024, False)],
                         ids=["small-copy", "large-copy", "sendfile"])
def test_a_freed_slot_keeps_only_a_small_copy_transfers_pages(arena, lends, written, kept):
    """Release punches the pages a transfer wrote, but a copy-mode transfer of at most
    KEEP_PAGES leaves them for the next (no socket was lent them); sendfile's are always
    punched, whatever their size (sockets may still be sending them)."""
    slots = SlotTable(arena)
    slot, gen = slots.assign(0, {1}, lends_pages=lends)
    arena.write(slot, 0, b"x" * written)
    arena.store(ring.SlotFields(arena, slot).high, written)
    assert not slots.release(0, slot, gen, "sender")
    assert slots.release(1, slot, gen, "receivers")
    base = arena.ring_base(slot)
    assert (bytes(arena.view[base:base + 1]) == b"x") is kept     # a punched page reads 0

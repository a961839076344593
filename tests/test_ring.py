"""The arena's shared fields across real processes: layout, ordering helpers, no lost wake-up."""
from __future__ import annotations

import os
import select

import pytest

from relayd import logs, ring
from relayd.worker import kick_marked

ROUNDS = int(os.environ.get("RELAYD_WAKEUP_ROUNDS", "20000"))


@pytest.fixture
def arena():
    a = ring.Arena(slots=2, capacity=1 << 19, worker_slots=4)
    yield a
    a.close()


def test_slot_fields_sit_on_their_own_cache_lines(arena):
    f0, f1 = ring.SlotFields(arena, 0), ring.SlotFields(arena, 1)
    cursors = [f0.cursor(w) for w in range(4)] + [f1.cursor(w) for w in range(4)]
    assert all(c % ring.LINE_U64 == 0 for c in cursors)
    assert len({c // ring.LINE_U64 for c in cursors}) == 8
    assert f0.tail // ring.LINE_U64 not in {c // ring.LINE_U64 for c in cursors}
    assert arena.ring_base(0) % ring.PAGE == 0 and arena.ring_base(1) % ring.PAGE == 0
    assert arena.ring_base(0) >= (f1.cursor(3) + ring.LINE_U64) * 8


def test_a_store_in_one_process_is_seen_by_another(arena):
    f = ring.SlotFields(arena, 1)
    pid = os.fork()
    if pid == 0:
        arena.store(f.tail, (1 << 63) + 12345)
        os._exit(0)
    os.waitpid(pid, 0)
    assert arena.load(f.tail) == (1 << 63) + 12345


def test_ring_write_wraps_at_the_end_and_punch_zeroes_whole_pages(arena):
    cap = arena.capacity
    arena.write(0, 3 * cap - 5, b"0123456789")      # lap 3, 5 bytes before the end
    base = arena.ring_base(0)
    assert bytes(arena.view[base + cap - 5:base + cap]) == b"01234"
    assert bytes(arena.view[base:base + 5]) == b"56789"
    arena.punch(0, 0, ring.PAGE)
    assert bytes(arena.view[base:base + 5]) == b"\0" * 5
    assert bytes(arena.view[base + cap - 5:base + cap]) == b"01234"


def _consume_until(reader: ring.RingReader, efd: int, target: int) -> bool:
    """A receiver worker waiting for tail >= target, by ReceiverGroup's protocol: read state
    and tail; caught up -> sleep_flag(True) (store, fence), re-check with moved(); sleep on
    the eventfd only if nothing moved; on a kick clear the flag and look again. False: a
    lost wake-up (nobody kicked within 5 s)."""
    state, tail = reader.state_and_tail()
    while tail < target:
        reader.sleep_flag(True)
        if not reader.moved(tail, state):
            ready, _, _ = select.select([efd], [], [], 5.0)
            if not ready:
                return False
            os.eventfd_read(efd)
        reader.sleep_flag(False)
        state, tail = reader.state_and_tail()
    return True


def _produce_until(writer: ring.RingWriter, efd: int, target: int) -> bool:
    """The producer waiting for the lowest cursor >= target, by SenderStream.pause's protocol:
    post wake_at, fence, re-check the cursors (refresh); sleep on the eventfd only if they
    are still short; on a kick look again, and clear the mark once through."""
    while True:
        writer.post_wake(target)
        ring.fence()
        if writer.refresh() >= target:
            writer.post_wake(0)
            return True
        ready, _, _ = select.select([efd], [], [], 5.0)
        if not ready:
            return False
        os.eventfd_read(efd)


def test_ping_pong_between_processes_loses_no_wake_up(arena):
    """Producer publishes tail (RingWriter.publish: store, fence, kick a waiting worker),
    consumer answers with its cursor (RingReader.publish: store, fence, kick the producer at
    its mark), each sleeping on its eventfd when it has nothing to do: without the fences,
    x86 lets a store and the following load pass each other and a kick is lost (the probe
    in DESIGN.md lost 1-446 per million)."""
    producer, consumer = 0, 1
    f = ring.SlotFields(arena, 0)
    f.reset(arena, producer, [consumer], gen=1)
    efds = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
    kick = lambda w: os.eventfd_write(efds[w], 1)  # noqa: E731
    pid = os.fork()
    if pid == 0:
        reader = ring.RingReader(arena, 0, consumer, kick)
        ok = True
        for i in range(1, ROUNDS + 1):
            if not _consume_until(reader, efds[consumer], i):
                ok = False
                break
            reader.publish(i, ring.NONE)
        os._exit(0 if ok else 1)
    writer = ring.RingWriter(arena, 0, [consumer], sendfile=False,
                             punch_block=arena.capacity // 2, kick=kick)
    lost = 0
    for i in range(1, ROUNDS + 1):
        writer.publish(i)
        if not _produce_until(writer, efds[producer], i):
            lost += 1
            break
    _, status = os.waitpid(pid, 0)
    assert lost == 0 and os.waitstatus_to_exitcode(status) == 0
    assert arena.load(f.cursor(consumer)) == ROUNDS
    for efd in efds:
        os.close(efd)


def test_a_receiver_that_looks_only_at_marked_slots_misses_no_wake_up(arena):
    """worker.kick_marked: after a kick a worker looks only at the slots marked for it
    (Arena.take_marks: clear, fence). Two pipes' producers in one process, both pipes'
    receivers in another, which after sleeping reads only the marked slots' tails: a mark
    lost, or cleared after the tail it announces was read, leaves a receiver asleep with
    bytes to read and its producer waiting for it -- a 5 s silence fails the test."""
    producer, consumer, slots = 0, 1, (0, 1)
    for s in slots:
        ring.SlotFields(arena, s).reset(arena, producer, [consumer], gen=1)
    efds = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
    kick = lambda w: os.eventfd_write(efds[w], 1)  # noqa: E731
    rounds = max(1, ROUNDS // 4)
    pid = os.fork()
    if pid == 0:
        readers = [ring.RingReader(arena, s, consumer, kick) for s in slots]
        seen, look = [0, 0], list(slots)
        while True:
            moved = []
            for s in look:            # as ReceiverGroup.on_kick: a pass over this slot only
                readers[s].sleep_flag(False)
                _, tail = readers[s].state_and_tail()
                if tail > seen[s]:
                    seen[s] = tail
                    readers[s].publish(tail, ring.NONE)
                readers[s].sleep_flag(True)          # caught up: flag, fence, look again
                if readers[s].moved(seen[s], ring.STREAMING):
                    moved.append(s)
            if min(seen) == rounds:
                break
            if moved:
                look = moved
                continue
            ready, _, _ = select.select([efds[consumer]], [], [], 5.0)
            if not ready:
                os._exit(1)
            os.eventfd_read(efds[consumer])
            look = arena.take_marks(consumer)
        os._exit(0)
    writers = [ring.RingWriter(arena, s, [consumer], sendfile=False,
                               punch_block=arena.capacity // 2, kick=kick) for s in slots]
    lost = 0
    for i in range(1, rounds + 1):
        for w in writers:
            w.publish(i)
        if not all(_produce_until(w, efds[producer], i) for w in writers):
            lost += 1
            break
    _, status = os.waitpid(pid, 0)
    assert lost == 0 and os.waitstatus_to_exitcode(status) == 0
    assert [arena.load(ring.SlotFields(arena, s).cursor(consumer)) for s in slots] == \
        [rounds, rounds]
    for efd in efds:
        os.close(efd)


def test_a_part_that_raises_in_a_kick_does_not_spend_the_other_slots_kicks(
        arena, monkeypatch):
    """kick_marked clears a worker's marks, then runs each marked slot's parts: one part
    raising past its guard is logged, and the other marked slots still run."""
    lines: list[str] = []
    monkeypatch.setattr(logs, "_write", lines.append)
    ran: list[str] = []

    class Part:
        def __init__(self, name: str, fails: bool = False):
            self.name, self.fails = name, fails

        def on_kick(self) -> None:
            ran.append(self.name)
            if self.fails:
                raise RuntimeError("a bug past the guard")

    arena.mark(2, 0)
    arena.mark(2, 1)
    groups = {0: Part("group 0", fails=True), 1: Part("group 1")}
    senders = {0: Part("sender 0"), 1: Part("sender 1")}
    kick_marked(arena, 2, groups, senders)
    assert ran == ["group 0", "sender 0", "group 1", "sender 1"]
    assert arena.take_marks(2) == []
    assert any("error in a kick of slot 0" in line and "RuntimeError" in line
               for line in lines)


def test_marks_name_each_slot_once_and_are_cleared_by_taking(arena):
    arena.mark(1, 1)
    arena.mark(1, 0)
    arena.mark(1, 1)
    arena.mark(2, 1)
    assert arena.take_marks(1) == [0, 1]
    assert arena.take_marks(1) == []
    assert arena.take_marks(2) == [1]
    assert arena.take_marks(0) == []


def test_a_cut_for_a_tighter_bound_at_the_same_position_still_reaches_the_readers():
    """--slow drop: a cut at the spill limit (lag 0) and then one for the spent budget at the
    same position: the receivers' workers must see the budget's smaller lag, and be kicked,
    or they would wait for a spill limit's lag while the budget holds the producer."""
    arena = ring.Arena(slots=1, capacity=1 << 19, worker_slots=2)
    kicked: list[int] = []
    try:
        f = ring.SlotFields(arena, 0)
        f.reset(arena, producer=0, receiver_workers=[1], gen=1)
        writer = ring.RingWriter(arena, 0, [1], False, 64 * 1024, kicked.append)
        reader = ring.RingReader(arena, 0, 1, lambda worker: None)
        writer.cut_below(1000)
        assert (reader.drop_below(), reader.drop_lag(), kicked) == (1000, 0, [1])
        writer.cut_below(1000, 4 << 20)
        assert (reader.drop_below(), reader.drop_lag(), kicked) == (1000, 4 << 20, [1, 1])
        writer.cut_below(900, 8 << 20)                  # a looser bound changes nothing
        assert (reader.drop_below(), reader.drop_lag(), kicked) == (1000, 4 << 20, [1, 1])
    finally:
        arena.close()

"""The arena's shared fields across real processes: layout, ordering helpers, no lost wake-up."""
from __future__ import annotations

import os
import select

import pytest

from relayd import ring

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


def _wait(arena, efd, field, target, flag):
    """Sleep protocol of streaming.py: flag, fence, re-check, sleep on the eventfd."""
    while arena.load(field) < target:
        arena.store(flag, 1)
        ring.fence()
        if arena.load(field) >= target:
            arena.store(flag, 0)
            break
        ready, _, _ = select.select([efd], [], [], 5.0)
        if not ready:
            return False                     # a lost wake-up: nobody will kick us again
        os.eventfd_read(efd)
        arena.store(flag, 0)
    return True


def _publish(arena, efd, field, value, flag):
    arena.store(field, value)
    ring.fence()
    if arena.load(flag):
        os.eventfd_write(efd, 1)


def test_ping_pong_between_processes_loses_no_wake_up(arena):
    """Producer publishes tail, consumer answers with its cursor, each sleeping on an eventfd
    when it has nothing to do: without the fence, x86 lets a store and the following load
    pass each other and a kick is lost (the probe in DESIGN.md lost 1-446 per million)."""
    f = ring.SlotFields(arena, 0)
    to_consumer = os.eventfd(0, os.EFD_NONBLOCK)
    to_producer = os.eventfd(0, os.EFD_NONBLOCK)
    pid = os.fork()
    if pid == 0:
        ok = True
        for i in range(1, ROUNDS + 1):
            if not _wait(arena, to_consumer, f.tail, i, f.waiting(1)):
                ok = False
                break
            _publish(arena, to_producer, f.cursor(1), i, f.wake_at)
        os._exit(0 if ok else 1)
    lost = 0
    for i in range(1, ROUNDS + 1):
        _publish(arena, to_consumer, f.tail, i, f.waiting(1))
        if not _wait(arena, to_producer, f.cursor(1), i, f.wake_at):
            lost += 1
            break
    _, status = os.waitpid(pid, 0)
    assert lost == 0 and os.waitstatus_to_exitcode(status) == 0
    assert arena.load(f.cursor(1)) == ROUNDS

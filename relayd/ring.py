"""The shared-memory arena: slot table, per-pipe rings, positions, and the only code that
orders loads and stores.

One memfd, created by the supervisor before the first fork and mapped (MAP_SHARED) by every
worker through inheritance. Its fields are little-endian u64 in 64-byte lines of eight, but
for the wake marks, a byte each:

    | stats: a block per worker index, one for the supervisor (stats.py)     (own pages) |
    | slot table, per slot:                                                  (own pages) |
    |   line 0   | gen | tail | state | wake_at | producer | high |                       |
    |   line 1   | spill_active | spill_start | spill_fd | spill_pid | file_wake_at |     |
    |            | drop_below | spill_end | drop_lag |                                    |
    |   line 2+i | cursor[i] | waiting[i] | file_cursor[i] |  one line per worker index i |
    | wake marks: per worker index, one byte per slot                        (own pages) |
    | ring 0 | ring 1 | ... each `capacity` bytes (a power of two), page aligned          |

A *position* counts bytes since the pipe began and never wraps; an *offset* is
`position & (capacity - 1)`. Only this module turns one into the other. Every field has
exactly one writer, but for the marks:
    gen         the supervisor, each time it assigns the slot (stale messages are ignored)
    tail        the producer's worker: receiver wire bytes published so far
    state       the producer's worker (the supervisor when that worker died)
    wake_at     the producer's worker: kick me when the lowest ring cursor reaches this
    high        the producer's worker: the highest position it wrote (published or not);
                the slot's release punches the pages below it, and only those (a small
                copy-mode transfer's are kept for the next: rendezvous.KEEP_PAGES)
    spill_*     the producer's worker (spill.py): the spill file, where it starts, and
                spill_end, NONE while the file grows, else the position it holds up to;
                spill_active returns to 0 before the file's descriptor is closed
    file_wake_at, drop_below, drop_lag   the producer's worker: same mark for file readers;
                file readers below drop_below and drop_lag behind are cut (--slow drop;
                drop_lag is the bound the producer met: the spill limit, or less when the
                node's spill budget ran out first)
    cursor[i]   worker i: the lowest position any of its ring readers still needs, or NONE
    waiting[i]  worker i: it has a caught-up receiver of this pipe and sleeps on its eventfd
    file_cursor[i]  worker i: the lowest position of its spill-file readers, or NONE
    mark[i][slot]   set to 1 by whoever kicks worker i about the slot, before the kick;
                cleared by worker i (then a fence) before it looks at the slot. A kick then
                costs the parts of the slots it names, not every pipe of the worker.

Memory ordering (x86-64 TSO only; the supervisor refuses other machines): every load and
store of those fields goes through `Arena.load`/`store`, 8-byte aligned through a memoryview
cast, so no store is torn. Data is written before the tail store, the tail before the state;
a reader loads state before tail. "Store my flag, then load theirs" needs a full fence on
both sides, else x86 may reorder them and a wake-up is lost: `fence()` takes and releases a
lock, whose lock-prefixed instruction is a full barrier.

A mark is a one-byte store through a byte memoryview (`Arena.mark`), never a read-modify-
write, so kickers setting marks in one row at once cannot undo each other; the worker clears
only the bytes it saw set. The kick that follows a mark is an `eventfd_write`, a syscall
that takes a lock in the kernel: the mark is visible before the kick can be counted.

The sendfile hazard (DESIGN): a socket keeps references to the ring pages it sends until
the peer has read them. So in sendfile mode a block is punched out of the memfd before it is
written again, and only once the lowest cursor has passed the end of its previous lap;
in-flight sockets keep the old pages. `RingWriter` owns that rule.
"""
from __future__ import annotations

import mmap
import os
import threading
from typing import Callable, Iterable

from relayd.fileio import SYSCALLS, Syscalls, write_all, writev_all

PAGE = mmap.PAGESIZE
LINE_U64 = 8                     # a 64-byte cache line holds eight u64
NONE = (1 << 64) - 1             # cursor of a worker that has no reader of the pipe
STATS_U64 = 4 * LINE_U64         # u64 per stats block (layout: stats.py)

# slot states
IDLE, STREAMING, DONE, ABORTED = 0, 1, 2, 3

_fence_lock = threading.Lock()


def shmem_huge_pages_possible() -> bool:
    """Whether the kernel may back the memfd with large folios. Punching part of a large
    folio that sockets still reference zeroes it in place (measured on ext4 for the spill
    file), so the sendfile ring's punch rule is only safe with small shmem pages."""
    import glob
    for path in ["/sys/kernel/mm/transparent_hugepage/shmem_enabled",
                 *glob.glob("/sys/kernel/mm/transparent_hugepage/hugepages-*/shmem_enabled")]:
        try:
            with open(path) as f:
                selected = f.read().split("[")[1].split("]")[0]
        except (OSError, IndexError):
            continue
        if selected in ("always", "within_size", "force"):
            return True
    return False


def fence() -> None:
    """A full memory barrier (lock-prefixed instruction inside the lock)."""
    _fence_lock.acquire()
    _fence_lock.release()


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class Arena:
    """The mapped memfd; `q` is its u64 view, the only way fields are read and written."""

    def __init__(self, slots: int, capacity: int, worker_slots: int):
        self.slots = slots
        self.capacity = capacity
        self.mask = capacity - 1
        self.worker_slots = worker_slots
        self.fd = -1
        self.mm = None
        self.stats_bytes = _round_up((worker_slots + 1) * STATS_U64 * 8, PAGE)
        self.slot_lines = 2 + worker_slots
        self.table_bytes = _round_up(slots * self.slot_lines * 64, PAGE)
        self.marks_base = self.stats_bytes + self.table_bytes
        self.rings_base = self.marks_base + _round_up(worker_slots * slots, PAGE)
        self.size = self.rings_base + slots * capacity
        self.fd = os.memfd_create("relayd-arena", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)
        self.q = self.view[: self.rings_base].cast("Q")
        self.marks = self.view[self.marks_base: self.marks_base + worker_slots * slots]
        self._table_u64 = self.stats_bytes // 8
        self.calls: Syscalls = SYSCALLS

    # -- field addresses (u64 indexes) ---------------------------------------------------
    def stat_index(self, worker: int, field: int) -> int:
        return worker * STATS_U64 + field

    def sup_index(self, field: int) -> int:
        return self.worker_slots * STATS_U64 + field

    def slot_index(self, slot: int) -> int:
        """u64 index of the slot's first line: gen, tail, state, wake_at, producer."""
        return self._table_u64 + slot * self.slot_lines * LINE_U64

    def ring_base(self, slot: int) -> int:
        return self.rings_base + slot * self.capacity

    # -- ordered access --------------------------------------------------------------------
    def load(self, index: int) -> int:
        return self.q[index]

    def store(self, index: int, value: int) -> None:
        self.q[index] = value

    # -- wake marks ------------------------------------------------------------------------
    def mark(self, worker: int, slot: int) -> None:
        """Before kicking a worker: the slot it is kicked about (a one-byte store)."""
        self.marks[worker * self.slots + slot] = 1

    def take_marks(self, worker: int) -> list[int]:
        """The slots a worker was kicked about since it last looked, its marks cleared;
        then a fence, so what it loads next is at least what the kicker stored before
        marking (a mark set after the clear stays, with its kick still to come)."""
        row = self.marks[worker * self.slots:(worker + 1) * self.slots]
        seen = row.tobytes()
        slots = []
        at = seen.find(1)
        while at >= 0:
            row[at] = 0
            slots.append(at)
            at = seen.find(1, at + 1)
        if slots:
            fence()
        return slots

    # -- ring bytes ------------------------------------------------------------------------
    def span(self, slot: int, position: int, end: int) -> tuple[int, int]:
        """(arena offset, length) of the bytes from position toward end that lie contiguous
        in the slot's ring (they stop at the ring's end)."""
        off = position & self.mask
        return self.ring_base(slot) + off, min(end - position, self.capacity - off)

    def peek(self, slot: int, position: int, length: int) -> bytes:
        """A copy of ring bytes at position, across the ring's end if need be."""
        at, first = self.span(slot, position, position + length)
        data = bytes(self.view[at:at + first])
        if first < length:
            base = self.ring_base(slot)
            data += bytes(self.view[base:base + length - first])
        return data

    def write(self, slot: int, position: int, data) -> None:
        """Copy data into the ring at position, splitting at the ring's end."""
        at, first = self.span(slot, position, position + len(data))
        if first == len(data):
            write_all(self.fd, data, at, self.calls)
        else:
            mv = memoryview(data)
            write_all(self.fd, mv[:first], at, self.calls)
            write_all(self.fd, mv[first:], self.ring_base(slot), self.calls)

    def writev(self, slot: int, position: int, buffers: list, length: int) -> bool:
        """Gather-write buffers at position; False (nothing written) if they would wrap."""
        at, contiguous = self.span(slot, position, position + length)
        if contiguous < length:
            return False
        writev_all(self.fd, buffers, at, self.calls)
        return True

    def punch(self, slot: int, offset: int, length: int) -> None:
        """Give ring pages back to the kernel; sockets still sending them keep the old pages."""
        self.mm.madvise(mmap.MADV_REMOVE, self.ring_base(slot) + offset, length)

    def punch_written(self, slot: int, keep: int = 0) -> None:
        """At a slot's release: give back every page its transfer wrote -- and only those (a
        1 KiB pipe punches one page, not its whole window) -- unless it wrote no more than
        `keep` bytes. A kept page was never lent to a socket (only copy-mode slots keep), so
        a sendfile transfer may take it for a first-lap page."""
        high = self.load(SlotFields(self, slot).high)
        length = min(_round_up(high, PAGE), self.capacity)
        if length > keep:
            self.punch(slot, 0, length)

    def resident_bytes(self) -> int:
        """Bytes of the memfd backed by memory now (punched and untouched pages cost none)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.q.release()
                self.marks.release()
                self.view.release()
                self.mm.close()
            except (BufferError, ValueError):
                pass          # a live memoryview elsewhere; the mapping dies with the process
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SlotFields:
    """u64 indexes of one slot's fields (layout in the module docstring)."""

    __slots__ = ("slot", "gen", "tail", "state", "wake_at", "producer", "high", "spill_active",
                 "spill_start", "spill_fd", "spill_pid", "file_wake_at", "drop_below",
                 "spill_end", "drop_lag", "_cursor0")

    def __init__(self, arena: Arena, slot: int):
        base = arena.slot_index(slot)
        self.slot = slot
        self.gen = base
        self.tail = base + 1
        self.state = base + 2
        self.wake_at = base + 3
        self.producer = base + 4
        self.high = base + 5
        spill = base + LINE_U64
        self.spill_active = spill
        self.spill_start = spill + 1
        self.spill_fd = spill + 2
        self.spill_pid = spill + 3
        self.file_wake_at = spill + 4
        self.drop_below = spill + 5
        self.spill_end = spill + 6
        self.drop_lag = spill + 7
        self._cursor0 = base + 2 * LINE_U64

    def cursor(self, worker: int) -> int:
        return self._cursor0 + worker * LINE_U64

    def waiting(self, worker: int) -> int:
        return self._cursor0 + worker * LINE_U64 + 1

    def file_cursor(self, worker: int) -> int:
        return self._cursor0 + worker * LINE_U64 + 2

    def reset(self, arena: Arena, producer: int, receiver_workers: Iterable[int],
              gen: int) -> None:
        """Initialise for a new transfer (the supervisor, before any start message): the
        receivers' workers start at cursor 0, so no producer can lap one that has not yet
        published a cursor."""
        readers = set(receiver_workers)
        arena.store(self.gen, gen)
        arena.store(self.tail, 0)
        arena.store(self.high, 0)
        arena.store(self.wake_at, 0)
        arena.store(self.producer, producer)
        for field in (self.spill_active, self.spill_start, self.spill_fd, self.spill_pid,
                      self.file_wake_at, self.drop_below, self.drop_lag):
            arena.store(field, 0)
        arena.store(self.spill_end, NONE)
        for w in range(arena.worker_slots):
            arena.store(self.cursor(w), 0 if w in readers else NONE)
            arena.store(self.waiting(w), 0)
            arena.store(self.file_cursor(w), NONE)
        arena.store(self.state, STREAMING)


class RingWriter:
    """The producer's positions in one slot's ring (after Aeron's IpcPublication).

    `tail` is where the next byte goes, `published` what receivers may read. The producer
    writes below `limit` = lowest cursor + capacity, cached (Disruptor style: W loads, not one
    per receiver, and only when the cached limit says there is too little room). In sendfile
    mode it also stays below `punched_end`, the end of the blocks punched since their
    previous lap was sent. `hold_at` is a position the ring must keep for readers that will
    come back to it (the end of a spill file that stopped growing), or None.
    """

    def __init__(self, arena: Arena, slot: int, receiver_workers: list[int], sendfile: bool,
                 punch_block: int, kick: Callable[[int], None]):
        self.arena = arena
        self.slot = slot
        self.f = SlotFields(arena, slot)
        self.receiver_workers = receiver_workers
        self.sendfile = sendfile
        self.block = punch_block
        self.kick = kick
        self.capacity = arena.capacity
        self.base = arena.ring_base(slot)
        self.tail = 0
        self.published = 0
        self.limit = arena.capacity
        # First lap: no page of a free slot is lent to a socket (release punched the lent)
        self.punched_end = arena.capacity
        self.hold_at: int | None = None
        self.lowest = 0                      # lowest ring cursor at the last refresh
        self.high = 0                        # the highest position written

    # -- space -----------------------------------------------------------------------------
    def space(self) -> int:
        """Bytes writable at tail by the cached limits (no loads)."""
        return min(self.limit, self.punched_end) - self.tail

    def writable(self, need: int) -> int:
        """Bytes writable at tail now; the cursors are re-read only when the cached limits
        say fewer than `need`."""
        space = self.space()
        if space < need:
            self.refresh()
            space = self.space()
        return space

    def refresh(self) -> int:
        """Re-read the cursors: the new limit; punch the blocks it frees (sendfile mode).
        Returns the lowest ring cursor (tail when nobody reads the ring)."""
        a, f = self.arena, self.f
        lowest = min(a.load(f.cursor(w)) for w in self.receiver_workers)
        if lowest == NONE:
            lowest = self.tail               # no ring reader left to protect
        self.lowest = lowest
        if self.hold_at is not None:
            lowest = min(lowest, self.hold_at)
        self.limit = lowest + self.capacity
        if not self.sendfile:
            self.punched_end = self.limit
        else:
            while self.punched_end + self.block <= self.limit:
                a.punch(self.slot, self.punched_end & a.mask, self.block)
                self.punched_end += self.block
        return self.lowest

    def wake_mark(self, free: int) -> int:
        """The lowest-cursor position at which `free` bytes will be writable again."""
        return self.tail + free - self.capacity + (self.block if self.sendfile else 0)

    # -- bytes at tail ---------------------------------------------------------------------
    def recv_buffer(self, most: int) -> memoryview:
        """Where the next bytes may be received in place: contiguous, at most `most` (which
        the caller bounds by what `writable` allowed), within the ring's space."""
        at, length = self.arena.span(self.slot, self.tail, self.tail + min(most, self.space()))
        return self.arena.view[at:at + length]

    def bytes_at(self, position: int, end: int) -> memoryview:
        """Ring bytes from position toward end, contiguous (they stop at the ring's end)."""
        at, length = self.arena.span(self.slot, position, end)
        return self.arena.view[at:at + length]

    def finder(self, position: int, byte: bytes) -> Callable[[int, int], int]:
        """find(i, j): the index of the first `byte` in the contiguous bytes from position,
        between i and j, or -1 (searched in place, nothing copied)."""
        mm, start = self.arena.mm, self.arena.span(self.slot, position, position + 1)[0]

        def find(i: int, j: int) -> int:
            found = mm.find(byte, start + i, start + j)
            return found - start if found >= 0 else -1
        return find

    def advance(self, n: int) -> None:
        """n bytes were received in place at tail."""
        self.tail += n
        self._wrote()

    def write(self, data) -> None:
        self.arena.write(self.slot, self.tail, data)
        self.tail += len(data)
        self._wrote()

    def writev(self, buffers: list, length: int) -> None:
        """Gather-write at tail; joined into one buffer when it would wrap the ring."""
        if not self.arena.writev(self.slot, self.tail, buffers, length):
            self.arena.write(self.slot, self.tail, b"".join(buffers))
        self.tail += length
        self._wrote()

    def _wrote(self) -> None:
        if self.tail > self.high and self.high < self.capacity:
            self.high = self.tail              # past one lap every page is written anyway
            self.arena.store(self.f.high, self.tail)

    # -- publishing ------------------------------------------------------------------------
    def publish(self, visible: int) -> bool:
        """Let receivers read up to `visible`; kick the workers that sleep. False if
        nothing new."""
        if visible == self.published:
            return False
        a, f = self.arena, self.f
        self.published = visible
        a.store(f.tail, visible)
        fence()
        for w in self.receiver_workers:
            if a.load(f.waiting(w)):
                a.mark(w, self.slot)
                self.kick(w)
        return True

    def finish(self, visible: int, state: int) -> None:
        """The last publication: tail, then the final state (DONE or ABORTED); kick all."""
        a, f = self.arena, self.f
        self.published = visible
        a.store(f.tail, visible)
        a.store(f.state, state)
        self.kick_all()

    def kick_all(self) -> None:
        """After a store the receivers' workers must see: fence, then wake them all."""
        fence()
        for w in self.receiver_workers:
            self.arena.mark(w, self.slot)
            self.kick(w)

    def cut_below(self, position: int, lag: int = 0) -> None:
        """--slow drop: receivers below position that hold the producer are cut; it waits
        only until their workers have done it. `lag`: how far behind a file reader must be
        (the bound the producer met; 0: the spill limit)."""
        if self.arena.load(self.f.drop_below) >= position:
            stored = self.arena.load(self.f.drop_lag)
            if lag and (stored == 0 or lag < stored):
                self.arena.store(self.f.drop_lag, lag)     # a tighter bound than the last cut
                self.kick_all()
            return
        self.arena.store(self.f.drop_lag, lag)
        self.arena.store(self.f.drop_below, position)
        self.kick_all()

    def post_wake(self, mark: int) -> None:
        """Ask the receivers' workers to kick the producer once the lowest cursor reaches
        mark (0: no mark)."""
        self.arena.store(self.f.wake_at, max(1, mark) if mark else 0)


class RingReader:
    """One worker's view of a slot's ring: the producer's tail and state, the bytes, and
    this worker's published cursors (ring and spill file) and sleep flag."""

    def __init__(self, arena: Arena, slot: int, me: int, kick: Callable[[int], None]):
        self.arena = arena
        self.slot = slot
        self.f = SlotFields(arena, slot)
        self.me = me
        self.kick = kick
        self.fd = arena.fd
        self.producer = arena.load(self.f.producer)
        self.published = 0
        self.published_file = NONE
        self.waiting = False

    def state_and_tail(self) -> tuple[int, int]:
        """State first: DONE seen implies the final tail is seen too."""
        a, f = self.arena, self.f
        state = a.load(f.state)
        return state, a.load(f.tail)

    def moved(self, tail: int, state: int) -> bool:
        a, f = self.arena, self.f
        return a.load(f.tail) != tail or a.load(f.state) != state

    def span(self, position: int, end: int) -> tuple[int, int]:
        return self.arena.span(self.slot, position, end)

    def bytes_at(self, position: int, end: int) -> memoryview:
        at, length = self.arena.span(self.slot, position, end)
        return self.arena.view[at:at + length]

    def peek(self, position: int, length: int) -> bytes:
        return self.arena.peek(self.slot, position, length)

    def drop_below(self) -> int:
        """--slow drop: receivers below this that hold the producer are to be cut (0: none)."""
        return self.arena.load(self.f.drop_below)

    def drop_lag(self) -> int:
        """--slow drop: how far behind a file reader below drop_below is cut (0: the spill
        limit). Loaded after drop_below, which the producer stores after it."""
        return self.arena.load(self.f.drop_lag)

    # -- sleeping ------------------------------------------------------------------------
    def sleep_flag(self, on: bool) -> None:
        """Set (then fence) or clear this worker's waiting flag. After setting it, re-check
        the tail before sleeping: a publication in between then kicks us."""
        if on == self.waiting:
            return
        self.waiting = on
        self.arena.store(self.f.waiting(self.me), 1 if on else 0)
        if on:
            fence()

    # -- cursors ---------------------------------------------------------------------------
    def publish(self, lowest: int, lowest_file: int) -> bool:
        """Publish this worker's lowest ring and file cursors; kick the producer if it
        sleeps on a mark one of them crossed. False if nothing changed."""
        if lowest == self.published and lowest_file == self.published_file:
            return False
        a, f = self.arena, self.f
        before, before_file = self.published, self.published_file
        # A receiver moving between ring and file must never be missing from both as the
        # producer loads one field, then the other: store first the field that gains it
        # (the one whose lowest position drops), then the one that loses it (x86 keeps
        # stores in order, and loads too).
        if lowest < self.published:
            a.store(f.cursor(self.me), lowest)
            a.store(f.file_cursor(self.me), lowest_file)
        else:
            a.store(f.file_cursor(self.me), lowest_file)
            a.store(f.cursor(self.me), lowest)
        self.published, self.published_file = lowest, lowest_file
        fence()
        # Kick when a cursor crosses a mark (NONE, no reader left, is past every mark). Not
        # "once per mark value": a producer woken by one worker but still held by another
        # posts the same mark again, and a worker that kicked for it already (say while its
        # readers were all on the spill file) must kick again when a reader of its crosses
        # it; a worker already past the mark is not the one the producer waits for.
        wake_at = a.load(f.wake_at)
        file_wake_at = a.load(f.file_wake_at)
        if (wake_at and before < wake_at <= lowest) or \
                (file_wake_at and before_file < file_wake_at <= lowest_file):
            a.mark(self.producer, self.slot)
            self.kick(self.producer)
        return True

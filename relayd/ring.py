"""The shared-memory arena: slot table, per-pipe rings, and the only code that orders loads/stores.

One memfd, created by the supervisor before the first fork and mapped (MAP_SHARED) by every
worker through inheritance. Its bytes, in 64-byte lines of eight little-endian u64:

    | stats: one line block per worker index, one for the supervisor          (own pages) |
    | slot table: per slot  | gen | tail | state | wake_at | producer | ... |  (own pages) |
    |                       | cursor[i] | waiting[i] |  one line per worker index i        |
    | ring 0 | ring 1 | ... each `capacity` bytes (a power of two), page aligned          |

A *position* counts bytes since the pipe began and never wraps; an *offset* is
`position & (capacity - 1)`. Every field has exactly one writer:
    gen       the supervisor, each time it assigns the slot (stale messages are ignored)
    tail      the producer's worker: receiver wire bytes published so far
    state     the producer's worker (the supervisor when that worker died)
    wake_at   the producer's worker: kick me when the lowest cursor reaches this (0 = no)
    cursor[i] worker i: the lowest position any of its receivers of this pipe still needs,
              or NONE when it has none
    waiting[i] worker i: it has a caught-up receiver of this pipe and sleeps on its eventfd

Memory ordering (x86-64 TSO only; the CLI refuses other machines): every load and store of
those fields goes through `load`/`store` below, 8-byte aligned through a memoryview cast, so
no store is torn. Data is written (pwrite) before the tail store, the tail before the state.
A reader loads state before tail. "Store my flag, then load theirs" needs a full fence on
both sides, else x86 may reorder them and a wake-up is lost: `fence()` takes and releases a
lock, whose lock-prefixed instruction is a full barrier.
"""
from __future__ import annotations

import mmap
import os
import threading

PAGE = mmap.PAGESIZE
LINE_U64 = 8                     # a 64-byte cache line holds eight u64
NONE = (1 << 64) - 1             # cursor of a worker that has no receiver of the pipe

# slot states
IDLE, STREAMING, DONE, ABORTED = 0, 1, 2, 3
STATE_NAMES = {IDLE: "idle", STREAMING: "streaming", DONE: "done", ABORTED: "aborted"}

# Stats blocks (STATS_U64 u64 each): one per worker index, written only by that worker, and
# one for the supervisor. Counters are kept locally and published about once a second.
STATS_U64 = 4 * LINE_U64
STAT_PID, STAT_CONNECTIONS, STAT_SENDERS, STAT_RECEIVERS, STAT_BYTES_IN, STAT_BYTES_OUT, \
    STAT_HEARTBEAT, STAT_PIPES_ACTIVE, STAT_RECEIVERS_STREAMING, STAT_SENDERS_STREAMING, \
    STAT_MAX_LAG, STAT_SPILL_BYTES = range(12)
STAT_REJECTED0 = 16              # then one counter per status in REJECTION_STATUSES
REJECTION_STATUSES = (400, 401, 403, 404, 405, 408, 409, 413, 414, 417, 429, 431, 501, 503,
                      505, 0)    # 0: any other status
SUP_PIPES_WAITING, SUP_PIPES_STREAMING, SUP_SLOTS_IN_USE, SUP_WORKERS_ALIVE, SUP_RESTARTS, \
    SUP_STARTED_AT, SUP_TRANSFERS_DONE, SUP_TRANSFERS_ABORTED = range(8)
SUP_OUTCOME0 = 8                 # then one counter per outcome in TRANSFER_OUTCOMES
TRANSFER_OUTCOMES = ("ok", "ok_some_receivers_left", "sender_lost", "receivers_left",
                     "worker_died", "shutdown")

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
        self.rings_base = self.stats_bytes + self.table_bytes
        self.size = self.rings_base + slots * capacity
        self.fd = os.memfd_create("relayd-arena", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)
        self.q = self.view[: self.rings_base].cast("Q")
        self._table_u64 = self.stats_bytes // 8

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

    # -- ring bytes ------------------------------------------------------------------------
    def write(self, slot: int, position: int, data) -> None:
        """Copy data into the ring at position, splitting at the ring's end."""
        base = self.ring_base(slot)
        off = position & self.mask
        first = self.capacity - off
        if len(data) <= first:
            os.pwrite(self.fd, data, base + off)
        else:
            mv = memoryview(data)
            os.pwrite(self.fd, mv[:first], base + off)
            os.pwrite(self.fd, mv[first:], base)

    def writev(self, slot: int, position: int, buffers: list, length: int) -> bool:
        """Gather-write buffers at position; False (nothing written) if they would wrap."""
        off = position & self.mask
        if off + length > self.capacity:
            return False
        os.pwritev(self.fd, buffers, self.ring_base(slot) + off)
        return True

    def punch(self, slot: int, offset: int, length: int) -> None:
        """Give ring pages back to the kernel; sockets still sending them keep the old pages."""
        self.mm.madvise(mmap.MADV_REMOVE, self.ring_base(slot) + offset, length)

    def resident_bytes(self) -> int:
        """Bytes of the memfd backed by memory now (punched and untouched pages cost none)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.q.release()
                self.view.release()
                self.mm.close()
            except (BufferError, ValueError):
                pass          # a live memoryview elsewhere; the mapping dies with the process
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SlotFields:
    """u64 indexes of one slot's fields, computed once per transfer.

    Line 0: gen, tail, state, wake_at, producer.
    Line 1, the spill (writer: the producer's worker): spill_active, spill_start (first
    position in the file), spill_fd and spill_pid (the file is reopened through
    /proc/<pid>/fd/<fd>), file_wake_at, drop_below (file readers below it are cut).
    Line 2 + i, worker i's: cursor (ring readers), waiting, file_cursor (spill readers).
    """

    __slots__ = ("slot", "gen", "tail", "state", "wake_at", "producer", "spill_active",
                 "spill_start", "spill_fd", "spill_pid", "file_wake_at", "drop_below",
                 "_cursor0")

    def __init__(self, arena: Arena, slot: int):
        base = arena.slot_index(slot)
        self.slot = slot
        self.gen = base
        self.tail = base + 1
        self.state = base + 2
        self.wake_at = base + 3
        self.producer = base + 4
        spill = base + LINE_U64
        self.spill_active = spill
        self.spill_start = spill + 1
        self.spill_fd = spill + 2
        self.spill_pid = spill + 3
        self.file_wake_at = spill + 4
        self.drop_below = spill + 5
        self._cursor0 = base + 2 * LINE_U64

    def cursor(self, worker: int) -> int:
        return self._cursor0 + worker * LINE_U64

    def waiting(self, worker: int) -> int:
        return self._cursor0 + worker * LINE_U64 + 1

    def file_cursor(self, worker: int) -> int:
        return self._cursor0 + worker * LINE_U64 + 2

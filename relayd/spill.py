"""Spill files: the lag beyond a pipe's memory window, on disk, so a slow receiver slows only
itself.

Theory of operation. When the slowest ring reader would hold the producer (the window is
full) and the pipe has more than one receiver, the producer's worker creates one spill file
for the pipe (`SpillWriter.start`) and from then on writes every byte to the file as well as
to the ring, at file offset = stream position (the file is sparse below the first spilled
position). Receivers that lag more than half a window switch to the file and are sent from
it with os.sendfile (`SpillReader`); their cursors leave the ring's `cursor[w]` for
`file_cursor[w]`, so the ring's limit follows only the fast receivers.

Bounds: a file reader may lag at most --spill-limit behind the producer, and the node's
spill files together hold at most --spill-budget (`SpillBudget`: every worker publishes the
bytes its producers keep, the node's use is their sum). At a bound, --slow block holds the
producer (lossless) and --slow drop cuts the slowest file readers (a visible short body).

A write the disk refuses (ENOSPC, EIO; short writes are continued first, fileio.py) is the
same as a bound reached: the file stops growing at `end`, the position it holds up to
(published as `spill_end`). Under block, file readers are served up to `end` and then return
to the ring, which keeps every byte from `end` on until they have (`RingWriter.hold_at`):
nothing is lost, the slowest now holds the producer. Under drop, the receivers that hold
the producer -- still in the file below `end`, or in the ring with a full socket -- are cut:
a visible short body. Either way the pipe spills no more, and the failure is logged and
counted (relayd_spill_write_failures). A file that cannot be created at all is the same.

The file is only ever appended to, so the sendfile hazard of the ring does not arise, and
consumed ranges are given back (FALLOC_FL_PUNCH_HOLE) -- but only IN_FLIGHT_MARGIN below the
lowest cursor. Measured here (ext4, kernel 6.18): punching right at the lowest cursor
corrupted a third of 64 MiB transfers, because a punched range inside a large folio that
sockets still reference cannot be split off and is zeroed in place. Bytes sendfile'd to a
socket can sit in its send queue and, on loopback, in the peer's receive queue: at most
tcp_wmem[max] + tcp_rmem[max], so nothing in flight is ever inside a punched range.

The file has no name: O_TMPFILE (or mkstemp + unlink where a filesystem lacks it), mode 0600.
Other workers reopen it through /proc/<pid>/fd/<fd> of the producer's worker, so it vanishes
with the last descriptor: at the pipe's end, on abort, and when a worker crashes. Leftovers
of the fallback's window between create and unlink are swept at daemon start.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import os
import tempfile

from relayd import ring, stats
from relayd.fileio import SYSCALLS, Syscalls, WriteFailed, write_all, writev_all
from relayd.states import State

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLBACK_PREFIX = "relayd-spill-"
PUNCH_UNIT = 1 << 20             # consumed file ranges are returned in whole MiBs
NO_LIMIT = 1 << 62


def _in_flight_margin() -> int:
    """Most bytes one socket can hold: its send queue plus, on loopback, the peer's receive
    queue (the kernel's autotuning maxima), plus a unit for alignment."""
    total = 0
    for name in ("tcp_wmem", "tcp_rmem"):
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                total += int(f.read().split()[2])
        except (OSError, ValueError, IndexError):
            total += 32 << 20
    return total + PUNCH_UNIT


IN_FLIGHT_MARGIN = _in_flight_margin()

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(e, os.strerror(e))


def create(directory: str) -> int:
    """A nameless read-write file in directory, mode 0600."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    fd, path = tempfile.mkstemp(prefix=FALLBACK_PREFIX, dir=directory)
    os.unlink(path)
    return fd


def sweep(directory: str) -> int:
    """Remove fallback spill files a crash left between create and unlink; returns count."""
    removed = 0
    for path in glob.glob(os.path.join(directory, FALLBACK_PREFIX + "*")):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


class SpillBudget:
    """--spill-budget for the whole node. This worker publishes the bytes its producers keep
    on disk whenever that changes; the node's use is the sum over every worker index (old
    generations during a reload included)."""

    def __init__(self, arena: ring.Arena, block: stats.WorkerBlock, budget: int):
        self.arena = arena
        self.block = block
        self.budget = budget
        self.mine = 0

    def change(self, delta: int) -> None:
        if delta:
            self.mine += delta
            self.block.spill(self.mine)

    def left(self) -> int:
        """Bytes the node may still spill (never negative)."""
        return max(0, self.budget - stats.node_spill_bytes(self.arena))


class Spill(State):
    GROWING = "growing"          # every byte goes to the file too
    STOPPED = "stopped"          # a write failed: the file holds bytes up to `end`


class SpillWriter:
    """The producer's side of one pipe's spill file."""

    def __init__(self, writer: ring.RingWriter, directory: str, start: int, limit: int,
                 drop: bool, budget: SpillBudget, calls: Syscalls = SYSCALLS):
        self.ring = writer
        self.arena = writer.arena
        self.f = writer.f
        self.receiver_workers = writer.receiver_workers
        self.limit = limit
        self.drop = drop
        self.budget = budget
        self.calls = calls
        self.fd = create(directory)     # OSError: no spill for this pipe
        self.start = start              # first stream position held by the file
        self.end = start                # bytes below this are in the file
        self.state = Spill.GROWING
        self.consumed = start           # every reader is past this position
        self.punched = start - start % PUNCH_UNIT
        self.counted = 0                # our bytes in the budget
        self.failure: WriteFailed | None = None
        self.announced = False          # the receivers' workers know of the file

    def announce(self) -> None:
        """Tell the receivers' workers the file exists (they reopen it and move laggards)."""
        a, f = self.arena, self.f
        a.store(f.spill_start, self.start)
        a.store(f.spill_fd, self.fd)
        a.store(f.spill_pid, os.getpid())
        a.store(f.spill_active, 1)
        self.announced = True
        self.ring.kick_all()

    # -- writing ---------------------------------------------------------------------------
    def write(self, position: int, data) -> None:
        """The bytes at position (the producer's tail) go to the file too, while it grows."""
        if self.state is Spill.STOPPED:
            self._rewritten(position)
        else:
            try:
                write_all(self.fd, data, position, self.calls)
            except WriteFailed as e:
                self._stop(position + e.written, e)
                return
            self.end = position + len(memoryview(data).cast("B"))
            self._account()

    def writev(self, position: int, buffers: list, length: int) -> None:
        if self.state is Spill.STOPPED:
            self._rewritten(position)
        else:
            try:
                writev_all(self.fd, buffers, position, self.calls)
            except WriteFailed as e:
                self._stop(position + e.written, e)
                return
            self.end = position + length
            self._account()

    def _rewritten(self, position: int) -> None:
        """The producer rewrites bytes from position (a chunked body's last line becomes a
        plain terminator) that the stopped file cannot take: it holds only what is below."""
        if position < self.end:
            self.end = position
            if self.announced:
                self.arena.store(self.f.spill_end, position)
            self._account()

    def _stop(self, end: int, error: WriteFailed) -> None:
        """The disk refused: the file holds bytes below `end` and grows no more."""
        self.end = end
        self.state = Spill.STOPPED
        self.failure = error
        self._account()
        if not self.announced:
            return                        # still being filled: nobody reads it yet
        self.arena.store(self.f.spill_end, end)
        self.ring.kick_all()

    # -- limits ----------------------------------------------------------------------------
    def lowest_reader(self) -> int:
        """The lowest file cursor over the receivers' workers (NONE: nobody reads the file)."""
        a, f = self.arena, self.f
        return min(a.load(f.file_cursor(w)) for w in self.receiver_workers)

    def file_space(self, tail: int, ring_lowest: int) -> int:
        """Bytes the producer may write at tail as far as the file readers allow, while the
        file grows. Releases what every reader has passed, and under drop cuts the slowest
        file readers once they are a spill limit behind."""
        file_lowest = self.lowest_reader()
        self.release_below(min(ring_lowest, file_lowest))
        if file_lowest == ring.NONE:
            return NO_LIMIT
        limit = self.limit
        budget_left = self.budget.left()
        if budget_left <= 0:
            limit = min(limit, tail - file_lowest)       # over budget: do not grow
        else:
            limit = min(limit, tail - file_lowest + budget_left)
        if self.drop and tail - file_lowest >= limit:
            self.ring.cut_below(file_lowest + 1, limit)
        return file_lowest + limit - tail

    def release_below(self, position: int) -> None:
        """Every reader is past `position`: punch whole units below it, less the in-flight
        margin (see the module's docstring)."""
        if position == ring.NONE:
            position = self.end
        self.consumed = max(self.consumed, min(position, self.end))
        position -= IN_FLIGHT_MARGIN
        end = position - position % PUNCH_UNIT
        if end > self.punched:
            punch_hole(self.fd, self.punched, end - self.punched)
            self.punched = end
        self._account()

    def _account(self) -> None:
        usage = max(0, self.end - self.consumed)
        self.budget.change(usage - self.counted)
        self.counted = usage

    def close(self) -> None:
        self.budget.change(-self.counted)
        self.counted = 0
        if self.fd >= 0:
            if self.announced:
                # Withdrawn before the number is freed: a worker that reopens it later
                # (an aborted transfer's readers may) must not get whatever file this
                # process opens next under that number (SpillReader.open checks).
                self.arena.store(self.f.spill_active, 0)
                ring.fence()
            os.close(self.fd)
            self.fd = -1


class SpillReader:
    """A receiver worker's own descriptor of a pipe's spill file, reopened through /proc of
    the producer's worker."""

    def __init__(self, fd: int, start: int, arena: ring.Arena, fields: ring.SlotFields):
        self.fd = fd
        self.start = start
        self.arena = arena
        self.f = fields

    @classmethod
    def open(cls, arena: ring.Arena, fields: ring.SlotFields) -> "SpillReader | None":
        """None when the file is gone already (the producer ended)."""
        pid, fd = arena.load(fields.spill_pid), arena.load(fields.spill_fd)
        try:
            own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        if not arena.load(fields.spill_active):
            # Withdrawn (the producer closed it, or is closing it): the number may name
            # another file by now.
            os.close(own)
            return None
        return cls(own, arena.load(fields.spill_start), arena, fields)

    def end(self, tail: int) -> int:
        """Bytes readable from the file: all published while it grows, else up to where it
        stopped."""
        return min(tail, self.arena.load(self.f.spill_end))

    def stopped_at(self) -> int:
        """Where the file stopped growing (NONE while it grows): a reader returns to the
        ring only there, never below -- the ring may already hold a later lap below it."""
        return self.arena.load(self.f.spill_end)

    def growing(self) -> bool:
        return self.arena.load(self.f.spill_end) == ring.NONE

    def send(self, sock_fd: int, position: int, end: int) -> int:
        return os.sendfile(sock_fd, self.fd, position, end - position)

    def peek(self, position: int, length: int) -> bytes:
        return os.pread(self.fd, length, position)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""Spill files: the lag beyond a pipe's memory window, on disk, so a slow receiver slows only
itself.

Theory of operation. When the slowest ring reader would hold the producer (the window is
full), the producer's worker creates one spill file for the pipe and from then on writes
every byte to the file as well as to the ring, at file offset = stream position (the file is
sparse below the first spilled position). Receivers that lag more than half a window switch
to the file for good and are sent from it with os.sendfile; their cursors leave the ring's
`cursor[w]` for `file_cursor[w]`, so the ring's limit follows only the fast receivers.

The file is only ever appended to, so the sendfile hazard of the ring does not arise, and
consumed ranges are given back (FALLOC_FL_PUNCH_HOLE) -- but only IN_FLIGHT_MARGIN below the
lowest cursor. Measured here (ext4, kernel 6.18): punching right at the lowest cursor
corrupted a third of 64 MiB transfers, because a punched range inside a large folio that
sockets still reference cannot be split off and is zeroed in place. Bytes sendfile'd to a
socket can sit in its send queue and, on loopback, in the peer's receive queue: at most
tcp_wmem[max] + tcp_rmem[max], so nothing in flight is ever inside a punched range. Disk use
is then the lag plus that margin, bounded by --spill-limit per pipe and --spill-budget.

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

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLBACK_PREFIX = "relayd-spill-"
PUNCH_UNIT = 1 << 20             # consumed file ranges are returned in whole MiBs


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


def reopen(pid: int, fd: int) -> int:
    """Another worker's view of a spill file (read-only); raises OSError if it is gone."""
    return os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class SpillFile:
    """The producer's side: writes at stream positions, returns consumed ranges to the disk."""

    def __init__(self, directory: str, start: int):
        self.fd = create(directory)
        self.start = start              # first stream position held by the file
        self.punched = start - start % PUNCH_UNIT

    def write(self, position: int, data) -> None:
        os.pwrite(self.fd, data, position)

    def writev(self, position: int, buffers: list) -> None:
        os.pwritev(self.fd, buffers, position)

    def release_below(self, position: int) -> None:
        """Every reader is past `position`: punch whole units below it, less the in-flight
        margin (see the module's docstring)."""
        position -= IN_FLIGHT_MARGIN
        end = position - position % PUNCH_UNIT
        if end > self.punched:
            punch_hole(self.fd, self.punched, end - self.punched)
            self.punched = end

    def disk_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

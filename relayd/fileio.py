"""Positional writes that either finish or fail loudly: the data path's only pwrite/pwritev.

A pwrite may write less than it was given (a nearly full disk, a signal) and report it only
in its return count; ignoring that count leaves a hole of zeros inside a body that looks
complete. `write_all`/`writev_all` continue short writes until every byte is down and raise
OSError (ENOSPC, EIO, ...) when the kernel refuses more, so the caller knows exactly which
position the file holds up to (`WriteFailed.written`).

`Syscalls` is the boundary to the kernel. Tests substitute a subclass that returns short
counts or raises ENOSPC after a budget, on a real file: fault injection at the fd, not a
mock of the ring or the spill.
"""
from __future__ import annotations

import errno
import os


class WriteFailed(OSError):
    """The kernel took only `written` bytes of a positional write, then refused."""

    def __init__(self, error: OSError, written: int):
        super().__init__(error.errno, error.strerror)
        self.written = written


class Syscalls:
    """The file calls of the data path, one place to fail them on purpose."""

    pwrite = staticmethod(os.pwrite)
    pwritev = staticmethod(os.pwritev)


SYSCALLS = Syscalls()


def write_all(fd: int, data, offset: int, calls: Syscalls = SYSCALLS) -> None:
    """Write all of data at offset; raises WriteFailed with the bytes that did land."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            n = calls.pwrite(fd, view[done:], offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            raise WriteFailed(e, done) from None
        if n <= 0:        # a zero-byte pwrite of a non-empty buffer will not progress
            raise WriteFailed(OSError(errno.EIO, "pwrite made no progress"), done)
        done += n


def writev_all(fd: int, buffers: list, offset: int, calls: Syscalls = SYSCALLS) -> None:
    """Gather-write buffers at offset, continuing a short pwritev with what is left."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        try:
            n = calls.pwritev(fd, views, offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            raise WriteFailed(e, done) from None
        if n <= 0:
            raise WriteFailed(OSError(errno.EIO, "pwritev made no progress"), done)
        done += n
        while views and n >= len(views[0]):      # drop the buffers that are down
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]

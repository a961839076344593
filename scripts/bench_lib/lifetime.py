"""Children that do not outlive the harness.

Servers and clients run in their own sessions (so stop() can signal exactly their group),
which also means a killed harness would orphan them. PR_SET_PDEATHSIG makes the kernel send
SIGTERM to each child when the harness dies, however it dies (a test's timeout, SIGKILL).
"""
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent():
    """preexec_fn: SIGTERM this child when its parent exits (Linux); a no-op elsewhere."""
    parent = os.getppid()
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except AttributeError:
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

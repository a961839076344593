"""The control plane between the supervisor and its workers: typed messages and the channel
that carries them.

One SOCK_SEQPACKET socketpair per worker keeps message boundaries. Messages are rare (one per
connection event, never per byte) and are batched: everything sent during one pass of the
sender's loop goes out as one datagram holding a list, so a pipe's start costs one datagram
per worker involved, not one per party. Messages carry connection ids, never descriptors.

Both ends use `Channel`; each dispatches what it receives through a table of handlers keyed
by message type (`dispatch`).
"""
from __future__ import annotations

import enum
import os
import pickle
import socket
from typing import Callable, NamedTuple

MAX_DATAGRAM = 64 * 1024          # a batch is split beyond this (SEQPACKET's send buffer)
RECV_BYTES = 1 << 20


class Outcome(enum.Enum):
    """How a transfer ended, for its log line and the relayd_transfers counter."""
    OK = "ok"
    OK_SOME_RECEIVERS_LEFT = "ok_some_receivers_left"
    SENDER_LOST = "sender_lost"
    RECEIVERS_LEFT = "receivers_left"
    WORKER_DIED = "worker_died"
    SHUTDOWN = "shutdown"
    RELAY_ERROR = "relay_error"       # an exception in the relay aborted this pipe only

    @property
    def aborted(self) -> bool:
        return self not in (Outcome.OK, Outcome.OK_SOME_RECEIVERS_LEFT)


class SenderInfo(NamedTuple):
    """What the receivers' response carries from the sender's request."""
    content_type: bytes
    headers: list                     # [(name, value)] forwarded as they came
    length: int | None                # Content-Length of the body, None when chunked


# -- worker -> supervisor ----------------------------------------------------------------
class Ready(NamedTuple):
    pid: int


class Join(NamedTuple):
    conn: int
    role: str                         # "sender" | "receiver"
    path: bytes
    n: int
    info: SenderInfo | None           # a sender's; None for a receiver


class Leave(NamedTuple):
    conn: int


class ReceiverEnded(NamedTuple):
    slot: int
    gen: int
    conn: int
    ok: bool                          # every byte queued (else: left, cut or aborted)


class BodyEnded(NamedTuple):
    slot: int
    gen: int
    nbytes: int


class SenderLost(NamedTuple):
    slot: int
    gen: int
    outcome: Outcome
    reason: str
    nbytes: int


class Handed(NamedTuple):
    """The receiver's socket (fd; -1 when it is gone), on its way to the sender's worker."""
    conn: int
    slot: int
    gen: int
    version: str
    fd: int


class Released(NamedTuple):
    slot: int
    gen: int
    role: str                         # "sender" | "receivers"


# -- supervisor -> worker ----------------------------------------------------------------
class Rejected(NamedTuple):
    conn: int
    status: int
    reason: str


class Expired(NamedTuple):
    conn: int
    reason: str


class Progress(NamedTuple):
    conn: int
    connected: int
    n: int


class StartSender(NamedTuple):
    conn: int
    slot: int
    gen: int
    mode: str                         # "copy" | "sendfile"
    n: int
    receiver_workers: list


class StartReceivers(NamedTuple):
    slot: int
    gen: int
    mode: str
    conns: list
    info: SenderInfo


class Finished(NamedTuple):
    slot: int
    gen: int
    ok: int
    lost: int


class AbortSender(NamedTuple):
    slot: int
    gen: int
    reason: str


class StartSplice(NamedTuple):
    """An n = 1 pipe: the sender's worker moves the body itself, socket to socket."""
    conn: int                         # the sender
    slot: int
    gen: int
    receiver: int | None              # the receiver's connection here, or None: it comes
    info: SenderInfo                  # by AttachReceiver from the worker it landed on


class HandOver(NamedTuple):
    """To the receiver's worker: pass this receiver's socket to the sender's worker."""
    conn: int
    slot: int
    gen: int


class AttachReceiver(NamedTuple):
    """To the sender's worker: the receiver's socket (fd), under a connection id of its own."""
    slot: int
    gen: int
    conn: int
    version: str
    fd: int


class Retire(NamedTuple):
    """Reload: a new generation listens; stop accepting and exit when idle."""


# Messages whose `fd` travels as SCM_RIGHTS: the sending Channel passes its descriptor (and
# closes its own copy once sent); the receiving Channel puts the new descriptor in `fd`.
CARRIES_FD = (Handed, AttachReceiver)
MAX_FDS = 250                     # SCM_MAX_FD is 253 per message

Handlers = dict  # {message type: callable(message)}


def dispatch(handlers: Handlers, message) -> None:
    handlers[type(message)](message)


class Channel:
    """One end of a control socketpair: batches what is sent, keeps an outbox while the
    socket is full, and splits received datagrams back into messages.

    `on_pending` is called when the first message of a batch is queued: the owner arranges
    a `flush()` soon (the worker with call_soon, the supervisor after its pass).
    `want_write(True)` asks the owner to call `flush()` when the socket is writable again;
    `want_write(False)` when that is no longer needed.
    """

    def __init__(self, sock: socket.socket, on_pending: Callable[[], None],
                 want_write: Callable[[bool], None]):
        self.sock = sock
        self.on_pending = on_pending
        self.want_write = want_write
        self.pending: list = []
        self.outbox: list[bytes] = []
        self.broken = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message) -> None:
        if not self.pending:
            self.on_pending()
        self.pending.append(message)

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left to send."""
        if self.pending:
            batch, self.pending = self.pending, []
            self.outbox += _frames(batch)
        while self.outbox and not self.broken:
            data, fds = self.outbox[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                self.want_write(True)
                return False
            except OSError:
                self.broken = True        # the other end is gone; its owner learns apart
                break
            self.outbox.pop(0)
            _close_all(fds)               # the kernel holds them for the other end now
        if self.broken:
            for _, fds in self.outbox:
                _close_all(fds)
            self.outbox.clear()
        self.want_write(False)
        return True

    def receive(self, most: int = 256) -> list | None:
        """Messages that have arrived (up to `most` datagrams); None once the peer is gone."""
        messages: list = []
        for _ in range(most):
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, RECV_BYTES, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return messages
            except OSError:
                data, fds, flags = b"", [], 0
            if not data:
                _close_all(fds)
                return messages or None
            batch = pickle.loads(data)
            # Descriptors were sent with this datagram only if some arrived or the kernel
            # dropped them (MSG_CTRUNC): most batches carry none and are not walked.
            if fds or flags & socket.MSG_CTRUNC:
                carried = sum(isinstance(m, CARRIES_FD) and m.fd >= 0 for m in batch)
                if flags & socket.MSG_CTRUNC or len(fds) != carried:
                    # Out of descriptors here: each carrier gets -1 (gone), never the number
                    # the sender knew it by, which here is some other descriptor of ours.
                    _close_all(fds)
                    fds = [-1] * carried
                received = iter(fds)
                batch = [m._replace(fd=next(received)) if isinstance(m, CARRIES_FD)
                         and m.fd >= 0 else m for m in batch]
            messages += batch
        return messages

    def close(self) -> None:
        for m in self.pending:
            if isinstance(m, CARRIES_FD) and m.fd >= 0:
                _close_all([m.fd])
        self.pending.clear()
        for _, fds in self.outbox:
            _close_all(fds)
        self.outbox.clear()
        self.sock.close()


def _frames(batch: list) -> list[tuple[bytes, list[int]]]:
    """The batch as datagrams of at most MAX_DATAGRAM bytes and MAX_FDS descriptors (halved
    until it fits), each with the descriptors its messages carry, in order."""
    data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    fds = [m.fd for m in batch if isinstance(m, CARRIES_FD) and m.fd >= 0]
    if (len(data) <= MAX_DATAGRAM and len(fds) <= MAX_FDS) or len(batch) == 1:
        return [(data, fds)]
    half = len(batch) // 2
    return _frames(batch[:half]) + _frames(batch[half:])


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

"""The port's listening sockets: one seat per --workers, owned by the supervisor (as nginx's
master owns its listeners) and inherited by the worker that serves the seat.

Why the supervisor holds them: closing a listener resets every connection still queued on
it. The kernel does not hand them to another listener of the SO_REUSEPORT group (unless
net.ipv4.tcp_migrate_req is set), and a worker cannot drain its queue and close it in one
step: a handshake that completes in between is reset. So a seat outlives its workers:

- a reload's new worker takes the old worker's seat; both accept from the one queue until
  the old one retires and closes its copy, and the queue itself never closes;
- a worker that dies is replaced on its seat, and what queued meanwhile is the
  replacement's;
- only a seat whose worker keeps dying right after its start is closed until its delayed
  respawn, so that its share of new connections goes to the other seats instead of waiting
  out the backoff.
"""
from __future__ import annotations

import socket

BACKLOG = 4096


def bind_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        # Accepted sockets inherit it (Linux): every pipe socket sends at once, no Nagle delay.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Seats:
    """The listeners of one port, by seat number (0 .. count - 1)."""

    def __init__(self, host: str, port: int, count: int):
        self.host = host
        self.port = port
        self.sockets: list[socket.socket | None] = [None] * count

    def open(self, seat: int) -> socket.socket:
        """The seat's listener, bound again if it was closed (OSError if that fails)."""
        sock = self.sockets[seat]
        if sock is None:
            sock = self.sockets[seat] = bind_listener(self.host, self.port)
        return sock

    def close(self, seat: int) -> None:
        sock, self.sockets[seat] = self.sockets[seat], None
        if sock is not None:
            sock.close()

    def close_all(self) -> None:
        for seat in range(len(self.sockets)):
            self.close(seat)

    def keep_only(self, seat: int) -> socket.socket:
        """In a forked worker: its own seat's listener; every other seat's copy is closed,
        so a seat's queue lives exactly as long as the processes that serve it."""
        mine = self.sockets[seat]
        self.sockets[seat] = None
        self.close_all()
        return mine

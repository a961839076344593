"""Hang-ups of waiting senders.

A waiting sender's body sits unread (after 100-continue, TCP holds it), so a level-triggered
reader would spin and no reader sees it leave. Its socket is watched instead in a per-worker
epoll set with EPOLLRDHUP | EPOLLET and no EPOLLIN, whose own descriptor the loop reads.
"""
from __future__ import annotations

import select
from typing import Callable


class HangupWatch:
    def __init__(self, on_hangup: Callable[[object, bool], None]):
        """on_hangup(conn, error): the peer half-closed or hung up (error: reset/EPOLLERR)."""
        self.epoll = select.epoll()
        self.watched: dict[int, object] = {}     # fd -> connection
        self.on_hangup = on_hangup

    def fileno(self) -> int:
        return self.epoll.fileno()

    def add(self, conn) -> None:
        self.epoll.register(conn.fd, select.EPOLLRDHUP | select.EPOLLET)
        self.watched[conn.fd] = conn

    def discard(self, conn) -> None:
        if self.watched.pop(conn.fd, None) is not None:
            try:
                self.epoll.unregister(conn.fd)
            except OSError:
                pass

    def poll(self) -> None:
        for fd, events in self.epoll.poll(0):
            conn = self.watched.get(fd)
            if conn is not None:
                self.on_hangup(conn, bool(events & select.EPOLLERR))

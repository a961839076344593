#!/usr/bin/env python3
"""A probe, not relayd: one sender socket to 2 receiver sockets (512 MiB, loopback), relayed
by recv_into + send to each, or by splice into a pipe + tee(2) into a second + splice out of
each. Prints the relaying thread's CPU per delivered GB and the rate, alternating, twice.
It answered whether tee() is worth bringing every receiver of a small-n pipe into the
sender's worker (docs/performance.md): not by itself."""
from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import socket
import threading
import time

SIZE = 512 << 20
STEP = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)


def tee(src: int, dst: int, length: int) -> int:
    moved = libc.tee(src, dst, ctypes.c_size_t(length), 0)
    if moved < 0:
        raise OSError(ctypes.get_errno(), "tee")
    return moved


def connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def produce(sock: socket.socket) -> None:
    data = os.urandom(STEP)
    sent = 0
    while sent < SIZE:
        sent += sock.send(data)
    sock.shutdown(socket.SHUT_WR)


def consume(sock: socket.socket) -> None:
    buf = bytearray(STEP)
    while sock.recv_into(buf):
        pass


def relay_by_copy(src: socket.socket, dsts: list[socket.socket]) -> None:
    buf = bytearray(STEP)
    view = memoryview(buf)
    while n := src.recv_into(buf):
        for dst in dsts:
            dst.sendall(view[:n])


def relay_by_tee(src: socket.socket, dsts: list[socket.socket]) -> None:
    first_r, first_w = os.pipe()
    second_r, second_w = os.pipe()
    for fd in (first_w, second_w):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, STEP)
    while n := os.splice(src.fileno(), first_w, STEP):
        left = n
        while left:                       # blocking pipes: a short tee just goes again
            left -= tee(first_r, second_w, left)
        for pipe_r, dst in ((first_r, dsts[0]), (second_r, dsts[1])):
            left = n
            while left:
                left -= os.splice(pipe_r, dst.fileno(), left)
    for fd in (first_r, first_w, second_r, second_w):
        os.close(fd)


def run(mode: str) -> None:
    sender, src = connected_pair()
    outs = [connected_pair() for _ in range(2)]
    threads = [threading.Thread(target=produce, args=(sender,))]
    threads += [threading.Thread(target=consume, args=(out[1],)) for out in outs]
    for t in threads:
        t.start()
    dsts = [out[0] for out in outs]
    before, start = resource.getrusage(resource.RUSAGE_THREAD), time.monotonic()
    (relay_by_copy if mode == "copy" else relay_by_tee)(src, dsts)
    after, elapsed = resource.getrusage(resource.RUSAGE_THREAD), time.monotonic() - start
    for dst in dsts:
        dst.shutdown(socket.SHUT_WR)
    for t in threads:
        t.join()
    for sock in [sender, src, *dsts, *(out[1] for out in outs)]:
        sock.close()
    gb = 2 * SIZE / 1e9
    print(f"{mode:6} relay thread: sys {(after.ru_stime - before.ru_stime) / gb:.3f} "
          f"user {(after.ru_utime - before.ru_utime) / gb:.3f} s per delivered GB, "
          f"{gb / elapsed:.2f} GB/s")


if __name__ == "__main__":
    for mode in ("copy", "tee", "copy", "tee"):
        run(mode)

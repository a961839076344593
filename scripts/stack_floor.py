#!/usr/bin/env python3
"""The floor of relayd's stack per connection: the cheapest server uvloop + httptools + raw
non-blocking sockets allow, measured the way the manypipes workload measures relayd.

    scripts/stack_floor.py --connections 20000 --repeat 3

W worker processes on one SO_REUSEPORT port (TCP_NODELAY on the listener, as relayd), each a
uvloop loop that accepts, registers the socket with add_reader, feeds what it reads to an
httptools parser and, once the request is complete, sends a 1 KiB response and closes. No
rendezvous, no ring, no control messages, no timers. Clients: two processes, each keeping
128 connections open, one GET per connection, reading to EOF. Prints the workers' CPU
(user + system) per connection. A pipe of n receivers has n + 1 connections: relayd's CPU
per pipe over (n + 1) times this figure is what its own work costs on top of the stack's.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import selectors
import signal
import socket
import time

import psutil

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n"
            + b"x" * 1024)


def worker(port: int) -> None:
    import asyncio

    import httptools
    import uvloop

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    class Connection:
        def __init__(self, sock: socket.socket):
            self.sock, self.fd = sock, sock.fileno()
            self.parser = httptools.HttpRequestParser(self)
            loop.add_reader(self.fd, self.on_readable)

        def on_readable(self) -> None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            try:
                self.sock.send(RESPONSE)
            except OSError:
                pass
            self.close()

        def close(self) -> None:
            loop.remove_reader(self.fd)
            self.sock.close()
            self.parser = None

    def on_accept() -> None:
        for _ in range(64):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            Connection(sock)

    loop.add_reader(listener.fileno(), on_accept)
    loop.run_forever()


def client(port: int, count: int, concurrency: int) -> None:
    sel = selectors.DefaultSelector()
    started = done = 0
    while done < count:
        while started - done < concurrency and started < count:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /floor HTTP/1.1\r\nHost: floor\r\n\r\n")
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            started += 1
        for key, _ in sel.select(5):
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                done += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    workers = [multiprocessing.Process(target=worker, args=(port,), daemon=True)
               for _ in range(args.workers)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.3)
        procs = [psutil.Process(w.pid) for w in workers]
        for run in range(args.repeat):
            before = sum(sum(p.cpu_times()[:2]) for p in procs)
            start = time.monotonic()
            clients = [multiprocessing.Process(target=client,
                                               args=(port, args.connections // 2, 128))
                       for _ in range(2)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - before
            elapsed = time.monotonic() - start
            print(f"run {run + 1}: {cpu / args.connections * 1e6:.1f} us of server CPU per "
                  f"connection, {args.connections / elapsed:.0f} connections/s", flush=True)
    finally:
        for w in workers:
            if w.pid is not None:
                os.kill(w.pid, signal.SIGKILL)
            w.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

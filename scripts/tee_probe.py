#!/usr/bin/env python3
"""A probe, not relayd: one sender socket to 2 receiver sockets (512 MiB, loopback), relayed
by recv_into + send to each, or by splice into a pipe + tee(2) into a second + splice out of
each. Prints the relaying thread's CPU per delivered GB and the rate, alternating, twice.
It answered whether tee() is worth bringing every receiver of a small-n pipe into the
sender's worker (docs/performance.md): not by itself."""
import os, socket, threading, resource, fcntl, time, ctypes
libc = ctypes.CDLL(None, use_errno=True)
def tee(a, b, n):
    r = libc.tee(a, b, ctypes.c_size_t(n), 0)
    if r < 0: raise OSError(ctypes.get_errno(), "tee")
    return r

SIZE = 512 << 20
def pair():
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
    c = socket.create_connection(l.getsockname()); s, _ = l.accept(); l.close()
    return c, s
def producer(sock):
    buf = os.urandom(1 << 20)
    sent = 0
    while sent < SIZE:
        sent += sock.send(buf)
    sock.shutdown(socket.SHUT_WR)
def consumer(sock):
    buf = bytearray(1 << 20)
    while sock.recv_into(buf): pass
def run(mode):
    src_c, src = pair(); outs = [pair() for _ in range(2)]
    threads = [threading.Thread(target=producer, args=(src_c,))] + [threading.Thread(target=consumer, args=(o[1],)) for o in outs]
    for t in threads: t.start()
    dsts = [o[0] for o in outs]
    r0 = resource.getrusage(resource.RUSAGE_THREAD); t0 = time.time()
    if mode == "copy":
        buf = bytearray(1 << 20); mv = memoryview(buf)
        while True:
            n = src.recv_into(buf)
            if not n: break
            for d in dsts: d.sendall(mv[:n])
    else:
        p1r, p1w = os.pipe(); p2r, p2w = os.pipe()
        for fd in (p1w, p2w): fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        while True:
            n = os.splice(src.fileno(), p1w, 1 << 20)
            if not n: break
            left = n
            while left:
                left -= tee(p1r, p2w, left)   # blocking pipes: fine here
            for pr, d in ((p1r, dsts[0]), (p2r, dsts[1])):
                left = n
                while left: left -= os.splice(pr, d.fileno(), left)
    r1 = resource.getrusage(resource.RUSAGE_THREAD); dt = time.time() - t0
    for d in dsts: d.shutdown(socket.SHUT_WR)
    for t in threads: t.join()
    gb = 2 * SIZE / 1e9
    print(f"{mode:6} relay thread: sys {(r1.ru_stime-r0.ru_stime)/gb:.3f} user {(r1.ru_utime-r0.ru_utime)/gb:.3f} s per delivered GB, {gb/dt:.2f} GB/s")
for m in ("copy", "tee", "copy", "tee"): run(m)

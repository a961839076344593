"""Paced chunked "token" producer on a raw socket (a program: python -m bench_lib.producer).

Writes LINE_BYTES-byte lines "<seq:08d> <monotonic_ns:020d> <padding>\\n" as one HTTP chunk
each, at --rate lines per second on an absolute schedule (a late line does not push the
next ones back), then the terminating chunk. TCP_NODELAY so no line waits for the next.
Prints one line "RESULT {json}" with the line count and the body's sha256, which every
receiver's sha256 must match.
"""
import argparse
import hashlib
import json
import socket
import sys
import threading
import time

LINE_BYTES = 100


def make_line(seq):
    head = f"{seq:08d} {time.monotonic_ns():020d} ".encode()
    return head + b"x" * (LINE_BYTES - 1 - len(head)) + b"\n"


def drain_response(sock, sink):
    """Read the server's progress response until it closes, so it never blocks on us."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sink.append(data)
    except OSError:
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="e.g. /tokens?n=50")
    parser.add_argument("--rate", type=float, default=200, help="lines per second")
    parser.add_argument("--lines", type=int, required=True)
    parser.add_argument("--deadline-s", type=float, default=60)
    args = parser.parse_args(argv)

    sock = socket.create_connection((args.host, args.port), timeout=args.deadline_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall((f"PUT {args.target} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                  f"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                  f"Connection: close\r\n\r\n").encode())
    response = []
    reader = threading.Thread(target=drain_response, args=(sock, response), daemon=True)
    reader.start()

    digest = hashlib.sha256()
    start = time.monotonic()
    for seq in range(args.lines):
        delay = start + seq / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        line = make_line(seq)
        digest.update(line)
        sock.sendall(b"%x\r\n%s\r\n" % (len(line), line))
    sock.sendall(b"0\r\n\r\n")
    sent_s = time.monotonic() - start
    # The server answers the sender to the end of the transfer; wait for that (bounded).
    reader.join(args.deadline_s)
    sock.close()
    text = b"".join(response).decode("latin-1", "replace")
    print("RESULT " + json.dumps({
        "lines": args.lines,
        "bytes": args.lines * LINE_BYTES,
        "sha256": digest.hexdigest(),
        "sent_s": sent_s,
        "response_status": text.split(" ", 2)[1] if text.startswith("HTTP/") else None,
        "response_tail": text[-300:],
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many lean HTTP GET receivers in one process (a program: python -m bench_lib.receivers).

256 curl processes would eat the 2 cores the servers need; one selectors loop over raw
non-blocking sockets costs a recv_into and a body check per read. The harness spreads the
receivers of one run over several such processes, one per core it may use.

Body checks (--check); either way every byte of every body is checked:
  compare  each body piece is compared with the payload file at its position (a memcmp in C,
           several times cheaper than sha256, which held one process near 1.4 GB/s); before
           connecting, the process checks the file's sha256 against --reference-sha256, so
           bytes equal to the file are the payload's
  sha256   count and sha256 of every body (latency: there is no payload file)
Modes:
  bytes  check every receiver's body (throughput, slow receiver)
  lines  also split the body into the producer's lines and time each one (token latency)
  wait   connect, send the GET, never read: the scale-of-waiting workload

Talks to the harness over stdin/stdout, one line each:
  PREPARED {}      (--wait-go) ready to connect; connects when "GO" arrives on stdin, so the
                   processes of one run start together, whatever their start-up took
  READY {json}     every socket connected and its GET sent (the producer may start)
  CHECKED {json}   (wait mode, after "CHECK" on stdin) sockets still silent / answered / closed
  RESULT {json}    per-receiver outcome, last line; then the process exits
  "LIFT" on stdin (--lift-on-stdin) lifts the throttle: the harness sends it once the fast
  receivers, in other processes, are done.
Clocks: time.monotonic_ns is CLOCK_MONOTONIC, shared by all processes of the machine, so
the producer's send stamps, these receive stamps and other processes' stamps are comparable.
"""
import argparse
import array
import errno
import hashlib
import json
import mmap
import os
import resource
import selectors
import socket
import sys
import time

from bench_lib.http_body import ProtocolError, ResponseDecoder

RECV_BUFFER_BYTES = 256 * 1024
THROTTLE_BURST_BYTES = 64 * 1024
THROTTLE_MIN_READ_BYTES = 4 * 1024
WAIT_CONNECT_BATCH = 256
HASH_BLOCK_BYTES = 4 << 20


class Sha256Body:
    """Byte count and sha256 of a body."""

    def __init__(self):
        self.received = 0
        self.digest = hashlib.sha256()

    def update(self, piece):
        self.digest.update(piece)
        self.received += len(piece)

    def outcome(self):
        return {"check": "sha256", "bytes": self.received, "sha256": self.digest.hexdigest()}


class ComparedBody:
    """Byte count of a body and the first position where it differs from its slice of the
    payload file (size bytes at offset)."""

    def __init__(self, reference, offset, size):
        self.reference = reference      # the payload file, mapped
        self.offset = offset            # where this body's bytes start in it
        self.size = size
        self.received = 0
        self.mismatch_at = None         # None: every byte so far equals the file's

    def update(self, piece):
        count = len(piece)
        if self.mismatch_at is None:
            start = self.offset + self.received
            expected = self.reference[start:self.offset + min(self.size, self.received + count)]
            # startswith takes any buffer and memcmps: no copy of the piece, one of the file.
            if len(expected) != count or not expected.startswith(piece):
                self.mismatch_at = self.received + first_difference(piece, expected)
        self.received += count

    def outcome(self):
        return {"check": "compare", "bytes": self.received, "mismatch_at": self.mismatch_at}


def first_difference(piece, expected):
    """Index of the first byte where piece and expected differ (run on a mismatch only)."""
    for index, (got, want) in enumerate(zip(bytes(piece), expected)):
        if got != want:
            return index
    return min(len(piece), len(expected))


def map_reference(path, sha256):
    """The payload file mapped read-only, after checking its sha256 (ValueError if it differs)."""
    with open(path, "rb") as file:
        # MAP_POPULATE: page faults now, before connecting, not while bodies are measured.
        reference = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                              prot=mmap.PROT_READ)
    digest = hashlib.sha256()
    view = memoryview(reference)
    for start in range(0, len(reference), HASH_BLOCK_BYTES):
        digest.update(view[start:start + HASH_BLOCK_BYTES])
    view.release()
    if digest.hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {digest.hexdigest()} is not the payload's {sha256}")
    return reference


class Receiver:
    """One GET: connection state, decoder, and what it received."""

    def __init__(self, index, target, host, port, body, line_sink=None, headers="",
                 expected_status=200):
        self.index = index
        self.request = (f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}"
                        f"Connection: close\r\n\r\n").encode()
        self.body = body
        self.expected_status = expected_status
        self.line_sink = line_sink
        self.decoder = ResponseDecoder(self._on_body)
        self.sock = None
        self.error = None
        self.finished = False
        self.request_sent = False
        self.t_connect_ns = self.t_first_byte_ns = self.t_done_ns = None
        # Throttle (token bucket); rate None = read as fast as possible.
        self.rate_bps = None
        self.tokens = THROTTLE_BURST_BYTES
        self.tokens_at_ns = 0
        self.resume_at_ns = None
        # Line mode.
        self.line_buffer = bytearray()
        self.last_seq = -1
        self.lines = 0
        self.gaps = 0
        self.now_ns = 0

    def _on_body(self, piece):
        self.body.update(piece)
        if self.line_sink is not None:
            self.line_buffer += piece
            self._take_lines()

    def _take_lines(self):
        buffer = self.line_buffer
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            seq_field, stamp_field = bytes(buffer[start:end]).split(b" ", 2)[:2]
            seq = int(seq_field)
            if seq != self.last_seq + 1:
                self.gaps += 1
            self.last_seq = seq
            self.lines += 1
            self.line_sink(seq, self.now_ns - int(stamp_field))
            start = end + 1
        del buffer[:start]

    def readable_bytes(self, now_ns):
        """Bytes this receiver may read now (token bucket); 0 = wait for resume_at_ns."""
        if self.rate_bps is None:
            return RECV_BUFFER_BYTES
        elapsed = (now_ns - self.tokens_at_ns) / 1e9
        self.tokens = min(THROTTLE_BURST_BYTES, self.tokens + elapsed * self.rate_bps)
        self.tokens_at_ns = now_ns
        if self.tokens < THROTTLE_MIN_READ_BYTES:
            wait_s = (THROTTLE_MIN_READ_BYTES - self.tokens) / self.rate_bps
            self.resume_at_ns = now_ns + int(wait_s * 1e9)
            return 0
        return int(self.tokens)

    def outcome(self):
        return {
            "index": self.index,
            "status": self.decoder.status,
            "complete": self.decoder.complete,
            **self.body.outcome(),
            "error": self.error,
            "throttled": self.rate_bps is not None,
            "t_connect_ns": self.t_connect_ns,
            "t_first_byte_ns": self.t_first_byte_ns,
            "t_done_ns": self.t_done_ns,
            "lines": self.lines,
            "gaps": self.gaps,
        }


class ReceiverPool:
    """The selectors loop that connects, reads and (optionally) throttles every receiver.

    Each registered socket carries (handler, party): the loop calls handler(party, mask,
    now_ns), so other parties (bench_lib.pipes' producers) share the loop.
    """

    def __init__(self, receivers, host, port, deadline_ns):
        self.receivers = receivers
        self.address = (host, port)
        self.deadline_ns = deadline_ns
        self.selector = selectors.DefaultSelector()
        self.buffer = bytearray(RECV_BUFFER_BYTES)
        self.view = memoryview(self.buffer)
        self.unsent = 0  # connects started whose request is not sent yet
        self.active = len(receivers)
        self.paused = []  # throttled receivers waiting for tokens
        self.commands = {}  # stdin line -> action, while stdin is watched

    def watch_stdin(self, commands):
        """Run commands[line] when the harness writes that line on stdin."""
        self.commands = commands
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, (self._on_stdin, None))

    def connect(self, receivers, batch=None, before_batch=None):
        """Start every non-blocking connect (in batches, so no listen queue overflows;
        before_batch() may hold each batch back further)."""
        step = batch or len(receivers) or 1
        for start in range(0, len(receivers), step):
            if before_batch:
                before_batch()
            for receiver in receivers[start:start + step]:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                receiver.sock = sock
                receiver.t_connect_ns = time.monotonic_ns()
                self.unsent += 1
                code = sock.connect_ex(self.address)
                if code not in (0, errno.EINPROGRESS):
                    self._fail(receiver, f"connect: {errno.errorcode.get(code, code)}")
                    continue
                self.selector.register(sock, selectors.EVENT_WRITE, (self._send_request,
                                                                     receiver))
            if batch:
                self.run(until=self.all_requests_sent)

    def connect_all(self, batch=None, before_batch=None):
        self.connect(self.receivers, batch, before_batch)

    def run(self, until=None):
        """Serve events until until() holds (default: every party finished) or deadline."""
        until = until or (lambda: self.active == 0)
        while not until():
            if not self.serve_once():
                return

    def serve_once(self, max_wait_ns=None):
        """Wait for events (at most max_wait_ns) and handle them; False past the deadline."""
        now_ns = time.monotonic_ns()
        if now_ns >= self.deadline_ns:
            self.on_deadline()
            return False
        timeout_ns = self.deadline_ns - now_ns
        if max_wait_ns is not None:
            timeout_ns = min(timeout_ns, max_wait_ns)
        if self.paused:
            timeout_ns = min(timeout_ns, min(r.resume_at_ns for r in self.paused) - now_ns)
        events = self.selector.select(max(timeout_ns, 0) / 1e9)
        now_ns = time.monotonic_ns()
        for key, mask in events:
            handler, party = key.data
            handler(party, mask, now_ns)
        self._resume_paused(now_ns)
        return True

    def on_deadline(self):
        for receiver in self.receivers:
            if not receiver.finished:
                self._fail(receiver, "deadline")

    def all_requests_sent(self):
        return self.unsent == 0

    def lift_throttles(self):
        for receiver in self.receivers:
            receiver.rate_bps = None
        self._resume_paused(float("inf"))

    def _on_stdin(self, _party, _mask, _now_ns):
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:  # the harness is gone: nothing more will come
            self.selector.unregister(sys.stdin.fileno())
            return
        for line in data.decode().split():
            action = self.commands.get(line)
            if action:
                action()

    def _send_request(self, receiver, _mask, _now_ns):
        error = send_once_connected(receiver.sock, receiver.request)
        if error:
            self._fail(receiver, error)
            return
        receiver.request_sent = True
        self.unsent -= 1
        self.selector.modify(receiver.sock, selectors.EVENT_READ, (self._read, receiver))

    def _read(self, receiver, _mask, now_ns):
        limit = receiver.readable_bytes(now_ns)
        if limit == 0:
            self.selector.unregister(receiver.sock)
            self.paused.append(receiver)
            return
        try:
            count = receiver.sock.recv_into(self.buffer, limit)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(receiver, f"recv: {exc}")
            return
        if receiver.rate_bps is not None:
            receiver.tokens -= count
        if count == 0:
            receiver.decoder.feed_eof()
            if not receiver.decoder.complete:
                receiver.error = "closed before the body was complete"
            self._finish(receiver, now_ns)
            return
        if receiver.t_first_byte_ns is None:
            receiver.t_first_byte_ns = now_ns
        receiver.now_ns = now_ns
        try:
            receiver.decoder.feed(self.view[:count])
        except (ProtocolError, ValueError) as exc:
            self._fail(receiver, f"protocol: {exc}")
            return
        if receiver.decoder.status not in (None, receiver.expected_status):
            self._fail(receiver, f"status {receiver.decoder.status}")
        elif receiver.decoder.complete:
            self._finish(receiver, now_ns)

    def _resume_paused(self, now_ns):
        still_paused = []
        for receiver in self.paused:
            if receiver.rate_bps is None or receiver.resume_at_ns <= now_ns:
                self.selector.register(receiver.sock, selectors.EVENT_READ,
                                       (self._read, receiver))
            else:
                still_paused.append(receiver)
        self.paused = still_paused

    def _fail(self, receiver, message):
        if receiver.error is None:
            receiver.error = message
        self._finish(receiver, time.monotonic_ns())

    def _finish(self, receiver, now_ns):
        if receiver.finished:
            return
        receiver.finished = True
        receiver.t_done_ns = now_ns
        if not receiver.request_sent:
            self.unsent -= 1
        if receiver in self.paused:
            self.paused.remove(receiver)
        elif receiver.sock is not None:
            try:
                self.selector.unregister(receiver.sock)
            except (KeyError, ValueError):
                pass
        if receiver.sock is not None:
            receiver.sock.close()
        self.active -= 1


def send_once_connected(sock, data):
    """A non-blocking connect finished: send a request head (tiny: it fits any send buffer at
    once). The failure as a line, or None."""
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        return f"connect: {errno.errorcode.get(code, code)}"
    try:
        sock.sendall(data)
    except OSError as exc:
        return f"send: {exc}"
    return None


def emit(tag, document):
    sys.stdout.write(f"{tag} {json.dumps(document)}\n")
    sys.stdout.flush()


def wait_for_go():
    """PREPARED, then block until the harness writes GO (every process is prepared)."""
    emit("PREPARED", {})
    # os.read, not sys.stdin: a buffered reader could swallow later commands (LIFT, BODIES)
    # that the selector loop then never sees. The harness sends those only after READY.
    received = b""
    while b"GO\n" not in received:
        data = os.read(sys.stdin.fileno(), 64)
        if not data:
            sys.exit("stdin closed before GO")
        received += data


def client_cpu_seconds():
    """This process's CPU so far: beside the elapsed time, it tells whether the client
    bound the run."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def make_body_check(args, reference):
    if args.check == "compare":
        return lambda: ComparedBody(reference, 0, len(reference))
    return Sha256Body


def run_transfer(args):
    """bytes/lines mode: connect all, READY, receive to the end, RESULT."""
    latencies_ns = array.array("q")
    warmup = args.warmup_lines

    def record_line(seq, latency_ns):
        if seq >= warmup:
            latencies_ns.append(latency_ns)

    reference = map_reference(args.reference, args.reference_sha256) if args.reference else None
    new_body = make_body_check(args, reference)
    sink = record_line if args.mode == "lines" else None
    receivers = [Receiver(args.first_index + i, args.target, args.host, args.port, new_body(),
                          sink) for i in range(args.count)]
    pool = ReceiverPool(receivers, args.host, args.port,
                        time.monotonic_ns() + int(args.deadline_s * 1e9))
    if args.wait_go:
        wait_for_go()
    cpu_at_start = client_cpu_seconds()
    if args.throttle_bps:
        for receiver in receivers:
            receiver.rate_bps = args.throttle_bps
            receiver.tokens_at_ns = time.monotonic_ns()
    if args.lift_on_stdin:
        pool.watch_stdin({"LIFT": pool.lift_throttles})
    pool.connect_all()
    pool.run(until=pool.all_requests_sent)
    emit("READY", {"t_ns": time.monotonic_ns()})
    pool.run()
    ordered = sorted(latencies_ns)
    document = {"receivers": [r.outcome() for r in receivers],
                "client_cpu_s": client_cpu_seconds() - cpu_at_start}
    if args.mode == "lines":
        document["latency_ns"] = {
            "count": len(ordered),
            "p50": percentile(ordered, 0.50),
            "p99": percentile(ordered, 0.99),
            "max": ordered[-1] if ordered else None,
        }
    emit("RESULT", document)


def run_waiting(args):
    """wait mode: count distinct paths, GET sent, nothing read; CHECK and CLOSE on stdin."""
    receivers = [Receiver(i, args.target.replace("{i}", str(i)), args.host, args.port,
                          Sha256Body()) for i in range(args.count)]
    pool = ReceiverPool(receivers, args.host, args.port,
                        time.monotonic_ns() + int(args.deadline_s * 1e9))
    pool.connect_all(batch=WAIT_CONNECT_BATCH)
    failed = [r.error for r in receivers if r.error]
    emit("READY", {"t_ns": time.monotonic_ns(), "connected": args.count - len(failed),
                   "errors": failed[:5]})
    for line in sys.stdin:
        if line.strip() == "CHECK":
            emit("CHECKED", check_silent(receivers))
        elif line.strip() == "CLOSE":
            break
    for receiver in receivers:
        if receiver.sock is not None:
            receiver.sock.close()
    emit("RESULT", {"closed": len(receivers)})


def check_silent(receivers):
    """How many waiting sockets are still silent (no response, not closed by the server)."""
    counts = {"silent": 0, "answered": 0, "closed": 0, "failed": 0}
    for receiver in receivers:
        if receiver.error or receiver.sock is None or receiver.sock.fileno() < 0:
            counts["failed"] += 1
            continue
        try:
            data = receiver.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            counts["silent"] += 1
            continue
        except OSError:
            counts["closed"] += 1
            continue
        counts["answered" if data else "closed"] += 1
    return counts


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True,
                        help="request target, e.g. /p?n=50; wait mode: {i} = receiver index")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first-index", type=int, default=0,
                        help="index of this process's first receiver among the run's")
    parser.add_argument("--mode", choices=("bytes", "lines", "wait"), default="bytes")
    parser.add_argument("--check", choices=("compare", "sha256"), default="sha256")
    parser.add_argument("--reference", help="compare: the payload file")
    parser.add_argument("--reference-sha256", help="compare: the payload's sha256")
    parser.add_argument("--wait-go", action="store_true",
                        help="print PREPARED and connect only once GO arrives on stdin")
    parser.add_argument("--throttle-bps", type=float, default=0,
                        help="every receiver of this process reads at most this many B/s")
    parser.add_argument("--lift-on-stdin", action="store_true",
                        help="LIFT on stdin: read at full speed from then on")
    parser.add_argument("--warmup-lines", type=int, default=0,
                        help="lines mode: first lines left out of the latency figures")
    parser.add_argument("--deadline-s", type=float, default=120)
    args = parser.parse_args(argv)
    if args.check == "compare" and not (args.reference and args.reference_sha256):
        parser.error("--check compare needs --reference and --reference-sha256")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mode == "wait":
        run_waiting(args)
    else:
        run_transfer(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

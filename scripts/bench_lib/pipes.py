"""The producers and receivers of many pipes (a program: python -m bench_lib.pipes).

Pipe i of a run carries bytes [i * size, (i + 1) * size) of the payload file, so no two
pipes carry the same body and bytes delivered to the wrong pipe cannot pass. The run's
receivers are dealt over --processes processes one by one (so even P = 1 uses them all),
its producers pipe by pipe; this one is --process-index. Receiver k of pipe i sends GET
<prefix>-i?n=N; pipe i's producer sends PUT with Content-Length, its body by os.sendfile
from the file (a syscall or two per producer). Connects go in batches, each once the
server's accept queues have room (listen_queue): a dropped SYN would come back only 1 s
later and time the kernel's retransmit instead of the server.

--static (nginx, which has no pipes): no producers; each receiver GETs the file itself with
`Range: bytes=<the pipe's slice>` and expects 206 — the same bytes over the same receiver
connections, a ceiling without producers.

Every receiver's body is compared with its slice in full (receivers.ComparedBody). A receiver
answered 503 is refused, not failed: the run counts refusals and fails on anything else.

The harness steps every process of a run together (stdout line -> stdin line):
  PREPARED {}     -> GO          connect the receivers
  RECEIVERS {}    -> PRODUCERS   every process's receivers have sent their GETs: connect
                                 the producers, send their heads, wait for their answers
  HEADS {json}    -> BODIES      every producer answered — 200, its pipe streams, or 503 —
                                 (or "unanswered" after 10 s): the P pipes are all open at
                                 once; now the bodies flow
  RESULT {json}   a summary: receivers ok / refused / failed (the first few described),
                  bytes delivered, first connect and last done stamps, producers' statuses
"""
import argparse
import errno
import os
import selectors
import socket
import sys
import time

from bench_lib.http_body import ProtocolError, ResponseDecoder
from bench_lib.listen_queue import listen_queues
from bench_lib.receivers import (ComparedBody, Receiver, ReceiverPool, client_cpu_seconds,
                                 emit, map_reference, send_once_connected, wait_for_go)

CONNECT_BATCH = 64           # connects per batch and process
# A batch waits until every accept queue of the server is at most this full: with two
# processes' batches on top, a queue of 511 (nginx's, node's) still has room.
QUEUE_FULL_BEFORE_BATCH = 0.25
ROOM_POLL_NS = 1_000_000
# A pipe server answers a producer's head once its pipe is streaming (200) or refused (503);
# the bodies wait for every answer, at most this long (a server may answer only later).
ANSWER_WAIT_NS = 10_000_000_000
REFUSED_STATUS = 503
FAILURES_SHOWN = 5


class Producer:
    """One PUT with Content-Length: head, then the body by sendfile, then the response."""

    def __init__(self, index, target, host, port, file_fd, offset, size):
        self.index = index
        self.head = (f"PUT {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
                     f"Connection: close\r\n\r\n").encode()
        self.file_fd, self.offset, self.size = file_fd, offset, size
        self.sent = None             # body bytes sent; None until the head is sent
        self.decoder = ResponseDecoder(lambda piece: None)   # progress lines: not checked
        self.sock = None
        self.error = None
        self.finished = False


class PipesPool(ReceiverPool):
    """ReceiverPool that also drives the producers in the same loop."""

    def __init__(self, receivers, producers, host, port, deadline_ns):
        super().__init__(receivers, host, port, deadline_ns)
        self.producers = producers
        self.active += len(producers)
        self.producers_unsent = 0    # producers whose head is not sent yet
        self.producers_started = False
        self.bodies_released = False

    def make_room(self):
        """Serve events until the server's accept queues can take another batch."""
        while True:
            queues = listen_queues(self.address[1])
            if not queues or all(queued <= backlog * QUEUE_FULL_BEFORE_BATCH
                                 for queued, backlog in queues):
                return
            if not self.serve_once(ROOM_POLL_NS):
                return

    def start_producers(self):
        self.producers_started = True

    def connect_producers(self):
        for start in range(0, len(self.producers), CONNECT_BATCH):
            self.make_room()
            for producer in self.producers[start:start + CONNECT_BATCH]:
                producer.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                producer.sock.setblocking(False)
                self.producers_unsent += 1
                code = producer.sock.connect_ex(self.address)
                if code not in (0, errno.EINPROGRESS):
                    self._end_producer(producer, f"connect: {errno.errorcode.get(code, code)}")
                    continue
                self.selector.register(producer.sock, selectors.EVENT_WRITE,
                                       (self._on_producer, producer))
            self.run(until=lambda: self.producers_unsent == 0)

    def wait_for_answers(self):
        """Serve events until every producer has its response status (or has ended)."""
        give_up_ns = time.monotonic_ns() + ANSWER_WAIT_NS
        while self.unanswered() and time.monotonic_ns() < give_up_ns:
            if not self.serve_once(ROOM_POLL_NS):
                return

    def unanswered(self):
        return sum(1 for p in self.producers if not p.finished and p.decoder.status is None)

    def on_deadline(self):
        super().on_deadline()
        for producer in self.producers:
            self._end_producer(producer, "deadline")

    def _on_producer(self, producer, mask, _now_ns):
        if producer.sent is None:
            error = send_once_connected(producer.sock, producer.head)
            if error:
                self._end_producer(producer, error)
                return
            producer.sent = 0
            self.producers_unsent -= 1
            self.selector.modify(producer.sock, selectors.EVENT_READ,
                                 (self._on_producer, producer))
        if mask & selectors.EVENT_READ:
            self._read_response(producer)
        if self.bodies_released and not producer.finished and producer.sent < producer.size:
            self._send_body(producer)

    def release_bodies(self):
        """Every producer of the run has sent its head: the bodies may flow."""
        self.bodies_released = True
        for producer in self.producers:
            if producer.sent is not None and not producer.finished:
                self._send_body(producer)

    def _send_body(self, producer):
        try:
            while producer.sent < producer.size:
                producer.sent += os.sendfile(producer.sock.fileno(), producer.file_fd,
                                             producer.offset + producer.sent,
                                             producer.size - producer.sent)
        except BlockingIOError:
            pass
        except OSError as exc:          # a refusing server may close before the body is in
            self._end_producer(producer, f"send: {exc}")
            return
        events = selectors.EVENT_READ
        if producer.sent < producer.size:
            events |= selectors.EVENT_WRITE
        self.selector.modify(producer.sock, events, (self._on_producer, producer))

    def _read_response(self, producer):
        try:
            count = producer.sock.recv_into(self.buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end_producer(producer, f"recv: {exc}")
            return
        if count == 0:
            producer.decoder.feed_eof()
            self._end_producer(producer, None if producer.decoder.complete
                               else "response closed before its end")
            return
        try:
            producer.decoder.feed(self.view[:count])
        except (ProtocolError, ValueError) as exc:
            self._end_producer(producer, f"protocol: {exc}")
            return
        if producer.decoder.complete:
            self._end_producer(producer, None)

    def _end_producer(self, producer, error):
        if producer.finished:
            return
        producer.finished = True
        producer.error = error
        if producer.sent is None:
            self.producers_unsent -= 1
        if producer.sock is not None:
            try:
                self.selector.unregister(producer.sock)
            except (KeyError, ValueError):
                pass
            producer.sock.close()
        self.active -= 1


def describe(receiver, n, expected_status):
    outcome = receiver.outcome()
    who = f"pipe {receiver.index // n} receiver {receiver.index % n}"
    if outcome["mismatch_at"] is not None:
        return f"{who}: CORRUPT: differs from its slice at byte {outcome['mismatch_at']}"
    return (f"{who}: status {outcome['status']} (want {expected_status}), {outcome['bytes']} "
            f"of {receiver.body.size} B, complete={outcome['complete']}, "
            f"error={outcome['error']}")


def summarize(receivers, producers, n, expected_status, client_cpu_s):
    """The RESULT document: receivers sorted into ok, refused (503) and failed."""
    ok, refused, failed, corrupt = [], 0, [], 0
    not_delivered = set()   # a pipe's receivers may be in several processes: the harness
    for receiver in receivers:  # unites these sets
        body = receiver.body
        if (receiver.error is None and receiver.decoder.complete
                and receiver.decoder.status == expected_status
                and body.received == body.size and body.mismatch_at is None):
            ok.append(receiver)
            continue
        not_delivered.add(receiver.index // n)
        if receiver.decoder.status == REFUSED_STATUS:
            refused += 1
        else:
            corrupt += body.mismatch_at is not None
            failed.append(receiver)
    producer_outcomes = {}
    for producer in producers:
        key = str(producer.decoder.status) if producer.error is None else "error"
        producer_outcomes[key] = producer_outcomes.get(key, 0) + 1
    return {
        "receivers": len(receivers), "ok": len(ok), "refused": refused,
        "failed": len(failed), "corrupt": corrupt,
        "failures": [describe(r, n, expected_status) for r in failed[:FAILURES_SHOWN]],
        "pipes_not_delivered": sorted(not_delivered),
        "delivered_bytes": sum(r.body.received for r in ok),
        "t_first_connect_ns": min(r.t_connect_ns for r in receivers if r.t_connect_ns),
        "t_last_done_ns": max(r.t_done_ns for r in receivers if r.t_done_ns),
        "producers": producer_outcomes,
        "producer_errors": [f"pipe {p.index}: {p.error}" for p in producers
                            if p.error][:FAILURES_SHOWN],
        "client_cpu_s": client_cpu_s,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", required=True, help="pipe i is <prefix>-i?n=N")
    parser.add_argument("--pipes", type=int, required=True, help="pipes in the whole run")
    parser.add_argument("--n", type=int, required=True, help="receivers per pipe")
    parser.add_argument("--size", type=int, required=True, help="body bytes per pipe")
    parser.add_argument("--reference", required=True, help="the payload file")
    parser.add_argument("--reference-sha256", required=True)
    parser.add_argument("--process-index", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--static", action="store_true",
                        help="no producers: GET the file with a Range per pipe (nginx)")
    parser.add_argument("--deadline-s", type=float, default=120)
    args = parser.parse_args(argv)

    reference = map_reference(args.reference, args.reference_sha256)
    file_fd = os.open(args.reference, os.O_RDONLY)
    receivers, producers = [], []
    expected_status = 206 if args.static else 200
    for pipe in range(args.pipes):
        offset = pipe * args.size
        if args.static:
            target = args.prefix
            headers = f"Range: bytes={offset}-{offset + args.size - 1}\r\n"
        else:
            target, headers = f"{args.prefix}-{pipe}?n={args.n}", ""
            if pipe % args.processes == args.process_index:
                producers.append(Producer(pipe, target, args.host, args.port, file_fd, offset,
                                          args.size))
        # Receivers dealt one by one, not by pipe: with P = 1 the 4 still use every process.
        receivers += [Receiver(index, target, args.host, args.port,
                               ComparedBody(reference, offset, args.size), headers=headers,
                               expected_status=expected_status)
                      for index in range(pipe * args.n, (pipe + 1) * args.n)
                      if index % args.processes == args.process_index]
    pool = PipesPool(receivers, producers, args.host, args.port,
                     time.monotonic_ns() + int(args.deadline_s * 1e9))
    wait_for_go()
    cpu_at_go = client_cpu_seconds()
    pool.watch_stdin({"PRODUCERS": pool.start_producers, "BODIES": pool.release_bodies})
    pool.connect_all(batch=CONNECT_BATCH, before_batch=pool.make_room)
    # Receivers first, in every process, before any producer (as in every workload).
    emit("RECEIVERS", {})
    pool.run(until=lambda: pool.producers_started or pool.active == 0)
    pool.connect_producers()
    pool.wait_for_answers()
    # All P pipes open at once: no body byte flows before every producer's pipe streams.
    emit("HEADS", {"unanswered": pool.unanswered()})
    pool.run()
    emit("RESULT", summarize(receivers, producers, args.n, expected_status,
                             client_cpu_seconds() - cpu_at_go))
    return 0


if __name__ == "__main__":
    sys.exit(main())

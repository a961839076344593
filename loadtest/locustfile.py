"""Locust load test for relayd: one producer per pipe round, fanned out to fast and slow consumers.

Theory of operation
-------------------
Rounds. One RoundBoard per locust process pairs the users. Consumers wait on the board; the
Producer opens round k on the fresh path `/lt-<runid>-<k>?n=N`, N = the consumers idle at that
moment (it waits, up to --round-gather-s, until every FastConsumer is idle; a SlowConsumer still
draining an older round simply joins a later one). Each consumer GETs the round's path, the
producer PUTs there once every consumer has sent its GET. Record 0 opens the pipe: the producer
sends the rest once every consumer has it, so the rendezvous shows in TTFB, not in the records'
latency. The run id keeps a killed run's half-open pipes from ever meeting the next run's
requests.

Records. The body is a sequence of fixed-size records:
    | "LTR1" | record_bytes u32 | round u32 | seq u64 | send_ns u64 | payload_crc32 u32 |
    | header_crc32 u32 (of the 32 bytes before it) | payload |
so every record carries checks of itself. The payload is a slice of one random block at an offset
derived from seq, so a record shifted, repeated or spliced from elsewhere differs from what its
seq promises. Consumers compare each payload byte for byte with that slice (or, with
--verify-crc, recompute its crc32). send_ns is perf_counter_ns() when the producer built the
record; producer and consumers share one process, hence one clock.

Clients. Each request is a raw gevent socket whose response is fed to httptools as it arrives,
so every recv() gets its own timestamp (FastHttpUser.iter_content(n) blocks until n bytes).
relayd itself is never imported: it uses asyncio/uvloop, and locust monkey-patches with gevent.

Metrics, fired through environment.events.request (request_type / name in locust's tables):
    PUT / producer body              body sent (ms, bytes); failure = rejected or cut
    PUT / producer response          sender's response read to its end (ms from first byte)
    GET / consumer fast|slow         one consumer's round (ms, bytes); failure = any violation
    TTFB / consumer fast|slow        GET sent -> first body byte (ms; includes the rendezvous)
    LATENCY_us / record fast|slow    producer -> consumer per record, every Kth but record 0 (µs)
    THROUGHPUT_KiBps / consumer ...  record 1 -> last body byte of one round (value = KiB/s)
Locust's own percentiles round values below 100 to whole units, so the summary printed at quit
(and written to --summary-json) keeps exact samples and checks the thresholds against them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import secrets
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.pool
import gevent.queue
import httptools
import psutil
from gevent import socket
from locust import User, constant, events, task
from locust.runners import STATE_SPAWNING

# ---------------------------------------------------------------------------------------------
# Process limits

WANTED_OPEN_FILES = 16384


def raise_open_files_limit() -> None:
    """256 consumers plus the producer's sockets need more than a 1024 soft limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, WANTED_OPEN_FILES)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


raise_open_files_limit()

# ---------------------------------------------------------------------------------------------
# Records

RECORD_MAGIC = b"LTR1"
# magic, record_bytes, round, seq, send_ns, payload_crc32; then header_crc32 over these 32 bytes
RECORD_PREFIX = struct.Struct("<4sIIQQI")
RECORD_CRC = struct.Struct("<I")
RECORD_HEADER_BYTES = RECORD_PREFIX.size + RECORD_CRC.size  # 36
MIN_RECORD_BYTES = RECORD_HEADER_BYTES + 1
PAYLOAD_SOURCE = os.urandom(1 << 20)
PAYLOAD_SOURCE_VIEW = memoryview(PAYLOAD_SOURCE)
PAYLOAD_STRIDE = 7919  # prime: neighbouring records get unrelated payload offsets


def expected_payload(seq: int, payload_bytes: int) -> memoryview:
    """The payload record seq carries: a slice of PAYLOAD_SOURCE chosen by seq."""
    start = (seq * PAYLOAD_STRIDE) % (len(PAYLOAD_SOURCE) - payload_bytes)
    return PAYLOAD_SOURCE_VIEW[start:start + payload_bytes]


@functools.lru_cache(maxsize=1 << 16)
def expected_payload_crc(seq: int, payload_bytes: int) -> int:
    return zlib.crc32(expected_payload(seq, payload_bytes))


def encode_record(round_number: int, seq: int, record_bytes: int, send_ns: int) -> bytes:
    """One self-checking record of exactly record_bytes bytes."""
    payload_bytes = record_bytes - RECORD_HEADER_BYTES
    prefix = RECORD_PREFIX.pack(RECORD_MAGIC, record_bytes, round_number, seq, send_ns,
                                expected_payload_crc(seq, payload_bytes))
    return b"".join((prefix, RECORD_CRC.pack(zlib.crc32(prefix)),
                     expected_payload(seq, payload_bytes)))


class RecordStreamVerifier:
    """Checks one consumer's body: records 0..expected-1 of one round, in order, each intact.

    Payloads are checked byte for byte against the expected content (memcmp speed) or, with
    check_payload_crc, by their crc32 (several times the CPU, which is what limits fan-out).
    The first violation is kept in `violation` and everything after it is ignored.
    """

    def __init__(self, round_number: int, record_bytes: int, expected_records: int, on_record,
                 check_payload_crc: bool = False):
        self.round_number = round_number
        self.record_bytes = record_bytes
        self.payload_bytes = record_bytes - RECORD_HEADER_BYTES
        self.expected_records = expected_records
        self.on_record = on_record  # (seq, send_ns, received_ns) for every verified record
        self.check_payload_crc = check_payload_crc
        self.pending = bytearray()
        self.next_seq = 0
        self.violation: str | None = None

    def feed(self, body: bytes, received_ns: int) -> None:
        if self.violation:
            return
        if self.pending:
            self.pending += body
            data = self.pending
        else:
            data = body  # the common case: check records in place, keep only the tail
        record_bytes = self.record_bytes
        consumed = 0
        view = memoryview(data)
        try:
            while len(view) - consumed >= record_bytes:
                self.violation = self._check_record(data, view, consumed, received_ns)
                if self.violation:
                    return
                consumed += record_bytes
            rest = view[consumed:]
            if data is not self.pending:
                self.pending += rest
            else:
                rest.release()
                view.release()  # a bytearray cannot shrink while a view is exported
                del self.pending[:consumed]
        finally:
            view.release()

    def _check_record(self, data, view: memoryview, at: int, received_ns: int) -> str | None:
        magic, size, round_number, seq, send_ns, payload_crc = RECORD_PREFIX.unpack_from(view, at)
        if magic != RECORD_MAGIC or size != self.record_bytes:
            return f"corruption: bad record header after record {self.next_seq - 1}"
        (header_crc,) = RECORD_CRC.unpack_from(view, at + RECORD_PREFIX.size)
        if zlib.crc32(view[at:at + RECORD_PREFIX.size]) != header_crc:
            return f"corruption: header crc mismatch in the record after {self.next_seq - 1}"
        if round_number != self.round_number:
            return f"corruption: record of round {round_number} in round {self.round_number}"
        if seq < self.next_seq:
            return f"duplicate: record {seq} again after {self.next_seq - 1}"
        if seq > self.next_seq:
            return f"gap: records {self.next_seq}..{seq - 1} missing"
        if seq >= self.expected_records:
            return f"extra: record {seq} beyond the {self.expected_records} sent"
        payload_at = at + RECORD_HEADER_BYTES
        if self.check_payload_crc:
            intact = zlib.crc32(view[payload_at:at + size]) == payload_crc
        else:
            intact = data.startswith(expected_payload(seq, self.payload_bytes), payload_at)
        if not intact:
            return f"corruption: payload of record {seq} differs from what was sent"
        self.next_seq += 1
        self.on_record(seq, send_ns, received_ns)
        return None

    def finish(self, message_complete: bool) -> str | None:
        """The violation of the whole body, once the response has ended (or the socket closed)."""
        if self.violation:
            return self.violation
        if not message_complete:
            return (f"truncated: connection ended after {self.next_seq} of "
                    f"{self.expected_records} records")
        if self.pending:
            return f"corruption: {len(self.pending)} stray bytes after record {self.next_seq - 1}"
        if self.next_seq != self.expected_records:
            return f"short body: {self.next_seq} of {self.expected_records} records, ended cleanly"
        return None


# ---------------------------------------------------------------------------------------------
# HTTP over a raw gevent socket

RECV_BYTES = 256 * 1024
SLOW_RECV_BUFFER_BYTES = 64 * 1024  # fixed SO_RCVBUF: no kernel autotuning that hides the slowness
ERROR_TEXT_BYTES = 200


class HttpExchange:
    """One request on a fresh gevent socket; the response is parsed by httptools as bytes arrive."""

    def __init__(self, host: str, port: int, timeout_s: float, receive_buffer_bytes: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer_bytes:
            # Before connect: the window scale is negotiated in the handshake.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout_s)
        self.sock.connect((host, port))
        self.parser = httptools.HttpResponseParser(self)
        self.status: int | None = None
        self.complete = False
        self.error_text = b""
        self.received_ns = 0  # set before each feed: the time of the recv() that brought the bytes
        self.on_ok_body = None  # called with body bytes of a 200 response

    def close(self) -> None:
        self.sock.close()

    # httptools callbacks, in wire order
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status == 200 and self.on_ok_body is not None:
            self.on_ok_body(body)
        elif len(self.error_text) < ERROR_TEXT_BYTES:
            self.error_text += body[:ERROR_TEXT_BYTES]

    def on_message_complete(self) -> None:
        self.complete = True

    def read_response(self, max_recv: int = RECV_BYTES, throttle_bytes_per_s: int = 0) -> None:
        """Reads until the response is complete or the peer closes; optionally paced."""
        buffer = bytearray(max_recv)
        view = memoryview(buffer)
        throttle_start_ns = 0
        throttled_bytes = 0
        while not self.complete:
            count = self.sock.recv_into(buffer, max_recv)
            self.received_ns = time.perf_counter_ns()
            if count == 0:
                return
            self.parser.feed_data(view[:count])
            if throttle_bytes_per_s:
                throttle_start_ns = throttle_start_ns or self.received_ns
                throttled_bytes += count
                due_ns = throttle_start_ns + throttled_bytes * 1_000_000_000 // throttle_bytes_per_s
                delay_s = (due_ns - time.perf_counter_ns()) / 1e9
                if delay_s > 0:
                    gevent.sleep(delay_s)

    def describe_error(self) -> str:
        text = self.error_text.decode("utf-8", "replace").strip().splitlines()
        return f"HTTP {self.status}: {text[0] if text else ''}".strip()


def parse_host(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--host must be http://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port or 80


# ---------------------------------------------------------------------------------------------
# Rounds

@dataclass(eq=False)
class Round:
    number: int
    path: str  # with ?n=
    n: int
    records: int
    record_bytes: int
    receivers_requested: int = 0
    all_receivers_requested: gevent.event.Event = field(default_factory=gevent.event.Event)
    receivers_started: int = 0
    all_receivers_started: gevent.event.Event = field(default_factory=gevent.event.Event)

    def receiver_requested(self) -> None:
        self.receivers_requested += 1
        if self.receivers_requested >= self.n:
            self.all_receivers_requested.set()

    def receiver_started(self) -> None:
        """A receiver has record 0 (or gave up): the transfer is running for it."""
        self.receivers_started += 1
        if self.receivers_started >= self.n:
            self.all_receivers_started.set()


class RoundBoard:
    """Pairs one producer with the consumers idle at the moment a round opens (one process)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.next_round_number = 0
        self.fast_consumers: set = set()
        self.idle_consumers: set = set()
        self.inboxes: dict = {}
        self.idle_changed = gevent.event.Event()
        self.stopping = False

    def register(self, consumer, is_fast: bool) -> None:
        self.inboxes[consumer] = gevent.queue.Queue()
        if is_fast:
            self.fast_consumers.add(consumer)

    def unregister(self, consumer) -> None:
        self.inboxes.pop(consumer, None)
        self.fast_consumers.discard(consumer)
        self.idle_consumers.discard(consumer)
        self.idle_changed.set()

    def wait_for_round(self, consumer) -> Round:
        self.idle_consumers.add(consumer)
        self.idle_changed.set()
        return self.inboxes[consumer].get()

    def open_round(self, records: int, record_bytes: int, gather_s: float) -> Round:
        """Waits until every fast consumer is idle (or gather_s passed, one idle), then deals."""
        deadline = time.monotonic() + gather_s
        while True:
            idle = self.idle_consumers
            if idle and (self.fast_consumers <= idle or time.monotonic() >= deadline):
                break
            self.idle_changed.clear()
            self.idle_changed.wait(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
        participants = list(self.idle_consumers)
        self.idle_consumers.clear()
        number = self.next_round_number
        self.next_round_number += 1
        path = f"/lt-{self.run_id}-{number}?n={len(participants)}"
        new_round = Round(number, path, len(participants), records, record_bytes)
        for consumer in participants:
            self.inboxes[consumer].put(new_round)
        return new_round


# ---------------------------------------------------------------------------------------------
# Our own tally: locust rounds response times below 100 to whole units

def percentile(samples: list[float], fraction: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Tally:
    """Exact samples and counters of this process, for the summary and the thresholds."""

    def __init__(self):
        self.latency_us = {"fast": [], "slow": []}
        self.ttfb_ms = {"fast": [], "slow": []}
        self.throughput_kibps = {"fast": [], "slow": []}
        self.rounds_verified = {"fast": 0, "slow": 0}
        self.delivered_bytes = 0
        self.produced_bytes = 0
        self.rounds_opened = 0
        self.started_s = 0.0
        self.stopped_s = 0.0
        self.cpu_start_s = 0.0
        self.cpu_used_s = 0.0

    def start(self) -> None:
        self.started_s = time.monotonic()
        self.cpu_start_s = sum(psutil.Process().cpu_times()[:2])

    def stop(self) -> None:
        if not self.stopped_s:
            self.stopped_s = time.monotonic()
            self.cpu_used_s = sum(psutil.Process().cpu_times()[:2]) - self.cpu_start_s

    def summary(self, environment) -> dict:
        wall_s = max(1e-9, (self.stopped_s or time.monotonic()) - self.started_s)
        runner = environment.runner
        failures = environment.stats.total.num_failures
        failures += sum(row["count"] for row in runner.exceptions.values()) if runner else 0
        fast_latency = self.latency_us["fast"]
        options = environment.parsed_options
        summary = {
            "run_id": BOARD.run_id if BOARD else None,
            "consumers": {"fast": options.num_users - 1 - options.slow_consumers,
                          "slow": options.slow_consumers} if options.num_users else None,
            "wall_s": round(wall_s, 2),
            "rounds_opened": self.rounds_opened,
            "rounds_verified": dict(self.rounds_verified),
            "produced_mib": round(self.produced_bytes / 2**20, 2),
            "delivered_mib": round(self.delivered_bytes / 2**20, 2),
            "delivered_mib_per_s": round(self.delivered_bytes / 2**20 / wall_s, 2),
            # Headline latency is the fast consumers': a slow one's records wait on its throttle.
            "latency_ms": {"p50": ms(percentile(fast_latency, 0.50)),
                           "p99": ms(percentile(fast_latency, 0.99)),
                           "samples": len(fast_latency)},
            "failures": failures,
            "locust_cpu_s": round(self.cpu_used_s, 2),
            "locust_cpu_percent": round(100 * self.cpu_used_s / wall_s, 1),
        }
        for kind in ("fast", "slow"):
            summary[kind] = {
                "latency_ms_p50": ms(percentile(self.latency_us[kind], 0.50)),
                "latency_ms_p99": ms(percentile(self.latency_us[kind], 0.99)),
                "ttfb_ms_p50": rounded(percentile(self.ttfb_ms[kind], 0.50)),
                "ttfb_ms_p99": rounded(percentile(self.ttfb_ms[kind], 0.99)),
                "kibps_p50": rounded(percentile(self.throughput_kibps[kind], 0.50)),
                "kibps_min": rounded(min(self.throughput_kibps[kind], default=None)),
            }
        return summary


def ms(microseconds: float | None) -> float | None:
    return None if microseconds is None else round(microseconds / 1000, 3)


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


BOARD: RoundBoard | None = None
LOGGED_FAILURES = 50
failures_logged = 0
logger = logging.getLogger("relayd-loadtest")
TALLY = Tally()
BACKGROUND = gevent.pool.Group()  # producers' response readers: killed when the test stops


def report(environment, request_type: str, name: str, value: float, length: int = 0,
           failure: str | None = None, where: str = "") -> None:
    """One sample into locust's stats; failures seen while the test is stopping are dropped.

    A failure reads "category: detail". Locust groups its error table by message, so it gets
    the category alone; the whole line goes to the log (the first LOGGED_FAILURES of them).
    """
    category = None
    if failure is not None:
        if BOARD is not None and BOARD.stopping:
            return
        category = failure.split(": ", 1)[0]
        global failures_logged
        if failures_logged < LOGGED_FAILURES:
            failures_logged += 1
            logger.warning("%s %s %s: %s", request_type, name, where, failure)
    environment.events.request.fire(
        request_type=request_type, name=name, response_time=value, response_length=length,
        exception=Exception(category) if category is not None else None, context={})


# ---------------------------------------------------------------------------------------------
# Users

class Producer(User):
    """Opens one round at a time and streams its records, paced or as fast as the relay takes."""

    fixed_count = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        self.address = parse_host(self.host)
        self.options = self.environment.parsed_options
        runner = self.environment.runner
        # Rounds of the full N: let every consumer arrive before the first round.
        while runner is not None and runner.state == STATE_SPAWNING:
            gevent.sleep(0.05)

    @task
    def run_round(self) -> None:
        options = self.options
        current = BOARD.open_round(options.round_records, options.record_bytes,
                                   options.round_gather_s)
        TALLY.rounds_opened += 1
        # Either side may come first; sending after the GETs keeps every round alike.
        current.all_receivers_requested.wait(timeout=options.io_timeout_s)
        started_ns = time.perf_counter_ns()
        try:
            exchange = HttpExchange(*self.address, timeout_s=options.io_timeout_s)
        except OSError as error:
            report(self.environment, "PUT", "producer body", 0,
                   failure=f"cannot connect {type(error).__name__}: {error}",
                   where=f"round {current.number}")
            gevent.sleep(0.1)  # a relay that is down should not turn this into a busy loop
            return
        try:
            sent_bytes = self._send_body(exchange, current)
        except (OSError, socket.timeout) as error:
            self._report_send_failure(exchange, current, error, started_ns)
            exchange.close()
            return
        body_ms = (time.perf_counter_ns() - started_ns) / 1e6
        TALLY.produced_bytes += sent_bytes
        report(self.environment, "PUT", "producer body", body_ms, sent_bytes)
        BACKGROUND.spawn(self._read_sender_response, exchange, current, started_ns)

    def _send_body(self, exchange: HttpExchange, current: Round) -> int:
        options = self.options
        chunked = options.sender_framing == "chunked"
        body_bytes = current.records * current.record_bytes
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {body_bytes}"
        host, port = self.address
        exchange.sock.sendall(
            f"PUT {current.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/octet-stream\r\n{framing}\r\n\r\n".encode("ascii"))
        paced_interval_ns = int(1e9 / options.records_per_s) if options.records_per_s else 0
        batch: list[bytes] = []
        batch_bytes = 0

        def add_record(seq: int) -> None:
            nonlocal batch_bytes
            record = encode_record(current.number, seq, current.record_bytes,
                                   time.perf_counter_ns())
            batch.extend((b"%x\r\n" % len(record), record, b"\r\n") if chunked else (record,))
            batch_bytes += len(record)

        def flush() -> None:
            nonlocal batch_bytes
            exchange.sock.sendall(b"".join(batch))
            batch.clear()
            batch_bytes = 0

        # Record 0 opens the pipe. The rest follows once every receiver has it, so the rendezvous
        # shows in TTFB and not in the records' latency.
        add_record(0)
        flush()
        current.all_receivers_started.wait(timeout=options.io_timeout_s)
        streaming_ns = time.perf_counter_ns()
        for seq in range(1, current.records):
            if paced_interval_ns:
                due_ns = streaming_ns + (seq - 1) * paced_interval_ns
                delay_s = (due_ns - time.perf_counter_ns()) / 1e9
                if delay_s > 0:
                    gevent.sleep(delay_s)
            add_record(seq)
            # Paced: each record leaves at once. Unpaced: fewer, larger sends.
            if paced_interval_ns or batch_bytes >= options.send_batch_bytes:
                flush()
        if chunked:
            batch.append(b"0\r\n\r\n")
        if batch:
            exchange.sock.sendall(b"".join(batch))
        return body_bytes

    def _report_send_failure(self, exchange, current, error, started_ns) -> None:
        # A rejected sender (409/400) is usually answered and closed before the body is taken.
        exchange.sock.settimeout(1.0)
        try:
            exchange.read_response()
        except (OSError, socket.timeout, httptools.HttpParserError):
            pass
        if exchange.status not in (None, 200):
            why = exchange.describe_error()
        else:
            why = f"send failed {type(error).__name__}: {error}"
        elapsed_ms = (time.perf_counter_ns() - started_ns) / 1e6
        report(self.environment, "PUT", "producer body", elapsed_ms,
               failure=why, where=f"round {current.number} (n={current.n})")

    def _read_sender_response(self, exchange: HttpExchange, current: Round, started_ns: int):
        # relayd ends the sender's response only after its last receiver is done: slow ones count.
        slow_bytes_per_s = max(1.0, self.options.slow_kibps) * 1024
        slowest_s = current.records * current.record_bytes / slow_bytes_per_s
        exchange.sock.settimeout(self.options.io_timeout_s + slowest_s)
        failure = None
        try:
            exchange.read_response()
            if exchange.status != 200:
                failure = exchange.describe_error()
            elif not exchange.complete:
                failure = "sender response ended early"
        except (OSError, socket.timeout, httptools.HttpParserError) as error:
            failure = f"sender response {type(error).__name__}: {error}"
        finally:
            exchange.close()
        elapsed_ms = (time.perf_counter_ns() - started_ns) / 1e6
        report(self.environment, "PUT", "producer response", elapsed_ms,
               failure=failure, where=f"round {current.number} (n={current.n})")


class Consumer(User):
    """Takes the rounds dealt to it and verifies every record; `kind` names it in the stats."""

    abstract = True
    wait_time = constant(0)
    kind = "fast"

    def on_start(self) -> None:
        self.address = parse_host(self.host)
        self.options = self.environment.parsed_options
        BOARD.register(self, is_fast=self.kind == "fast")

    def on_stop(self) -> None:
        BOARD.unregister(self)

    def throttle_bytes_per_s(self) -> int:
        return 0

    @task
    def take_round(self) -> None:
        current = BOARD.wait_for_round(self)
        options = self.options
        name = f"consumer {self.kind}"
        stats = {"first_ns": 0, "record_1_ns": 0, "last_ns": 0, "bytes": 0, "started": False}
        sample_every = max(1, options.latency_sample_every)
        environment = self.environment

        def on_record(seq: int, send_ns: int, received_ns: int) -> None:
            if seq == 0:  # it waited for the rendezvous: TTFB, not latency
                stats["started"] = True
                current.receiver_started()
                return
            if seq == 1:
                stats["record_1_ns"] = received_ns
            if seq % sample_every == 0:
                latency_us = (received_ns - send_ns) / 1000
                TALLY.latency_us[self.kind].append(latency_us)
                report(environment, "LATENCY_us", f"record {self.kind}", latency_us)

        verifier = RecordStreamVerifier(current.number, current.record_bytes, current.records,
                                        on_record, check_payload_crc=options.verify_crc)
        requested_ns = time.perf_counter_ns()
        exchange = None
        failure = None
        requested = False
        try:
            receive_buffer = SLOW_RECV_BUFFER_BYTES if self.throttle_bytes_per_s() else 0
            exchange = HttpExchange(*self.address, timeout_s=options.io_timeout_s,
                                    receive_buffer_bytes=receive_buffer)

            def on_ok_body(body: bytes) -> None:
                if not stats["first_ns"]:
                    stats["first_ns"] = exchange.received_ns
                stats["last_ns"] = exchange.received_ns
                stats["bytes"] += len(body)
                TALLY.delivered_bytes += len(body)
                verifier.feed(body, exchange.received_ns)

            exchange.on_ok_body = on_ok_body
            host, port = self.address
            exchange.sock.sendall(
                f"GET {current.path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode("ascii"))
            current.receiver_requested()
            requested = True
            throttle = self.throttle_bytes_per_s()
            max_recv = min(RECV_BYTES, max(1024, throttle // 16)) if throttle else RECV_BYTES
            exchange.read_response(max_recv, throttle)
            if exchange.status != 200:
                failure = exchange.describe_error() if exchange.status else "no response"
            else:
                failure = verifier.finish(exchange.complete)
        except socket.timeout:
            failure = (f"timeout: {options.io_timeout_s} s without data, "
                       f"{verifier.next_seq} records in")
        except httptools.HttpParserError as error:
            failure = f"malformed HTTP response: {error}"
        except OSError as error:
            failure = (f"connection error {type(error).__name__}: {error}, "
                       f"{verifier.next_seq} records in")
        finally:
            if exchange is not None:
                exchange.close()
            # A consumer that never asked, or never got record 0, must not hold the producer.
            if not requested:
                current.receiver_requested()
            if not stats["started"]:
                current.receiver_started()

        done_ns = time.perf_counter_ns()
        if failure is not None:
            report(environment, "GET", name, (done_ns - requested_ns) / 1e6, stats["bytes"],
                   failure=failure, where=f"round {current.number} (n={current.n})")
            return
        TALLY.rounds_verified[self.kind] += 1
        report(environment, "GET", name, (done_ns - requested_ns) / 1e6, stats["bytes"])
        ttfb_ms = (stats["first_ns"] - requested_ns) / 1e6
        TALLY.ttfb_ms[self.kind].append(ttfb_ms)
        report(environment, "TTFB", name, ttfb_ms)
        # Measured from record 1: after record 0 the producer paused for the slowest receiver.
        streamed_bytes = stats["bytes"] - 2 * current.record_bytes
        transfer_s = (stats["last_ns"] - stats["record_1_ns"]) / 1e9
        if streamed_bytes > 0 and transfer_s > 0:
            kibps = streamed_bytes / 1024 / transfer_s
            TALLY.throughput_kibps[self.kind].append(kibps)
            report(environment, "THROUGHPUT_KiBps", name, kibps)


class FastConsumer(Consumer):
    kind = "fast"


class SlowConsumer(Consumer):
    kind = "slow"
    fixed_count = 5  # set from --slow-consumers at init

    def throttle_bytes_per_s(self) -> int:
        return int(self.options.slow_kibps * 1024)


# ---------------------------------------------------------------------------------------------
# Options, set-up, thresholds

@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("relayd load test")
    option = group.add_argument
    option("--slow-consumers", type=int, default=5,
           help="consumers throttled to --slow-kibps; the rest of -u but the producer are fast")
    option("--slow-kibps", type=float, default=64.0, help="slow consumers' read rate, KiB/s")
    option("--record-bytes", type=int, default=16384,
           help=f"size of one record incl. its {RECORD_HEADER_BYTES}-byte header")
    option("--round-records", type=int, default=64, help="records per round (one pipe)")
    option("--records-per-s", type=float, default=0.0, help="producer pacing; 0 = unpaced")
    option("--send-batch-bytes", type=int, default=64 * 1024,
           help="unpaced producer: bytes per send call")
    option("--sender-framing", choices=("chunked", "length"), default="chunked",
           help="producer body framing: Transfer-Encoding: chunked or Content-Length")
    option("--round-gather-s", type=float, default=5.0,
           help="longest wait for every fast consumer to be idle before a round opens")
    option("--latency-sample-every", type=int, default=8,
           help="record latency of every Kth record")
    option("--verify-crc", action="store_true",
           help="consumers recompute each payload's crc32 instead of comparing bytes")
    option("--io-timeout-s", type=float, default=30.0, help="socket timeout of every request")
    option("--run-id", default="", help="path component of this run's pipes; default random")
    option("--summary-json", default="",
           help="write the summary here; default <--csv prefix>.summary.json with --csv")
    option("--max-lat-p99-ms", type=float, default=0.0,
           help="fail if the fast consumers' record latency p99 exceeds this; 0 = off")
    option("--min-fast-kibps", type=float, default=0.0,
           help="fail if the median fast-consumer throughput is below this; 0 = off")
    option("--max-failures", type=int, default=0, help="fail if more failures than this")
    option("--min-rounds", type=int, default=1,
           help="fail if fewer consumer rounds than this were verified end to end")


@events.init.add_listener
def set_up(environment, **_kwargs) -> None:
    global BOARD
    options = environment.parsed_options
    if options is None:
        return
    if options.record_bytes < MIN_RECORD_BYTES or options.record_bytes > len(PAYLOAD_SOURCE):
        raise SystemExit(f"--record-bytes must be {MIN_RECORD_BYTES}..{len(PAYLOAD_SOURCE)}")
    if options.num_users and options.num_users < options.slow_consumers + 2:
        raise SystemExit("-u must cover the producer, the slow consumers and one fast consumer")
    SlowConsumer.fixed_count = options.slow_consumers
    SlowConsumer.weight = 1 if options.slow_consumers else 0  # weight 0: never dealt by weight
    BOARD = RoundBoard(options.run_id or secrets.token_hex(4))


@events.test_start.add_listener
def on_test_start(environment, **_kwargs) -> None:
    TALLY.start()


@events.test_stopping.add_listener
def on_test_stopping(environment, **_kwargs) -> None:
    # From here on, cut transfers are the test ending, not the relay failing.
    if BOARD is not None:
        BOARD.stopping = True


@events.test_stop.add_listener
def on_test_stop(environment, **_kwargs) -> None:
    TALLY.stop()
    BACKGROUND.kill(block=False)


@events.quitting.add_listener
def check_thresholds(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or BOARD is None:
        return
    TALLY.stop()
    summary = TALLY.summary(environment)
    problems = []
    if summary["failures"] > options.max_failures:
        problems.append(f"failures {summary['failures']} > --max-failures {options.max_failures}")
    verified = sum(summary["rounds_verified"].values())
    if verified < options.min_rounds:
        problems.append(f"verified consumer rounds {verified} < --min-rounds {options.min_rounds}")
    p99 = summary["latency_ms"]["p99"]
    if options.max_lat_p99_ms and (p99 is None or p99 > options.max_lat_p99_ms):
        problems.append(f"latency p99 {p99} ms > --max-lat-p99-ms {options.max_lat_p99_ms}")
    fast_kibps = summary["fast"]["kibps_p50"]
    if options.min_fast_kibps and (fast_kibps is None or fast_kibps < options.min_fast_kibps):
        problems.append(f"fast consumer median {fast_kibps} KiB/s "
                        f"< --min-fast-kibps {options.min_fast_kibps}")
    summary["threshold_problems"] = problems
    environment.process_exit_code = 1 if problems else 0

    summary_path = options.summary_json
    if not summary_path and options.csv_prefix:
        summary_path = f"{options.csv_prefix}.summary.json"
    if summary_path:
        with open(summary_path, "w") as out:
            json.dump(summary, out, indent=2)
    print(f"relayd load test summary: {json.dumps(summary)}", file=sys.stderr)
    for problem in problems:
        print(f"THRESHOLD FAILED: {problem}", file=sys.stderr)

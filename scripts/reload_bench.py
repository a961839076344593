#!/usr/bin/env python3
"""Reloads under load: pipes streaming through SIGHUPs, every byte of every receiver checked.

    scripts/reload_bench.py            # 100 pipes x 3 receivers, 3 MiB each over 12 s, 10 reloads
    scripts/reload_bench.py --quick    # 10 pipes, 3 reloads, 256 KiB bodies (the smoke run)

A benchmark, not a timed test: it starts relayd (`python -m relayd --host 127.0.0.1 --port 0
--workers 2`, its stderr to a log file), then from one asyncio process on raw sockets:

- opens the streaming pipes (n receivers each; senders alternate Content-Length and chunked
  bodies) and waits until every one has started, then feeds each sender's body at a paced
  rate over --seconds, so every pipe is still streaming when the last SIGHUP goes out;
- opens "late sender" pipes whose n receivers wait from the start and whose sender arrives
  only after the reloads began, and "late receivers" pipes whose sender and first receiver
  wait from the start and whose other receivers arrive after the reloads began (so waiting
  parties of a retiring generation are matched with parties at the new one);
- sends --reloads SIGHUPs to the supervisor: one a --every seconds, with a burst of --burst
  of them back to back in the middle;
- meanwhile --hammers threads open new connections one after another (`GET /version`, read to
  the close), so some always arrive while a generation hands its listeners over.

Then it checks: every receiver's body equals its sender's (count and sha256; a body that is
only a prefix is "short", anything else "wrong"), every sender's response says "Sent
successfully", the supervisor is alive, once the transfers end the workers settle back to
--workers (the supervisor's children by psutil and /health's "workers" agree), the log has no
"supervisor error", no new connection was reset or refused, and a fresh transfer works. It
prints a table of figures; reloads started / queued / joined are counted from relayd's log
lines ("SIGHUP: reloading workers", "reload queued", "joins it"). Exits 1 if any check fails
(a wrong or short body, the supervisor dead, ...). Run it with the interpreter relayd is
installed in (.venv/bin/python scripts/reload_bench.py): relayd runs from this checkout.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lib import procstats, servers  # noqa: E402
from bench_lib.hammer import ConnectionHammer  # noqa: E402
from bench_lib.http_body import ProtocolError, ResponseDecoder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
TICK_S = 0.1                  # a paced sender writes once a tick
CHECKPOINT_BYTES = 256 << 10  # a receiver keeps its prefix digest at every such boundary
READ_BYTES = 256 << 10
SAMPLE_S = 0.05               # psutil sampling of the supervisor's children
HEALTH_EVERY_S = 0.5
SETTLE_STABLE_S = 0.5         # settled means: unchanged this long


# -- payload -------------------------------------------------------------------------------
class Payload:
    """One seeded random buffer; pipe i's body is a slice of it at its own offset, so every
    body is distinct and any prefix of it can be re-hashed at the end."""

    def __init__(self, seed: int, body_bytes: int, pipes: int):
        self.size = max(16 << 20, 2 * body_bytes)
        self.data = random.Random(seed).randbytes(self.size)
        self.view = memoryview(self.data)
        self.body_bytes = body_bytes
        self.span = self.size - body_bytes
        self.stride = max(1, self.span // max(1, pipes))

    def offset(self, index: int) -> int:
        return (index * self.stride + index * 4099) % self.span

    def body(self, index: int, size: int) -> memoryview:
        start = self.offset(index)
        return self.view[start:start + size]


# -- the parties ---------------------------------------------------------------------------
@dataclasses.dataclass
class ReceiverResult:
    status: int | None = None
    received: int = 0
    complete: bool = False
    digest: str = ""
    checkpoints: list = dataclasses.field(default_factory=list)
    error: str = ""
    done_at: float = 0.0
    verdict: str = ""          # complete / short / wrong / refused
    detail: str = ""


@dataclasses.dataclass
class SenderResult:
    status: int | None = None
    text: str = ""
    started_at: float = 0.0
    done_at: float = 0.0
    sent: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return "Sent successfully" in self.text


@dataclasses.dataclass
class Pipe:
    index: int
    kind: str                  # streaming / late-sender / late-receivers
    path: str
    n: int
    size: int
    chunked: bool
    seconds: float             # how long its sender feeds the body
    sender_at: float = 0.0     # seconds after the first reload's zero (late kinds)
    receivers_at: float = 0.0
    sender: SenderResult = dataclasses.field(default_factory=SenderResult)
    receivers: list = dataclasses.field(default_factory=list)
    started: asyncio.Event | None = None


class CheckedBody:
    """Count and sha256 of a body, with the prefix digest at every CHECKPOINT_BYTES."""

    def __init__(self):
        self.received = 0
        self.digest = hashlib.sha256()
        self.checkpoints: list[bytes] = []

    def update(self, piece):
        while len(piece):
            room = CHECKPOINT_BYTES - self.received % CHECKPOINT_BYTES
            part = piece[:room]
            self.digest.update(part)
            self.received += len(part)
            if self.received % CHECKPOINT_BYTES == 0:
                self.checkpoints.append(self.digest.digest())
            piece = piece[room:]


async def read_response(reader, decoder: ResponseDecoder, after_read=None) -> None:
    """Feed the decoder until the response is complete or the peer closes; `after_read`
    after each piece."""
    while not decoder.complete:
        data = await reader.read(READ_BYTES)
        if not data:
            decoder.feed_eof()
            return
        decoder.feed(data)
        if after_read is not None:
            after_read()


async def receive(pipe: Pipe, port: int, deadline_s: float) -> ReceiverResult:
    result = ReceiverResult()
    body = CheckedBody()
    decoder = ResponseDecoder(body.update)
    writer = None
    try:
        async with asyncio.timeout(deadline_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"GET {pipe.path}?n={pipe.n} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"
                         .encode())
            await writer.drain()
            await read_response(reader, decoder)
    except TimeoutError:
        result.error = f"no end after {deadline_s:.0f} s"
    except (OSError, ProtocolError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    result.status = decoder.status
    result.complete = decoder.complete
    result.received = body.received
    result.digest = body.digest.hexdigest()
    result.checkpoints = body.checkpoints
    result.done_at = time.monotonic()
    return result


def pace(size: int, seconds: float, rng: random.Random) -> list[tuple[int, int]]:
    """Cut a body into one piece per tick, of random sizes (some ticks send nothing)."""
    ticks = max(1, round(seconds / TICK_S))
    cuts = sorted(rng.randrange(size + 1) for _ in range(ticks - 1))
    edges = [0, *cuts, size]
    return [(edges[k], edges[k + 1]) for k in range(ticks)]


def chunk_frames(piece: memoryview, rng: random.Random) -> list:
    """A piece as 1..3 chunks of random sizes (chunk boundaries fall anywhere)."""
    frames = []
    while len(piece):
        take = len(piece) if rng.random() < 0.5 else rng.randrange(1, len(piece) + 1)
        frames += [b"%x\r\n" % take, piece[:take], b"\r\n"]
        piece = piece[take:]
    return frames


async def send(pipe: Pipe, body: memoryview, port: int, deadline_s: float) -> SenderResult:
    result = pipe.sender
    rng = random.Random(pipe.index)
    text = bytearray()
    decoder = ResponseDecoder(text.extend)
    start = asyncio.Event()
    writer = None

    async def read_progress(reader):
        def started():
            if b"Start sending" in text:
                start.set()
        await read_response(reader, decoder, started)
        start.set()        # ended before starting: the pacer sees no "Start sending"

    try:
        async with asyncio.timeout(deadline_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            framing = ("Transfer-Encoding: chunked" if pipe.chunked
                       else f"Content-Length: {pipe.size}")
            writer.write(f"PUT {pipe.path}?n={pipe.n} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                         f"{framing}\r\n\r\n".encode())
            await writer.drain()
            responding = asyncio.create_task(read_progress(reader))
            await start.wait()
            if b"Start sending" not in text:
                await responding
                raise ConnectionError("the response ended before the transfer started")
            result.started_at = t0 = time.monotonic()
            pipe.started.set()
            for k, (a, b) in enumerate(pace(pipe.size, pipe.seconds, rng)):
                delay = t0 + k * TICK_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if b > a:
                    piece = body[a:b]
                    if pipe.chunked:
                        writer.writelines(chunk_frames(piece, rng))
                    else:
                        writer.write(piece)
                    await writer.drain()
                    result.sent = b
            if pipe.chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            await responding
    except TimeoutError:
        result.error = f"no end after {deadline_s:.0f} s"
    except (OSError, ProtocolError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
        pipe.started.set()
    result.status = decoder.status
    result.text = text.decode("utf-8", "replace")
    result.done_at = time.monotonic()
    return result


def judge(pipe: Pipe, body: memoryview, r: ReceiverResult) -> None:
    """complete: every byte, a well-formed end; short: a true prefix (visibly cut, or a
    receiver that gave up); wrong: any byte differs; refused: no 200."""
    want = hashlib.sha256(body).hexdigest()
    if r.status != 200:
        r.verdict, r.detail = "refused", f"status {r.status} {r.error}".strip()
    elif r.complete and r.received == pipe.size and r.digest == want:
        r.verdict = "complete"
    elif r.received < pipe.size and r.digest == hashlib.sha256(body[:r.received]).hexdigest():
        r.verdict = "short"
        r.detail = f"{r.received} of {pipe.size} bytes, a correct prefix {r.error}".strip()
    else:
        r.verdict = "wrong"
        first_bad = next((k for k, d in enumerate(r.checkpoints) if
                          d != hashlib.sha256(body[:(k + 1) * CHECKPOINT_BYTES]).digest()),
                         len(r.checkpoints))
        r.detail = (f"{r.received} of {pipe.size} bytes, complete={r.complete}; first "
                    f"differing {CHECKPOINT_BYTES >> 10} KiB block starts at byte "
                    f"{first_bad * CHECKPOINT_BYTES} {r.error}".strip())


# -- watching the relay --------------------------------------------------------------------
def health(port: int, timeout_s: float = 5.0) -> dict:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)   # no proxy, ever
    try:
        conn.request("GET", "/health", headers={"Connection": "close"})
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()


def relay_cpu_seconds(pid: int) -> float:
    """Supervisor + live workers + workers it has reaped (retired generations)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return float("nan")
    return procstats.cpu_seconds(pid) + t.children_user + t.children_system


def children(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children()}
    except psutil.NoSuchProcess:
        return set()


class Watcher(threading.Thread):
    """Samples the supervisor's children (psutil) and /health through the whole run."""

    def __init__(self, pid: int, port: int, workers: int):
        super().__init__(daemon=True)
        self.pid, self.port, self.workers = pid, port, workers
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.peak_children = 0
        self.peak_health_workers = 0
        self.kids: set[int] = set()
        self.all_kids: set[int] = set()
        self.settled_at = 0.0        # last time the children dropped back to --workers
        self.spawned: list[tuple[float, int]] = []    # (when, how many) new children appeared
        self.history: list[tuple[float, list[int]]] = []    # (when, children) at each change
        self.health_ok = 0
        self.health_failed: list[str] = []
        self.last_health: dict = {}

    def run(self) -> None:
        next_health = 0.0
        while not self.halt.is_set():
            kids = children(self.pid)
            now = time.monotonic()
            with self.lock:
                if len(self.kids) > self.workers and len(kids) <= self.workers:
                    self.settled_at = now
                if kids != self.kids:
                    self.history.append((now, sorted(kids)))
                new = kids - self.all_kids
                if new and self.all_kids:
                    self.spawned.append((now, len(new)))
                self.kids = kids
                self.all_kids |= kids
                self.peak_children = max(self.peak_children, len(kids))
            if now >= next_health:
                next_health = now + HEALTH_EVERY_S
                self.poll_health()
            self.halt.wait(SAMPLE_S)

    def poll_health(self) -> dict:
        try:
            h = health(self.port)
        except (OSError, ValueError, http.client.HTTPException) as e:
            with self.lock:
                self.health_failed.append(f"{type(e).__name__}: {e}")
            return {}
        with self.lock:
            self.health_ok += 1
            self.last_health = h
            self.peak_health_workers = max(self.peak_health_workers, len(h.get("workers", [])))
        return h


# -- the run -------------------------------------------------------------------------------
def reload_times(reloads: int, burst: int, every_s: float) -> list[float]:
    """Seconds after zero for each SIGHUP: spaced ones every_s apart, the burst (all at the
    same instant, sent back to back) in the middle of them."""
    burst = min(burst, reloads)
    spaced = reloads - burst
    before = spaced - spaced // 2
    times, t = [], every_s
    for _ in range(before):
        times.append(t)
        t += every_s
    times += [t] * burst
    if burst:
        t += every_s
    for _ in range(spaced // 2):
        times.append(t)
        t += every_s
    return times


def spread(count: int, first: float, last: float) -> list[float]:
    if count <= 1:
        return [first] * count
    return [first + (last - first) * k / (count - 1) for k in range(count)]


def make_pipes(args, run_id: str, first_reload: float, last_reload: float) -> list[Pipe]:
    pipes = []
    size = int(args.body_kib * 1024)

    def add(kind, at_sender=0.0, at_receivers=0.0):
        index = len(pipes)
        seconds = max(args.min_seconds, args.seconds - max(at_sender, at_receivers))
        pipes.append(Pipe(index=index, kind=kind, path=f"/reload-bench/{run_id}/{kind}/{index}",
                          n=args.n, size=size, chunked=index % 2 == 1, seconds=seconds,
                          sender_at=at_sender, receivers_at=at_receivers))

    for _ in range(args.pipes):
        add("streaming")
    # Late parties arrive just after reloads, from the first to the last.
    for t in spread(args.late_senders, first_reload + 0.3, last_reload + 0.3):
        add("late-sender", at_sender=t)
    for t in spread(args.late_receivers, first_reload + 0.45, last_reload + 0.45):
        add("late-receivers", at_receivers=t)
    return pipes


async def run_clients(args, pipes, payload, relay, watcher, figures) -> None:
    port = relay.port
    deadline = args.seconds + 120
    tasks_r: list[tuple[Pipe, asyncio.Task]] = []
    tasks_s: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()
    for pipe in pipes:
        pipe.started = asyncio.Event()

    def start_receivers(pipe, count):
        for _ in range(count):
            tasks_r.append((pipe, loop.create_task(receive(pipe, port, deadline))))

    def start_sender(pipe):
        tasks_s.append(loop.create_task(
            send(pipe, payload.body(pipe.index, pipe.size), port, deadline)))

    # Phase 1: every party that comes before the reloads.
    for pipe in pipes:
        if pipe.kind == "streaming":
            if pipe.index % 3 == 0:
                start_sender(pipe)
                start_receivers(pipe, pipe.n)
            else:
                start_receivers(pipe, pipe.n)
                start_sender(pipe)
        elif pipe.kind == "late-sender":
            start_receivers(pipe, pipe.n)
        else:
            start_sender(pipe)
            start_receivers(pipe, 1)
        await asyncio.sleep(0.005)
    streaming = [p for p in pipes if p.kind == "streaming"]
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(p.started.wait() for p in streaming))
    except TimeoutError:
        figures["failures"].append("not every streaming pipe started within 30 s")
    waiting_expected = len(pipes) - len(streaming)
    h = {}
    for _ in range(100):          # the late pipes' early parties are registered (gen 0)
        h = await asyncio.to_thread(watcher.poll_health)
        if h.get("pipes_waiting", -1) >= waiting_expected:
            break
        await asyncio.sleep(0.1)
    figures["waiting_before_reloads"] = h.get("pipes_waiting")
    figures["streaming_before_reloads"] = h.get("pipes_streaming")

    zero = time.monotonic()
    figures["zero"] = zero

    async def reloads():
        sent = []
        for t in figures["reload_times"]:
            delay = zero + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            os.kill(relay.process.pid, signal.SIGHUP)
            sent.append(time.monotonic())
        figures["hups_sent_at"] = sent

    async def late(pipe):
        at = pipe.sender_at or pipe.receivers_at
        await asyncio.sleep(max(0.0, zero + at - time.monotonic()))
        if pipe.kind == "late-sender":
            start_sender(pipe)
        else:
            start_receivers(pipe, pipe.n - 1)

    await asyncio.gather(reloads(), *(late(p) for p in pipes if p.kind != "streaming"))
    await asyncio.gather(*tasks_s)
    results = await asyncio.gather(*(t for _, t in tasks_r))
    for (pipe, _), r in zip(tasks_r, results):
        pipe.receivers.append(r)


def spans_generations(line: str, workers: int) -> bool:
    """A transfer line whose sender and receivers sat on both halves of the worker indexes
    (0..W-1 and W..2W-1): parties of two generations, matched across a reload."""
    sender = re.search(r" sender=w(\d+)", line)
    spread_ = re.search(r" workers=(\S*)", line)
    if not sender or not spread_:
        return False
    indexes = {int(sender.group(1))} | {int(w.split(":")[0][1:])
                                         for w in spread_.group(1).split(",") if w}
    return any(i < workers for i in indexes) and any(i >= workers for i in indexes)


def parse_log(path: str, workers: int) -> dict:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    transfers = [x for x in lines if x.startswith("relayd: transfer ")]
    return {
        "started": sum("SIGHUP: reloading workers" in x for x in lines),
        "queued": sum("reload queued" in x for x in lines),
        "joined": sum("joins it" in x for x in lines),
        "ignored": sum("SIGHUP ignored" in x for x in lines),
        "retired": sum(x.endswith(" retired") for x in lines),
        "crashed": [x for x in lines if "respawning" in x or "missed its heartbeat" in x],
        "errors": [x for x in lines if "supervisor error" in x or "error handling" in x
                   or "Traceback" in x],
        "transfers_ok": sum(x.endswith("outcome=ok") for x in transfers),
        "transfers_other": [x for x in transfers if not x.endswith("outcome=ok")],
        "cross_generation": sum(spans_generations(x, workers) for x in transfers),
    }


def reload_pending(log_path: str) -> bool:
    """A SIGHUP is queued: its "reload queued" / "joins it" line came after the last
    "SIGHUP: reloading workers" line. Between reaping the last worker of a retiring generation
    and starting the queued reload, the supervisor has exactly --workers children: without
    this, that instant looks settled."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = [x for x in f.read().splitlines() if "SIGHUP" in x]
    started = max((k for k, x in enumerate(lines) if "SIGHUP: reloading workers" in x),
                  default=-1)
    return any("reload queued" in x or "joins it" in x for x in lines[started + 1:])


def wait_settled(relay, watcher, workers: int, timeout_s: float) -> tuple[bool, dict, set]:
    """Settled: no reload queued, exactly --workers children, /health lists the same pids,
    no pipe left, and all of it unchanged for SETTLE_STABLE_S."""
    deadline = time.monotonic() + timeout_s
    h, kids, since, last = {}, set(), 0.0, None
    while time.monotonic() < deadline:
        kids = children(relay.process.pid)
        h = watcher.poll_health()
        pids = {w.get("pid") for w in h.get("workers", [])}
        now = time.monotonic()
        if (len(kids) == workers and h.get("workers_alive") == workers and pids == kids
                and not h.get("pipes_waiting") and not h.get("pipes_streaming")
                and not reload_pending(relay.log_path)):
            if kids != last:
                since, last = now, kids
            elif now - since >= SETTLE_STABLE_S:
                return True, h, kids
        else:
            last = None
        time.sleep(0.1)
    return False, h, kids


def fresh_transfer(port: int, payload: Payload) -> str:
    """One more pipe after everything settled: n = 3, 1 MiB, a chunked sender."""
    pipe = Pipe(index=10**6, kind="fresh", path=f"/reload-bench/fresh-{os.getpid()}", n=3,
                size=1 << 20, chunked=True, seconds=0.3)
    body = payload.body(7, pipe.size)

    async def go():
        pipe.started = asyncio.Event()
        rs = [asyncio.create_task(receive(pipe, port, 30)) for _ in range(pipe.n)]
        await send(pipe, body, port, 30)
        return await asyncio.gather(*rs)

    results = asyncio.run(go())
    for r in results:
        judge(pipe, body, r)
    verdicts = [r.verdict for r in results]
    if verdicts == ["complete"] * pipe.n and pipe.sender.ok:
        return "ok"
    return f"FAILED: receivers {verdicts}, sender {pipe.sender.text.strip()!r} {pipe.sender.error}"


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB" if n >= 1 << 20 else f"{n / 1024:,.0f} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10 pipes, 2+2 late, 3 reloads (burst 2), 256 KiB over 3 s")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pipes", type=int, default=100, help="streaming pipes (default 100)")
    ap.add_argument("--late-senders", type=int, default=10,
                    help="pipes whose receivers wait and whose sender comes after reloads")
    ap.add_argument("--late-receivers", type=int, default=10,
                    help="pipes whose sender waits and whose receivers come after reloads")
    ap.add_argument("--n", type=int, default=3, help="receivers per pipe (default 3)")
    ap.add_argument("--body-kib", type=float, default=3072, help="body per pipe (default 3 MiB)")
    ap.add_argument("--seconds", type=float, default=12.0,
                    help="each streaming sender feeds its body over this long (default 12)")
    ap.add_argument("--min-seconds", type=float, default=2.0,
                    help="a late pipe's body is fed over at least this long")
    ap.add_argument("--reloads", type=int, default=10, help="SIGHUPs sent (default 10)")
    ap.add_argument("--burst", type=int, default=4,
                    help="of them, sent back to back in the middle (default 4)")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between spaced SIGHUPs")
    ap.add_argument("--settle-timeout", type=float, default=60.0)
    ap.add_argument("--hammers", type=int, default=2,
                    help="threads opening new connections (GET /version) through the whole "
                         "run; none may be reset or refused (default 2)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the work dir and relayd's log")
    ap.add_argument("--verbose", action="store_true",
                    help="also print the supervisor's children at every change")
    args = ap.parse_args()
    if args.quick:
        args.pipes, args.late_senders, args.late_receivers = 10, 2, 2
        args.reloads, args.burst, args.every = 3, 2, 0.5
        args.body_kib, args.seconds, args.min_seconds = 256, 3.0, 1.0
    times = reload_times(args.reloads, args.burst, args.every)
    if times and args.seconds <= times[-1] + 1:
        ap.error(f"--seconds {args.seconds} must outlast the last SIGHUP (at {times[-1]} s) "
                 "by more than a second: every pipe streams through every reload")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    run_id = f"{os.getpid()}-{random.randrange(1 << 32):08x}"
    first, last = (times[0], times[-1]) if times else (0.0, 0.0)
    pipes = make_pipes(args, run_id, first, last)
    payload = Payload(args.seed, int(args.body_kib * 1024), len(pipes))
    figures: dict = {"failures": [], "reload_times": times}
    work = tempfile.mkdtemp(prefix="reload-bench-")
    load_before = os.getloadavg()
    relay = servers.RelaydServer(work, REPO, args.workers)
    print(f"starting: {relay.describe()}", flush=True)
    relay.start()
    relay_pid = relay.process.pid
    watcher = Watcher(relay_pid, relay.port, args.workers)
    watcher.start()
    hammers = [ConnectionHammer(relay.port) for _ in range(args.hammers)]
    for hammer in hammers:
        hammer.start()
    try:
        cpu0 = relay_cpu_seconds(relay.process.pid)
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        wall0 = time.monotonic()
        print(f"{len(pipes)} pipes x {args.n} receivers, {mib(payload.body_bytes)} each; "
              f"{args.reloads} SIGHUPs at {', '.join(f'{t:g}' for t in times)} s", flush=True)
        asyncio.run(run_clients(args, pipes, payload, relay, watcher, figures))
        for hammer in hammers:
            hammer.stop.set()
            hammer.join(30)
        ended_at = max([r.done_at for p in pipes for r in p.receivers] +
                       [p.sender.done_at for p in pipes], default=time.monotonic())
        settled, h, kids = wait_settled(relay, watcher, args.workers, args.settle_timeout)
        settled_at = time.monotonic()
        with watcher.lock:
            if watcher.settled_at:
                settled_at = watcher.settled_at
        cpu = relay_cpu_seconds(relay.process.pid) - cpu0
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - wall0
        alive = relay.process.poll() is None
        fresh = fresh_transfer(relay.port, payload) if alive else "not tried: supervisor gone"
        alive = alive and relay.process.poll() is None
        load_after = os.getloadavg()
    finally:
        for hammer in hammers:
            hammer.stop.set()
        watcher.halt.set()
        watcher.join(5)
        relay.stop()
    log = parse_log(relay.log_path, args.workers)

    # -- verdicts ----------------------------------------------------------------------
    for pipe in pipes:
        body = payload.body(pipe.index, pipe.size)
        for r in pipe.receivers:
            judge(pipe, body, r)
    receivers = [(p, r) for p in pipes for r in p.receivers]
    count = {v: sum(r.verdict == v for _, r in receivers)
             for v in ("complete", "short", "wrong", "refused")}
    senders_ok = sum(p.sender.ok for p in pipes)
    failures = figures["failures"]
    for v in ("wrong", "short", "refused"):
        for p, r in receivers:
            if r.verdict == v:
                framing = "chunked" if p.chunked else "Content-Length"
                failures.append(f"receiver {v}: {p.kind} pipe {p.path} ({framing}): {r.detail}")
    for p in pipes:
        if not p.sender.ok:
            failures.append(f"sender of {p.kind} pipe {p.path}: status {p.sender.status}, "
                            f"{p.sender.error or 'no Sent successfully'}; response "
                            f"{p.sender.text.strip()[-300:]!r}")
    if not alive:
        failures.append(f"the supervisor died (exit {relay.process and relay.process.returncode})")
    if not settled:
        failures.append(f"workers did not settle to {args.workers} within "
                        f"{args.settle_timeout:.0f} s: children {sorted(kids)}, /health "
                        f"workers {[w.get('pid') for w in h.get('workers', [])]}, "
                        f"pipes waiting/streaming {h.get('pipes_waiting')}/"
                        f"{h.get('pipes_streaming')}")
    failures += [f"log: {x[:500]}" for x in log["errors"] + log["crashed"]]
    if settled and log["retired"] != log["started"] * args.workers:
        failures.append(f"{log['started']} reloads started but {log['retired']} worker "
                        f"retirements logged (expected {log['started'] * args.workers})")
    if fresh != "ok":
        failures.append(f"fresh transfer after the reloads: {fresh}")
    asked = sum(hammer.total for hammer in hammers)
    failed: dict[str, int] = {}
    for hammer in hammers:
        for kind, times_seen in hammer.failures.items():
            failed[kind] = failed.get(kind, 0) + times_seen
    if failed:
        failures.append(f"new connections during the run: {sum(failed.values())} of {asked} "
                        f"failed {failed}")
    hups_logged = log["started"] + log["joined"] + log["ignored"]

    # -- the table ---------------------------------------------------------------------
    kinds = {k: sum(p.kind == k for p in pipes)
             for k in ("streaming", "late-sender", "late-receivers")}
    sent_bytes = sum(p.sender.sent for p in pipes)
    received_bytes = sum(r.received for _, r in receivers)
    hups = figures.get("hups_sent_at", [])
    burst_ms = None
    burst_at = [t for t in times if times.count(t) > 1]
    if burst_at:
        sent_burst = [s for s, t in zip(hups, times) if t == burst_at[0]]
        burst_ms = (max(sent_burst) - min(sent_burst)) * 1e3
    cl = sum(not p.chunked for p in pipes)
    rows = [
        ("pipes: streaming / late sender / late receivers",
         f"{kinds['streaming']} / {kinds['late-sender']} / {kinds['late-receivers']} "
         f"(n = {args.n}; {cl} Content-Length, {len(pipes) - cl} chunked senders)"),
        ("receivers", f"{len(receivers)}"),
        ("body per pipe, fed over", f"{mib(payload.body_bytes)}, {args.seconds:g} s "
                                    f"(late pipes: at least {args.min_seconds:g} s)"),
        ("bytes sent by senders / received by receivers",
         f"{mib(sent_bytes)} / {mib(received_bytes)}"),
        ("pipes waiting / streaming at the first SIGHUP",
         f"{figures.get('waiting_before_reloads')} / {figures.get('streaming_before_reloads')}"),
        ("SIGHUPs sent", f"{len(hups)} (at {', '.join(f'{t:g}' for t in times)} s"
                         + (f"; the burst of {args.burst} within {burst_ms:.2f} ms" if burst_ms
                            is not None else "") + ")"),
        ("SIGHUPs logged by the supervisor", f"{hups_logged}"),
        ("reloads started / queued / joined a queued one",
         f"{log['started']} / {log['queued']} / {log['joined']}"),
        ("worker retirements logged", f"{log['retired']}"),
        ("peak worker processes alive (psutil / /health)",
         f"{watcher.peak_children} / {watcher.peak_health_workers}"),
        ("worker processes seen in all", f"{len(watcher.all_kids)}"),
        ("new workers appeared at (s after zero)",
         ", ".join(f"{t - figures['zero']:.1f} (+{k})" for t, k in watcher.spawned) or "-"),
        ("the last transfer ended at (s after zero)", f"{ended_at - figures['zero']:.1f}"),
        ("last retiring generation exited",
         f"{settled_at - ended_at:+.2f} s after the last transfer ended, "
         f"{settled_at - (hups[-1] if hups else figures['zero']):.1f} s after the last SIGHUP"),
        ("settled back to --workers", f"{'yes' if settled else 'NO'} ({len(kids)} children, "
                                      f"/health workers_alive {h.get('workers_alive')})"),
        ("receivers complete / short / wrong / refused",
         f"{count['complete']} / {count['short']} / {count['wrong']} / {count['refused']}"),
        ("senders 'Sent successfully'", f"{senders_ok} / {len(pipes)}"),
        ("transfer log lines outcome=ok / other",
         f"{log['transfers_ok']} / {len(log['transfers_other'])}"),
        ("transfers with parties in two generations (log)", f"{log['cross_generation']}"),
        (f"new connections during the run ({args.hammers} threads): answered / failed",
         f"{asked - sum(failed.values())} / {sum(failed.values())}"
         + (f" {failed}" if failed else "")),
        ("/health polls during the run: answered / failed",
         f"{watcher.health_ok} / {len(watcher.health_failed)}"),
        ("supervisor alive; 'supervisor error' lines",
         f"{'yes' if alive else 'NO'}; {len(log['errors'])}"),
        ("fresh transfer after settling", fresh),
        ("relay CPU seconds (supervisor + all workers)", f"{cpu:.2f}"),
        ("bench client CPU seconds",
         f"{(usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime):.2f}"),
        ("wall seconds (clients start to settled)", f"{wall:.1f}"),
        ("load average before / after (1 min; 2 shared cores)",
         f"{load_before[0]:.2f} / {load_after[0]:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.verbose:
        print(f"\nchildren of the supervisor (pid {relay_pid}) at every change:")
        for t, kids_then in watcher.history:
            print(f"  {t - figures['zero']:7.2f} s  {kids_then}")
        print(f"settled: children {sorted(kids)}, /health workers "
              f"{[(w.get('index'), w.get('pid')) for w in h.get('workers', [])]}")
    for x in log["transfers_other"][:10]:
        print(f"log: {x}")
    for x in watcher.health_failed[:5]:
        print(f"/health failed: {x}")
    if failures:
        print(f"\nFAILED ({len(failures)}):")
        for f in failures[:40]:
            print(f"  {f}")
        print(f"relayd's log kept: {relay.log_path}")
        return 1
    if args.keep:
        print(f"\nrelayd's log kept: {relay.log_path}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print("\nOK: every byte of every receiver is its sender's")
    return 0


if __name__ == "__main__":
    sys.exit(main())

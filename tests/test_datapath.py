"""The data path in one process: a sender's bytes through a real ring (and spill file) to real
receiver sockets, checked byte for byte.

The harness (tests/datapath_bench.py): a real memfd arena of 512 KiB per ring (the smallest
window: two 256 KiB punch blocks), a real uvloop loop that the test drives, one real eventfd
per worker index (3 of them, all served by that loop), the real rendezvous registry in the
supervisor's place, and relayd's own Connection, SenderStream and ReceiverGroup wired as
worker.py wires them. Clients are the other ends of socketpairs: the test writes the sender's
request (Content-Length or chunked, in paced pieces when the ring positions matter) and reads
each receiver's raw response, de-chunks it itself and compares it with what was sent.
Faults are injected at the fd (relayd.fileio.Syscalls), never by mocking the ring or spill.

Nothing here asserts speed; every wait gives up after 30 s with the state of every part, so
a broken data path (a lost wake-up included: the worker's once-a-second safety pass is not
part of the bench) fails instead of hanging.
"""
from __future__ import annotations

import random

import pytest

from datapath_bench import (CAPACITY, KIB, MIB, Bench, chunk, chunked_wire, cut, fionread,
                            payload, sha, stepped)
from relayd import control, ring
from relayd.control import Outcome
from relayd.producer import SenderState

STEP = 128 * KIB                  # paced pieces: at most this much per read


@pytest.fixture
def make_bench(tmp_path, monkeypatch):
    made = []

    def make(**options) -> Bench:
        bench = Bench(tmp_path, monkeypatch, **options)
        made.append(bench)
        return bench
    yield make
    for bench in made:
        bench.close()


def assert_every_receiver_got(bench: Bench, body: bytes, peers=None) -> None:
    """Each receiver's client saw a 200 and exactly `body`, ended as a complete response."""
    for peer in peers if peers is not None else bench.peers:
        r = peer.response()
        assert r.status == 200, (peer.conn_id, bytes(peer.data[:200]))
        if r.body != body:
            at = next((i for i, (a, b) in enumerate(zip(r.body, body)) if a != b),
                      min(len(r.body), len(body)))
            pytest.fail(f"receiver {peer.conn_id} (worker {peer.worker}): {len(r.body)} "
                        f"bytes, sha {sha(r.body)}; sent {len(body)}, sha {sha(body)}; "
                        f"first difference at {at}")
        assert r.complete, f"receiver {peer.conn_id}: the response does not end complete"
        assert peer.ended() == control.ReceiverEnded(0, peer.ended().gen, peer.conn_id, True)
    assert not bench.relay_failures(), bench.relay_failures()


def assert_transfer_ok(bench: Bench, n: int) -> None:
    assert bench.registry.outcomes == {Outcome.OK: 1}
    assert bench.registry.slots.in_use == 0, "a worker index still holds the slot"
    assert f"Sent successfully to {n} receiver(s)" in bench.sender_peer.progress()


# -- 1. wrap-around at every offset class ----------------------------------------------------
def lap_targets(delta: int, laps: int = 2, cap: int = CAPACITY) -> list[int]:
    """Ring positions a read must end on: each lap's end + delta; then a piece straddling the
    ring's end by 50 KB each side (its data wraps); the body ends at a lap's end + delta."""
    return ([k * cap + delta for k in range(1, laps + 1)]
            + [(laps + 1) * cap - 50_000, (laps + 1) * cap + 50_000, (laps + 2) * cap + delta])


FRAMINGS = {
    "content-length": "Content-Length; 1000 body bytes arrive with the head",
    "chunked-passthrough": "chunked, none with the head: the sender's framing goes to the ring",
    "chunked-parsed": "chunked, 1000 bytes with the head: httptools parses, relayd frames",
}


@pytest.mark.parametrize("delta", [-1, 0, 1], ids=["end-1", "end", "end+1"])
@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("transmit", ["copy", "sendfile"])
def test_reads_ending_at_the_ring_end_or_a_byte_either_side_deliver_every_byte_over_laps(
        make_bench, transmit, framing, delta):
    """Paced pieces make the producer's reads end exactly at `lap_targets` (checked through the
    ring's tail after each); three receivers on three worker indexes -- one of them HTTP/1.0,
    which gets a chunked body de-chunked -- receive the body exactly."""
    bench = make_bench(transmit=transmit)
    targets = lap_targets(delta)
    total = targets[-1]
    rng = random.Random(delta + 7).randbytes
    if framing == "content-length":
        body = rng(total)
        sender = bench.sender(3, length=total, with_head=body[:1000])
        pieces = cut(body, stepped(targets, 1000, STEP), start=1000)
    elif framing == "chunked-passthrough":
        wire, body = chunked_wire(rng, total)
        sender = bench.sender(3)
        pieces = cut(wire, stepped(targets, 0, STEP))
    else:
        first = rng(1000)                   # one frame of 1012 ring bytes, framed by relayd
        ends = stepped(targets[:-1] + [total - 5], 1012, STEP)
        frames = [e - s - 12 for s, e in zip([1012] + ends, ends)]
        datas = [rng(size) for size in frames]
        body = first + b"".join(datas)
        sender = bench.sender(3, with_head=chunk(first))
        pieces = [chunk(d) for d in datas] + [b"0\r\n\r\n"]
    peers = [bench.receiver(3, worker=0, version="1.0"), bench.receiver(3, worker=1),
             bench.receiver(3, worker=2)]
    sender.feed(pieces, pace=True)
    bench.run_until(bench.finished, "end of the transfer")

    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, 3)
    missed = [t for t in targets if t not in sender.tails]
    assert not missed, f"no read ended at {missed}; tails {sender.tails}"
    raw = peers[1].response().raw           # an HTTP/1.1 receiver: the ring's bytes as they were
    assert raw == peers[2].response().raw
    if framing == "chunked-passthrough":
        assert raw == wire, "a chunked body that passes through must reach receivers untouched"
    elif framing == "chunked-parsed":
        frame_ends = {end for _, end in peers[1].response().frames}
        assert set(targets[:-1]) <= frame_ends
        # ... and one frame straddles the ring's end: its pwritev fell back to a joined write
        assert (targets[-3], targets[-2]) in peers[1].response().frames
        assert peers[1].response().frames[0] == (0, 1012)


# -- 2. the sendfile punch rule ---------------------------------------------------------------
def stall_while_the_producer_laps(bench: Bench, body: bytes):
    """A lone receiver whose client reads nothing, with a send buffer big enough to hold more
    than a punch block in flight: run until the producer waits on it."""
    sender = bench.sender(1, length=len(body))
    peer = bench.receiver(1, worker=1, sndbuf=384 * KIB)
    peer.stall()
    sender.feed([body])
    bench.run_until(lambda: sender.stream is not None and peer.receiver is not None
                    and sender.stream.state is SenderState.PAUSED and peer.receiver.blocked,
                    "producer waiting on the stalled receiver")
    return sender, peer


@pytest.mark.parametrize("transmit", ["copy", "sendfile"])
def test_a_stalled_receiver_holds_the_producer_which_waits_instead_of_overwriting_its_bytes(
        make_bench, transmit):
    """The producer laps the ring over positions the stalled receiver has sent but its client
    has not read (in sendfile mode those pages are still in the socket: the punch rule must
    give the ring fresh pages), then waits, PAUSED, with the rest of the body unread in its
    socket. The receiver, resumed, gets exactly the body."""
    bench = make_bench(transmit=transmit)
    body = payload(3 * MIB)
    sender, peer = stall_while_the_producer_laps(bench, body)
    stream, cursor = sender.stream, peer.receiver.cursor
    tail = stream.ring.tail
    assert len(peer.data) == 0, "the client was to read nothing yet"
    assert tail - CAPACITY >= bench.block, "the producer was to write a block a second time"
    assert cursor >= tail - CAPACITY, "... over positions still in the receiver's socket"
    assert tail <= cursor + CAPACITY
    bench.run_for(0.2)
    assert stream.state is SenderState.PAUSED and stream.ring.tail == tail
    assert fionread(sender.relay_fd) > 0, "the rest of the body waits in the sender's socket"

    peer.resume()
    bench.run_until(bench.finished, "end of the transfer")
    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, 1)


def test_without_the_punch_the_same_stall_would_deliver_overwritten_bytes(make_bench):
    """The control for the test above: with MADV_REMOVE made a no-op, the sendfile'd pages the
    producer rewrites are the ones the stalled client later reads -- so the stall above does
    put the hazard in front of the punch rule."""
    bench = make_bench(transmit="sendfile")
    bench.arena.punch = lambda slot, offset, length: None
    body = payload(3 * MIB)
    stall_while_the_producer_laps(bench, body)
    bench.peers[0].resume()
    bench.run_until(bench.all_ended, "end of the transfer")
    got = bench.peers[0].response().body
    assert len(got) == len(body)
    assert got[:4096] != body[:4096]
    assert got[:4096] in (body[CAPACITY:CAPACITY + 4096], body[2 * CAPACITY:2 * CAPACITY + 4096])


# -- 3. to the spill file and back ------------------------------------------------------------
def spill_flag(bench: Bench) -> int:
    return bench.arena.load(ring.SlotFields(bench.arena, 0).spill_active)


@pytest.mark.parametrize("workers", [(1, 2), (1, 1)], ids=["apart", "same-worker"])
@pytest.mark.parametrize("transmit", ["copy", "sendfile"])
def test_a_receiver_stalled_past_half_the_window_moves_to_the_spill_file_and_gets_every_byte(
        make_bench, transmit, workers):
    """n = 2: the fast receiver finishes the whole body while the other still reads nothing
    (it was moved onto the spill file, so it no longer holds the producer); resumed, the slow
    one gets every byte."""
    bench = make_bench(transmit=transmit)
    body = payload(4 * MIB)
    sender = bench.sender(2, length=len(body))
    fast = bench.receiver(2, worker=workers[0])
    slow = bench.receiver(2, worker=workers[1])
    slow.stall()
    sender.feed([body])
    bench.run_until(lambda: fast.eof, "the fast receiver's end")
    assert fast.ended().ok and slow.ended() is None
    assert slow.receiver.in_file and spill_flag(bench) == 1
    assert len(slow.data) < len(body) // 4

    slow.resume()
    bench.run_until(bench.finished, "end of the transfer")
    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, 2)
    ends = [m.conn for m in bench.messages(control.ReceiverEnded)]
    assert ends == [fast.conn_id, slow.conn_id]


@pytest.mark.parametrize("framing", ["chunked-passthrough", "chunked-parsed"])
def test_an_http10_receiver_of_a_chunked_body_that_spills_gets_the_plain_body(
        make_bench, framing):
    """The ring and the file hold chunk framing (the sender's own, or relayd's fixed-width
    frames); the HTTP/1.0 receiver, served from the file, gets it stripped, and the end of
    its body is a clean close."""
    bench = make_bench(transmit="copy")
    rng = random.Random(3).randbytes
    if framing == "chunked-passthrough":
        wire, body = chunked_wire(rng, 3 * MIB)
        sender = bench.sender(2)
    else:
        first, datas = rng(1000), [rng(random.Random(i).randint(1, 70_000)) for i in range(90)]
        body = first + b"".join(datas)
        wire = b"".join(map(chunk, datas)) + b"0\r\n\r\n"
        sender = bench.sender(2, with_head=chunk(first))
    fast = bench.receiver(2, worker=1)
    slow = bench.receiver(2, worker=2, version="1.0")
    slow.stall()
    sender.feed([wire])
    bench.run_until(lambda: fast.eof, "the fast receiver's end")
    assert slow.receiver.in_file and slow.receiver.deframe

    slow.resume()
    bench.run_until(bench.finished, "end of the transfer")
    assert_every_receiver_got(bench, body)
    head = slow.response()
    assert head.version == "HTTP/1.0" and b"transfer-encoding" not in head.headers
    assert not slow.reset

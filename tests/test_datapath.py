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

from datapath_bench import (CAPACITY, KIB, MIB, Bench, chunk, chunked_wire, cut, payload,
                            sha, stepped)
from relayd import control, ring
from relayd.control import Outcome

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

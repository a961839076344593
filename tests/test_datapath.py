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

import os
import random
import subprocess

import pytest

from datapath_bench import (CAPACITY, KIB, MIB, Bench, FullDisk, ShortWrites, chunk,
                            chunked_wire, cut, fionread, payload, sha, stepped)
from relayd import control, ring
from relayd.control import Outcome
from relayd.fileio import Syscalls
from relayd.producer import SenderState

STEP = 128 * KIB                  # paced pieces: at most this much per read
SEEDS = int(os.environ.get("RELAYD_DATAPATH_SEEDS", "24"))    # random schedules to run


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


# -- 3. to the spill file and back ------------------------------------------------------------
def fast_and_stalled(bench: Bench, sender, wire: bytes, workers=(1, 2), slow_version="1.1"):
    """Two receivers, the second of which reads nothing yet; then the sender writes `wire`."""
    fast = bench.receiver(2, worker=workers[0])
    slow = bench.receiver(2, worker=workers[1], version=slow_version)
    slow.stall()
    sender.feed([wire])
    return fast, slow


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
    fast, slow = fast_and_stalled(bench, sender, body, workers)
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
    fast, slow = fast_and_stalled(bench, sender, wire, slow_version="1.0")
    bench.run_until(lambda: fast.eof, "the fast receiver's end")
    assert slow.receiver.in_file and slow.receiver.deframe

    slow.resume()
    bench.run_until(bench.finished, "end of the transfer")
    assert_every_receiver_got(bench, body)
    head = slow.response()
    assert head.version == "HTTP/1.0" and b"transfer-encoding" not in head.headers
    assert not slow.reset


# -- 5. slow and vanished receivers -----------------------------------------------------------
@pytest.mark.parametrize("transmit", ["copy", "sendfile"])
def test_a_slow_lone_receiver_holds_the_producer_and_still_gets_every_byte(make_bench, transmit):
    """n = 1 never spills: a client reading 32 KiB every 2 ms paces the whole transfer."""
    bench = make_bench(transmit=transmit)
    body = payload(2 * MIB)
    sender = bench.sender(1, length=len(body))
    peer = bench.receiver(1, worker=1)
    peer.sip = (32 * KIB, 0.002)
    sender.feed([body])
    bench.run_until(bench.finished, "end of the transfer")
    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, 1)


def leave(peer, how: str, after: int) -> None:
    """Make the client leave once it has read `after` bytes: close its socket, half-close it
    (shutdown SHUT_WR, reading on), or reset it (stop reading, then close with bytes unread)."""
    if how == "closes":
        peer.at.append((after, peer.vanish))
    elif how == "half-closes":
        peer.at.append((after, peer.half_close))
    else:
        def reset():
            peer.stall()
            peer.bench.loop.call_later(0.05, peer.vanish)
        peer.at.append((after, reset))


@pytest.mark.parametrize("how", ["closes", "half-closes", "resets"])
@pytest.mark.parametrize("transmit", ["copy", "sendfile"])
def test_a_receiver_that_leaves_mid_body_is_reported_lost_and_the_others_complete(
        make_bench, transmit, how):
    """Three receivers, one of which leaves after 300 KB: it is ReceiverEnded(ok=False) (what
    it got is visibly short), the other two get the whole body, and the sender is told
    2 succeeded and 1 left."""
    bench = make_bench(transmit=transmit)
    body = payload(2 * MIB)
    sender = bench.sender(3, length=len(body))
    peers = [bench.receiver(3, worker=w) for w in (0, 1, 2)]
    leaver = peers[1]
    leave(leaver, how, 300_000)
    sender.feed([body])
    bench.run_until(bench.finished, "end of the transfer")

    assert leaver.ended().ok is False
    r = leaver.response()
    assert r.body == body[:len(r.body)], "what it read before leaving is the body's start"
    if how == "half-closes":                # it read on until the relay closed it: short
        assert not r.complete and len(r.body) < len(body)
    assert_every_receiver_got(bench, body, [peers[0], peers[2]])
    assert bench.registry.outcomes == {Outcome.OK_SOME_RECEIVERS_LEFT: 1}
    progress = sender.progress()
    assert "Sent successfully to 2 receiver(s)" in progress
    assert "1 receiver(s) left before the end" in progress
    assert bench.registry.slots.in_use == 0


@pytest.mark.parametrize("transmit", ["copy", "sendfile"])
def test_when_every_receiver_vanishes_the_groups_release_and_the_sender_is_told(
        make_bench, transmit):
    """Both receivers (on two worker indexes) close mid-body: each group releases the slot,
    the registry aborts the sender ("all receivers left"), the producer closes and releases
    too, and the slot is free again."""
    bench = make_bench(transmit=transmit)
    body = payload(4 * MIB)
    sender = bench.sender(2, length=len(body))
    peers = [bench.receiver(2, worker=1), bench.receiver(2, worker=2)]
    for peer, after in zip(peers, (200_000, 700_000)):
        leave(peer, "closes", after)
    sender.feed([body])
    bench.run_until(lambda: bench.finished() and sender.stream.state is SenderState.CLOSED,
                    "the slot's release")
    assert [m.ok for m in bench.messages(control.ReceiverEnded)] == [False, False]
    for peer in peers:
        assert peer.response().body == body[:len(peer.response().body)]
    released = {(w, m.role) for w, m in bench.reports if isinstance(m, control.Released)}
    assert released == {(1, "receivers"), (2, "receivers"), (0, "sender")}
    assert bench.registry.outcomes == {Outcome.RECEIVERS_LEFT: 1}
    assert "all receivers left" in sender.progress()
    assert not bench.messages(control.BodyEnded)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_sender_that_vanishes_mid_body_leaves_every_receiver_a_visibly_short_body(
        make_bench, chunked):
    """The sender's socket closes after 1.5 MB: SenderLost is reported and each receiver's
    response stops short -- a Content-Length body short of its length, a chunked one without
    its terminator, an HTTP/1.0 one (over TCP here) with a reset -- after exactly the bytes
    the sender sent."""
    bench = make_bench(transmit="copy")
    body = payload(3 * MIB)
    if chunked:
        wire = b"".join(chunk(body[i:i + 50_000]) for i in range(0, len(body), 50_000))
        sender = bench.sender(3)
    else:
        wire = body
        sender = bench.sender(3, length=len(body))
    peers = [bench.receiver(3, worker=1), bench.receiver(3, worker=2),
             bench.receiver(3, worker=0, version="1.0", tcp=True)]
    sent = wire[:1_500_000]
    sender.feed([sent], then=sender.vanish)
    bench.run_until(bench.finished, "end of the transfer")
    lost = bench.messages(control.SenderLost)
    assert len(lost) == 1 and lost[0].outcome is Outcome.SENDER_LOST
    for peer in peers:
        r = peer.response()
        assert peer.ended().ok is False and not r.complete
        assert 0 < len(r.body) and r.body == body[:len(r.body)]
        if not chunked:
            assert len(r.body) == len(sent)
    assert peers[2].reset == chunked, "a cut HTTP/1.0 body without a length ends in a reset"
    assert bench.registry.outcomes == {Outcome.SENDER_LOST: 1}


def test_a_sender_that_resets_with_megabytes_unread_is_lost_at_once(make_bench):
    """Over TCP, the sender writes 3 MiB in one go (the relay's receive buffer takes it all)
    and resets. The producer must read what arrived, meet ECONNRESET and abort: every
    receiver ends short at once -- not when the sender's idle timeout fires minutes later."""
    bench = make_bench(transmit="copy", capacity=4 * MIB)
    body = payload(6 * MIB)
    sender = bench.sender(2, length=len(body), tcp=True, rcvbuf=4 * MIB)
    peers = [bench.receiver(2, worker=1), bench.receiver(2, worker=2)]
    sender.feed([body[:3 * MIB]], then=sender.reset)
    bench.run_until(bench.finished, "end of the transfer", timeout=10)
    lost = bench.messages(control.SenderLost)
    # A reset after the data reads as ECONNRESET or, when it overtakes nothing, as an EOF.
    assert len(lost) == 1 and ("connection failed" in lost[0].reason
                               or "closed its connection" in lost[0].reason)
    assert lost[0].nbytes < len(body)
    for peer in peers:
        r = peer.response()
        assert peer.ended().ok is False and not r.complete
        assert r.body == body[:len(r.body)]


def test_a_short_first_send_of_head_and_bytes_goes_on_exactly_where_it_stopped(make_bench):
    """Bytes that came with the sender's head are in the ring when the receiver starts, so its
    head leaves with them in one sendmsg; a socket that takes only part of that (8 KiB send
    buffer, client not reading) blocks the receiver there, and the rest follows in order."""
    bench = make_bench(transmit="copy")
    body = random.Random(5).randbytes(96 * KIB)
    sender = bench.sender(1, length=len(body), with_head=body[:60 * KIB])
    peer = bench.receiver(1, worker=0, sndbuf=8 * KIB)
    peer.stall()
    bench.run_until(lambda: peer.receiver is not None and peer.receiver.blocked,
                    "the receiver's first send filling its socket")
    r = peer.receiver
    assert not r.head and 0 < r.cursor < 60 * KIB, (len(r.head), r.cursor)
    peer.resume()
    sender.feed([body[60 * KIB:]])
    bench.run_until(bench.finished, "end of the transfer")
    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, 1)


# -- 6. faults at the fd boundary -------------------------------------------------------------
def stall_one_until_the_other_ends(bench: Bench, sender, body_wire: bytes):
    fast, slow = fast_and_stalled(bench, sender, body_wire)
    bench.run_until(lambda: fast.eof, "the fast receiver's end")
    assert slow.receiver.in_file
    slow.resume()
    bench.run_until(bench.finished, "end of the transfer")
    return fast, slow


@pytest.mark.parametrize("framing", ["content-length", "chunked-parsed"])
def test_short_pwrites_to_the_ring_and_the_spill_file_still_deliver_exact_bytes(
        make_bench, framing):
    """Every pwrite/pwritev of the ring (body bytes read with the head, relayd's chunk frames)
    and of the spill file returns at most 1000: continued, not lost."""
    bench = make_bench(transmit="copy")
    bench.arena.calls = ring_calls = ShortWrites(1000)
    bench.spill_calls = spill_calls = ShortWrites(1000)
    body = payload(3 * MIB)
    if framing == "content-length":
        sender = bench.sender(2, length=len(body), with_head=body[:30_000])
        wire = body[30_000:]
    else:
        sender = bench.sender(2, with_head=chunk(body[:30_000]))
        wire = b"".join(chunk(body[i:i + 70_000]) for i in range(30_000, len(body), 70_000))
        wire += b"0\r\n\r\n"
    stall_one_until_the_other_ends(bench, sender, wire)
    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, 2)
    assert ring_calls.short and spill_calls.short


def test_a_full_disk_under_block_returns_file_readers_to_the_ring_and_loses_nothing(make_bench):
    """--slow block: the spill file takes 1 MiB, then ENOSPC. The producer is held (the ring
    keeps every byte from where the file stopped), the fast receiver waits with it, and the
    slow one, resumed, reads the file to its end and the rest from the ring. The failure is
    counted."""
    bench = make_bench(transmit="copy")
    bench.spill_calls = disk = FullDisk(1 * MIB)
    body = payload(4 * MIB)
    sender = bench.sender(2, length=len(body))
    fast, slow = fast_and_stalled(bench, sender, body)
    producer = bench.parts[0]
    bench.run_until(lambda: producer.counters.spill_failures and sender.stream.state
                    is SenderState.PAUSED and not fast.receiver.blocked
                    and fast.receiver.cursor == sender.stream.ring.published,
                    "the producer held after the spill failure")
    spill_end = bench.arena.load(ring.SlotFields(bench.arena, 0).spill_end)
    assert disk.refused and spill_end < len(body)
    assert fast.ended() is None and len(fast.data) < len(body), "block loses nothing: all wait"
    assert slow.receiver.in_file and slow.receiver.cursor < spill_end
    bench.run_for(0.2)
    assert sender.stream.state is SenderState.PAUSED

    slow.resume()
    bench.run_until(bench.finished, "end of the transfer")
    assert not slow.receiver.in_file, "it came back to the ring at the file's end"
    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, 2)
    assert producer.counters.spill_failures == 1
    assert any("spill write failed" in line for line in bench.log)


def test_a_file_reader_that_vanishes_while_a_full_disk_holds_the_producer_releases_it(
        make_bench):
    """--slow block, the same full disk: while the producer is held for the stalled file
    reader, that reader's client goes away. Its worker's last file reader is gone, so the
    producer must be woken to drop the hold; the fast receiver then gets every byte."""
    bench = make_bench(transmit="copy")
    bench.spill_calls = FullDisk(1 * MIB)
    body = payload(4 * MIB)
    sender = bench.sender(2, length=len(body))
    fast, slow = fast_and_stalled(bench, sender, body)
    bench.run_until(lambda: bench.parts[0].counters.spill_failures and sender.stream.state
                    is SenderState.PAUSED and fast.receiver.cursor == sender.stream.ring.published,
                    "the producer held after the spill failure")
    assert slow.receiver.in_file
    slow.vanish()
    bench.run_until(bench.finished, "end of the transfer")
    assert slow.ended().ok is False
    assert_every_receiver_got(bench, body, [fast])
    assert bench.registry.outcomes == {Outcome.OK_SOME_RECEIVERS_LEFT: 1}


def test_a_full_disk_under_drop_cuts_the_slowest_visibly_and_the_rest_complete(make_bench):
    """?slow=drop: the same full disk cuts the stalled file reader (ReceiverEnded ok=False, a
    short Content-Length body) instead of holding everyone; the fast one gets every byte.
    The cut comes once the reader's socket has not drained for DROP_GRACE_S: the group sets
    its own timer for that, no tick needed."""
    bench = make_bench(transmit="copy")
    bench.spill_calls = FullDisk(1 * MIB)
    body = payload(4 * MIB)
    sender = bench.sender(2, length=len(body), query=b"&slow=drop")
    fast, slow = fast_and_stalled(bench, sender, body)
    bench.run_until(lambda: fast.eof and slow.ended() is not None, "the fast one's end and the cut")
    assert slow.ended().ok is False
    slow.resume()
    bench.run_until(bench.finished, "end of the transfer")
    r = slow.response()
    assert not r.complete and len(r.body) < len(body) and r.body == body[:len(r.body)]
    assert_every_receiver_got(bench, body, [fast])
    assert bench.registry.outcomes == {Outcome.OK_SOME_RECEIVERS_LEFT: 1}
    assert bench.parts[0].counters.spill_failures == 1


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 1 MiB tmpfs, unmounted after the test (request it before make_bench, so the bench
    and its spill descriptors are gone first)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    if subprocess.run(["umount", str(mount)]).returncode:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_really_full_tmpfs_under_block_loses_nothing(full_tmpfs, make_bench):
    """The spill directory is a real 1 MiB tmpfs: the kernel's own short write and ENOSPC
    stop the file; the producer is held until the stalled reader has come back through the
    ring, and both receivers get every byte."""
    bench = make_bench(transmit="sendfile", spill_dir=str(full_tmpfs))
    body = payload(4 * MIB)
    sender = bench.sender(2, length=len(body))
    fast, slow = fast_and_stalled(bench, sender, body)
    producer = bench.parts[0]
    bench.run_until(lambda: producer.counters.spill_failures
                    and sender.stream.state is SenderState.PAUSED, "the disk to fill")
    assert slow.receiver.in_file and fast.ended() is None
    slow.resume()
    bench.run_until(bench.finished, "end of the transfer")
    assert not slow.receiver.in_file, "it came back to the ring at the file's end"
    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, 2)
    assert producer.counters.spill_failures == 1


# -- random schedules -------------------------------------------------------------------------
def random_chunks(body: bytes, rng: random.Random) -> bytes:
    """The body in a sender's chunk framing of random sizes (1 byte to 100 KB), hex in either
    case, some size lines with extensions."""
    wire, i = [], 0
    while i < len(body):
        size = rng.choice([rng.randint(1, 30), rng.randint(1, 100_000)])
        data = body[i:i + size]
        line = (b"%X" if rng.random() < 0.5 else b"%x") % len(data)
        if rng.random() < 0.1:
            line += b';bench="x y"'
        wire += [line, b"\r\n", data, b"\r\n"]
        i += size
    return b"".join(wire) + b"0\r\n\r\n"


def random_pieces(data: bytes, rng: random.Random) -> list[bytes]:
    pieces, i = [], 0
    while i < len(data):
        step = rng.choice([rng.randint(1, 100), rng.randint(1, 300_000)])
        pieces.append(data[i:i + step])
        i += step
    return pieces


@pytest.mark.parametrize("faults", [False, True], ids=["", "faults"])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_schedules_deliver_every_byte_to_every_receiver(make_bench, seed, faults):
    """A random mix per seed: transmit mode, n = 1..5 receivers on random worker indexes
    (some HTTP/1.0), either arrival order, Content-Length or chunked (passed through or
    parsed), the body's size (empty included) and the pieces and gaps it is written in,
    and receivers that read at once, sip slowly, or stall a while mid-body. With faults:
    the ring's pwrites are short and the spill file's disk fills after 0..2 MiB (--slow
    block: still every byte)."""
    rng = random.Random(seed)
    bench = make_bench(transmit=rng.choice(["copy", "sendfile"]))
    if faults:
        bench.arena.calls = ShortWrites(rng.randint(1, 8192))
        bench.spill_calls = FullDisk(rng.randint(0, 2 * MIB))
    n = rng.randint(1, 5)
    size = rng.choice([0, 1, rng.randint(2, 5000)] + [rng.randint(5000, 3 * MIB)] * 5)
    body = payload(size, seed)
    framing = rng.choice(["content-length", "chunked-passthrough", "chunked-parsed"])
    if framing == "content-length":
        wire, head_part = body, rng.randint(0, min(size, 30_000))
    else:
        wire = random_chunks(body, rng)
        head_part = 0 if framing == "chunked-passthrough" else rng.randint(1, min(len(wire),
                                                                                  30_000))

    def add_sender():
        return bench.sender(n, length=size if framing == "content-length" else None,
                            with_head=wire[:head_part])

    def add_receiver():
        peer = bench.receiver(n, worker=rng.randrange(3),
                              version="1.0" if rng.random() < 0.2 else "1.1")
        behaviour = rng.choice(["reads", "sips", "stalls"])
        if behaviour == "sips":
            peer.sip = (rng.randint(16, 128) * KIB, rng.uniform(0.0005, 0.002))
        elif behaviour == "stalls":
            def stall_a_while():
                peer.stall()
                bench.loop.call_later(rng.uniform(0.01, 0.2), peer.resume)
            peer.at.append((rng.randint(1, max(1, size)), stall_a_while))
        return peer

    sender_first = rng.random() < 0.5
    sender = add_sender() if sender_first else None
    for _ in range(n):
        add_receiver()
    sender = sender or add_sender()
    sender.feed(random_pieces(wire[head_part:], rng), gap_s=rng.choice([0, 0, 0.001]))
    bench.run_until(bench.finished, f"end of the transfer (seed {seed}, {framing}, n={n}, "
                                    f"{size} bytes)")
    assert_every_receiver_got(bench, body)
    assert_transfer_ok(bench, n)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_departures_never_leave_a_short_body_looking_complete(make_bench, seed):
    """Random schedules where receivers may close, half-close or reset at a random point, the
    sender may vanish mid-body, and --slow may be drop with a disk that fills. Whatever
    happens: the transfer settles (every receiver reported, the slot released); each client
    got a prefix of the body; of the clients that read to the end, a response that looks
    complete holds the whole body, and so does every one reported ok; under block, with the
    sender staying, every receiver that stayed got everything. HTTP/1.0 receivers use TCP
    here, so a cut reaches them as a reset."""
    rng = random.Random(1000 + seed)
    bench = make_bench(transmit=rng.choice(["copy", "sendfile"]))
    drop = rng.random() < 0.5
    if rng.random() < 0.5:
        bench.spill_calls = FullDisk(rng.randint(0, 2 * MIB))
    n = rng.randint(1, 4)
    body = payload(rng.randint(1, 3 * MIB), seed)
    chunked = rng.random() < 0.5
    wire = random_chunks(body, rng) if chunked else body
    head_part = rng.randint(0, min(len(wire), 20_000))
    sender = bench.sender(n, length=None if chunked else len(body), with_head=wire[:head_part],
                          query=b"&slow=drop" if drop else b"")
    stayers, readers_to_the_end = [], []
    for _ in range(n):
        version = "1.0" if rng.random() < 0.2 else "1.1"
        peer = bench.receiver(n, worker=rng.randrange(3), version=version, tcp=version == "1.0")
        how = rng.choice(["stays", "stays", "stays", "closes", "half-closes", "resets"])
        if how in ("stays", "half-closes"):
            readers_to_the_end.append(peer)
        if how == "stays":
            stayers.append(peer)
            if rng.random() < 0.4:
                def stall_a_while(peer=peer):
                    peer.stall()
                    bench.loop.call_later(rng.uniform(0.01, 0.2), peer.resume)
                peer.at.append((rng.randint(1, len(body)), stall_a_while))
        else:
            leave(peer, how, rng.randint(1, len(body)))
    sender_vanishes = rng.random() < 0.2
    rest = wire[head_part:]
    cut_at = rng.randint(0, len(rest) - 1) if sender_vanishes and rest else len(rest)
    sender.feed(random_pieces(rest[:cut_at], rng),
                then=sender.vanish if cut_at < len(rest) else None)
    bench.run_until(bench.finished, f"the transfer to settle (seed {seed})")

    for peer in bench.peers:
        r = peer.response()
        assert r.body == body[:len(r.body)], f"receiver {peer.conn_id}: not a prefix"
        if peer not in readers_to_the_end:
            continue                        # it hung up itself: it knows it did not finish
        if r.complete:
            assert r.body == body, f"receiver {peer.conn_id}: short but looks complete"
        if peer.ended().ok:                 # ok: every byte was queued
            assert r.complete and r.body == body
    if not drop and cut_at == len(rest):
        assert_every_receiver_got(bench, body, stayers)
    assert sum(bench.registry.outcomes.values()) == 1
    assert not bench.relay_failures(), bench.relay_failures()


# -- 7. a bug in one pipe ---------------------------------------------------------------------
class Broken(Syscalls):
    """A ring write that raises what no errno explains: a stand-in for a bug in the relay."""

    def pwrite(self, fd, data, offset):
        raise RuntimeError("a bug in the relay")

    def pwritev(self, fd, buffers, offset):
        raise RuntimeError("a bug in the relay")


def test_an_exception_in_one_pipe_aborts_it_visibly_and_logged_and_the_next_pipe_works(
        make_bench):
    """A chunked body partly read with its head is framed into the ring with pwritev; make that
    raise. The pipe ends with Outcome.RELAY_ERROR, its receivers' bodies end short, the log
    names the pipe, its slot comes back -- and the next pipe on the same worker parts goes
    through whole."""
    bench = make_bench(transmit="copy")
    bench.arena.calls = Broken()
    body = payload(200 * KIB)
    sender = bench.sender(2, with_head=chunk(body[:50_000]))
    broken = [bench.receiver(2, worker=w) for w in (1, 2)]
    sender.feed([chunk(body[50_000:]) + b"0\r\n\r\n"])
    bench.run_until(lambda: all(p.eof for p in broken) and bench.registry.slots.in_use == 0,
                    "the broken pipe's end")
    lost, = bench.messages(control.SenderLost)
    assert lost.outcome is Outcome.RELAY_ERROR
    assert all(not p.response().complete for p in broken)
    assert any("failed in the relay" in line and "RuntimeError" in line for line in bench.log)
    assert "[ERROR] the relay failed on this transfer" in sender.progress()

    bench.arena.calls = Syscalls()
    bench.peers.clear()
    sender = bench.sender(2, with_head=chunk(body[:50_000]))
    good = [bench.receiver(2, worker=w) for w in (1, 2)]
    sender.feed([chunk(body[50_000:]) + b"0\r\n\r\n"])
    bench.run_until(bench.finished, "the next pipe's end")
    for peer in good:
        response = peer.response()
        assert response.status == 200 and response.complete and response.body == body
    assert bench.registry.outcomes[Outcome.OK] == 1


def test_a_withdrawn_spill_file_is_never_reopened_under_a_reused_descriptor_number(tmp_path):
    """An aborted transfer's producer closes its spill file while readers elsewhere may not
    have reopened it yet (through /proc/<pid>/fd/<n>). The number is then free, and the next
    file the producer's worker opens takes it: a late reader must get nothing, not that
    file's bytes (spill_active is withdrawn before the close and checked after the open)."""
    from relayd import stats
    from relayd.spill import SpillBudget, SpillReader, SpillWriter

    arena = ring.Arena(slots=1, capacity=CAPACITY, worker_slots=2)
    try:
        f = ring.SlotFields(arena, 0)
        f.reset(arena, producer=0, receiver_workers=[1], gen=1)
        writer = ring.RingWriter(arena, 0, [1], False, 64 * KIB, lambda worker: None)
        budget = SpillBudget(arena, stats.WorkerBlock(arena, 0), 1 << 30)
        spill = SpillWriter(writer, str(tmp_path), start=0, limit=MIB, drop=False,
                            budget=budget)
        spill.write(0, b"this pipe's spilled bytes")
        spill.announce()
        early = SpillReader.open(arena, f)
        assert os.pread(early.fd, 100, 0) == b"this pipe's spilled bytes"
        number = spill.fd
        spill.close()
        other = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)   # another pipe's file
        try:
            assert other == number                    # the number was reused
            os.pwrite(other, b"ANOTHER PIPE'S BYTES", 0)
            assert SpillReader.open(arena, f) is None
        finally:
            os.close(other)
        assert os.pread(early.fd, 100, 0) == b"this pipe's spilled bytes"   # its own copy
        os.close(early.fd)
    finally:
        arena.close()


def test_a_dead_workers_spill_bytes_leave_the_node_budget_when_it_is_reaped():
    """The budget is summed over every worker index as each last published: a worker killed
    while it spilled left its bytes in the sum, and every other pipe's spill was refused
    until the index was reused (seen by a hunt after a kill -9)."""
    from relayd import stats
    from relayd.spill import SpillBudget

    arena = ring.Arena(slots=1, capacity=CAPACITY, worker_slots=4)
    try:
        dead, alive = stats.WorkerBlock(arena, 0), stats.WorkerBlock(arena, 1)
        dead.claim(1111)
        alive.claim(2222)
        SpillBudget(arena, dead, 16 * MIB).change(16 * MIB)
        budget = SpillBudget(arena, alive, 16 * MIB)
        assert budget.left() == 0
        dead.vacate()                          # the supervisor reaped it
        assert stats.node_spill_bytes(arena) == 0
        assert budget.left() == 16 * MIB
    finally:
        arena.close()


def test_a_fault_of_ours_while_handling_a_request_is_answered_400_and_logged(capsys):
    """A request meets a bug (here: a route that raises): the client gets a 400 line and the
    worker serves on, but the fault is logged with its traceback, never silent."""
    import asyncio
    import socket

    import uvloop

    from relayd.config import Config
    from relayd.connection import Connection, ConnectionHooks

    def broken_route(request):
        raise RuntimeError("a bug in routing")

    loop = uvloop.new_event_loop()
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        hooks = ConnectionHooks(route=broken_route, pipe=lambda c, p: None,
                                left=lambda c: None, closed=lambda c: loop.stop(),
                                answered=lambda c, s: None, refused=lambda c, s, r: None,
                                may_keep_alive=lambda: True)
        Connection(ours, 1, "127.0.0.1:1", loop, Config(workers=1).validate(), hooks)
        theirs.sendall(b"GET /x HTTP/1.1\r\nHost: r\r\n\r\n")
        theirs.shutdown(socket.SHUT_WR)
        loop.call_later(10, loop.stop)                   # bounds a failure only
        loop.run_forever()
        answer = theirs.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400") and b"[ERROR] malformed request" in answer
        err = capsys.readouterr().err
        assert "error handling a request from 127.0.0.1:1 (answered 400)" in err
        assert "RuntimeError: a bug in routing" in err
    finally:
        theirs.close()
        loop.close()
        asyncio.set_event_loop(None)

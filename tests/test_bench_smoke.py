"""Smoke run of the benchmark harness (scripts/bench --quick): integrity and report shape.

No timing is asserted: speed is measured by scripts/bench, never asserted in tests.
The quick bench needs nginx and node from the system (.ci/run installs them with npm) and
piping-server, which npm installs into .bench-cache. None of them is optional: a missing one
fails the test with what to install, it never skips, since a skip would hide a broken CI.
The other tests here need only relayd and curl.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

from bench_lib import deps, servers  # noqa: E402
from bench_lib.http_body import ResponseDecoder  # noqa: E402
from bench_lib.payload import PayloadCache  # noqa: E402
from bench_lib.receivers import ComparedBody  # noqa: E402
from bench_lib.workloads import IntegrityError, run_many_pipes, verify  # noqa: E402

BENCH_TIMEOUT_S = 240
PIPE_SERVERS = ("relayd", "piping-server")
EXPECTED_ROWS = {
    ("throughput", "N=1, 4 MiB", "GB/s"), ("throughput", "N=1, 4 MiB", "CPU s/GB"),
    ("throughput", "N=50, 4 MiB", "GB/s"), ("throughput", "N=50, 4 MiB", "CPU s/GB"),
    ("throughput", "N=1, 4 MiB", "producer CPU s/GB"),
    ("latency", "N=50, 200 lines", "p50 ms"), ("latency", "N=50, 200 lines", "p99 ms"),
    ("latency", "N=50, 200 lines", "lines lost"),
    ("slow", "fits: 256 KiB", "ratio"), ("slow", "30×: 7.5 MiB", "ratio"),
    ("waiting", "1000 waiting", "RSS waiting MiB"), ("waiting", "1000 waiting", "not waiting"),
    ("transmit", "throughput N=50, 4 MiB", "GB/s"), ("transmit", "latency N=50, 200 lines",
                                                     "p99 ms"),
    ("manypipes", "P=1, 16 MiB each", "GB/s"), ("manypipes", "P=1, 16 MiB each", "CPU s/GB"),
    ("manypipes", "P=100, 164 KiB each", "CPU ms/pipe"),
    ("manypipes", "P=100, 164 KiB each", "pipes/s"),
    ("manypipes", "P=100, 164 KiB each", "receivers refused"),
}


def chunked(body, size):
    out = b""
    for start in range(0, len(body), size):
        piece = body[start:start + size]
        out += b"%08x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


def test_decoder_reassembles_a_chunked_body_fed_one_byte_at_a_time():
    body = os.urandom(5000)
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body, 777)
    received = bytearray()
    decoder = ResponseDecoder(received.extend)
    for index in range(len(wire)):
        decoder.feed(wire[index:index + 1])
    assert decoder.complete and bytes(received) == body


def test_decoder_never_calls_a_chunked_body_cut_before_its_terminator_complete():
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"abc" * 100, 64)
    decoder = ResponseDecoder(lambda piece: None)
    decoder.feed(wire[:-5])
    decoder.feed_eof()
    assert not decoder.complete


def test_verify_names_a_receiver_whose_bytes_differ():
    good = {"index": 0, "bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest(),
            "complete": True, "error": None}
    bad = dict(good, index=1, sha256=hashlib.sha256(b"abd").hexdigest())
    with pytest.raises(IntegrityError, match="1/2 receivers wrong"):
        verify([good, bad], 3, good["sha256"], "test")


def test_verify_names_a_compared_body_that_differs_from_the_payload():
    good = {"index": 0, "check": "compare", "bytes": 3, "mismatch_at": None, "complete": True,
            "error": None}
    bad = dict(good, index=1, mismatch_at=2)
    verify([good], 3, "unused by compare", "test")
    with pytest.raises(IntegrityError, match="DIFFERS from the payload at byte 2"):
        verify([good, bad], 3, "unused by compare", "test")


def test_compared_body_finds_the_first_differing_byte_and_extra_bytes():
    reference = b"0123456789"
    same = ComparedBody(reference, 2, 5)
    for piece in (b"23", b"456"):
        same.update(memoryview(piece))
    assert same.outcome() == {"check": "compare", "bytes": 5, "mismatch_at": None}
    changed = ComparedBody(reference, 2, 5)
    changed.update(memoryview(b"23"))
    changed.update(memoryview(b"4x6"))
    assert changed.outcome()["mismatch_at"] == 3
    longer = ComparedBody(reference, 2, 5)
    longer.update(memoryview(b"234567"))    # one byte past the slice, though the file has it
    assert longer.outcome()["mismatch_at"] == 5


def test_many_pipes_past_max_transfers_counts_refused_receivers_and_verifies_the_rest(
        tmp_path):
    """8 pipes open at once on a relayd with 4 ring slots: a receiver answered 503 is
    counted, not failed; every other receiver's bytes are checked."""
    os.chmod(tmp_path, 0o755)
    payload = PayloadCache(str(tmp_path)).get(8 * 4096)
    with servers.RelaydServer(str(tmp_path), REPO_ROOT, 2,
                              options=["--max-transfers", "4"]) as relay:
        figures = run_many_pipes(relay, payload, pipes=8, n=2)
    refused_pipes = 8 - figures["pipes delivered"]
    assert figures["receivers refused"] == 2 * refused_pipes
    assert figures["delivered_bytes"] == 2 * 4096 * figures["pipes delivered"]


@pytest.fixture(scope="module")
def bench_servers():
    """nginx present and piping-server installed, or the test fails saying what is missing.
    Nothing is installed from the system's packages here: that is .ci/run's job."""
    if shutil.which(servers.nginx_binary()) is None:
        pytest.fail("nginx is missing: apt-get install -y nginx (.ci/run installs it)",
                    pytrace=False)
    try:   # node must be there; npm only while .bench-cache lacks the pinned piping-server
        deps.ensure_piping_server(os.path.join(REPO_ROOT, ".bench-cache"))
        problem = None
    except deps.MissingDependency as exc:
        problem = str(exc)
    if problem:
        pytest.fail(f"piping-server {deps.PIPING_SERVER_VERSION} is unavailable: {problem}",
                    pytrace=False)


def test_quick_bench_verifies_every_receiver_and_reports_every_row(bench_servers, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "bench"),
                           "--quick", "--repeat", "1", "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=BENCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["failures"] == []
    rows = {(r["workload"], r["case"], r["metric"]): r for r in document["rows"]}
    assert EXPECTED_ROWS <= set(rows)
    for (workload, case, metric), row in rows.items():
        names = {"throughput": PIPE_SERVERS + ("nginx",), "slow": PIPE_SERVERS + ("nginx",),
                 "manypipes": PIPE_SERVERS + ("nginx",),
                 "transmit": ("relayd copy", "relayd sendfile", "relayd auto")
                 }.get(workload, PIPE_SERVERS)
        if metric == "producer CPU s/GB":
            assert row["servers"]["nginx"] is None       # it has no producer
            names = PIPE_SERVERS
        for name in names:
            assert isinstance(row["servers"][name], dict), (workload, case, metric, name)
        if metric == "lines lost":
            assert all(row["servers"][name]["median"] == 0 for name in names)
        if metric == "not waiting":
            assert all(row["servers"][name]["median"] == 0 for name in names)
    assert "relayd/piping-server" in rows[("throughput", "N=50, 4 MiB", "GB/s")]["ratios"]
    assert "== throughput" in done.stdout and "relayd/nginx" in done.stdout
    assert document["meta"]["clients"]["receiver_check"] == "compare"
    assert "every body byte compared with the payload file" in done.stdout


def compare_relayd(*args: str) -> subprocess.CompletedProcess:
    script = os.path.join(REPO_ROOT, "scripts", "compare_relayd.py")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=120)


def test_compare_relayd_many_pipes_reports_cpu_per_pipe():
    done = compare_relayd("--many-pipes", "8", "--n", "2", "--repeat", "1", "")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 receivers refused" in done.stdout
    assert "CPU-ms per pipe" in done.stdout.split("medians of 1\n")[1]


def test_compare_relayd_token_pipes_checks_every_line_and_reports_cpu_per_line():
    """scripts/compare_relayd.py --token-pipes: concurrent chunked pipes whose every
    receiver must get every line of its own pipe, in order, before a figure is printed."""
    done = compare_relayd("--token-pipes", "3", "--n", "2", "--repeat", "1", "")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 token pipes x N = 2" in done.stdout
    assert "CPU-us per line" in done.stdout.split("medians of 1\n")[1]


def test_token_pipes_name_a_receiver_that_misses_a_line():
    """The workload's check: a receiver whose body lacks its pipe's second line, or whose
    body never ended, is named; one with exactly its lines passes."""
    from bench_lib import tokenpipes
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def chunk(data):
        return b"%x\r\n%s\r\n" % (len(data), data)

    a, b = socket.socketpair()
    with a, b:
        whole, short, unended = (tokenpipes.Receiver(a, 7) for _ in range(3))
        whole.decoder.feed(head + chunk(tokenpipes.line(7, 0)) + chunk(tokenpipes.line(7, 1))
                           + b"0\r\n\r\n")
        short.decoder.feed(head + chunk(tokenpipes.line(7, 0)) + b"0\r\n\r\n")
        unended.decoder.feed(head + chunk(tokenpipes.line(7, 0)) + chunk(tokenpipes.line(7, 1)))
        tokenpipes.verify([whole], 2)
        for bad in (short, unended):
            with pytest.raises(tokenpipes.WorkloadError, match="1/2 receivers without"):
                tokenpipes.verify([whole, bad], 2)


def test_compare_relayd_runs_each_option_set_and_reports_it():
    """scripts/compare_relayd.py: every set runs the verified throughput workload; a set
    relayd refuses fails the invocation instead of being reported."""
    ok = compare_relayd("--n", "3", "--mib", "1", "--repeat", "1", "", "--window 1M")
    assert ok.returncode == 0, ok.stderr
    summary = ok.stdout.split("medians of 1\n")[1].splitlines()
    assert [line.split("  ")[0].strip() for line in summary] == ["(defaults)", "--window 1M"]
    bad = compare_relayd("--n", "3", "--mib", "1", "--repeat", "1", "--window 3M")
    assert bad.returncode != 0 and "medians" not in bad.stdout

"""Smoke run of scripts/reload_bench.py --quick: integrity and the table's shape.

No timing is asserted: the benchmark's figures are for docs/operations.md, never a test.
"""
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "reload_bench.py")


@pytest.mark.timeout(90)
def test_quick_reload_bench_delivers_every_byte_and_settles():
    done = subprocess.run([sys.executable, SCRIPT, "--quick"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=80)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    rows = dict(re.findall(r"^(\S.*?)  +(\S.*)$", out, re.M))
    # --quick: 10 streaming pipes + 2 late-sender + 2 late-receivers, n = 3.
    assert rows["receivers"] == "42"
    assert rows["receivers complete / short / wrong / refused"] == "42 / 0 / 0 / 0"
    assert rows["senders 'Sent successfully'"] == "14 / 14"
    assert rows["SIGHUPs sent"].startswith("3 ")
    started, queued, joined = map(int, rows["reloads started / queued / joined a queued one"]
                                  .split(" / "))
    assert started >= 1 and joined >= 0 and queued <= started
    assert rows["settled back to --workers"].startswith("yes (2 children")
    assert rows["supervisor alive; 'supervisor error' lines"] == "yes; 0"
    assert rows["fresh transfer after settling"] == "ok"
    assert rows["/health polls during the run: answered / failed"].endswith(" / 0")
    answered, failed = rows["new connections during the run (2 threads): answered / failed"] \
        .split(" / ", 1)
    assert int(answered) > 0 and failed == "0", failed
    assert "OK: every byte of every receiver is its sender's" in out


def load_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("reload_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reload_bench"] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_verdicts_tell_a_short_prefix_from_a_wrong_byte():
    rb = load_script()
    payload = rb.Payload(seed=3, body_bytes=1 << 20, pipes=2)
    pipe = rb.Pipe(index=1, kind="streaming", path="/p", n=1, size=1 << 20, chunked=False,
                   seconds=1)
    body = payload.body(1, pipe.size)

    def received(data, complete):
        checked = rb.CheckedBody()
        checked.update(memoryview(data))
        r = rb.ReceiverResult(status=200, received=checked.received, complete=complete,
                              digest=checked.digest.hexdigest(), checkpoints=checked.checkpoints)
        rb.judge(pipe, body, r)
        return r

    assert received(bytes(body), True).verdict == "complete"
    assert received(bytes(body[:700_000]), False).verdict == "short"
    flipped = bytearray(body)
    flipped[600_000] ^= 1
    wrong = received(bytes(flipped), True)
    assert wrong.verdict == "wrong" and "starts at byte 524288" in wrong.detail
    assert received(bytes(payload.body(0, pipe.size)), True).verdict == "wrong"
    refused = rb.ReceiverResult(status=409)
    rb.judge(pipe, body, refused)
    assert refused.verdict == "refused"

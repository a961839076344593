"""Smoke test of the load test: `scripts/loadtest --quick` against a real relayd on a free port.

The script starts relayd itself (--port 0) and stops it; this test only reads what it reports.
Speed is not asserted here (see loadtest/README.md), only that every record arrived intact.
"""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOADTEST_SCRIPT = REPO / "scripts" / "loadtest"
SCRIPT_TIMEOUT_S = 120  # the quick run takes ~18 s; this only bounds a hang


def read_stats_rows(stats_csv: Path) -> dict:
    with open(stats_csv, newline="") as handle:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}


# Run in a child interpreter: the locustfile imports locust, which gevent-patches its process.
VERIFIER_SELF_CHECK = r"""
import sys
sys.path.insert(0, "loadtest")
import locustfile as lf

RECORD_BYTES = 100
records = [lf.encode_record(7, seq, RECORD_BYTES, 0) for seq in range(10)]
body = b"".join(records)

def violation(chunks, check_payload_crc, complete=True):
    verifier = lf.RecordStreamVerifier(7, RECORD_BYTES, 10, lambda *_: None, check_payload_crc)
    for chunk in chunks:
        verifier.feed(chunk, 0)
    return verifier.finish(complete) or "intact"

def flipped(position):
    damaged = bytearray(body)
    damaged[position] ^= 1
    return bytes(damaged)

for crc in (False, True):
    print(violation([body[i:i + 37] for i in range(0, len(body), 37)], crc).split(":")[0])
    print(violation([b"".join(records[:3] + records[4:])], crc).split(":")[0])
    print(violation([b"".join(records[:3] + records[2:])], crc).split(":")[0])
    print(violation([flipped(5 * RECORD_BYTES + 60)], crc).split(":")[0])
    print(violation([flipped(5 * RECORD_BYTES + 10)], crc).split(":")[0])
    print(violation([body[:-10]], crc, complete=False).split(":")[0])
    print(violation([body[:-RECORD_BYTES]], crc).split(":")[0])
"""


def test_record_verifier_reports_gap_duplicate_corruption_and_truncation():
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[load]')")
    completed = subprocess.run([sys.executable, "-B", "-c", VERIFIER_SELF_CHECK], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    expected = ["intact", "gap", "duplicate", "corruption", "corruption", "truncated", "short body"]
    assert completed.stdout.splitlines() == expected * 2


def test_quick_load_test_delivers_every_record_intact_to_fast_and_slow_consumers(tmp_path):
    # find_spec, not import: importing locust monkey-patches this pytest process with gevent.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[load]')")

    completed = subprocess.run(
        [sys.executable, str(LOADTEST_SCRIPT), "--quick", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    locust_log = tmp_path / "quick.locust.log"
    locust_log_tail = locust_log.read_text()[-4000:] if locust_log.exists() else "-"
    context = (f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}\n"
               f"locust log tail:\n{locust_log_tail}")

    stats_csv = tmp_path / "quick_stats.csv"
    assert stats_csv.exists(), f"locust wrote no CSV\n{context}"
    rows = read_stats_rows(stats_csv)
    failures = {key: int(row["Failure Count"]) for key, row in rows.items()
                if row["Name"] != "Aggregated" and int(row["Failure Count"])}
    failures_csv = (tmp_path / "quick_failures.csv").read_text()
    assert not failures, f"failures by request: {failures}\n{failures_csv}"
    for kind in ("fast", "slow"):
        verified = int(rows[("GET", f"consumer {kind}")]["Request Count"])
        assert verified > 0, f"no {kind} consumer round was verified end to end\n{context}"

    summary = json.loads((tmp_path / "quick.summary.json").read_text())
    assert summary["failures"] == 0, summary
    assert completed.returncode == 0, (
        f"scripts/loadtest --quick exited {completed.returncode}\n{context}")

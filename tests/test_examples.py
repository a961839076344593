"""The examples, end to end: each `run.sh` starts relayd, its producer and its consumers for
real (curl, jq, the bundled model), and every consumer's output is checked against the
same work done directly in this process, without relayd, curl or jq.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EMBEDDINGS = REPO / "examples" / "embeddings"
TOKEN_STREAM = REPO / "examples" / "token-stream"
# Generous: model load and 13 process pipelines on a shared 2-core machine.
RUN_TIMEOUT_S = 240
EMBEDDING_CONSUMERS = 8
TOKEN_WORKERS = 12


def load_module(path: Path, name: str):
    """Import an example script by path, under a name no other module uses."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(script: Path, out: Path, *args: str) -> str:
    """Run an example's run.sh to the end; its stdout. relayd comes from this venv."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", str(script), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # run.sh's trap stops the relayd it started, which ends every curl it started.
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"{script} still running after {RUN_TIMEOUT_S} s:\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{stdout}\n{stderr}"
    return stdout


# -- fleet embeddings --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedding_consumer():
    return load_module(EMBEDDINGS / "consumer.py", "embeddings_consumer")


@pytest.fixture(scope="module")
def embeddings_run(tmp_path_factory) -> tuple[str, Path]:
    """(stdout, output dir) of one `examples/embeddings/run.sh`."""
    out = tmp_path_factory.mktemp("embeddings")
    return run_example(EMBEDDINGS / "run.sh", out), out


@pytest.fixture(scope="module")
def direct_vectors(embedding_consumer) -> list[tuple[str, list[float]]]:
    """[(id, vector)]: the catalog embedded in this process, with no pipe in between."""
    sys.path.insert(0, str(EMBEDDINGS))     # producer.py imports consumer.py beside it
    try:
        producer = load_module(EMBEDDINGS / "producer.py", "embeddings_producer")
    finally:
        sys.path.remove(str(EMBEDDINGS))
    items = embedding_consumer.read_catalog(EMBEDDINGS / "catalog.tsv")
    vectors = producer.embed(producer.load_model(), [text for _, text in items])
    return [(item_id, vector.tolist()) for (item_id, _), vector in zip(items, vectors)]


def consumer_outputs(out: Path) -> list[str]:
    return [(out / f"consumer-{i}.txt").read_text() for i in range(1, EMBEDDING_CONSUMERS + 1)]


def test_catalog_file_is_what_make_catalog_writes(tmp_path):
    subprocess.run([sys.executable, str(EMBEDDINGS / "make_catalog.py"), str(tmp_path / "c.tsv")],
                   check=True, timeout=30)
    assert (tmp_path / "c.tsv").read_bytes() == (EMBEDDINGS / "catalog.tsv").read_bytes()


def test_eight_embedding_consumers_each_get_vectors_bit_identical_to_a_direct_computation(
        embeddings_run, direct_vectors, embedding_consumer):
    stdout, out = embeddings_run
    expected = (f"vectors: {len(direct_vectors)} x {len(direct_vectors[0][1])}, "
                f"sha256 {embedding_consumer.vectors_digest(direct_vectors)}")
    outputs = consumer_outputs(out)
    assert [expected in output for output in outputs] == [True] * EMBEDDING_CONSUMERS, outputs
    assert expected.split("sha256 ")[1] in (out / "producer.txt").read_text()
    assert (f"{EMBEDDING_CONSUMERS} of {EMBEDDING_CONSUMERS} consumers' vectors are "
            "bit-identical") in stdout


def test_each_embedding_consumer_ranks_its_own_query_as_a_direct_computation_does(
        embeddings_run, direct_vectors, embedding_consumer):
    _, out = embeddings_run
    queries = set()
    for i, output in enumerate(consumer_outputs(out), start=1):
        query = re.match(rf"consumer {i}: more like (sku-\d+) ", output).group(1)
        queries.add(query)
        got = re.findall(r"^  (\d\.\d{4})  (sku-\d+)  ", output, re.MULTILINE)
        expected = [(f"{score:.4f}", item_id)
                    for score, item_id in embedding_consumer.most_like(direct_vectors, query, 5)]
        assert got == expected, f"consumer {i}:\n{output}"
    assert len(queries) == EMBEDDING_CONSUMERS     # each its own query


def test_embedding_producer_reports_what_its_one_pass_cost_and_reaches_all_consumers(
        embeddings_run):
    _, out = embeddings_run
    report = (out / "producer.txt").read_text()
    assert re.search(r"300 items x 384 dims embedded once: model load .* s wall, .* CPU-s; "
                     r"embedding pass .* s wall, .* CPU-s", report), report
    sent = (out / "sender.txt").read_text()
    assert f"Sent successfully to {EMBEDDING_CONSUMERS} receiver(s)" in sent


# -- token stream ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_producer():
    return load_module(TOKEN_STREAM / "producer.py", "token_stream_producer")


@pytest.fixture(scope="module")
def score():
    return load_module(TOKEN_STREAM / "score.py", "token_stream_score")


def test_token_stream_workers_each_score_the_answer_as_a_direct_computation_does(
        tmp_path, token_producer, score):
    stdout = run_example(TOKEN_STREAM / "run.sh", tmp_path, "--consumers", str(TOKEN_WORKERS),
                         "--stream", "0.005")
    answer = (TOKEN_STREAM / "answer.txt").read_text(encoding="utf-8")
    direct = score.summarize(token_producer.tokenize(answer))
    for i in range(1, TOKEN_WORKERS + 1):
        assert (tmp_path / f"worker-{i}.txt").read_text() == f"worker {i}: {direct}\n"
    sent = (tmp_path / "sender.txt").read_text()
    assert f"Sent successfully to {TOKEN_WORKERS} receiver(s)" in sent
    assert f"{TOKEN_WORKERS} of {TOKEN_WORKERS} workers match the direct computation" in stdout


def test_token_producer_cuts_the_answer_into_pieces_that_spell_it(token_producer):
    answer = (TOKEN_STREAM / "answer.txt").read_text(encoding="utf-8")
    tokens = token_producer.tokenize(answer)
    assert "".join(tokens) == answer
    assert len(tokens) > len(answer.split())       # punctuation and spacing are tokens too


def test_token_producer_wraps_a_models_plain_text_from_stdin_without_changing_it():
    # A model's stdout arrives in arbitrary chunks, one may end inside a UTF-8 character.
    text = "Grüße — naïve café, 🙂 and a \"quote\" \\ backslash.\nNext line."
    data = text.encode()
    cut = data.index("🙂".encode()) + 2
    proc = subprocess.Popen([sys.executable, str(TOKEN_STREAM / "producer.py"), "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(data[:cut])
    proc.stdin.flush()
    time.sleep(0.2)
    proc.stdin.write(data[cut:])
    proc.stdin.close()
    lines = proc.stdout.read().splitlines()
    assert proc.wait(timeout=30) == 0
    assert "".join(json.loads(line)["delta"] for line in lines) == text

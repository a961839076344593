#!/usr/bin/env python3
"""Tastes a streamed answer: reads `jq -c .delta` output, prints one summary line.

    curl -sS http://relay:8080/llm?n=50 | jq -c .delta | ./score.py --worker 7

Each stdin line is one delta as a JSON string (jq's -c output). The summary counts the
deltas (tokens), words and characters of the whole answer and ends with the sha256 of its
UTF-8 text: every worker that tasted the same tokens prints the same line but its name.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys


def read_deltas(lines) -> list[str]:
    deltas = []
    for number, line in enumerate(lines, start=1):
        delta = json.loads(line)
        if not isinstance(delta, str):
            raise SystemExit(f"score.py: line {number} is {line.strip()!r}, not a string delta")
        deltas.append(delta)
    return deltas


def summarize(deltas: list[str]) -> str:
    """'N tokens, N words, N chars, sha256 HEX' of the answer the deltas spell."""
    text = "".join(deltas)
    return (f"{len(deltas)} tokens, {len(text.split())} words, {len(text)} chars, "
            f"sha256 {hashlib.sha256(text.encode()).hexdigest()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default="1", help="this worker's name in its output line")
    args = parser.parse_args()
    print(f"worker {args.worker}: {summarize(read_deltas(sys.stdin.buffer))}")


if __name__ == "__main__":
    main()

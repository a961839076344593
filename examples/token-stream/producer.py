#!/usr/bin/env python3
"""Writes a model's answer as `{"delta": "..."}` lines, one per token, as a model streams.

    ./producer.py --stream 0.02 answer.txt | curl -T - http://relay:8080/llm?n=50

Replay: no model runs here. The text of FILE (answer.txt, a written answer) is cut into
tokens the way GPT-2's pre-tokenizer cuts words (a word with its leading space, up to three
digits, a run of punctuation, whitespace), and each token is written and flushed
--stream seconds after the one before, as a generating model would.

    llama-completion -m model.gguf -p "$PROMPT" -no-cnv --no-display-prompt 2>/dev/null \\
        | ./producer.py - | curl -T - http://relay:8080/llm?n=50

With FILE `-`, the text on stdin becomes one delta for each chunk as it arrives, so a
real model's plain-text output streams through unchanged (UTF-8 split across chunks is
held back until complete).
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import sys
import time
from pathlib import Path

DEFAULT_ANSWER = Path(__file__).with_name("answer.txt")
# GPT-2's split, with Python's classes: letters, digits, anything else that is not
# whitespace (the underscore too), whitespace. Every character falls in one of them.
TOKEN_RE = re.compile(r"'(?:s|t|re|ve|m|ll|d)\b| ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\s\w]|_)+"
                      r"|\s+(?!\S)|\s+")
READ_BYTES = 4096


def tokenize(text: str) -> list[str]:
    """The text as token-sized pieces whose concatenation is the text."""
    tokens = TOKEN_RE.findall(text)
    assert "".join(tokens) == text, "the token pattern skipped a character"
    return tokens


def delta_line(delta: str) -> bytes:
    return json.dumps({"delta": delta}, ensure_ascii=False).encode() + b"\n"


def replay(tokens: list[str], pause_s: float, out) -> None:
    for i, token in enumerate(tokens):
        if i and pause_s:
            time.sleep(pause_s)
        out.write(delta_line(token))
        out.flush()


def wrap_stdin(out) -> int:
    """One delta per chunk read from stdin, as it arrives; the number of deltas."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    count = 0
    while True:
        chunk = os.read(sys.stdin.fileno(), READ_BYTES)
        text = decoder.decode(chunk, final=not chunk)
        if text:
            out.write(delta_line(text))
            out.flush()
            count += 1
        if not chunk:
            return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=str(DEFAULT_ANSWER),
                        help="text to replay (default: answer.txt); - wraps stdin as it arrives")
    parser.add_argument("--stream", type=float, default=0.02, metavar="SECONDS",
                        help="pause between replayed tokens (0.02, about a 50 token/s model)")
    args = parser.parse_args()
    out = sys.stdout.buffer
    started = time.perf_counter()
    if args.file == "-":
        count = wrap_stdin(out)
    else:
        tokens = tokenize(Path(args.file).read_text(encoding="utf-8"))
        replay(tokens, args.stream, out)
        count = len(tokens)
    print(f"producer: {count} deltas in {time.perf_counter() - started:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

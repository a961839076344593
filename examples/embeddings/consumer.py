#!/usr/bin/env python3
"""Reads the catalog's embeddings from stdin and prints the items most like one item.

    curl -sS http://relay:8080/embeddings?n=8 | python3 consumer.py --like sku-0042

A consumer needs no model, no torch, not even numpy: its query is an item of the catalog
("more like this"), so every vector it scores with arrives through the pipe. It prints its
top items by cosine similarity, then how many vectors it got and their sha256, which is the
producer's digest exactly when every float arrived bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

DEFAULT_CATALOG = Path(__file__).with_name("catalog.tsv")


def read_catalog(path: Path) -> list[tuple[str, str]]:
    """[(id, text)] in file order."""
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item_id, text = line.split("\t", 1)
            items.append((item_id, text))
    return items


def read_vectors(lines) -> list[tuple[str, list[float]]]:
    """[(id, vector)] in stream order, from JSON lines."""
    rows = []
    for line in lines:
        if line.strip():
            record = json.loads(line)
            rows.append((record["id"], record["vector"]))
    return rows


def vectors_digest(rows: list[tuple[str, list[float]]]) -> str:
    """sha256 over each id and its floats as IEEE doubles: equal iff every bit is."""
    digest = hashlib.sha256()
    for item_id, vector in rows:
        digest.update(item_id.encode() + b"\0")
        digest.update(struct.pack(f"<{len(vector)}d", *vector))
    return digest.hexdigest()


def most_like(rows: list[tuple[str, list[float]]], query_id: str,
              top: int) -> list[tuple[float, str]]:
    """[(score, id)], best first: cosine similarity to query_id (the vectors are unit length)."""
    vectors = dict(rows)
    query = vectors[query_id]
    scored = [(sum(a * b for a, b in zip(query, vector)), item_id)
              for item_id, vector in rows if item_id != query_id]
    scored.sort(key=lambda pair: (-pair[0], pair[1]))
    return scored[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", required=True, metavar="ID", help="the query: a catalog id")
    parser.add_argument("--top", type=int, default=5, help="how many items to print (5)")
    parser.add_argument("--name", default="consumer", help="how this consumer signs its output")
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG,
                        help="the catalog's texts, to print names beside ids")
    args = parser.parse_args()

    texts = dict(read_catalog(args.catalog))
    rows = read_vectors(sys.stdin)
    if not rows:
        sys.exit(f"{args.name}: no vectors on stdin (was the transfer cut short?)")
    print(f"{args.name}: more like {args.like}  \"{texts[args.like]}\"")
    for score, item_id in most_like(rows, args.like, args.top):
        print(f"  {score:.4f}  {item_id}  {texts.get(item_id, '?')}")
    print(f"  vectors: {len(rows)} x {len(rows[0][1])}, sha256 {vectors_digest(rows)}")


if __name__ == "__main__":
    main()

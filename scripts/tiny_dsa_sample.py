#!/usr/bin/env python3
"""Continue a held-out passage with a DSA model through transformers (CPU is fine), or through a running vLLM server.

    python scripts/tiny_dsa_sample.py examples/models/tiny-dsa --data data/tiny-dsa --doc sotu/2013_barack_obama_d
    make serve &   # then, through vLLM and the plugin (the prompt is sent as token ids to /v1/completions):
    python scripts/tiny_dsa_sample.py examples/models/tiny-dsa --data data/tiny-dsa --server http://127.0.0.1:8000/v1
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_indexcache.tools.data.corpus import load_tokens  # noqa: E402

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
p.add_argument("--server", help="OpenAI-compatible base URL of a vLLM server serving MODEL (instead of transformers)")
a = p.parse_args()

from transformers import AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(a.model)
docs = {n: (s, e) for n, s, e in json.loads((Path(a.data) / "heldout_docs.json").read_text())}
s, _ = docs[a.doc]
held = load_tokens(a.data, "heldout")
prompt = held[s + a.offset: s + a.offset + a.prompt_tokens].astype(np.int64)
if a.server:
    from openai import OpenAI

    client = OpenAI(base_url=a.server, api_key="unused")
    r = client.completions.create(model=a.model, prompt=prompt.tolist(), max_tokens=a.new_tokens,
                                  temperature=a.temperature, seed=a.seed, extra_body={"top_k": a.top_k})
    continuation = r.choices[0].text
else:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(a.seed)
    out = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=a.new_tokens, do_sample=True,
                         temperature=a.temperature, top_k=a.top_k, pad_token_id=0)
    continuation = tok.decode(out[0, len(prompt):].tolist())
print("PROMPT:", tok.decode(prompt.tolist()))
print("---- CONTINUATION:", continuation)
print("---- ACTUAL:", tok.decode(held[s + a.offset + a.prompt_tokens: s + a.offset + a.prompt_tokens + a.new_tokens]
                                    .astype(np.int64).tolist()))

#!/usr/bin/env python3
"""Paired per-token held-out loss differences between the rows of ``vllm-indexcache distill --compare``.

    python scripts/distill_paired_se.py examples/models/tiny-dsa runs/distill-v2 --windows 64

Scores the first ``--windows`` disjoint windows of 512 (+1) tokens of ``data/tiny-dsa/heldout.u16`` with the original
model (all F), the training-free uniform and searched patterns, and the two training-aware checkpoints
(``ta-uniform-1ofN``, ``ta-uniform-1ofN-nocross``) that ``--compare`` wrote under OUT, and prints every row's mean
loss and, for each pair, the mean difference with two standard errors: over tokens (assumes independent tokens) and
over per-window means (does not). ``--windows 8`` is the 4,096 tokens the ``--compare`` table itself uses.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_indexcache.pattern import uniform_pattern  # noqa: E402
from vllm_indexcache.tools.data.corpus import load_tokens  # noqa: E402
from vllm_indexcache.tools.distill.export import load_distilled  # noqa: E402
from vllm_indexcache.tools.reference import load_reference  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model", help="the source model of the --compare run")
p.add_argument("out", help="the --compare --out directory (results.json, ta-uniform-*/)")
p.add_argument("--data", default="data/tiny-dsa")
p.add_argument("--windows", type=int, default=8)
p.add_argument("--context", type=int, default=512)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
held = load_tokens(a.data, "heldout")
ctx, n = a.context, a.windows
w = torch.from_numpy(np.stack([held[i * (ctx + 1):(i + 1) * (ctx + 1)] for i in range(n)]).astype(np.int64))


def tok_loss(m):
    out = []
    with torch.no_grad():
        for i in range(0, n, 4):
            x = w[i:i + 4]
            lg = m(input_ids=x[:, :-1], use_cache=False).logits.float()
            out.append(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="none"))
    return torch.cat(out).double()


t0 = time.time()
rows = json.loads(Path(a.out, "results.json").read_text())["rows"]
searched = {r["retention"]: r["pattern"] for r in rows if r["method"] == "training-free searched"}
n_layers = len(rows[0]["pattern"])
orig = tok_loss(load_reference(a.model))
print(f"{n} windows x {ctx} tokens = {len(orig)} tokens; original (all F): {orig.mean():.4f}", flush=True)
for ret in searched:
    freq = int(ret.split("/")[1])
    uni = uniform_pattern(n_layers, freq, 1)      # as --compare: every FREQ-th layer F from layer 0
    tag = f"1of{freq}"
    res = {"tf": tok_loss(load_reference(a.model, pattern=uni)),
           "ts": tok_loss(load_reference(a.model, pattern=searched[ret])),
           "ta": tok_loss(load_distilled(Path(a.out, f"ta-uniform-{tag}"))),
           "nc": tok_loss(load_distilled(Path(a.out, f"ta-uniform-{tag}-nocross")))}
    print(f"{ret}: training-free uniform (tf) {res['tf'].mean():.4f}, training-free searched (ts) "
          f"{res['ts'].mean():.4f}, training-aware uniform (ta) {res['ta'].mean():.4f}, no cross-layer term (nc) "
          f"{res['nc'].mean():.4f}", flush=True)
    for x, y in (("ta", "nc"), ("ta", "tf"), ("nc", "tf"), ("ta", "ts"), ("ts", "tf")):
        d = res[x] - res[y]
        dw = d.view(n, ctx).mean(1)
        print(f"  {ret} {x} - {y}: mean {d.mean():+.5f}  SE over tokens {d.std() / math.sqrt(len(d)):.5f}  "
              f"SE over windows {dw.std() / math.sqrt(n):.5f}", flush=True)
print(f"wall {time.time() - t0:.0f} s", flush=True)

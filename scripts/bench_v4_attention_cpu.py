"""Time the DeepSeek-V4 CPU sparse attention op (``vllm_indexcache.ops.v4_attention.cpu.flash_mla_with_kvcache``)
at a prefill shape over a plain-row cache, against the same op at a git revision (``--ref``), in one process.

Shape (defaults): T query tokens of one sequence, H heads, D = 512, a W-token sliding window (the W previous
tokens) and K compressed entries picked at random among those visible (ratio 4), 1 thread.

    PYTHONPATH=$PWD python scripts/bench_v4_attention_cpu.py --ref 0ba9c9d --tokens 4096
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import time
import types

import torch

from vllm_indexcache.ops.fp8_cache import rows
from vllm_indexcache.ops.v4_attention import cpu as current

PATH = "vllm_indexcache/ops/v4_attention/cpu.py"


def _module_at(rev: str) -> types.ModuleType:
    """The op module as it was at git revision ``rev``."""
    src = subprocess.run(["git", "show", f"{rev}:{PATH}"], check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType(f"v4_attention_cpu_{rev}")
    exec(compile(src, f"{rev}:{PATH}", "exec"), mod.__dict__)
    return mod


def _case(tokens, heads, window, topk, ratio, dtype, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    bs = 64
    n_comp = max(1, tokens // ratio) if spread == 0 else spread
    win = torch.zeros(-(-tokens // bs), bs * 512, dtype=dtype)
    comp = torch.zeros(-(-n_comp // bs), bs * 512, dtype=dtype)
    rows.write_rows(win, torch.arange(tokens), torch.randn(tokens, 512, generator=g), bs)
    rows.write_rows(comp, torch.arange(n_comp), torch.randn(n_comp, 512, generator=g), bs)
    t = torch.arange(tokens)[:, None]
    win_slots = t - torch.arange(window)[None, :]
    win_slots[win_slots < 0] = -1
    visible = (t // ratio) if spread == 0 else torch.full_like(t, n_comp)    # compressed entries each token sees
    pick = (torch.rand(tokens, topk, generator=g) * visible).long()
    comp_slots = torch.where(torch.arange(topk)[None, :] < visible, pick, -1)
    q = (torch.randn(tokens, heads, 512, generator=g) * 0.3).to(dtype)
    sink = torch.randn(heads, generator=g)
    return q, win, win_slots, bs, comp, comp_slots, bs, sink, 512 ** -0.5


def _time(fn, args, repeat):
    out = torch.empty(args[0].shape, dtype=args[0].dtype)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(out, *args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=None, help="git revision of the op to compare with (e.g. 0ba9c9d)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--ratio", type=int, default=4)
    ap.add_argument("--spread", type=int, default=0,
                    help="0: top-k among the token's visible compressed entries; S>0: among S entries for all tokens")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--max-chunk-bytes", type=int, nargs="*", default=[],
                    help="also time the current op with these max_chunk_bytes")
    a = ap.parse_args()
    torch.set_num_threads(1)
    args = _case(a.tokens, a.heads, a.window, a.topk, a.ratio, getattr(torch, a.dtype), a.spread)
    print(f"T={a.tokens} H={a.heads} W={a.window} K={a.topk} ratio={a.ratio} spread={a.spread} {a.dtype}, 1 thread")
    new_s, new_out = _time(current.flash_mla_with_kvcache, args, a.repeat)
    print(f"current   {new_s:8.3f} s")
    for mcb in a.max_chunk_bytes:
        s, _ = _time(functools.partial(current.flash_mla_with_kvcache, max_chunk_bytes=mcb), args, a.repeat)
        print(f"current, max_chunk_bytes={mcb}: {s:8.3f} s")
    if a.ref:
        old_s, old_out = _time(_module_at(a.ref).flash_mla_with_kvcache, args, a.repeat)
        diff = (new_out.float() - old_out.float()).abs().max().item()
        print(f"{a.ref:9s} {old_s:8.3f} s   ratio {old_s / new_s:.1f}x   max |Δout| {diff:.3g}")


if __name__ == "__main__":
    main()

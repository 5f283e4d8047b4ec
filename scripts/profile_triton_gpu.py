#!/usr/bin/env python3
"""Where the Triton fallback's time goes on a CUDA GPU, kernel by kernel, at DeepSeek-V3.2 geometry (issue 18).

    PYTHONUNBUFFERED=1 python3 scripts/profile_triton_gpu.py --out $OUT            # sweep + breakdown
    PYTHONUNBUFFERED=1 python3 scripts/profile_triton_gpu.py --out $OUT --quick    # defaults only

Shapes are those vLLM hands the fallback in ``scripts/bench_vllm_gpu.py`` (indexer 64 heads × 128, top-k 2048;
sparse MLA 128 heads, latent 512 + rope 64; bf16; chunked prefill of 16384 tokens):

1. **Sparse MLA** (``ops/sparse_mla/triton.py``): prefill on 4096 tokens × 2048 slots, decode at batch 1 and 32, for
   each tile/launch configuration of the sweep (and the default); each configuration is first checked against
   ``sparse_mla_naive`` on 4 tokens (max abs error), then timed. TFLOP/s = ``T·N·K·2·(L+R+L)`` / time.
2. **Indexer prefill** (``ops/indexer/triton.py``): one 16384-row chunk at the end of a ``c``-token prompt against
   its ``c`` keys: the scores kernel per configuration on one row chunk (causal TFLOP/s = visible pairs ·
   2·64·128 / time), then the whole ``indexer_topk``, and on the chunk's scores the radix-select top-k
   (``ops/topk/triton.topk_rows``) beside ``torch.topk`` (unordered, ties arbitrary) for scale.
3. **Indexer decode**: ``indexer_topk_decode`` at batch 1 and 32 over ``c``-token requests with the block table of a
   131072 + 256 max-model-len engine (the fixed-shape graph path): the whole call, the scores kernel, the radix
   top-k, and ``torch.topk`` over the full fixed-width row (the previous top-k) for scale.

4. **Top-k sweep** (``--parts topk``): ``topk_rows`` per ``block`` × ``num_warps`` (and segment rule) on the
   prefill chunk shapes (``[rows of 1 GiB, c]`` causal) and the decode rows (batch 1 and 32 × 131,328, graphs).

Prefill times are CUDA-event medians of ``--repeats`` after two warm-ups; decode shapes (sparse MLA at ≤ 32 tokens,
the decode indexer) are replayed from a CUDA graph as vLLM runs them (mean of 20 replays, median of ``--repeats``),
so that host launch cost does not count. Writes ``profile_triton.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vllm_indexcache.ops.indexer import triton as ti  # noqa: E402
from vllm_indexcache.ops.sparse_mla import triton as tm  # noqa: E402
from vllm_indexcache.ops.sparse_mla.naive import sparse_mla_naive  # noqa: E402
from vllm_indexcache.ops.topk.triton import topk_rows  # noqa: E402

H_I, D_I, TOPK = 64, 128, 2048
N, L, R = 128, 512, 64
CHUNK = 16384
MAX_LEN = 131072 + 256
BF = torch.bfloat16

MLA_SWEEP = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
             for bn, bk, nw, ns in [(16, 32, 4, 2), (16, 32, 4, 3), (32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 2),
                                    (64, 32, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2), (64, 64, 16, 2),
                                    (128, 32, 16, 2), (128, 64, 16, 2), (128, 64, 8, 2), (32, 16, 4, 2)]]
#: split-K counts tried for the decode shapes (``None`` = the shape rule of ``sparse_mla``)
MLA_SPLITS = [None, 1, 4, 8, 16]
SCORE_SWEEP = [dict(block_t=bt, block_s=bs, num_warps=nw, num_stages=ns)
               for bt, bs, nw, ns in [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                                      (128, 128, 8, 3), (128, 128, 8, 2), (256, 64, 8, 3)]]


def timed(fn, repeats: int, *args, **kwargs) -> float:
    """Median seconds of ``fn(*args, **kwargs)`` (CUDA events), two warm-ups."""
    fn = functools.partial(fn, *args, **kwargs)
    for _ in range(2):
        fn()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def timed_graph(fn, repeats: int, *args, **kwargs) -> float:
    """Median seconds of one ``fn(*args, **kwargs)`` replayed from a CUDA graph (as vLLM's decode runs it: no
    host launch cost), 20 replays per sample."""
    fn = functools.partial(fn, *args, **kwargs)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / 20)
    return statistics.median(ts)


def mla(repeats: int, sweep: list[dict]) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    slots_n = 65536
    kv = torch.randn(slots_n, L + R, device="cuda", generator=g).to(BF)
    rows = []
    for T in (4096, 32, 1):
        ql = torch.randn(T, N, L, device="cuda", generator=g).to(BF)
        qp = torch.randn(T, N, R, device="cuda", generator=g).to(BF)
        sl = torch.randint(0, slots_n, (T, TOPK), device="cuda", generator=g, dtype=torch.int32)
        ref = sparse_mla_naive(ql[:4].float(), qp[:4].float(), kv.float(), sl[:4], 192 ** -0.5)
        cfgs = [dict(tm.SMALL_BATCH_CONFIG if T <= tm.SMALL_BATCH_TOKENS else tm.DEFAULT_CONFIG)] + sweep
        if T <= 32:  # decode: CUDA-graph replay, and the split-K count as a further knob
            cfgs = [{**c, "splits": n} for c in cfgs for n in (MLA_SPLITS if sweep else [None])]
        for cfg in cfgs:
            try:
                got = tm.sparse_mla(ql[:4], qp[:4], kv, sl[:4], 192 ** -0.5, **cfg).float()
                err = (got - ref).abs().max().item()
                t = (timed_graph if T <= 32 else timed)(tm.sparse_mla, repeats, ql, qp, kv, sl, 192 ** -0.5, **cfg)
            except Exception as e:  # a configuration the compiler refuses (shared memory, registers)
                rows.append({"op": "sparse_mla", "tokens": T, **cfg, "error": str(e).splitlines()[0][:200]})
                print(rows[-1], flush=True)
                continue
            tflops = T * N * TOPK * 2 * (L + R + L) / t / 1e12
            rows.append({"op": "sparse_mla", "tokens": T, **cfg, "ms": t * 1e3, "tflops": tflops, "max_err": err})
            print(rows[-1], flush=True)
    return rows


def indexer_prefill(c: int, repeats: int, sweep: list[dict]) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(1)
    T = min(CHUNK, c)
    q = torch.randn(T, H_I, D_I, device="cuda", generator=g).to(BF)
    k = torch.randn(c, D_I, device="cuda", generator=g).to(BF)
    w = torch.randn(T, H_I, device="cuda", generator=g) * (H_I * D_I) ** -0.5
    pos = torch.arange(c - T, c, device="cuda")
    pairs = float(pos.add(1).sum())
    rows = []
    rows_per_chunk = max(1, min(T, (1 << 30) // (4 * c)))       # indexer_topk's row chunk (1 GiB of scores)
    sub = q[:rows_per_chunk]
    for cfg in [dict(ti.PREFILL_CONFIG)] + sweep:
        try:
            t = timed(ti._prefill_scores_chunk, repeats, sub, k, w[:rows_per_chunk], pos[:rows_per_chunk], c,
                      **cfg)
        except Exception as e:
            rows.append({"op": "scores_kernel", "context": c, **cfg, "error": str(e).splitlines()[0][:200]})
            print(rows[-1], flush=True)
            continue
        vis = float((pos[:rows_per_chunk] + 1).sum())
        rows.append({"op": "scores_kernel", "context": c, "rows": rows_per_chunk, **cfg, "ms": t * 1e3,
                     "causal_tflops": vis * 2 * H_I * D_I / t / 1e12,
                     "dense_tflops": rows_per_chunk * c * 2 * H_I * D_I / t / 1e12})
        print(rows[-1], flush=True)
    t_all = timed(ti.indexer_topk, repeats, q, k, w, pos, TOPK)
    sc = ti._prefill_scores_chunk(sub, k, w[:rows_per_chunk], pos[:rows_per_chunk], c)
    t_topk = timed(topk_rows, repeats, sc, pos[:rows_per_chunk], TOPK, len_offset=1)
    t_raw = timed(torch.topk, repeats, sc, TOPK, dim=1, sorted=False)
    rows.append({"op": "indexer_topk", "context": c, "rows": T, "ms": t_all * 1e3,
                 "causal_tflops": pairs * 2 * H_I * D_I / t_all / 1e12,
                 "chunk_rows": rows_per_chunk, "chunk_radix_topk_ms": t_topk * 1e3,
                 "chunk_torch_topk_ms": t_raw * 1e3})
    print(rows[-1], flush=True)
    return rows


def indexer_decode(c: int, repeats: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(2)
    bs = 64
    rows = []
    for B in (1, 32):
        max_blocks = MAX_LEN // bs
        used = -(-c // bs)
        kc = torch.randn(B * used * bs, D_I, device="cuda", generator=g).to(BF)
        bt = torch.zeros(B, max_blocks, dtype=torch.int32, device="cuda")
        bt[:, :used] = torch.arange(B * used, device="cuda", dtype=torch.int32).view(B, used)
        lens = torch.full((B,), c, device="cuda")
        q = torch.randn(B, H_I, D_I, device="cuda", generator=g).to(BF)
        w = torch.randn(B, H_I, device="cuda", generator=g)
        S = max_blocks * bs
        t_all = timed_graph(ti.indexer_topk_decode, repeats, q, kc, w, bt, lens, bs, TOPK, max_len=S)
        t_sc = timed_graph(ti._decode_launch, repeats, q, kc, w, bt, lens, bs, S)
        scores = ti._decode_launch(q, kc, w, bt, lens, bs, S)
        t_tk = timed_graph(topk_rows, repeats, scores, lens, TOPK)
        t_raw = timed_graph(torch.topk, repeats, scores, TOPK, dim=1, sorted=False)
        rows.append({"op": "indexer_topk_decode", "context": c, "batch": B, "scored": S, "ms": t_all * 1e3,
                     "scores_ms": t_sc * 1e3, "radix_topk_ms": t_tk * 1e3, "torch_topk_full_row_ms": t_raw * 1e3})
        print(rows[-1], flush=True)
    return rows


TOPK_SWEEP = [dict(block=b, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8, 16)]


def topk_sweep(c: int, repeats: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(3)
    rows = []
    R = max(1, min(CHUNK, (1 << 30) // (4 * c)))
    pre = torch.randn(R, c, device="cuda", generator=g)
    pos = torch.arange(c - R, c, device="cuda")
    ref = topk_rows(pre, pos, TOPK, len_offset=1)
    for cfg in TOPK_SWEEP:
        try:
            same = bool(torch.equal(topk_rows(pre, pos, TOPK, len_offset=1, **cfg), ref))
            t = timed(topk_rows, repeats, pre, pos, TOPK, len_offset=1, **cfg)
        except Exception as e:
            rows.append({"op": "topk_prefill", "context": c, **cfg, "error": str(e).splitlines()[0][:200]})
            continue
        rows.append({"op": "topk_prefill", "context": c, "rows": R, **cfg, "ms": t * 1e3, "same": same,
                     "GB_per_s_one_pass": float((pos + 1).sum()) * 4 / t / 1e9})
        print(rows[-1], flush=True)
    del pre
    for B in (1, 32):
        dec = torch.randn(B, MAX_LEN, device="cuda", generator=g)
        lens = torch.full((B,), c, device="cuda")
        for cfg in TOPK_SWEEP:
            try:
                t = timed_graph(topk_rows, repeats, dec, lens, TOPK, **cfg)
            except Exception as e:
                rows.append({"op": "topk_decode", "context": c, "batch": B, **cfg,
                             "error": str(e).splitlines()[0][:200]})
                continue
            rows.append({"op": "topk_decode", "context": c, "batch": B, **cfg, "ms": t * 1e3})
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="default configurations only (no sweep)")
    ap.add_argument("--parts", default="mla,prefill,decode")
    a = ap.parse_args()
    import triton
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(info, flush=True)
    parts = a.parts.split(",")
    rows = []
    out = Path(a.out) / "profile_triton.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(new: list[dict]) -> None:  # after each part, so a run cut short keeps what it measured
        rows.extend(new)
        out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))

    if "mla" in parts:
        save(mla(a.repeats, [] if a.quick else MLA_SWEEP))
    for c in (int(x) for x in a.contexts.split(",")):
        if "prefill" in parts:
            save(indexer_prefill(c, a.repeats, [] if a.quick else SCORE_SWEEP))
        if "decode" in parts:
            save(indexer_decode(c, a.repeats))
        if "topk" in parts:
            save(topk_sweep(c, a.repeats))
    summary(rows)
    return 0


def summary(rows: list[dict]) -> None:
    """Print the fastest configuration per shape (the defaults of the kernels are set from these)."""
    keys = ("block_n", "block_k", "num_warps", "num_stages", "splits", "block_t", "block_s", "block", "batch")
    groups: dict = {}
    for r in rows:
        if "ms" in r and r["op"] in ("sparse_mla", "scores_kernel", "topk_prefill", "topk_decode"):
            groups.setdefault((r["op"], r.get("tokens", r.get("context")), r.get("batch")), []).append(r)
    for (op, size, _), rs in groups.items():
        best = min(rs, key=lambda r: r["ms"])
        print(f"BEST {op} {size}: {best['ms']:.4f} ms (default {rs[0]['ms']:.4f}) "
              f"{ {k: best[k] for k in keys if k in best} }", flush=True)
    for r in rows:
        if r["op"] == "indexer_topk_decode":
            print("DECODE", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Check the Triton kernels against the naive references on a CUDA GPU, then time them at DeepSeek-V3.2 geometry.

    PYTHONUNBUFFERED=1 python3 scripts/bench_triton_gpu.py --contexts 8192,32768,65536,131072 --out $OUT

Geometry (DeepSeek-V3.2, ``docs/../shared/notes/dsa-facts.md``): indexer 64 heads × 128, top-k 2048; sparse MLA 128
heads, latent 512 + rope 64; bf16 inputs, fp32 accumulation.

1. **Checks** (small shapes, bf16 and fp32): indexer scores and top-k (prefill, several key chunks), paged decode
   top-k, sparse MLA, each against ``ops/*/naive.py``.
2. **Matrix rate**: ``torch.matmul`` bf16 8192³ (10 timed after 3 warm-ups), the reference for the indexer's
   achieved TFLOP/s.
3. **Per layer, per context c** (median of ``--repeats`` after one warm-up, CUDA-synchronised wall time):
   indexer prefill (``indexer_topk`` over c queries × c keys, causal, top-k 2048: scores kernel + chunked top-k);
   its scores kernel alone on 4096 rows × c keys (dense FLOPs ``2·rows·c·64·128``); sparse MLA prefill (per-token
   cost measured on ``min(c, 16384)`` tokens × 2048 slots and scaled by c: its cost per token does not depend on c
   once c ≥ 2048); decode step for a batch of 8 requests of c tokens (paged indexer top-k + sparse MLA).
4. **Stack** of 61 layers (DeepSeek-V3.2's count): attention-path prefill time = 61·MLA + n_F·indexer, decode step
   likewise, for all-F (61 F), 1/2 (31 F) and 1/4 (16 F). This composes the measured per-layer kernel times; the
   rest of the model (projections, MoE, norms) is not run, so the ratios are those of the attention path only.

Writes ``bench_triton_gpu.json`` to ``--out`` and prints the table last.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vllm_indexcache.ops.indexer import triton as ti  # noqa: E402
from vllm_indexcache.ops.indexer.cpu import indexer_topk as indexer_topk_vec  # noqa: E402
from vllm_indexcache.ops.indexer.naive import indexer_scores_naive  # noqa: E402
from vllm_indexcache.ops.sparse_mla import triton as tm  # noqa: E402
from vllm_indexcache.ops.sparse_mla.naive import sparse_mla_naive  # noqa: E402
from vllm_indexcache.ops.topk.naive import to_ascending  # noqa: E402

H_I, D_I, TOPK = 64, 128, 2048
N, L, R = 128, 512, 64
LAYERS = 61
PATTERNS = {"all-F": 61, "1/2": 31, "1/4": 16}
DEV = os.environ.get("BENCH_DEVICE", "cuda")   # "cpu" (with TRITON_INTERPRET=1) for a dry run of the checks


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def checks() -> dict:
    out = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        name = str(dtype).split(".")[-1]
        T, S, topk = 192, 1000, 128
        q = torch.randn(T, H_I, D_I, device=DEV, generator=g).to(dtype)
        k = torch.randn(S, D_I, device=DEV, generator=g).to(dtype)
        w = torch.randn(T, H_I, device=DEV, generator=g) * (H_I * D_I) ** -0.5
        pos = torch.sort(torch.randperm(S, device=DEV, generator=g)[:T]).values
        ref_s = indexer_scores_naive(q, k, w, pos)
        got_s = ti.indexer_scores(q, k, w, pos)
        fin = torch.isfinite(ref_s)
        err = (got_s[fin] - ref_s[fin]).abs().max().item() / ref_s[fin].abs().max().item()
        got = ti.indexer_topk(q, k, w, pos, topk, max_chunk_bytes=4 * 64 * S)     # row chunks of 64
        ref = to_ascending(indexer_topk_vec(q, k, w, pos, topk))
        sel_ok = bool(torch.equal(got < 0, ref < 0)) and all(
            torch.allclose(got_s[t, got[t][got[t] >= 0].long()].sort().values,
                           got_s[t, ref[t][ref[t] >= 0].long()].sort().values, rtol=1e-3, atol=1e-3)
            for t in range(T))
        out[f"indexer_prefill_{name}"] = {"scores_rel_err": err, "topk_same_scores": sel_ok,
                                          "topk_identical_frac": (got == ref).float().mean().item(),
                                          "pass": err < tol and sel_ok}
        # paged decode
        bs, lens = 64, [100, 900, 2500]
        nb = sum(-(-n // bs) for n in lens)
        kc = torch.randn(nb * bs, D_I, device=DEV, generator=g).to(dtype)
        perm = torch.randperm(nb, device=DEV, generator=g)
        bt = torch.zeros(len(lens), max(-(-n // bs) for n in lens), dtype=torch.int32, device=DEV)
        used = 0
        for b, n in enumerate(lens):
            m = -(-n // bs)
            bt[b, :m] = perm[used:used + m].int()
            used += m
        qd = torch.randn(len(lens), H_I, D_I, device=DEV, generator=g).to(dtype)
        wd = torch.randn(len(lens), H_I, device=DEV, generator=g)
        got = ti.indexer_topk_decode(qd, kc, wd, bt, torch.tensor(lens, device=DEV), bs, topk)
        ok = True
        for b, n in enumerate(lens):
            p = torch.arange(n, device=DEV)
            keys = kc[bt[b, p // bs].long() * bs + p % bs]
            sc = ti.indexer_scores(qd[b:b + 1], keys, wd[b:b + 1], torch.tensor([n - 1], device=DEV))
            ref = indexer_topk_vec(qd[b:b + 1], keys, wd[b:b + 1], torch.tensor([n - 1], device=DEV), topk)
            ok &= bool(torch.equal(got[b] < 0, ref[0] < 0)) and torch.allclose(
                sc[0, got[b][got[b] >= 0].long()].sort().values, sc[0, ref[0][ref[0] >= 0].long()].sort().values,
                rtol=1e-3, atol=1e-3)
        out[f"indexer_decode_{name}"] = {"pass": ok}
        # sparse MLA
        T, K, slots_n = 48, 512, 4000
        ql = torch.randn(T, N, L, device=DEV, generator=g).to(dtype)
        qp = torch.randn(T, N, R, device=DEV, generator=g).to(dtype)
        kv = torch.randn(slots_n, L + R, device=DEV, generator=g).to(dtype)
        sl = torch.randint(0, slots_n, (T, K), device=DEV, generator=g)
        sl[1, 5:] = -1
        sl[2] = -1
        scale = (192 ** -0.5)
        ref = sparse_mla_naive(ql, qp, kv, sl, scale).float()
        got = tm.sparse_mla(ql, qp, kv, sl, scale).float()
        err = (got - ref).abs().max().item()
        out[f"sparse_mla_{name}"] = {"max_abs_err": err, "pass": err < tol}
    return out


def matmul_rate(n: int = 8192) -> float:
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, repeats=10, warm=3)
    return 2 * n ** 3 / t / 1e12


def per_layer(c: int, repeats: int) -> dict:
    bf = torch.bfloat16
    res = {"context": c}
    q = torch.randn(c, H_I, D_I, device=DEV, dtype=bf)
    k = torch.randn(c, D_I, device=DEV, dtype=bf)
    w = torch.randn(c, H_I, device=DEV) * (H_I * D_I) ** -0.5
    pos = torch.arange(c, device=DEV)
    res["indexer_prefill_s"] = timed(lambda: ti.indexer_topk(q, k, w, pos, TOPK), repeats)
    res["indexer_prefill_causal_tflops"] = 2 * H_I * D_I * c * (c + 1) / 2 / res["indexer_prefill_s"] / 1e12
    rows = min(4096, c)
    full = torch.full((rows,), c - 1, device=DEV, dtype=torch.int64)
    wr = w[:rows].contiguous()
    t_sc = timed(lambda: ti._prefill_scores_chunk(q[:rows], k, wr, full, c), repeats)
    res["scores_kernel_tflops"] = 2 * rows * c * H_I * D_I / t_sc / 1e12
    q = k = w = None  # free the GPU memory before the sparse MLA part
    # sparse MLA prefill: per-token cost on min(c, 16384) tokens
    tm_tokens = min(c, 16384)
    ql = torch.randn(tm_tokens, N, L, device=DEV, dtype=bf)
    qp = torch.randn(tm_tokens, N, R, device=DEV, dtype=bf)
    kv = torch.randn(c, L + R, device=DEV, dtype=bf)
    sl = torch.randint(0, c, (tm_tokens, TOPK), device=DEV, dtype=torch.int32)
    t_m = timed(lambda: tm.sparse_mla(ql, qp, kv, sl, 192 ** -0.5), repeats)
    res["mla_prefill_s"] = t_m * c / tm_tokens
    res["mla_tflops"] = tm_tokens * N * TOPK * 2 * (L + R + L) / t_m / 1e12
    ql = qp = sl = None
    # decode step, batch 8, paged (block 64)
    B, bs = 8, 64
    nbk = -(-c // bs)
    kc = torch.randn(B * nbk * bs, D_I, device=DEV, dtype=bf)
    bt = torch.arange(B * nbk, device=DEV, dtype=torch.int32).view(B, nbk)
    lens = torch.full((B,), c, device=DEV)
    qd = torch.randn(B, H_I, D_I, device=DEV, dtype=bf)
    wd = torch.randn(B, H_I, device=DEV)
    res["indexer_decode_s"] = timed(lambda: ti.indexer_topk_decode(qd, kc, wd, bt, lens, bs, TOPK), repeats)
    kvd = torch.randn(B * c, L + R, device=DEV, dtype=bf)
    sld = torch.randint(0, B * c, (B, TOPK), device=DEV, dtype=torch.int32)
    qld = torch.randn(B, N, L, device=DEV, dtype=bf)
    qpd = torch.randn(B, N, R, device=DEV, dtype=bf)
    res["mla_decode_s"] = timed(lambda: tm.sparse_mla(qld, qpd, kvd, sld, 192 ** -0.5), repeats)
    for name, nf in PATTERNS.items():
        res[f"prefill_{name}_s"] = LAYERS * res["mla_prefill_s"] + nf * res["indexer_prefill_s"]
        res[f"decode_{name}_ms"] = 1e3 * (LAYERS * res["mla_decode_s"] + nf * res["indexer_decode_s"])
    res["indexer_share_prefill"] = 61 * res["indexer_prefill_s"] / res["prefill_all-F_s"]
    res["indexer_share_decode"] = 61 * res["indexer_decode_s"] / (res["decode_all-F_ms"] / 1e3)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8192,32768,65536,131072")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip further contexts after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--checks-only", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    info = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__}
    import triton
    info["triton"] = triton.__version__
    print(info, flush=True)
    chk = checks()
    for k_, v in chk.items():
        print("check", k_, v, flush=True)
    if args.checks_only:
        return 0 if all(v["pass"] for v in chk.values()) else 1
    rate = matmul_rate()
    print(f"bf16 matmul 8192^3: {rate:.0f} TFLOP/s", flush=True)
    rows = []
    for c in [int(x) for x in args.contexts.split(",")]:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skip context {c}: budget {args.budget_s}s spent", flush=True)
            break
        r = per_layer(c, args.repeats)
        rows.append(r)
        print({k_: round(v, 5) if isinstance(v, float) else v for k_, v in r.items()}, flush=True)
        torch.cuda.empty_cache()
    result = {"info": info, "checks": chk, "matmul_bf16_tflops": rate, "rows": rows,
              "wall_s": time.perf_counter() - t0, "command": " ".join(sys.argv)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_triton_gpu.json").write_text(json.dumps(result, indent=1))
    print(f"\nchecks all pass: {all(v['pass'] for v in chk.values())}; bf16 matmul {rate:.0f} TFLOP/s; "
          f"stack {LAYERS} layers, attention path only (MLA + indexer)")
    print("| ctx | idx prefill s/layer | idx causal TFLOP/s | scores kernel TFLOP/s (% matmul) | MLA prefill s/layer "
          "| share prefill | prefill all-F s | 1/2 × | 1/4 × | decode all-F ms (b8) | 1/2 × | 1/4 × | share decode |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pf, dc = r["prefill_all-F_s"], r["decode_all-F_ms"]
        print(f"| {r['context']} | {r['indexer_prefill_s']:.3f} | {r['indexer_prefill_causal_tflops']:.0f} | "
              f"{r['scores_kernel_tflops']:.0f} ({100 * r['scores_kernel_tflops'] / rate:.0f} %) | "
              f"{r['mla_prefill_s']:.3f} | {r['indexer_share_prefill']:.2f} | {pf:.2f} | "
              f"{pf / r['prefill_1/2_s']:.2f} | {pf / r['prefill_1/4_s']:.2f} | {dc:.2f} | "
              f"{dc / r['decode_1/2_ms']:.2f} | {dc / r['decode_1/4_ms']:.2f} | {r['indexer_share_decode']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared memory per program of the Triton fallback kernels, compiled for a GPU target on any machine (no GPU needed).

Compiles, with Triton's own compiler (``triton.compile`` for ``GPUTarget("cuda", ARCH, 32)``; ptxas ships with
Triton), the sparse MLA kernel (``ops/sparse_mla/triton.py``) with the tile that ``launch_config`` picks for a prefill
batch and for a small (decode) batch, and the indexer's prefill and decode scores kernels (``ops/indexer/triton.py``,
their default tiles), at DeepSeek-V3.2 geometry (latent 512 + rope 64; indexer 64 heads × 128) for fp32, bf16 and
fp16 inputs, and prints each one's ``metadata.shared`` beside the limit of one program (Hopper, sm_90: 232,448 B).
``--also-bf16-tile`` adds the bf16 prefill tile compiled for fp32 inputs (the tile that raised ``OutOfResources:
shared memory, Required: 312320, Hardware limit: 232448`` in the search scorer on an H100; issue 34).

Usage: ``PYTHONPATH=. python scripts/check_triton_smem.py [--arch 90] [--limit 232448] [--also-bf16-tile]``
(a dozen compiles, 10–60 s each on a loaded 2-core CPU). Exit status 1 when a chosen tile exceeds ``--limit``.
Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import sys

L, R, IDX_H, IDX_D, PAGE = 512, 64, 64, 128, 64
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature, **dict.fromkeys(constexprs, "constexpr"))
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return int(kernel.metadata.shared)


def sparse_mla_shared(dt: str, cfg: dict, arch: int) -> int:
    from vllm_indexcache.ops.sparse_mla import triton as sm

    e = f"*{dt}"
    names = ["ql_ptr", "qp_ptr", "kv_ptr", "slot_ptr", "out_ptr", "part_ptr", "lse_ptr", "N", "K", "K_PER_SPLIT",
             "qk_scale", "stride_qlt", "stride_qln", "stride_qpt", "stride_qpn", "stride_kv", "stride_st",
             "stride_ot", "stride_on"]
    types = [e, e, e, "*i32", e, "*fp32", "*fp32", "i32", "i32", "i32", "fp32"] + ["i32"] * 8
    consts = dict(L=L, R=R, BLOCK_L=L, BLOCK_R=R, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], SPLIT=False,
                  PREC="ieee" if dt == "fp32" else "tf32", UPCAST=False)
    return _compile(sm._sparse_mla_kernel, dict(zip(names, types)), consts, cfg["num_warps"], cfg["num_stages"], arch)


def indexer_prefill_shared(dt: str, arch: int) -> int:
    from vllm_indexcache.ops.indexer import triton as ix

    e = f"*{dt}"
    cfg = ix.PREFILL_CONFIG
    names = ["q_ptr", "k_ptr", "w_ptr", "pos_ptr", "out_ptr", "T", "S", "H", "stride_qt", "stride_qh", "stride_ks",
             "stride_wt", "stride_ot"]
    types = [e, e, "*fp32", "*i64", "*fp32"] + ["i32"] * 8
    consts = dict(D=IDX_D, BLOCK_D=IDX_D, BLOCK_T=cfg["block_t"], BLOCK_S=cfg["block_s"],
                  PREC="ieee" if dt == "fp32" else "tf32", UPCAST=False)
    return _compile(ix._prefill_scores_kernel, dict(zip(names, types)), consts, cfg["num_warps"], cfg["num_stages"],
                    arch)


def indexer_decode_shared(dt: str, arch: int) -> int:
    from vllm_indexcache.ops.indexer import triton as ix

    e = f"*{dt}"
    names = ["q_ptr", "kc_ptr", "w_ptr", "bt_ptr", "seqlen_ptr", "out_ptr", "H", "S_max", "stride_qt", "stride_qh",
             "stride_kb", "stride_ko", "stride_wt", "stride_bt", "stride_ot"]
    types = [e, e, "*fp32", "*i32", "*i32", "*fp32"] + ["i32"] * 9
    consts = dict(D=IDX_D, BLOCK_D=IDX_D, BLOCK_H=IDX_H, BLOCK_S=128, PAGE=PAGE,
                  PREC="ieee" if dt == "fp32" else "tf32", UPCAST=False)
    return _compile(ix._decode_scores_kernel, dict(zip(names, types)), consts, 4, 3, arch)  # Triton's defaults


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: Hopper)")
    ap.add_argument("--limit", type=int, default=232448, help="shared memory one program may use (bytes)")
    ap.add_argument("--also-bf16-tile", action="store_true", help="also the bf16 prefill tile on fp32 inputs")
    args = ap.parse_args()
    from vllm_indexcache.ops.sparse_mla import triton as sm

    rows = []
    for dt, nbytes in DTYPES.items():
        for label, tokens in (("prefill", 64), ("decode", 1)):
            cfg = sm.launch_config(tokens, nbytes)
            tile = f"{cfg['block_n']}x{cfg['block_k']} w{cfg['num_warps']} s{cfg['num_stages']}"
            rows.append((f"sparse_mla {label}", dt, tile, sparse_mla_shared(dt, cfg, args.arch), True))
        rows.append(("indexer prefill scores", dt, "default", indexer_prefill_shared(dt, args.arch), True))
        rows.append(("indexer decode scores", dt, "default", indexer_decode_shared(dt, args.arch), True))
    if args.also_bf16_tile:
        cfg = sm.DEFAULT_CONFIG
        tile = f"{cfg['block_n']}x{cfg['block_k']} w{cfg['num_warps']} s{cfg['num_stages']} (bf16 tile)"
        rows.append(("sparse_mla prefill", "fp32", tile, sparse_mla_shared("fp32", cfg, args.arch), False))
    print(f"sm_{args.arch}, limit {args.limit} B per program; V3.2 geometry (MLA {L}+{R}, indexer {IDX_H}x{IDX_D})")
    print(f"{'kernel':24s} {'dtype':5s} {'tile':34s} {'shared B':>9s}  fits")
    bad = 0
    for name, dt, tile, shared, chosen in rows:
        fits = shared <= args.limit
        bad += chosen and not fits
        print(f"{name:24s} {dt:5s} {tile:34s} {shared:9d}  {'yes' if fits else 'NO'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

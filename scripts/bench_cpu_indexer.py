#!/usr/bin/env python3
"""CPU lightning indexer against the machine's compute-bound GEMM rate (issue 18, part 1).

    PYTHONPATH=. python scripts/bench_cpu_indexer.py --out runs/bench-cpu-indexer [--threads 1] [--quick]

Prints, in one run on the machine at hand: the CPU's vector extensions (torch's capability and /proc/cpuinfo flags),
the torch threads, a square torch GEMM rate in fp32 (2048³) and bf16 (512³ first; 2048³ only if bf16 is at least
half as fast as fp32), and for the toy indexer geometry (examples/models/tiny-dsa/config.json) and DeepSeek-V3.2's
(64 heads × 128, top-k 2048), at 4K and 16K tokens:

- **prefill**: queries = the prompt's tokens (causal), keys = the prompt, through
  :func:`vllm_indexcache.ops.indexer.cpu_blockwise.indexer_topk_blockwise` (new) and
  :func:`vllm_indexcache.ops.indexer.cpu.indexer_topk` (old; now kept as the vectorised oracle);
- **decode**: ``--decode-batch`` requests of one query each against S keys in a bf16 paged cache (block size 128,
  consecutive blocks), through :func:`vllm_indexcache.ops.indexer.paged_cpu.paged_indexer_step_cpu` (new) and the
  previous driver (gather each request's keys through the block table, then ``cpu.indexer_topk``; reproduced here).

Score FLOPs are counted as ``2 · H · D`` per (query, visible key) pair: ``2·H·D·Σ_t (pos_t + 1)`` for a causal
prefill, ``2·H·D·S`` per decode query (ReLU and the head-weighted sum not counted). Achieved FLOP/s = those FLOPs /
the indexer's wall time; ratio = achieved / the faster GEMM rate; top-k share = 1 − scoring time / indexer time, the
scoring time measured by a score-only pass over the new path's own query and key blocks (:func:`_score_seconds`:
GEMM, ReLU, head-weighted sum, causal mask; selection = everything after the ``[C, n]`` scores exist). ``--quick``
runs only the last ``--quick-queries`` query tokens of a prompt (the most expensive ones) and runs the old path on
at most ``--old-queries`` of them, for prefills whose causal score FLOPs exceed ``--quick-gflop`` (300 GFLOP: only
DeepSeek-V3.2's 16K); the table says which rows ran.
Writes ``OUT/bench_cpu_indexer.md`` and ``OUT/bench_cpu_indexer.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from vllm_indexcache.ops.indexer import cpu as old_cpu
from vllm_indexcache.ops.indexer.cpu_blockwise import block_shape, indexer_topk_blockwise, paged_key_segments
from vllm_indexcache.ops.indexer.paged_cpu import paged_indexer_step_cpu

REPO = Path(__file__).resolve().parents[1]
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


def cpu_info() -> dict:
    """CPU model, vector-extension flags of /proc/cpuinfo (those in ``VECTOR_FLAGS``), torch's capability, threads."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu_model": model, "logical_cpus": os.cpu_count(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "vector_flags": [f for f in VECTOR_FLAGS if f in flags], "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "loadavg": list(os.getloadavg())}


def _best(fn, reps: int) -> float:
    """Minimum wall seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_rate(dtype: torch.dtype, n: int, reps: int = 3) -> float:
    """GFLOP/s of a square ``n³`` torch.mm in ``dtype`` (best of ``reps``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / _best(lambda: torch.mm(a, b), reps) / 1e9


def _inputs(T: int, S: int, H: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g).bfloat16()
    k = torch.randn(S, D, generator=g).bfloat16()
    w = torch.randn(T, H, generator=g) * (H * D) ** -0.5
    return q, k, w, torch.arange(S - T, S)


def bench_prefill(H: int, D: int, topk: int, S: int, rows: int, old_rows: int) -> dict:
    """Last ``rows`` query tokens of an S-token prompt (causal) against its S keys; old path on the last
    ``old_rows`` (0 = not run)."""
    q, k, w, pos = _inputs(rows, S, H, D)
    flops = 2 * H * D * int((pos + 1).sum())
    t0 = time.perf_counter()
    new = indexer_topk_blockwise(q, k, w, pos, topk)
    t_new = time.perf_counter() - t0
    score_s = _score_seconds(q, w, pos, lambda max_keys: ((s0, k[s0:s0 + max_keys]) for s0 in range(0, S, max_keys)))
    res = {"kind": "prefill", "H": H, "D": D, "topk": topk, "S": S, "queries": rows, "new_s": t_new,
           "score_gflops": flops / t_new / 1e9, "topk_share": max(0.0, 1.0 - score_s / t_new)}
    if old_rows:
        sl = slice(rows - old_rows, rows)
        t0 = time.perf_counter()
        ref = old_cpu.indexer_topk(q[sl], k, w[sl], pos[sl], topk)
        t_old = time.perf_counter() - t0
        if old_rows == rows:
            again, t_new_sub = new, t_new
        else:
            t0 = time.perf_counter()
            again = indexer_topk_blockwise(q[sl], k, w[sl], pos[sl], topk)
            t_new_sub = time.perf_counter() - t0
        res.update(old_queries=old_rows, old_s=t_old, new_s_same_rows=t_new_sub, speedup=t_old / t_new_sub,
                   identical=bool(torch.equal(again, ref) and torch.equal(new[sl], ref)))
    return res


def _score_seconds(q: torch.Tensor, w: torch.Tensor, pos: torch.Tensor, segments) -> float:
    """Wall seconds of the fused blockwise indexer's scoring alone, over its own query and key blocks
    (:func:`~vllm_indexcache.ops.indexer.cpu_blockwise.block_shape`): per block one float32 GEMM, ReLU, the
    head-weighted sum and the causal mask of :func:`~vllm_indexcache.ops.indexer.cpu_blockwise.indexer_topk_segments`,
    no selection. ``segments(max_keys)`` yields ``(s0, keys [n, D])`` in ascending position."""
    T, H, D = q.shape
    C, max_keys = block_shape(T, H)
    t0 = time.perf_counter()
    for a in range(0, T, C):
        b = min(T, a + C)
        rows = b - a
        qf = q[a:b].float().reshape(rows * H, D)
        wf = w[a:b].float().reshape(rows, 1, H)
        p = pos[a:b].long()
        pmin, pmax = int(p.min()), int(p.max())
        for s0, keys in segments(max_keys):
            if s0 > pmax:
                break
            n = min(keys.shape[0], pmax + 1 - s0)
            logits = torch.mm(qf, keys[:n].float().T)
            logits.relu_()
            sc = torch.bmm(wf, logits.view(rows, H, n)).view(rows, n)
            if s0 + n - 1 > pmin:
                sc.masked_fill_(torch.arange(s0, s0 + n)[None, :] > p[:, None], float("-inf"))
    return time.perf_counter() - t0


def _old_paged_step(q, k, weights, cache, slot_mapping, block_table, qsl, seq_lens, positions, block_size, topk,
                    out, num_tokens) -> None:
    """The previous ``paged_indexer_step_cpu`` (gather every request's keys, then ``cpu.indexer_topk``)."""
    slots = slot_mapping[:num_tokens].long()
    valid = slots >= 0
    cache[slots[valid]] = k[:num_tokens][valid].to(cache.dtype)
    out[:num_tokens] = -1
    for r in range(len(qsl) - 1):
        start, end = qsl[r], qsl[r + 1]
        if end == start:
            continue
        p = torch.arange(seq_lens[r])
        key_slots = block_table[r, p // block_size].long() * block_size + p % block_size
        out[start:end] = old_cpu.indexer_topk(q[start:end], cache[key_slots], weights[start:end], positions[start:end],
                                              topk)


def bench_decode(H: int, D: int, topk: int, S: int, batch: int, block_size: int = 128, reps: int = 3) -> dict:
    """One decode step of ``batch`` requests, each one query at position S-1 against S keys of a bf16 paged cache."""
    nb = -(-S // block_size)
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(batch * nb * block_size, D, generator=g).bfloat16()
    block_table = torch.arange(batch * nb, dtype=torch.int32).view(batch, nb)
    q = torch.randn(batch, H, D, generator=g).bfloat16()
    w = torch.randn(batch, H, generator=g) * (H * D) ** -0.5
    k_new = cache.view(batch, nb * block_size, D)[:, S - 1].clone()
    slots = block_table[:, (S - 1) // block_size].long() * block_size + (S - 1) % block_size
    qsl, seq_lens, positions = list(range(batch + 1)), [S] * batch, torch.full((batch,), S - 1)
    args = (q, k_new, w, cache, slots, block_table, qsl, seq_lens, positions, block_size, topk)
    out_new, out_old = torch.empty(batch, topk, dtype=torch.int32), torch.empty(batch, topk, dtype=torch.int32)
    t_new = _best(lambda: paged_indexer_step_cpu(*args, out_new, batch), reps)
    score_s = 0.0
    for r in range(batch):
        ids = block_table[r].tolist()
        score_s += _score_seconds(q[r:r + 1], w[r:r + 1], positions[r:r + 1],
                                  lambda mk, ids=ids: paged_key_segments(cache, ids, S, block_size, mk))
    sel_share = max(0.0, 1.0 - score_s / t_new)
    t_old = _best(lambda: _old_paged_step(*args, out_old, batch), reps)
    flops = 2 * H * D * S * batch
    return {"kind": "decode", "H": H, "D": D, "topk": topk, "S": S, "queries": batch, "new_s": t_new,
            "score_gflops": flops / t_new / 1e9, "topk_share": sel_share, "old_s": t_old, "speedup": t_old / t_new,
            "old_queries": batch, "identical": bool(torch.equal(out_new, out_old))}


def toy_geometry() -> tuple[int, int, int]:
    cfg = json.loads((REPO / "examples/models/tiny-dsa/config.json").read_text())
    return cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]


def markdown(info: dict, gemm: dict, rows: list[dict], notes: list[str]) -> str:
    ref = max(gemm["fp32_gflops"], gemm["bf16_gflops"])
    lines = [f"CPU: {info['cpu_model']}, {info['logical_cpus']} logical CPUs; torch capability "
             f"{info['torch_capability']}; flags: {' '.join(info['vector_flags'])}; torch threads "
             f"{info['torch_threads']}; load average at start {' / '.join(f'{x:.2f}' for x in info['loadavg'])}",
             "",
             f"GEMM (torch.mm, square): fp32 {gemm['fp32_n']}³ {gemm['fp32_gflops']:.1f} GFLOP/s; "
             f"bf16 {gemm['bf16_n']}³ {gemm['bf16_gflops']:.2f} GFLOP/s; reference = the faster, {ref:.1f} GFLOP/s", "",
             "| geometry | case | S | query rows run | new s | score GFLOP/s | ratio to GEMM | top-k share | old rows "
             "| old s | new s (same rows) | speed-up | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        old = (f"{r['old_queries']} | {r['old_s']:.3f} | {r.get('new_s_same_rows', r['new_s']):.3f} | "
               f"{r['speedup']:.2f}× | {r['identical']}") if "old_s" in r else "– | – | – | – | –"
        lines.append(f"| {r['H']}×{r['D']}, top-k {r['topk']} | {r['kind']} | {r['S']} | {r['queries']} | "
                     f"{r['new_s']:.3f} | {r['score_gflops']:.1f} | {r['score_gflops'] / ref:.2f} | "
                     f"{r['topk_share']:.2f} | {old} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--quick", action="store_true",
                   help="limit the query rows of prefills above --quick-gflop score GFLOPs (see --quick-queries)")
    p.add_argument("--quick-gflop", type=float, default=300.0)
    p.add_argument("--quick-queries", type=int, default=1024)
    p.add_argument("--old-queries", type=int, default=512, help="old-path query rows per prefill with --quick")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    info = cpu_info()
    print(json.dumps(info), flush=True)
    gemm = {"fp32_n": 2048, "fp32_gflops": gemm_rate(torch.float32, 2048)}
    bf16 = gemm_rate(torch.bfloat16, 512, reps=1)
    gemm.update(bf16_n=512, bf16_gflops=bf16)
    if bf16 >= 0.5 * gemm["fp32_gflops"]:
        gemm.update(bf16_n=2048, bf16_gflops=gemm_rate(torch.bfloat16, 2048))
    print(json.dumps(gemm), flush=True)
    th, td, tk = toy_geometry()
    geoms = [(th, td, tk), (64, 128, 2048)]
    notes = [f"toy geometry from examples/models/tiny-dsa/config.json: {th} heads × {td}, top-k {tk}; "
             "DeepSeek-V3.2: 64 heads × 128, top-k 2048",
             "score FLOPs = 2·H·D per (query, visible key); prefill causal, queries = the prompt's last rows run",
             "decode: one query per request at position S-1, bf16 paged cache, block size 128, consecutive blocks"]
    rows = []
    for H, D, topk in geoms:
        for S in (int(c) for c in a.contexts.split(",")):
            big = 2 * H * D * S * (S + 1) / 2 > a.quick_gflop * 1e9
            n = min(S, a.quick_queries) if a.quick and big else S
            n_old = min(n, a.old_queries) if a.quick and big else n
            if n < S:
                notes.append(f"{H}×{D} prefill S={S}: --quick ran the last {n} of {S} query tokens "
                             f"(old path: last {n_old})")
            r = bench_prefill(H, D, topk, S, n, n_old)
            print(json.dumps(r), flush=True)
            rows.append(r)
            r = bench_decode(H, D, topk, S, a.decode_batch)
            print(json.dumps(r), flush=True)
            rows.append(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(info, gemm, rows, notes)
    (out / "bench_cpu_indexer.md").write_text(md)
    (out / "bench_cpu_indexer.json").write_text(json.dumps({"machine": info, "gemm": gemm, "rows": rows,
                                                            "notes": notes, "args": vars(a)}, indent=1))
    print(md)


if __name__ == "__main__":
    main()

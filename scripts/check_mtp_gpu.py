"""MTP speculative decoding with the INDEXCACHE plugin on one GPU (H100 or H200, vLLM 0.26 CUDA): token identity and
acceptance rate. The CPU counterpart is ``tests/engine/test_mtp.py`` (vLLM 0.32's CPU runner runs MTP).

Builds a 4-layer ``DeepseekV32ForCausalLM`` with DeepSeek-V3.2's attention geometry (hidden 1024, 16 MLA heads,
q/kv LoRA 512, nope 128 + rope 64, v 128; indexer 64 heads × 128, ``index_topk`` 2048; layer 0 dense, layers 1-3
a small MoE) and one MTP layer (``build_toy_model(mtp_layers=1)``, the layout of vLLM's
``model_executor/models/deepseek_mtp.py`` loader), bf16, random weights, on the GPU; then for each pattern (all-F
and ``FSFS``) runs two engines, each in a fresh process: without speculation, and with
``speculative_config={"method": "mtp", "num_speculative_tokens": N}``; both ``attention_backend="indexcache"``
(``VLLM_INDEXCACHE_KERNELS`` as set, default ``auto``: vLLM's native FlashMLA-sparse / DeepGEMM kernels at this
geometry), ``enforce_eager=True``, ``disable_log_stats=False``, greedy, ``ignore_eos``. Prompts of 300, 3000 and
6000 tokens: the last two select 2048 of their keys (sparse). Reported per pattern: whether the greedy tokens are
identical (they should be: the target verifies every draft token; bf16 can flip a near-tie through the different
batch shapes of verification, so the first differing position is reported too), the acceptance rate
``vllm:spec_decode_num_accepted_tokens / vllm:spec_decode_num_draft_tokens`` from ``LLM.get_metrics()``, and, from
the worker, which layers of the target and of the MTP drafter hold an indexer and which skip it (``skip_topk``):
the MTP layer must run its own indexer, never reuse the target's top-k (ROCm/ATOM #1362 saw acceptance collapse
when a draft did). The MTP layer is an "echo" of the next-token embedding over a near-bigram backbone
(``vllm_indexcache.tools.toy.make_mtp_echo``: on CPU float32 0.79 all-F / 0.68 FSFS were accepted); its attention
output is zeroed there, so the rate checks the target side of a pattern, not the quality of the draft's own
selection (a random model cannot tell a right selection from a wrong one).

Usage (vLLM 0.26 importable, this repo installed as a plugin):
``python scripts/check_mtp_gpu.py --out /tmp/out/check_mtp_gpu.json``. Prints one JSON object and writes it to
``--out``. A failing engine is recorded with its log tail instead of aborting the run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

PATTERNS = ("FFFF", "FSFS")
LENGTHS = (300, 3000, 6000)
MAX_MODEL_LEN = 8192
VOCAB = 512


def build_model(path: str, topk: int) -> None:
    """DeepSeek-V3.2 attention geometry, 4 layers (layer 0 dense, 1-3 a small MoE: the MTP layer copies layer 3 and
    vLLM builds it as MoE), one MTP layer made an echo, bf16, on the GPU."""
    import torch

    from vllm_indexcache.tools.toy import build_toy_model, make_mtp_echo

    build_toy_model(path, "DeepseekV32ForCausalLM", num_layers=4, first_k_dense_replace=1, seed=0, tokenizer=False,
                    device="cuda" if torch.cuda.is_available() else "cpu", dtype="bfloat16", mtp_layers=1,
                    hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256, num_attention_heads=16,
                    num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=topk,
                    max_position_embeddings=2 * MAX_MODEL_LEN, vocab_size=VOCAB)
    make_mtp_echo(path)  # drafts sometimes accepted (the accepted-token path runs)


def _indexer_layers(worker) -> dict:
    """Worker side (``collective_rpc``): per model (target, MTP drafter) the layers with an attention that has
    ``skip_topk``: ``{index: "F" | "S" | "-"}`` ("-": no indexer built)."""
    import re

    res = {}
    runner = worker.model_runner
    models = {"target": runner.model, "drafter": getattr(getattr(runner, "drafter", None), "model", None)}
    for key, model in models.items():
        if model is None:
            continue
        layers = {}
        for name, module in model.named_modules():
            m = re.search(r"layers\.(\d+)\.", name + ".")
            if m is None or not hasattr(module, "indexer"):
                continue
            state = "-" if module.indexer is None else ("S" if getattr(module, "skip_topk", False) else "F")
            layers.setdefault(int(m.group(1)), state)
        res[key] = {str(i): layers[i] for i in sorted(layers)}
    return res


def worker(model: str, pattern: str, num_spec: int, max_tokens: int, out_json: str) -> None:
    """One engine (``num_spec`` 0: no speculation): greedy tokens per prompt and the spec-decode counters."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs = dict(model=model, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.4,
                  max_model_len=MAX_MODEL_LEN, attention_backend="indexcache", disable_log_stats=False, seed=0,
                  hf_overrides={"index_topk_pattern": pattern})
    if num_spec:
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_spec}
    llm = LLM(**kwargs)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    info = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "generate_s": time.perf_counter() - t0,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        info["indexer_layers"] = llm.collective_rpc(_indexer_layers)
    except Exception as e:  # noqa: BLE001
        info["indexer_layers"] = f"not read ({type(e).__name__}: {e})"
    metrics = llm.get_metrics()
    for name in ("vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_drafts"):
        info[name] = sum(getattr(m, "value", 0) for m in metrics if m.name == name)
    with open(out_json, "w") as f:
        json.dump(info, f)


def _spawn(args, model: str, pattern: str, num_spec: int, tmp: str) -> dict:
    out_json = os.path.join(tmp, f"{pattern}-{num_spec}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model-dir", model, "--pattern", pattern,
           "--num-spec", str(num_spec), "--max-tokens", str(args.max_tokens), "--out-json", out_json]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not os.path.exists(out_json):
        return {"error": f"rc={proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-4000:]}
    with open(out_json) as f:
        info = json.load(f)
    info["indexcache_log"] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "IndexCache" in ln][:6]
    return info


def _first_difference(a: list[list[int]], b: list[list[int]]):
    for i, (x, y) in enumerate(zip(a, b)):
        for j, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return {"prompt": i, "position": j}
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="check_mtp_gpu.json", help="JSON result file")
    ap.add_argument("--num-spec", type=int, default=2, help="num_speculative_tokens")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--index-topk", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--pattern", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.model_dir, args.pattern, args.num_spec, args.max_tokens, args.out_json)
        return 0
    result: dict = {"num_speculative_tokens": args.num_spec, "prompt_lengths": LENGTHS, "index_topk": args.index_topk}
    try:
        import vllm
        result["vllm"] = vllm.__version__
    except Exception as e:  # noqa: BLE001
        result["vllm"] = f"not importable ({e})"
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "toy-mtp")
        build_model(model, args.index_topk)
        for pattern in PATTERNS:
            plain = _spawn(args, model, pattern, 0, tmp)
            spec = _spawn(args, model, pattern, args.num_spec, tmp)
            row = {"plain": plain, "spec": spec}
            if "tokens" in plain and "tokens" in spec:
                drafted = spec["vllm:spec_decode_num_draft_tokens"]
                row["tokens_identical"] = plain["tokens"] == spec["tokens"]
                row["first_difference"] = _first_difference(plain["tokens"], spec["tokens"])
                row["acceptance_rate"] = spec["vllm:spec_decode_num_accepted_tokens"] / drafted if drafted else None
            result[pattern] = row
            print(pattern, {k: row.get(k) for k in ("tokens_identical", "first_difference", "acceptance_rate")},
                  "indexers:", spec.get("indexer_layers"), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({p: {k: result[p].get(k) for k in ("tokens_identical", "acceptance_rate")}
                      for p in PATTERNS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

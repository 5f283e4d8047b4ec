"""MTP speculative decoding with the INDEXCACHE plugin on one GPU (H200, vLLM 0.26 CUDA): token identity and
acceptance rate. The CPU counterpart is ``tests/engine/test_mtp.py`` (vLLM 0.32's CPU runner runs MTP).

Builds a 4-layer ``DeepseekV32ForCausalLM`` toy with one MTP layer (``build_toy_model(mtp_layers=1)``,
the layout of vLLM's ``model_executor/models/deepseek_mtp.py`` loader; bf16, ``index_topk`` 64 so that prompts of a
few hundred tokens are really sparse), then for each pattern (all-F and ``FSFS``) runs two engines, each in a fresh
process: without speculation, and with ``speculative_config={"method": "mtp", "num_speculative_tokens": N}``;
both ``attention_backend="indexcache"``, ``enforce_eager=True``, ``disable_log_stats=False``, greedy,
``ignore_eos``. Reported per pattern: whether the greedy tokens are identical (they should be: the target verifies
every draft token; bf16 can flip a near-tie through the different batch shapes of verification, so the first
differing position is reported too), and the acceptance rate ``vllm:spec_decode_num_accepted_tokens /
vllm:spec_decode_num_draft_tokens`` from ``LLM.get_metrics()`` (the toy's MTP layer is an "echo" of the next-token
embedding over a near-bigram backbone, ``vllm_indexcache.tools.toy.make_mtp_echo``: on CPU float32 0.79 all-F / 0.68
FSFS were accepted).

Usage (vLLM 0.26 importable, this repo installed as a plugin):
``python scripts/check_mtp_h200.py --out /tmp/out/check_mtp_h200.json``. Prints one JSON object and writes it to
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
LENGTHS = (40, 300, 700)
VOCAB = 512


def build_model(path: str, topk: int) -> None:
    from vllm_indexcache.tools.toy import build_toy_model, make_mtp_echo

    build_toy_model(path, "DeepseekV32ForCausalLM", num_layers=4, seed=0, tokenizer=False, dtype="bfloat16",
                    index_topk=topk, mtp_layers=1)
    make_mtp_echo(path)  # drafts sometimes accepted (the accepted-token path runs)


def worker(model: str, pattern: str, num_spec: int, max_tokens: int, out_json: str) -> None:
    """One engine (``num_spec`` 0: no speculation): greedy tokens per prompt and the spec-decode counters."""
    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs = dict(model=model, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.4,
                  max_model_len=2048, attention_backend="indexcache", disable_log_stats=False, seed=0,
                  hf_overrides={"index_topk_pattern": pattern})
    if num_spec:
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_spec}
    llm = LLM(**kwargs)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    info = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "generate_s": time.perf_counter() - t0}
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
    ap.add_argument("--out", default="check_mtp_h200.json", help="JSON result file")
    ap.add_argument("--num-spec", type=int, default=2, help="num_speculative_tokens")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--index-topk", type=int, default=64)
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
                  flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({p: {k: result[p].get(k) for k in ("tokens_identical", "acceptance_rate")}
                      for p in PATTERNS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

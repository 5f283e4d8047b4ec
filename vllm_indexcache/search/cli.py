"""``vllm-indexcache search MODEL --data FILE --retain 1/4 --out PATH``: greedy IndexCache layer search.

Runs Algorithm 1 (:mod:`.algorithm`) with a scorer (:mod:`.scorers`) on a fixed calibration set (:mod:`.state`) and
writes:

* ``PATH`` (JSON): model and calibration identity, baseline (all-F) loss, every committed step (flipped layers,
  pattern, loss, every candidate's loss), the pattern at every retention level passed (1, 1/2, 1/4, … down to
  ``--retain``), evaluation count and wall time;
* ``PATH`` with suffix ``.png``: loss against step, retention levels marked;
* ``PATH.state.json``: the resumable state, rewritten atomically after every committed step (kept after success:
  rerunning with ``--resume`` and a lower ``--retain`` extends the same trajectory).

A state file already present is never overwritten: without ``--resume`` the command stops; with ``--resume`` a
state of another model, calibration set, objective, engine or block count — or a corrupt one — is refused with a
one-line error (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vllm_indexcache.search import algorithm as alg
from vllm_indexcache.search.state import (STATE_VERSION, StateError, calibration_identity, load_calibration,
                                          load_state, model_identity, write_atomic)
from vllm_indexcache.search.scorers import ENGINES, OBJECTIVES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local DSA model directory")
    parser.add_argument("--data", required=True, help="calibration data: .u16 tokens, .json/.jsonl, or text")
    parser.add_argument("--retain", default="1/4", help="target fraction of F layers (default 1/4)")
    parser.add_argument("--out", required=True, help="output JSON path (PNG and state file next to it)")
    parser.add_argument("--engine", choices=ENGINES, default="hf")
    parser.add_argument("--objective", choices=OBJECTIVES, default="lm-loss")
    parser.add_argument("--pp-blocks", type=int, default=1, help="pipeline blocks: first layer of each stays F, "
                        "one flip per block per step")
    parser.add_argument("--resume", action="store_true", help="continue from PATH.state.json")
    parser.add_argument("--seq-len", type=int, default=2048, help="calibration window length (tokens)")
    parser.add_argument("--num-seqs", type=int, default=8, help="calibration windows")
    parser.add_argument("--start", type=int, default=0, help="first token of the windows (token files)")
    parser.add_argument("--device", default=None, help="hf engine: torch device (default cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm engine")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1, help="vllm engine")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="vllm engine: KV cache size (needed on CPU, e.g. 268435456)")
    parser.add_argument("--no-progress", action="store_true")


def state_path(out) -> Path:
    return Path(str(out) + ".state.json")


def make_scorer(args, seqs):
    """Build the scorer of ``args.engine`` (imports torch/vLLM only here)."""
    if args.engine == "hf":
        import torch

        from vllm_indexcache.search.scorers import HFScorer

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return HFScorer(args.model, seqs, args.objective, device=device, dtype=args.dtype)
    from vllm_indexcache.search.scorers import VLLMScorer

    extra = {}
    if args.kv_cache_memory_bytes is not None:
        extra["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    return VLLMScorer(args.model, seqs, args.objective, dtype=args.dtype,
                      tensor_parallel_size=args.tensor_parallel_size,
                      pipeline_parallel_size=args.pipeline_parallel_size, **extra)


def plot(result: dict, png) -> None:
    """Loss against step (step 0 = all F), retention levels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [0] + [s["step"] for s in result["steps"]]
    ys = [result["baseline_loss"]] + [s["loss"] for s in result["steps"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o", ms=3)
    for level, entry in result["levels"].items():
        if level != "1":
            ax.axvline(entry["step"], color="grey", ls=":", lw=1)
            ax.annotate(f"{level} ({entry['num_f']} F)", (entry["step"], entry["loss"]), fontsize=8,
                        textcoords="offset points", xytext=(3, 6))
    ax.set_xlabel("step (committed flips)")
    ax.set_ylabel(f"{result['objective']} on calibration set")
    ax.set_title(f"IndexCache greedy search: {Path(result['model']['path']).name}, {result['num_layers']} layers, "
                 f"engine {result['engine']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run(args, scorer_factory=make_scorer, fail_after_steps: int | None = None) -> dict:
    """The search command without argument parsing; returns the result dict (also written).

    ``fail_after_steps`` (tests): raise ``RuntimeError`` right after that many steps of this run were committed and
    saved, to simulate a killed search.

    Raises:
        StateError: bad calibration data, state present without ``--resume``, or a mismatched/corrupt state.
        ValueError: bad ``--retain`` / ``--pp-blocks``.
    """
    t0 = time.time()
    retention = alg.parse_retention(args.retain)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spath = state_path(out)
    model_id = model_identity(args.model)
    num_layers = int(model_id["num_layers"])
    seqs = load_calibration(args.data, args.model, seq_len=args.seq_len, num_seqs=args.num_seqs, start=args.start)
    calib = calibration_identity(seqs, args.data)
    blocks = alg.pp_blocks(num_layers, args.pp_blocks)
    target_f = alg.target_f_count(num_layers, retention, args.pp_blocks)
    header = {"version": STATE_VERSION, "model": model_id, "calibration": calib, "objective": args.objective,
              "engine": args.engine, "pp_blocks": args.pp_blocks, "num_layers": num_layers}
    state = None
    if spath.exists():
        if not args.resume:
            raise StateError(f"state {spath} exists: pass --resume to continue it, or delete it to start over")
        state = load_state(spath, header)        # raises on mismatch/corruption, before anything is written
    steps = [alg.Step.from_json(s) for s in state["steps"]] if state else []
    evals_done = int(state.get("evaluations", 0)) if state else 0

    scorer = scorer_factory(args, seqs)
    try:
        if scorer.num_layers != num_layers:
            raise StateError(f"MODEL: scorer sees {scorer.num_layers} layers, config.json says {num_layers}")
        total = alg.total_evaluations(num_layers, target_f, blocks) + 1
        bar = None
        if not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="eval", desc="search", dynamic_ncols=True)
        done_before = _evals_until(num_layers, steps, blocks) + (1 if state else 0)
        if bar is not None:
            bar.update(min(done_before, total))
        counter = {"n": 0}

        def on_eval():
            counter["n"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{pattern_now['p'].count('F')} F")

        pattern_now = {"p": steps[-1].pattern if steps else "F" * num_layers}
        if state is None:
            baseline = float(scorer("F" * num_layers))
            on_eval()
            state = dict(header, baseline_loss=baseline, steps=[], evaluations=counter["n"])
            write_atomic(spath, state)
        baseline = float(state["baseline_loss"])
        committed_this_run = {"n": 0}

        def on_step(step: alg.Step):
            pattern_now["p"] = step.pattern
            state["steps"].append(step.to_json())
            state["evaluations"] = evals_done + counter["n"]
            write_atomic(spath, state)
            committed_this_run["n"] += 1
            if bar is not None:
                bar.write(f"step {step.step}: flipped {step.flipped} -> {step.pattern.count('F')} F, "
                          f"loss {step.loss:.6f}")
            if fail_after_steps is not None and committed_this_run["n"] >= fail_after_steps:
                raise RuntimeError(f"simulated kill after {committed_this_run['n']} steps")

        steps = alg.greedy_search(num_layers, target_f, scorer, num_blocks=args.pp_blocks, steps=steps,
                                  on_step=on_step, on_eval=on_eval)
        # a state searched further than --retain: report the trajectory up to this target only
        steps = [s for s in steps if s.pattern.count("F") >= target_f]
        if bar is not None:
            bar.close()
    finally:
        scorer.close()
    result = dict(header, retain=str(retention), target_f=target_f, blocks=blocks, baseline_loss=baseline,
                  index_topk=getattr(scorer, "index_topk", None),
                  steps=[s.to_json() for s in steps],
                  levels=alg.retention_levels(num_layers, steps, baseline, retention, args.pp_blocks),
                  final_pattern=steps[-1].pattern if steps else "F" * num_layers,
                  evaluations=int(state.get("evaluations", 0)), wall_s_this_run=round(time.time() - t0, 1))
    if scorer_seq_short(result, seqs):
        result["warning"] = (f"every calibration sequence has <= index_topk={result['index_topk']} tokens: all "
                             "layers attend densely, so every pattern scores the same; use longer sequences")
    write_atomic(out, result)
    plot(result, out.with_suffix(".png"))
    return result


def scorer_seq_short(result: dict, seqs) -> bool:
    k = result.get("index_topk")
    return k is not None and max(len(s) for s in seqs) <= k


def _evals_until(num_layers: int, steps: list, blocks) -> int:
    """Scorer calls the committed ``steps`` took (for the progress bar of a resumed search)."""
    return sum(len(s.candidates) + (1 if len(s.flipped) > 1 else 0) for s in steps)


def main(args: argparse.Namespace) -> int:
    try:
        result = run(args)
    except (StateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"final_pattern": result["final_pattern"], "levels": {k: v["pattern"] for k, v in
                                                                          result["levels"].items()},
                      "baseline_loss": result["baseline_loss"], "final_loss": result["steps"][-1]["loss"]
                      if result["steps"] else result["baseline_loss"], "out": str(args.out)}, indent=1))
    return 0

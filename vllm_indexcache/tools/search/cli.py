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

from vllm_indexcache.tools.search import algorithm as alg
from vllm_indexcache.tools.search.objectives import OBJECTIVES, ObjectiveOptions
from vllm_indexcache.tools.search.scorers import ENGINES
from vllm_indexcache.tools.search.state import (
    STATE_VERSION,
    StateError,
    calibration_file,
    calibration_identity,
    load_calibration,
    load_state,
    model_identity,
    write_atomic,
)

#: The objective ``vllm-indexcache search`` uses unless told otherwise (the winner of docs/search.md's comparison).
DEFAULT_OBJECTIVE = "retrieval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local DSA model directory")
    parser.add_argument("--data", required=True, help="calibration data: a corpus directory (its train.u16), "
                        ".u16 tokens, .json/.jsonl, or text")
    parser.add_argument("--retain", default="1/4", help="target fraction of F layers (default 1/4)")
    parser.add_argument("--out", required=True, help="output JSON path (PNG and state file next to it)")
    parser.add_argument("--engine", choices=ENGINES, default="hf")
    parser.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                        help=f"what a flip costs (default {DEFAULT_OBJECTIVE}; docs/search.md compares them)")
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
    d = ObjectiveOptions()
    g = parser.add_argument_group("objective options")
    g.add_argument("--long-margin", type=float, default=d.long_margin, help="long-lm: key-token margin (nats)")
    g.add_argument("--key-fraction", type=float, default=d.key_fraction,
                   help="long-lm: share of calibration tokens taken as key tokens")
    g.add_argument("--local-window", type=int, default=d.local_window,
                   help="long-lm: short-context window (default: the model's index_topk)")
    g.add_argument("--long-weight", type=float, default=d.long_weight, help="long-lm: weight of key tokens")
    g.add_argument("--retrieval-docs", type=int, default=d.retrieval_docs, help="retrieval: needle documents")
    g.add_argument("--retrieval-needles", type=int, default=d.retrieval_needles, help="retrieval: needles each")
    g.add_argument("--retrieval-weight", type=float, default=d.retrieval_weight,
                   help="retrieval: weight of the answer tokens")
    g.add_argument("--retrieval-seed", type=int, default=d.retrieval_seed, help="retrieval: document seed")
    g = parser.add_argument_group("retrieval gate")
    g.add_argument("--probe", choices=["retrieval", "none"], default="retrieval",
                   help="probe each retention level's pattern with needle documents from the calibration text")
    g.add_argument("--probe-docs", type=int, default=20, help="probe documents (one question each)")
    g.add_argument("--probe-seed", type=int, default=7)
    g.add_argument("--gate-margin", type=float, default=0.05,
                   help="warn when a level's probe accuracy is more than this below all-F's")
    parser.add_argument("--no-progress", action="store_true")


def state_path(out) -> Path:
    return Path(str(out) + ".state.json")


def options_from_args(args) -> ObjectiveOptions:
    """The :class:`ObjectiveOptions` of parsed arguments (defaults for those a caller's namespace lacks)."""
    d = ObjectiveOptions()
    return ObjectiveOptions(**{k: getattr(args, k, getattr(d, k)) for k in d.__dataclass_fields__})


#: The engine options :func:`search` passes to :func:`make_scorer` (the CLI's flags of the same names).
ENGINE_OPTIONS = ("device", "dtype", "tensor_parallel_size", "pipeline_parallel_size", "kv_cache_memory_bytes")


def make_scorer(model, seqs, *, engine: str, objective: str, options: ObjectiveOptions, device: str | None = None,
                dtype: str = "float32", tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                kv_cache_memory_bytes: int | None = None):
    """Build the scorer of ``engine`` (imports torch/vLLM only here); ``device`` is the hf engine's (default cuda
    if available), the parallel sizes and ``kv_cache_memory_bytes`` the vllm engine's."""
    if engine == "hf":
        import torch

        from vllm_indexcache.tools.search.scorers import HFScorer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return HFScorer(model, seqs, objective, device=device, dtype=dtype, options=options)
    from vllm_indexcache.tools.search.scorers import VLLMScorer

    extra = {} if kv_cache_memory_bytes is None else {"kv_cache_memory_bytes": kv_cache_memory_bytes}
    return VLLMScorer(model, seqs, objective, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                      pipeline_parallel_size=pipeline_parallel_size, options=options, **extra)


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


def run_gate(scorer, seqs, levels: dict, *, docs: int = 20, seed: int = 7, margin: float = 0.05,
             echo=print) -> dict:
    """The retrieval gate: probe accuracy of all-F and of each level's pattern; one warning line per level that
    loses more than ``margin`` (absolute accuracy) against all-F. Skipped (with the reason) when all-F itself
    answers fewer than half the probe questions.

    Returns ``{"probe": {...}, "all_f": acc, "levels": {level: {"pattern", "accuracy", "loss_vs_all_f", "ok"}},
    "skipped": reason or None}``.
    """
    from vllm_indexcache.tools.search.objectives import PROBE_NEEDLES, ObjectiveError, model_encoder, probe_documents

    n = scorer.num_layers
    try:
        probe = probe_documents(seqs, model_encoder(scorer.model_dir), docs=docs, seed=seed)
    except (ObjectiveError, OSError, ValueError) as e:   # no tokenizer, or windows too short for needles
        reason = f"no retrieval probe: {str(e).splitlines()[0]}"
        echo(f"retrieval gate: {reason}")
        return {"probe": None, "all_f": None, "levels": {}, "skipped": reason}
    out = {"probe": {"documents": docs, "seed": seed, "length": int(len(probe[0].ids)),
                     "needles": PROBE_NEEDLES,
                     "vocabulary": "calibration"}, "margin": margin, "levels": {}, "skipped": None}
    base = scorer.probe("F" * n, probe)
    out["all_f"] = base
    if base < 0.5:
        out["skipped"] = (f"all-F answers {base:.0%} of the retrieval probe (< 50 %): the model does not retrieve "
                          "at this length, so the gate cannot judge patterns")
        echo(f"retrieval gate: {out['skipped']}")
        return out
    for level, entry in levels.items():
        if level == "1":
            continue
        acc = scorer.probe(entry["pattern"], probe)
        ok = base - acc <= margin
        out["levels"][level] = {"pattern": entry["pattern"], "accuracy": acc, "loss_vs_all_f": base - acc, "ok": ok}
        entry["probe_accuracy"] = acc
        echo(f"retrieval gate: {level} {entry['pattern']} answers {acc:.0%} of {docs} probe questions "
             f"(all-F {base:.0%})")
        if not ok:
            print(f"warning: retention {level} pattern {entry['pattern']} loses retrieval: {acc:.0%} of the probe vs "
                  f"{base:.0%} all-F (more than --gate-margin {margin:g}); try --objective retrieval",
                  file=sys.stderr)
    return out


def search(model, data, out, *, retain: str = "1/4", engine: str = "hf", objective: str = DEFAULT_OBJECTIVE,
           options: ObjectiveOptions | None = None, pp_blocks: int = 1, resume: bool = False, seq_len: int = 2048,
           num_seqs: int = 8, start: int = 0, scorer_factory=None, probe: str = "retrieval", probe_docs: int = 20,
           probe_seed: int = 7, gate_margin: float = 0.05, progress: bool = True, on_step=None,
           engine_options: dict | None = None) -> dict:
    """Greedy IndexCache layer search (Algorithm 1) of ``model`` on calibration ``data``; writes ``out`` (JSON),
    its PNG and ``out.state.json``, and returns the result dict.

    Args:
        model: DSA model directory.
        data: calibration data (see :func:`.state.load_calibration`).
        out: output JSON path.
        retain: target retention (``"1/4"``).
        engine: ``"hf"`` or ``"vllm"`` (ignored with ``scorer_factory``).
        objective: one of :data:`.objectives.OBJECTIVES`; ``options`` its knobs.
        pp_blocks: pipeline blocks (each block's first layer stays F).
        resume: continue from ``out.state.json`` (refused when it belongs to another search).
        seq_len, num_seqs, start: calibration windows.
        scorer_factory: ``(seqs) → scorer`` (default: :func:`make_scorer` of ``engine`` with ``engine_options``,
            keys of :data:`ENGINE_OPTIONS`).
        probe, probe_docs, probe_seed, gate_margin: the retrieval gate (:func:`run_gate`; ``probe="none"`` skips).
        on_step: called with each committed :class:`.algorithm.Step` after its state is written.

    Raises:
        StateError: bad calibration data, state present without ``resume``, or a mismatched/corrupt state.
        ValueError: bad ``retain`` / ``pp_blocks`` / objective options (:class:`.objectives.ObjectiveError`).
    """
    t0 = time.time()
    options = options or ObjectiveOptions()
    options.check(objective)
    retention = alg.parse_retention(retain)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spath = state_path(out)
    model_id = model_identity(model)
    num_layers = int(model_id["num_layers"])
    data = calibration_file(data)
    seqs = load_calibration(data, model, seq_len=seq_len, num_seqs=num_seqs, start=start)
    calib = calibration_identity(seqs, data)
    blocks = alg.pp_blocks(num_layers, pp_blocks)
    target_f = alg.target_f_count(num_layers, retention, pp_blocks)
    header = {"version": STATE_VERSION, "model": model_id, "calibration": calib, "objective": objective,
              "objective_options": options.for_objective(objective), "engine": engine, "pp_blocks": pp_blocks,
              "num_layers": num_layers}
    state = None
    if spath.exists():
        if not resume:
            raise StateError(f"state {spath} exists: pass --resume to continue it, or delete it to start over")
        state = load_state(spath, header)        # raises on mismatch/corruption, before anything is written
    steps = [alg.Step.from_json(s) for s in state["steps"]] if state else []
    evals_done = int(state.get("evaluations", 0)) if state else 0

    if scorer_factory is None:
        scorer = make_scorer(model, seqs, engine=engine, objective=objective, options=options,
                             **(engine_options or {}))
    else:
        scorer = scorer_factory(seqs)
    try:
        if scorer.num_layers != num_layers:
            raise StateError(f"MODEL: scorer sees {scorer.num_layers} layers, config.json says {num_layers}")
        total = alg.total_evaluations(num_layers, target_f, blocks) + 1
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="eval", desc=f"search ({objective})", dynamic_ncols=True)
        done_before = _evals_until(num_layers, steps, blocks) + (1 if state else 0)
        if bar is not None:
            bar.update(min(done_before, total))
        counter = {"n": 0}
        pattern_now = {"p": steps[-1].pattern if steps else "F" * num_layers}

        def on_eval():
            counter["n"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{pattern_now['p'].count('F')} F")

        if state is None:
            baseline = float(scorer("F" * num_layers))
            on_eval()
            state = dict(header, baseline_loss=baseline, steps=[], evaluations=counter["n"])
            write_atomic(spath, state)
        baseline = float(state["baseline_loss"])
        echo = bar.write if bar is not None else (lambda _msg: None)

        def committed(step: alg.Step):
            pattern_now["p"] = step.pattern
            state["steps"].append(step.to_json())
            state["evaluations"] = evals_done + counter["n"]
            write_atomic(spath, state)
            echo(f"step {step.step}: flipped {step.flipped} -> {step.pattern.count('F')} F, loss {step.loss:.6f}")
            if on_step is not None:
                on_step(step)

        t_search = time.time()
        steps = alg.greedy_search(num_layers, target_f, scorer, num_blocks=pp_blocks, steps=steps,
                                  on_step=committed, on_eval=on_eval)
        search_s = time.time() - t_search
        # a state searched further than --retain: report the trajectory up to this target only
        steps = [s for s in steps if s.pattern.count("F") >= target_f]
        if bar is not None:
            bar.close()
        levels = alg.retention_levels(num_layers, steps, baseline, retention, pp_blocks)
        gate = None
        if probe == "retrieval":
            gate = run_gate(scorer, seqs, levels, docs=probe_docs, seed=probe_seed, margin=gate_margin,
                            echo=print if progress else (lambda _msg: None))
        tokens_per_eval = scorer.tokens_per_evaluation
    finally:
        scorer.close()
    result = dict(header, retain=str(retention), target_f=target_f, blocks=blocks, baseline_loss=baseline,
                  index_topk=getattr(scorer, "index_topk", None),
                  steps=[s.to_json() for s in steps], levels=levels,
                  final_pattern=steps[-1].pattern if steps else "F" * num_layers,
                  evaluations=int(state.get("evaluations", 0)), tokens_per_evaluation=tokens_per_eval,
                  objective_parts=dict(scorer.targets.parts) if getattr(scorer, "targets", None) else None,
                  gate=gate, wall_s_this_run=round(time.time() - t0, 1),
                  search_s_this_run=round(search_s, 1))
    if scorer_seq_short(result, seqs):
        result["warning"] = (f"every calibration sequence has <= index_topk={result['index_topk']} tokens: all "
                             "layers attend densely, so every pattern scores the same; use longer sequences")
    write_atomic(out, result)
    plot(result, out.with_suffix(".png"))
    return result


def run(args, scorer_factory=None, on_step=None) -> dict:
    """The search command's parsed arguments → :func:`search` (``scorer_factory(args, seqs)`` for tests)."""
    engine_options = {k: getattr(args, k) for k in ENGINE_OPTIONS if hasattr(args, k)}
    factory = None if scorer_factory is None else (lambda seqs: scorer_factory(args, seqs))
    return search(args.model, args.data, args.out, retain=args.retain, engine=args.engine,
                  objective=args.objective, options=options_from_args(args), pp_blocks=args.pp_blocks,
                  resume=args.resume, seq_len=args.seq_len, num_seqs=args.num_seqs, start=args.start,
                  scorer_factory=factory, probe=getattr(args, "probe", "none"),
                  probe_docs=getattr(args, "probe_docs", 20), probe_seed=getattr(args, "probe_seed", 7),
                  gate_margin=getattr(args, "gate_margin", 0.05), progress=not args.no_progress, on_step=on_step,
                  engine_options=engine_options)


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

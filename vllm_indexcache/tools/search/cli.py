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
from vllm_indexcache.tools.search.scorers import ENGINES, PatternSwitchError
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
    """The search command's flags; ``--help`` shows every default (``ArgumentDefaultsHelpFormatter``)."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("model", metavar="MODEL", help="local DSA model directory")
    parser.add_argument("--data", required=True, default=argparse.SUPPRESS,
                        help="calibration data: a corpus directory (its train.u16), "
                        ".u16 tokens, .json/.jsonl, or text")
    parser.add_argument("--retain", default="1/4", help="target fraction of F layers")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS,
                        help="output JSON path (PNG and state file next to it)")
    parser.add_argument("--engine", choices=ENGINES, default="hf",
                        help="hf: transformers reference (layer inputs cached per step); vllm: vLLM workers")
    parser.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                        help="what a flip costs (docs/search.md compares them)")
    parser.add_argument("--pp-blocks", type=int, default=1, help="pipeline blocks: first layer of each stays F, "
                        "one flip per block per step")
    parser.add_argument("--method", choices=alg.METHODS, default="full",
                        help="full: Algorithm 1 as written, N(N-1)/2 evaluations; lazy: lazy greedy, re-scores only "
                        "candidates that can still win if a flip never gets cheaper as more layers are S (a heuristic "
                        "that fails on tiny-dsa: docs/search.md)")
    parser.add_argument("--resume", action="store_true", help="continue from PATH.state.json")
    parser.add_argument("--seq-len", type=int, default=2048, help="calibration window length (tokens)")
    parser.add_argument("--num-seqs", type=int, default=8, help="calibration windows")
    parser.add_argument("--start", type=int, default=0, help="first token of the windows (token files)")
    parser.add_argument("--device", default=None, help="hf engine: torch device (None: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
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
                   help="long-lm: short-context window (None: the model's index_topk)")
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
    g.add_argument("--probe-seed", type=int, default=7, help="probe document seed")
    g.add_argument("--gate-margin", type=float, default=0.05,
                   help="warn when a level's probe accuracy is more than this below all-F's")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or step lines")


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


#: What each objective's loss is, for the plot's y-axis (:mod:`.objectives`).
OBJECTIVE_UNITS = {
    "lm-loss": "LM loss on the calibration set (mean NLL, nats; lower is better)",
    "long-lm": "long-lm loss: NLL + weighted key-token NLL (nats; lower is better)",
    "retrieval": "retrieval loss: NLL + weighted answer-token NLL (nats; lower is better)",
    "kl": "KL(all-F || pattern) per token (nats; lower is better)",
}


def plot(result: dict, png) -> None:
    """Loss against step (step 0 = all F; integer ticks), retention levels marked; the y-axis names the objective's
    quantity and unit (:data:`OBJECTIVE_UNITS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [0] + [s["step"] for s in result["steps"]]
    ys = [result["baseline_loss"]] + [s["loss"] for s in result["steps"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o", ms=3)
    for level, entry in result["levels"].items():
        if level != "1":
            ax.axvline(entry["step"], color="grey", ls=":", lw=1)
            ax.annotate(f"{level} ({entry['num_f']} F)", (entry["step"], entry["loss"]), fontsize=8,
                        textcoords="offset points", xytext=(3, 6))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (committed flips; 0 = all F)")
    ax.set_ylabel(OBJECTIVE_UNITS.get(result["objective"], f"{result['objective']} (lower is better)"), fontsize=8)
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
           engine_options: dict | None = None, method: str = "full", note=None) -> dict:
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
        method: ``"full"`` (Algorithm 1 as written) or ``"lazy"`` (heuristic; :mod:`.algorithm`).
        note: one-line messages (evaluation count and time estimate); default: stderr.

    Every fresh evaluation is written to the state's ``pending`` scores at once (atomically); a resumed search takes
    them from there, so it scores, records and counts exactly what an uninterrupted one does. ``KeyboardInterrupt``
    propagates after the state is saved (the CLI turns it into one line naming the ``--resume`` command).

    Raises:
        StateError: bad calibration data, state present without ``resume``, or a mismatched/corrupt state.
        ValueError: bad ``retain`` / ``pp_blocks`` / objective options (:class:`.objectives.ObjectiveError`).
    """
    t0 = time.time()
    if method not in alg.METHODS:
        raise ValueError(f"--method={method!r}: expected one of {', '.join(alg.METHODS)}")
    note = note or (lambda msg: print(msg, file=sys.stderr, flush=True))
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

    if scorer_factory is None:
        scorer = make_scorer(model, seqs, engine=engine, objective=objective, options=options,
                             **(engine_options or {}))
    else:
        scorer = scorer_factory(seqs)
    bar = None
    try:
        if scorer.num_layers != num_layers:
            raise StateError(f"MODEL: scorer sees {scorer.num_layers} layers, config.json says {num_layers}")
        full_count = alg.total_evaluations(num_layers, target_f, blocks) + 1
        # skipped candidates of committed lazy steps are not coming back: the bar's total shrinks by them
        total = full_count - sum(len(s.skipped) for s in steps)
        done_before = int(state.get("evaluations", 0)) if state else 0
        note(f"search: {num_layers} DSA layers to {target_f} F ({retention}), method {method}: Algorithm 1 needs "
             f"{full_count} evaluations (all-F included)"
             + (f"; {done_before} done, at most {max(total - done_before, 0)} to go" if state else "")
             + ("; lazy greedy skips those that cannot win" if method == "lazy" else ""))
        if progress:
            from tqdm import tqdm
            # initial=: the bar starts where the state is, and its rate counts this run's evaluations only
            bar = tqdm(total=total, initial=min(done_before, total), unit="eval", desc=f"search ({objective})",
                       dynamic_ncols=True)
        pattern_now = {"p": steps[-1].pattern if steps else "F" * num_layers}
        pending = (state or {}).get("pending") or {}
        memo = dict(pending.get("scores", {})) if pending.get("base") == pattern_now["p"] else {}
        timing = {"first": None, "n": 0}

        def on_new(pattern: str, loss: float, seconds: float):
            timing["n"] += 1
            if timing["first"] is None:
                timing["first"] = seconds
                left = max(total - done_before - 1, 0)
                note(f"search: one evaluation takes {seconds:.1f} s: at most {_duration(left * seconds)} for the "
                     f"{left} evaluations left")
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{pattern_now['p'].count('F')} F")
            if state is not None:                       # the all-F baseline is written with the fresh state
                state["evaluations"] = done_before + timing["n"]
                state["pending"] = {"base": pattern_now["p"], "scores": recorded.memo_since_commit}
                write_atomic(spath, state)

        recorded = _RecordedScorer(scorer, memo, on_new)
        if state is None:
            baseline = float(recorded("F" * num_layers))
            state = dict(header, baseline_loss=baseline, steps=[], evaluations=timing["n"],
                         pending={"base": "F" * num_layers, "scores": {}})
            recorded.memo_since_commit = {}
            write_atomic(spath, state)
        baseline = float(state["baseline_loss"])
        echo = bar.write if bar is not None else (lambda _msg: None)

        def committed(step: alg.Step):
            pattern_now["p"] = step.pattern
            recorded.memo_since_commit = {}
            state["steps"].append(step.to_json())
            state["evaluations"] = done_before + timing["n"]
            state["pending"] = {"base": step.pattern, "scores": {}}
            write_atomic(spath, state)
            if bar is not None and step.skipped:
                bar.total -= len(step.skipped)
                bar.refresh()
            skipped = f", {len(step.skipped)} candidates skipped" if step.skipped else ""
            echo(f"step {step.step}: flipped {step.flipped} -> {step.pattern.count('F')} F, loss {step.loss:.6f}"
                 f"{skipped}")
            if on_step is not None:
                on_step(step)

        t_search = time.time()
        steps = alg.greedy_search(num_layers, target_f, recorded, num_blocks=pp_blocks, steps=steps,
                                  on_step=committed, method=method, baseline_loss=baseline)
        search_s = time.time() - t_search
        # a state searched further than --retain: report the trajectory up to this target only
        steps = [s for s in steps if s.pattern.count("F") >= target_f]
        if bar is not None:
            bar.close()
            bar = None
        levels = alg.retention_levels(num_layers, steps, baseline, retention, pp_blocks)
        gate = None
        if probe == "retrieval":
            gate = run_gate(scorer, seqs, levels, docs=probe_docs, seed=probe_seed, margin=gate_margin,
                            echo=print if progress else (lambda _msg: None))
        tokens_per_eval = scorer.tokens_per_evaluation
    finally:
        if bar is not None:
            bar.close()
        scorer.close()
    result = dict(header, retain=str(retention), target_f=target_f, blocks=blocks, baseline_loss=baseline,
                  index_topk=getattr(scorer, "index_topk", None),
                  steps=[s.to_json() for s in steps], levels=levels,
                  final_pattern=steps[-1].pattern if steps else "F" * num_layers,
                  evaluations=int(state.get("evaluations", 0)), method=method,
                  algorithm1_evaluations=full_count, tokens_per_evaluation=tokens_per_eval,
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
                  engine_options=engine_options, method=getattr(args, "method", "full"))


def scorer_seq_short(result: dict, seqs) -> bool:
    k = result.get("index_topk")
    return k is not None and max(len(s) for s in seqs) <= k


class _RecordedScorer:
    """The scorer as the search loop sees it: a pattern already scored (``memo``: this run's scores and the state's
    pending ones) is answered from memory; a fresh score is reported to ``on_new(pattern, loss, seconds)`` (which
    writes the state) before it is returned. ``set_base`` goes to the scorer when it has one (layer-input cache)."""

    def __init__(self, scorer, memo: dict, on_new):
        self.scorer, self.memo, self.on_new = scorer, {str(k): float(v) for k, v in memo.items()}, on_new
        self.memo_since_commit = dict(self.memo)

    def __call__(self, pattern: str) -> float:
        if pattern in self.memo:
            return self.memo[pattern]
        t = time.perf_counter()
        loss = float(self.scorer(pattern))
        self.memo[pattern] = self.memo_since_commit[pattern] = loss
        self.on_new(pattern, loss, time.perf_counter() - t)
        return loss

    def set_base(self, pattern: str) -> None:
        set_base = getattr(self.scorer, "set_base", None)
        if set_base is not None:
            set_base(pattern)


def _duration(seconds: float) -> str:
    """``3725`` → ``"1 h 02 min"``; ``95`` → ``"1.6 min"``; ``12`` → ``"12 s"``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def resume_command(args, argv: list[str] | None = None) -> str:
    """The shell command that continues the search of ``args``: the command line as typed (``sys.argv`` from the
    ``search`` word on) plus ``--resume``; rebuilt from ``args`` when the process was not started from it."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    if "search" in argv:
        words = ["vllm-indexcache"] + argv[argv.index("search"):]
    else:
        words = ["vllm-indexcache", "search", str(args.model), "--data", str(args.data), "--out", str(args.out),
                 "--retain", str(args.retain), "--objective", str(args.objective)]
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(words)


def main(args: argparse.Namespace) -> int:
    """The ``search`` command: 0 done, 2 bad input or state, 130 interrupted (Ctrl-C; one line names the
    ``--resume`` command, every finished evaluation is in the state)."""
    try:
        result = run(args)
    except (StateError, ValueError, PatternSwitchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        spath = state_path(args.out)
        if spath.exists():
            print(f"interrupted: finished evaluations are saved in {spath}; continue with: {resume_command(args)}",
                  file=sys.stderr)
        else:
            print(f"interrupted before the first evaluation finished (nothing saved); start again with: "
                  f"{resume_command(args)}", file=sys.stderr)
        return 130
    print(json.dumps({"final_pattern": result["final_pattern"], "levels": {k: v["pattern"] for k, v in
                                                                          result["levels"].items()},
                      "baseline_loss": result["baseline_loss"], "final_loss": result["steps"][-1]["loss"]
                      if result["steps"] else result["baseline_loss"], "out": str(args.out)}, indent=1))
    return 0

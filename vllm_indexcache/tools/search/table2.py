"""The shape of the IndexCache paper's Table 2 on a small trained DSA model, for several search objectives.

    python -m vllm_indexcache.tools.search.table2 examples/models/tiny-dsa --data-dir data/tiny-dsa \\
        --out docs/tiny-dsa-table2/objectives --objectives lm-loss,long-lm,retrieval [--write-presets configs]

1. For each objective, greedy search (Algorithm 1, :func:`vllm_indexcache.tools.search.cli.search`, ``--engine hf``) on
   calibration windows of the *training* split (``train.u16``; ``--calib-split heldout`` takes held-out text past
   the evaluation windows), down to 1/8 retention: one nested trajectory gives the searched 1/2, 1/4, 1/8 patterns.
2. Uniform baselines with the same F count: F = 0, freq, 2·freq, … (``pattern.uniform_pattern(N, freq, 1)``).
3. Held-out evaluation (``heldout.u16``) of original (all F), uniform and each objective's searched patterns at each
   retention: LM loss and long-range retrieval accuracy per needle depth
   (:func:`vllm_indexcache.tools.training.evaluate.evaluate`, ``ties="lower"`` reference, batch size 1), with the
   binomial
   standard error ``sqrt(p(1 − p)/n)`` of each accuracy. Evaluation needles use the evaluation key vocabulary and
   seed 0; the search's needles (``retrieval`` objective, probe) the disjoint calibration vocabulary and other seeds.
4. Writes ``OUT/<objective>/search.json`` (+ ``.png``, state), ``OUT/table2.json`` and ``OUT/table2.md``; with
   ``--write-presets DIR``, ``DIR/<name>-searched-1of{2,4,8}.json`` presets from ``--preset-objective``'s search.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from fractions import Fraction
from pathlib import Path

RETENTIONS = ("1/2", "1/4", "1/8")


def uniform_for(num_layers: int, retention: str) -> str:
    """Uniform pattern with the F count of ``retention``: F = 0, freq, 2·freq, … (freq = its denominator)."""
    from vllm_indexcache.pattern import uniform_pattern

    return uniform_pattern(num_layers, Fraction(retention).denominator, 1)


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent documents."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def write_presets(search: dict, model: str, directory, objective: str, calib_desc: str) -> list[Path]:
    """``<model name>-searched-1of{2,4,8}.json`` presets from one search result (validated before writing)."""
    from vllm_indexcache.pattern import Preset

    name = Path(model).name
    written = []
    for r in RETENTIONS:
        lv = search["levels"][r]
        preset = {"name": f"{name}-searched-1of{Fraction(r).denominator}",
                  "architecture": search["model"]["architecture"], "num_layers": search["num_layers"],
                  "retention": r, "pattern": lv["pattern"],
                  "source": f"greedy search (Algorithm 1, vllm-indexcache search --engine hf --objective "
                            f"{objective}) on {calib_desc} (sha256 {search['calibration']['sha256'][:16]}...), "
                            f"model sha256 {search['model']['sha256'][:16]}...; step {lv['step']} of the "
                            "trajectory"}
        Preset.model_validate(preset)
        path = Path(directory) / f"{preset['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(preset, indent=2) + "\n")
        written.append(path)
    return written


def main(argv=None) -> int:
    import torch

    from vllm_indexcache.tools.reference import load_reference
    from vllm_indexcache.tools.search.cli import search, state_path
    from vllm_indexcache.tools.search.objectives import OBJECTIVES
    from vllm_indexcache.tools.search.scorers import HFScorer
    from vllm_indexcache.tools.training.evaluate import evaluate

    p = argparse.ArgumentParser(prog="python -m vllm_indexcache.tools.search.table2",
                                description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data-dir", required=True, help="corpus directory (train.u16, heldout.u16, tokenizer/)")
    p.add_argument("--out", required=True)
    p.add_argument("--objectives", default="lm-loss,long-lm,retrieval")
    p.add_argument("--calib-seq-len", type=int, default=2048)
    p.add_argument("--calib-seqs", type=int, default=8)
    p.add_argument("--calib-start", type=int, default=0, help="first calibration token in the split")
    p.add_argument("--calib-split", choices=["train", "heldout"], default="train",
                   help="calibration split; with heldout, set --calib-start past the evaluation windows (LM loss "
                        "reads heldout.u16 from token 0: contexts x (max_tokens/context) windows)")
    p.add_argument("--contexts", default="1024,2048")
    p.add_argument("--max-tokens", type=int, default=65536, help="held-out tokens per context for LM loss")
    p.add_argument("--examples", type=int, default=20, help="retrieval documents per (context, depth)")
    p.add_argument("--device", default=None)
    p.add_argument("--write-presets", metavar="DIR", help="write <model>-searched-1of{2,4,8}.json presets here")
    p.add_argument("--preset-objective", default="retrieval", help="the objective whose search the presets take")
    p.add_argument("--presets-only", action="store_true",
                   help="only write --write-presets from OUT/<preset-objective>/search.json (no search, no eval)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    calib = (f"{args.calib_seqs} x [{args.calib_seq_len}] tokens of {Path(args.data_dir).name}/"
             f"{args.calib_split}.u16 from token {args.calib_start}")
    if args.presets_only:
        if not args.write_presets:
            raise SystemExit("--presets-only needs --write-presets DIR")
        found = json.loads((Path(args.out) / args.preset_objective / "search.json").read_text())
        for path in write_presets(found, args.model, args.write_presets, args.preset_objective, calib):
            print(f"wrote {path}")
        return 0
    objectives = [o for o in args.objectives.split(",") if o]
    for o in objectives:
        if o not in OBJECTIVES:
            raise SystemExit(f"--objectives: {o!r} is not one of {', '.join(OBJECTIVES)}")
    if args.write_presets and args.preset_objective not in objectives:
        raise SystemExit(f"--preset-objective={args.preset_objective!r}: not among --objectives")
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.calib_split == "heldout":
        used = max(c + 1 for c in contexts) * max(max(1, args.max_tokens // c) for c in contexts)
        if args.calib_start < used:
            raise SystemExit(f"--calib-start={args.calib_start}: overlaps the held-out LM-loss windows (tokens "
                             f"0..{used}); use a start >= {used}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = load_reference(args.model, ties="lower").to(device)
    from vllm_indexcache.families import family_for

    N = family_for(type(model).__name__).num_indexer_layers(model.config)
    data = Path(args.data_dir) / f"{args.calib_split}.u16"

    searches = {}
    for o in objectives:
        t1 = time.time()
        sout = out / o / "search.json"
        searches[o] = search(args.model, data, sout, retain="1/8", engine="hf", objective=o,
                             resume=state_path(sout).exists(), seq_len=args.calib_seq_len, num_seqs=args.calib_seqs,
                             start=args.calib_start, progress=not args.no_progress,
                             scorer_factory=lambda seqs, o=o: HFScorer(args.model, seqs, o, model=model))
        searches[o]["table2_wall_s"] = round(time.time() - t1, 1)
        print(f"search {o} done in {time.time() - t1:.0f} s: "
              f"{ {k: v['pattern'] for k, v in searches[o]['levels'].items()} }", flush=True)

    rows = [("original", "1", "F" * N)]
    for r in RETENTIONS:
        rows.append(("uniform", r, uniform_for(N, r)))
        rows += [(f"searched ({o})", r, searches[o]["levels"][r]["pattern"]) for o in objectives]
    results, cache = [], {}
    for method, r, pattern in rows:
        t1 = time.time()
        if pattern not in cache:
            cache[pattern] = evaluate(args.model, args.data_dir, pattern=pattern, model=model, contexts=contexts,
                                      max_tokens=args.max_tokens, examples=args.examples, batch_size=1,
                                      device=device)
        ev = cache[pattern]
        n_docs = args.examples * (len(ev["retrieval"][str(contexts[0])]) - 1)
        retrieval = {c: dict(v, n=n_docs, se=binomial_se(v["mean"], n_docs)) for c, v in ev["retrieval"].items()}
        results.append({"method": method, "retention": r, "pattern": pattern, "num_f": pattern.count("F"),
                        "lm": ev["lm"], "retrieval": retrieval})
        print(f"{method:22s} {r:4s} {pattern} " + " ".join(
            f"ctx{c}: loss {ev['lm'][str(c)]['loss']:.4f} retr {ev['retrieval'][str(c)]['mean']:.2f}"
            for c in contexts) + f" ({time.time() - t1:.0f} s)", flush=True)
    args = argv or sys.argv[1:]
    command = "python -m vllm_indexcache.tools.search.table2 " + " ".join(shlex.quote(a) for a in args)
    any_search = searches[objectives[0]]
    table = {"model": any_search["model"], "calibration": any_search["calibration"], "contexts": contexts,
             "max_tokens": args.max_tokens, "examples": args.examples, "device": device, "rows": results,
             "searches": {o: {"wall_s": s["table2_wall_s"], "search_s": s["search_s_this_run"],
                              "evaluations": s["evaluations"], "tokens_per_evaluation": s["tokens_per_evaluation"],
                              "objective_options": s["objective_options"], "objective_parts": s["objective_parts"],
                              "gate": s["gate"], "levels": s["levels"]}
                          for o, s in searches.items()},
             "command": command, "wall_s": round(time.time() - t0, 1)}
    (out / "table2.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "table2.md").write_text(markdown(table))
    if args.write_presets:
        for path in write_presets(searches[args.preset_objective], args.model, args.write_presets,
                                  args.preset_objective, calib):
            print(f"wrote {path}")
    print((out / "table2.md").read_text())
    return 0


def markdown(table: dict) -> str:
    """The table as Markdown: loss and retrieval (± binomial SE) per context, then retrieval per depth."""
    ctxs = table["contexts"]
    head = "| method | retention | F | pattern | " + " | ".join(f"held-out loss @{c}" for c in ctxs) + " | " + \
        " | ".join(f"retrieval @{c}" for c in ctxs) + " |"
    sep = "|" + "---|" * (4 + 2 * len(ctxs))
    lines = [f"# IndexCache on {Path(table['model']['path']).name}: the shape of the paper's Table 2", "",
             f"Command: `{table['command']}` ({table['wall_s']:.0f} s on {table['device']}).", "",
             f"Calibration (search): {table['calibration']['sequences']} windows of "
             f"{table['calibration']['seq_lens']} tokens of `{table['calibration']['source']}`, sha256 "
             f"`{table['calibration']['sha256']}`. Evaluation: held-out split, LM loss (nats/token) on at most "
             f"{table['max_tokens']} tokens per context; retrieval accuracy ± binomial SE over "
             f"{table['rows'][0]['retrieval'][str(ctxs[0])]['n']} documents per context "
             f"({table['examples']} per needle depth).", "", head, sep]
    for row in table["rows"]:
        lines.append(f"| {row['method']} | {row['retention']} | {row['num_f']} | `{row['pattern']}` | " + " | ".join(
            f"{row['lm'][str(c)]['loss']:.4f}" for c in ctxs) + " | " + " | ".join(
            f"{row['retrieval'][str(c)]['mean']:.3f} ± {row['retrieval'][str(c)]['se']:.3f}" for c in ctxs) + " |")
    depths = [k for k in table["rows"][0]["retrieval"][str(ctxs[-1])] if k not in ("mean", "n", "se")]
    lines += ["", f"Retrieval per needle depth at {ctxs[-1]} tokens (0 = farthest from the question):", "",
              "| method | retention | " + " | ".join(f"depth {d}" for d in depths) + " |",
              "|" + "---|" * (2 + len(depths))]
    for row in table["rows"]:
        r = row["retrieval"][str(ctxs[-1])]
        lines.append(f"| {row['method']} | {row['retention']} | " + " | ".join(f"{r[d]:.2f}" for d in depths) + " |")
    lines += ["", "| objective | search wall time (s) | evaluations | tokens per evaluation | probe all-F | "
              "probe 1/2 | probe 1/4 | probe 1/8 |", "|---|---|---|---|---|---|---|---|"]
    for o, s in table["searches"].items():
        gate = s.get("gate") or {}
        probe = [f"{gate['levels'][r]['accuracy']:.2f}" if r in gate.get("levels", {}) else "–" for r in RETENTIONS]
        base = f"{gate['all_f']:.2f}" if gate.get("all_f") is not None else "–"
        lines.append(f"| {o} | {s['search_s']:.0f} | {s['evaluations']} | {s['tokens_per_evaluation']} | {base} | "
                     + " | ".join(probe) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

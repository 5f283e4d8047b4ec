"""The shape of the IndexCache paper's Table 2 on a small trained DSA model, in one command.

    python -m vllm_indexcache.search.table2 examples/models/tiny-dsa --data-dir data/tiny-dsa \\
        --out docs/tiny-dsa-table2 [--write-presets configs]

1. Greedy search (Algorithm 1, ``--engine hf``, objective lm-loss) on calibration windows of the *training* split
   (``train.u16``), down to 1/8 retention: one nested trajectory gives the searched 1/2, 1/4 and 1/8 patterns.
2. Uniform baselines with the same F count: ``uniform_pattern(N, freq, offset=1)`` (F = 0, freq, 2·freq, …).
3. Held-out evaluation (``heldout.u16``, never seen in training or calibration) of original (all F), uniform and
   searched at each retention: LM loss and long-range retrieval accuracy
   (:func:`vllm_indexcache.training.evaluate.evaluate`, ``ties="lower"`` reference, batch size 1).
4. Writes ``OUT/search.json`` (+ ``.png``, state), ``OUT/table2.json`` and ``OUT/table2.md``; with
   ``--write-presets DIR``, ``DIR/<name>-searched-1of{2,4,8}.json`` presets.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from fractions import Fraction
from pathlib import Path

RETENTIONS = ("1/2", "1/4", "1/8")


def uniform_for(num_layers: int, retention: str) -> str:
    # vllm_indexcache.patterns.uniform_pattern(num_layers, freq, offset=1), inlined: that module needs pydantic
    freq = Fraction(retention).denominator
    return "".join("S" if i % freq else "F" for i in range(num_layers))


def main(argv=None) -> int:
    import torch

    from vllm_indexcache.reference import load_reference
    from vllm_indexcache.search.cli import run, state_path
    from vllm_indexcache.search.scorers import HFScorer
    from vllm_indexcache.training.evaluate import evaluate

    p = argparse.ArgumentParser(prog="python -m vllm_indexcache.search.table2", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data-dir", required=True, help="corpus directory (train.u16, heldout.u16, tokenizer/)")
    p.add_argument("--out", required=True)
    p.add_argument("--calib-seq-len", type=int, default=2048)
    p.add_argument("--calib-seqs", type=int, default=8)
    p.add_argument("--calib-start", type=int, default=0, help="first calibration token in the split")
    p.add_argument("--calib-split", choices=["train", "heldout"], default="train",
                   help="calibration split; with heldout, set --calib-start past the evaluation windows (LM loss "
                        "reads heldout.u16 from token 0: contexts x (max_tokens/context) windows)")
    p.add_argument("--contexts", default="2048,4096")
    p.add_argument("--max-tokens", type=int, default=65536, help="held-out tokens per context for LM loss")
    p.add_argument("--examples", type=int, default=20, help="retrieval documents per (context, depth)")
    p.add_argument("--device", default=None)
    p.add_argument("--write-presets", metavar="DIR", help="write <model>-searched-1of{2,4,8}.json presets here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
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
    N = model.config.num_hidden_layers

    search_out = out / "search.json"
    sargs = argparse.Namespace(model=args.model, data=str(Path(args.data_dir) / f"{args.calib_split}.u16"),
                               retain="1/8",
                               out=str(search_out), engine="hf", objective="lm-loss", pp_blocks=1,
                               resume=state_path(search_out).exists(), seq_len=args.calib_seq_len,
                               num_seqs=args.calib_seqs, start=args.calib_start, device=device, dtype="float32",
                               tensor_parallel_size=1, pipeline_parallel_size=1, kv_cache_memory_bytes=None,
                               no_progress=args.no_progress)
    search = run(sargs, scorer_factory=lambda a, seqs: HFScorer(a.model, seqs, a.objective, model=model))
    print(f"search done in {time.time() - t0:.0f} s: {search['levels']}", flush=True)

    rows = [("original", "1", "F" * N)]
    for r in RETENTIONS:
        rows.append(("uniform", r, uniform_for(N, r)))
        rows.append(("searched", r, search["levels"][r]["pattern"]))
    results = []
    for method, r, pattern in rows:
        t1 = time.time()
        ev = evaluate(args.model, args.data_dir, pattern=pattern, model=model, contexts=contexts,
                      max_tokens=args.max_tokens, examples=args.examples, batch_size=1, device=device)
        results.append({"method": method, "retention": r, "pattern": pattern, "num_f": pattern.count("F"),
                        "lm": ev["lm"], "retrieval": ev["retrieval"]})
        print(f"{method:9s} {r:4s} {pattern} " + " ".join(
            f"ctx{c}: loss {ev['lm'][str(c)]['loss']:.4f} retr {ev['retrieval'][str(c)]['mean']:.2f}"
            for c in contexts) + f" ({time.time() - t1:.0f} s)", flush=True)
    command = "python -m vllm_indexcache.search.table2 " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    table = {"model": search["model"], "calibration": search["calibration"], "contexts": contexts,
             "max_tokens": args.max_tokens, "examples": args.examples, "device": device, "rows": results,
             "command": command, "wall_s": round(time.time() - t0, 1)}
    (out / "table2.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "table2.md").write_text(markdown(table))
    if args.write_presets:
        name = Path(args.model).name
        arch = search["model"]["architecture"]
        for r in RETENTIONS:
            lv = search["levels"][r]
            preset = {"name": f"{name}-searched-1of{Fraction(r).denominator}", "architecture": arch,
                      "num_layers": N, "retention": r, "pattern": lv["pattern"],
                      "source": f"greedy search (Algorithm 1, vllm-indexcache search --engine hf, lm-loss) on "
                                f"{search['calibration']['sequences']} x {search['calibration']['seq_lens']} "
                                f"tokens of {Path(args.data_dir).name}/{args.calib_split}.u16 from token "
                                f"{args.calib_start} (sha256 "
                                f"{search['calibration']['sha256'][:16]}...), model sha256 "
                                f"{search['model']['sha256'][:16]}...; step {lv['step']} of the trajectory"}
            try:
                from vllm_indexcache.patterns import Preset
            except ImportError:  # pydantic missing: check later with `vllm-indexcache pattern MODEL --preset FILE`
                Preset = None
            if Preset is not None:
                Preset.model_validate(preset)
            path = Path(args.write_presets) / f"{preset['name']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(preset, indent=2) + "\n")
            print(f"wrote {path}")
    print((out / "table2.md").read_text())
    return 0


def markdown(table: dict) -> str:
    ctxs = table["contexts"]
    head = "| method | retention | F layers | pattern | " + " | ".join(
        f"held-out loss @{c}" for c in ctxs) + " | " + " | ".join(f"retrieval @{c}" for c in ctxs) + " |"
    sep = "|" + "---|" * (4 + 2 * len(ctxs))
    lines = [f"# IndexCache on {Path(table['model']['path']).name}: the shape of the paper's Table 2", "",
             f"Command: `{table['command']}` ({table['wall_s']:.0f} s on {table['device']}).", "",
             f"Calibration (search): {table['calibration']['sequences']} windows of "
             f"{table['calibration']['seq_lens']} tokens of `{table['calibration']['source']}`, sha256 "
             f"`{table['calibration']['sha256']}`. Evaluation: held-out split, LM loss (nats/token) on at most "
             f"{table['max_tokens']} tokens per context; retrieval accuracy over {table['examples']} documents per "
             "needle depth (5 depths).", "", head, sep]
    for row in table["rows"]:
        lines.append(f"| {row['method']} | {row['retention']} | {row['num_f']} | `{row['pattern']}` | " + " | ".join(
            f"{row['lm'][str(c)]['loss']:.4f}" for c in ctxs) + " | " + " | ".join(
            f"{row['retrieval'][str(c)]['mean']:.3f}" for c in ctxs) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""``vllm-indexcache distill MODEL --compare 4,2 --data DIR --out DIR``: the training-aware IndexCache table.

For each retention ``1/FREQ`` it evaluates, on the held-out split of ``--data`` (LM loss, nats/token, and retrieval
accuracy, :func:`vllm_indexcache.tools.training.evaluate.evaluate`):

* **original** — all layers F (once);
* **training-free uniform** — the source model with the uniform pattern (every ``FREQ``-th layer F, starting at 0:
  vLLM's rule with ``index_skip_topk_offset = 1``, so that it keeps the same number of F layers as the search);
* **training-free searched** — the source model with the pattern of Algorithm 1 (``vllm-indexcache search``, LM-loss
  objective, calibration windows from the *training* split, so held-out data stays unseen);
* **training-aware uniform** — :func:`~vllm_indexcache.tools.distill.cli.distill` with the uniform pattern and Eq. 1;
* **training-aware uniform, no cross-layer term** — the same run with each F indexer trained on its own layer only.

The two training-aware runs get identical budgets, data and seeds; they differ only in ``cross_layer``. Everything is
written under ``--out``: ``search.json`` (+ state), ``ta-*/`` checkpoints, ``results.json`` and ``table.md``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("--compare budgets")
    g.add_argument("--eval-context", type=int, default=1024, help="held-out window length (tokens)")
    g.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for the LM loss")
    g.add_argument("--eval-examples", type=int, default=10, help="retrieval documents per depth")
    g.add_argument("--eval-depths", default="0,0.25,0.5,0.75,1")
    g.add_argument("--eval-needles", type=int, default=4)
    g.add_argument("--search-seqs", type=int, default=4, help="calibration windows of the greedy search")
    g.add_argument("--search-len", type=int, default=1024, help="calibration window length")


def _eval(model, args, pattern: str) -> dict:
    from ..training.evaluate import evaluate

    t0 = time.time()
    r = evaluate(args.model, args.data, pattern=pattern, model=model, contexts=[args.eval_context],
                 depths=[float(d) for d in args.eval_depths.split(",")], max_tokens=args.eval_tokens,
                 examples=args.eval_examples, needles=args.eval_needles, batch_size=2, device="cpu")
    c = str(args.eval_context)
    return {"pattern": pattern, "num_f": pattern.count("F"), "heldout_loss": r["lm"][c]["loss"],
            "heldout_tokens": r["lm"][c]["tokens"], "retrieval": r["retrieval"][c]["mean"],
            "retrieval_by_depth": {k: v for k, v in r["retrieval"][c].items() if k != "mean"},
            "eval_s": round(time.time() - t0, 1)}


def _search(args, out: Path, min_retention: str) -> dict:
    """The training-free searched patterns this comparison is measured against (LM-loss objective, as run)."""
    from ..search.cli import search, state_path

    res_path = out / "search.json"
    return search(args.model, Path(args.data) / "train.u16", res_path, retain=min_retention, objective="lm-loss",
                  probe="none", resume=state_path(res_path).exists(), seq_len=args.search_len,
                  num_seqs=args.search_seqs, progress=False, engine_options={"device": "cpu"})


def run_compare(args) -> int:
    from vllm_indexcache.pattern import uniform_pattern

    from ..reference import load_reference
    from .export import export_checkpoint
    from .trainer import distill, make_batches

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    freqs = [int(f) for f in args.compare.split(",")]
    t_all = time.time()
    src = load_reference(args.model, dtype=torch.float32)
    from vllm_indexcache.families import family_for

    n = family_for(type(src).__name__).num_indexer_layers(src.config)
    results: dict = {"model": str(args.model), "data": str(args.data), "threads": torch.get_num_threads(),
                     "budgets": {k: getattr(args, k) for k in (
                         "context", "batch_size", "warmup_steps", "sparse_steps", "indexer_lr", "main_lr",
                         "kl_weight", "seed", "eval_context", "eval_tokens", "eval_examples", "eval_needles",
                         "search_seqs", "search_len")}, "rows": []}
    rpath = out / "results.json"

    def save():
        results["wall_s"] = round(time.time() - t_all, 1)
        rpath.write_text(json.dumps(results, indent=1) + "\n")
        (out / "table.md").write_text(table(results) + "\n")

    print("[compare] original", flush=True)
    results["rows"].append({"retention": "1", "method": "original", **_eval(src, args, "F" * n)})
    save()
    print("[compare] greedy search", flush=True)
    search = _search(args, out, f"1/{max(freqs)}")
    results["search"] = {"levels": search["levels"], "evaluations": search["evaluations"],
                         "calibration": f"{args.search_seqs} x {args.search_len} tokens of train.u16"}
    for freq in freqs:
        ret = f"1/{freq}"
        uni = uniform_pattern(n, freq, 1)
        print(f"[compare] {ret}: training-free uniform {uni}", flush=True)
        results["rows"].append({"retention": ret, "method": "training-free uniform", **_eval(src, args, uni)})
        searched = search["levels"][ret]["pattern"]
        print(f"[compare] {ret}: training-free searched {searched}", flush=True)
        results["rows"].append({"retention": ret, "method": "training-free searched", **_eval(src, args, searched)})
        save()
        for cross in (True, False):
            name = "training-aware uniform" + ("" if cross else ", no cross-layer term")
            print(f"[compare] {ret}: {name}", flush=True)
            model = load_reference(args.model, pattern=uni, dtype=torch.float32)
            get_batch = make_batches(args.data, model.config.vocab_size, args.context, args.batch_size, args.seed,
                                     args.retrieval_fraction)
            reports = distill(model, uni, get_batch, warmup_steps=args.warmup_steps, sparse_steps=args.sparse_steps,
                              indexer_lr=args.indexer_lr, main_lr=args.main_lr, kl_weight=args.kl_weight,
                              cross_layer=cross, progress=not args.no_progress)
            row = {"retention": ret, "method": name, **_eval(model, args, uni),
                   "train": [{k: v for k, v in r.items() if k != "log"} for r in reports]}
            ckpt = out / f"ta-uniform-1of{freq}{'' if cross else '-nocross'}"
            export_checkpoint(model, uni, args.model, ckpt, None,
                              {"source": str(args.model), "pattern": uni, "stages": reports})
            row["checkpoint"] = str(ckpt)
            results["rows"].append(row)
            save()
            del model
    save()
    print(table(results), flush=True)
    return 0


def table(results: dict) -> str:
    """Markdown table of ``results`` (see :func:`run_compare`)."""
    lines = ["| retention | method | pattern | held-out loss (nats/token) | retrieval acc. |",
             "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['retention']} | {r['method']} | `{r['pattern']}` | {r['heldout_loss']:.4f} | "
                     f"{r['retrieval']:.3f} |")
    return "\n".join(lines)

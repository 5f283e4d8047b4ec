"""``vllm-indexcache distill MODEL --pattern … --data … --out DIR``: training-aware IndexCache (paper §3.2).

Two stages on a transformers DSA checkpoint (``DeepseekV32ForCausalLM``; GLM-5 layout through the same hooks), with
the pattern applied (S layers reuse the preceding F layer's top-k, :mod:`vllm_indexcache.tools.reference`):

1. **warm-up** (``--warmup-steps``): attention dense (every indexer selects every key), main model frozen (forward
   under ``no_grad``); only the F-layer indexers train, on Eq. 1's *dense* variant — KL to the attention of every
   layer they serve, over all causal keys (:class:`~vllm_indexcache.tools.distill.loss.MultiLayerIndexerDistiller`).
2. **sparse** (``--sparse-steps``): attention sparse with the pattern (S layers attend to their F layer's top-k);
   the F-layer indexers learn from Eq. 1's *sparse* variant (KL restricted to the selected keys, renormalised), on
   detached inputs; the rest of the model learns only from the next-token LM loss (``--main-lr 0`` freezes it).

``--no-cross-layer`` trains each F indexer on its own layer's attention only (the paper's ablation).
S-layer indexers never run and never train.

Output ``DIR``: a Hugging Face checkpoint the plugin serves — safetensors **without the S layers' indexer weights**
(vLLM's ``DeepseekV2Model.load_weights`` builds no indexer on S layers and drops such weights anyway), ``config.json``
with ``index_topk_pattern`` (and the keys vLLM reads: ``topk_method``, ``scoring_func``,
``indexer_rope_interleave``, ``architectures``), the source's tokenizer files, and ``distill.json`` (arguments,
per-stage logs, wall time). :func:`load_distilled` reloads it into the reference with its pattern.

``--data`` is a directory written by ``scripts/prepare_tiny_dsa_data.py`` (``train.u16`` + ``tokenizer/``; batches
are the training recipe's :class:`~vllm_indexcache.tools.data.retrieval.TrainBatches`: text windows plus retrieval
documents), or ``random`` (uniform random token ids, for toy models and smoke tests).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .export import export_checkpoint
from .trainer import distill, make_batches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="source DSA checkpoint directory (e.g. examples/models/tiny-dsa)")
    parser.add_argument("--pattern", metavar="SPEC",
                        help="pattern spec, one F/S per indexer layer: an F/S string, all-F, freq:K[:OFFSET] (vLLM's "
                             "rule; uniform:K[:OFFSET] is an alias), every:K (= 1/K), preset:NAME")
    parser.add_argument("--data", required=True, help="data directory (train.u16 + tokenizer/) or 'random'")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--context", type=int, default=512, help="tokens per training row")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=100, help="dense indexer warm-up steps (0 = skip)")
    parser.add_argument("--sparse-steps", type=int, default=100, help="sparse stage steps (0 = skip)")
    parser.add_argument("--indexer-lr", type=float, default=1e-3)
    parser.add_argument("--main-lr", type=float, default=3e-5, help="sparse stage, rest of the model (0 = frozen)")
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--no-cross-layer", action="store_true",
                        help="ablation: each F indexer learns only its own layer's attention")
    parser.add_argument("--retrieval-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-dtype", choices=["float32", "bfloat16", "source"], default="source")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--compare", metavar="FREQS",
                        help="instead of one run: build the comparison table for these uniform frequencies "
                             "(e.g. 4,2 for 1/4 and 1/2) into --out; see vllm_indexcache.tools.distill.compare")
    parser.add_argument("--no-progress", action="store_true")
    from .compare import add_compare_arguments
    add_compare_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from ..reference import load_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        from .compare import run_compare
        return run_compare(args)
    if not args.pattern:
        raise SystemExit("distill: --pattern is required (or --compare)")
    src_cfg = json.loads((Path(args.model) / "config.json").read_text())
    from vllm_indexcache.pattern import describe_spec, resolve_for_model

    pattern = resolve_for_model(args.pattern, src_cfg, key="--pattern")
    print(describe_spec(args.pattern, pattern), flush=True)
    model = load_reference(args.model, pattern=pattern, dtype=torch.float32)
    get_batch = make_batches(args.data, model.config.vocab_size, args.context, args.batch_size, args.seed,
                             args.retrieval_fraction)
    t0 = time.time()
    reports = distill(model, pattern, get_batch, warmup_steps=args.warmup_steps, sparse_steps=args.sparse_steps,
                      indexer_lr=args.indexer_lr, main_lr=args.main_lr, kl_weight=args.kl_weight,
                      cross_layer=not args.no_cross_layer, progress=not args.no_progress)
    if args.export_dtype == "source":
        name = src_cfg.get("dtype") or src_cfg.get("torch_dtype") or "float32"
        dtype = getattr(torch, name)
    else:
        dtype = getattr(torch, args.export_dtype)
    extra = {"source": str(args.model), "pattern": pattern, "args": {k: v for k, v in vars(args).items()},
             "wall_s": round(time.time() - t0, 1), "threads": torch.get_num_threads(), "stages": reports}
    export_checkpoint(model, pattern, args.model, args.out, dtype, extra)
    print(f"wrote {args.out}: pattern {pattern} ({pattern.count('F')} F / {len(pattern)} layers), "
          f"S-layer indexer weights dropped")
    return 0

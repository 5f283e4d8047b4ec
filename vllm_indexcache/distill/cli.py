"""``vllm-indexcache distill MODEL --pattern … --data … --out DIR``: training-aware IndexCache (paper §3.2).

Two stages on a transformers DSA checkpoint (``DeepseekV32ForCausalLM``; GLM-5 layout through the same hooks), with
the pattern applied (S layers reuse the preceding F layer's top-k, :mod:`vllm_indexcache.reference`):

1. **warm-up** (``--warmup-steps``): attention dense (every indexer selects every key), main model frozen (forward
   under ``no_grad``); only the F-layer indexers train, on Eq. 1's *dense* variant — KL to the attention of every
   layer they serve, over all causal keys (:class:`~vllm_indexcache.distill.loss.MultiLayerIndexerDistiller`).
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
are the training recipe's :class:`~vllm_indexcache.data.retrieval.TrainBatches`: text windows plus retrieval
documents), or ``random`` (uniform random token ids, for toy models and smoke tests).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .loss import MultiLayerIndexerDistiller

_COPY_SKIP = (".safetensors", ".bin", ".pt")


def resolve_pattern(spec: str, num_layers: int) -> str:
    """``spec``: an explicit F/S string, ``uniform:FREQ`` or ``uniform:FREQ:OFFSET`` (vLLM 0.32's rule,
    :func:`vllm_indexcache.patterns.uniform_pattern`, default offset 2). Validated against ``num_layers``."""
    from ..patterns import parse_pattern, uniform_pattern

    if spec.startswith("uniform:"):
        parts = [int(x) for x in spec.split(":")[1:]]
        return uniform_pattern(num_layers, *parts)
    return parse_pattern(spec, num_layers)


def make_batches(data: str, vocab_size: int, context: int, batch_size: int, seed: int = 0,
                 retrieval_fraction: float = 0.25):
    """Return ``get(step) -> LongTensor [batch_size, context + 1]``, a pure function of ``(seed, step)``."""
    if data == "random":
        def get(step: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            return torch.randint(3, vocab_size, (batch_size, context + 1), generator=g)
        return get
    from tokenizers import Tokenizer

    from ..data.corpus import load_tokens
    from ..data.retrieval import TrainBatches

    d = Path(data)
    tok = Tokenizer.from_file(str(d / "tokenizer" / "tokenizer.json"))
    batches = TrainBatches(load_tokens(d, "train"), tok, context, batch_size, seed=seed,
                           retrieval_fraction=retrieval_fraction)
    return lambda step: torch.from_numpy(batches.get(step)).long()


def _set_dense(model, dense: bool) -> None:
    for layer in model.model.layers[: model.config.num_hidden_layers]:
        idx = getattr(layer.self_attn, "indexer", None)
        if idx is not None:
            idx.index_topk = 1 << 30 if dense else model.config.index_topk


def _indexer_params(model, pattern: str) -> list[torch.nn.Parameter]:
    layers = model.model.layers[: model.config.num_hidden_layers]
    return [p for i, c in enumerate(pattern) if c == "F" for p in layers[i].self_attn.indexer.parameters()]


def distill(model, pattern: str, get_batch, *, warmup_steps: int, sparse_steps: int, indexer_lr: float = 1e-3,
            main_lr: float = 3e-5, kl_weight: float = 1.0, cross_layer: bool = True, grad_clip: float = 1.0,
            log_every: int = 10, progress: bool = True) -> list[dict]:
    """Run the warm-up and sparse stages in place on ``model`` (from :func:`~vllm_indexcache.reference.
    load_reference` with ``pattern`` set, eager attention). Returns one report per stage run.

    Optimiser: AdamW (betas 0.9/0.95, no weight decay on the indexers, 0.1 on the main model), constant learning
    rate after a linear ramp over the first 10 % of a stage, gradient clipping at ``grad_clip`` per group.
    """
    reports = []
    idx_params = _indexer_params(model, pattern)
    # everything but the indexers (S-layer indexers never run, so they never train)
    main_params = [p for n, p in model.named_parameters() if ".indexer." not in n]
    for name, steps in (("warmup", warmup_steps), ("sparse", sparse_steps)):
        if steps <= 0:
            continue
        train_main = name == "sparse" and main_lr > 0
        for p in model.parameters():
            p.requires_grad_(False)
        for p in idx_params:
            p.requires_grad_(True)
        groups = [{"params": idx_params, "lr": indexer_lr, "weight_decay": 0.0}]
        if train_main:
            for p in main_params:
                p.requires_grad_(True)
            groups.append({"params": main_params, "lr": main_lr, "weight_decay": 0.1})
        base = [g["lr"] for g in groups]
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
        _set_dense(model, name == "warmup")
        model.train()
        log, t0 = [], time.monotonic()
        variant = "dense" if name == "warmup" else "sparse"
        with MultiLayerIndexerDistiller(model, pattern, variant=variant, cross_layer=cross_layer) as dist:
            for step in range(steps):
                ramp = min(1.0, (step + 1) / max(1, steps // 10))
                for g, lr in zip(opt.param_groups, base):
                    g["lr"] = lr * ramp
                rows = get_batch(step if name == "sparse" else 1_000_000 + step).to(model.device)
                x, y = rows[:, :-1], rows[:, 1:]
                with torch.set_grad_enabled(train_main):
                    logits = model(input_ids=x, use_cache=False).logits
                kl = dist.loss()
                total = kl_weight * kl.total
                lm = None
                if name == "sparse":
                    lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
                    if train_main:
                        total = total + lm
                opt.zero_grad(set_to_none=True)
                total.backward()
                for g in opt.param_groups:
                    torch.nn.utils.clip_grad_norm_(g["params"], grad_clip)
                opt.step()
                rec = {"step": step + 1, "kl": float(kl.total.detach()),
                       "kl_per_layer": {str(k): round(v, 5) for k, v in kl.per_layer.items()}}
                if lm is not None:
                    rec["lm"] = float(lm.detach())
                log.append(rec)
                if progress and ((step + 1) % log_every == 0 or step == 0 or step + 1 == steps):
                    extra = f" lm {rec['lm']:.4f}" if lm is not None else ""
                    print(f"[distill {name}] step {step + 1}/{steps} kl {rec['kl']:.4f}{extra} "
                          f"({time.monotonic() - t0:.0f}s)", flush=True)
        _set_dense(model, False)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tail = log[-max(1, min(5, len(log))):]
        reports.append({"stage": name, "variant": variant, "steps": steps, "cross_layer": cross_layer,
                        "train_main": train_main, "indexer_lr": indexer_lr, "main_lr": main_lr if train_main else 0,
                        "wall_s": round(time.monotonic() - t0, 1), "kl_first": log[0]["kl"],
                        "kl_last5": sum(r["kl"] for r in tail) / len(tail),
                        **({"lm_last5": sum(r["lm"] for r in tail) / len(tail)} if name == "sparse" else {}),
                        "log": log})
    return reports


def export_checkpoint(model, pattern: str, src_dir: str | Path, out_dir: str | Path,
                      dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    """Write ``model`` as a servable IndexCache checkpoint (see the module docstring). S-layer indexer tensors
    (``model.layers.{i}.self_attn.indexer.*``) are left out; ``config.json`` gets ``index_topk_pattern``."""
    import re

    from vllm_indexcache.dsa_config import complete_dsa_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        f.unlink()
    s_layers = {i for i, c in enumerate(pattern) if c == "S"}
    sd = {}
    for k, v in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.self_attn\.indexer\.", k)
        if m and int(m.group(1)) in s_layers:
            continue
        sd[k] = v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
    model.save_pretrained(str(out), state_dict=sd)
    src = Path(src_dir)
    src_cfg = json.loads((src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    for key in ("topk_method", "scoring_func", "indexer_rope_interleave", "architectures"):
        if key in src_cfg:
            cfg[key] = src_cfg[key]
    for key in ("index_topk_freq", "index_skip_topk_offset", "index_cache_preset"):
        cfg.pop(key, None)
    cfg["index_topk_pattern"] = pattern
    complete_dsa_config(cfg)           # every vLLM-only key explicit, also when the source lacked one
    if dtype is not None:
        cfg["dtype"] = str(dtype).replace("torch.", "")
    if cfg.get("model_type") == "glm_moe_dsa":
        cfg["indexer_types"] = ["full" if c == "F" else "shared" for c in pattern]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_COPY_SKIP) and f.name not in ("config.json",
                                                                              "model.safetensors.index.json",
                                                                              "generation_config.json"):
            shutil.copy(f, out / f.name)
    if extra is not None:
        (out / "distill.json").write_text(json.dumps(extra, indent=1) + "\n")
    return out


def load_distilled(model_dir: str | Path, dtype: torch.dtype = torch.float32, **kwargs):
    """Load a checkpoint written by :func:`export_checkpoint` into :mod:`vllm_indexcache.reference` with the
    ``index_topk_pattern`` of its config (S layers' indexers are absent from the checkpoint and never run)."""
    import warnings

    from ..reference import load_reference

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_reference(str(model_dir), pattern=cfg.get("index_topk_pattern"), dtype=dtype, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="source DSA checkpoint directory (e.g. examples/models/tiny-dsa)")
    parser.add_argument("--pattern", help="F/S per layer, or uniform:FREQ[:OFFSET] (vLLM rule)")
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
                             "(e.g. 4,2 for 1/4 and 1/2) into --out; see vllm_indexcache.distill.compare")
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
    pattern = resolve_pattern(args.pattern, src_cfg["num_hidden_layers"])
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

"""Multi-layer indexer distillation (IndexCache paper §3.2, Eq. 1) as a function: :func:`distill` trains the F
layers' indexers of a pattern against the attention of the layers that reuse them; batches from :func:`make_batches`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .loss import MultiLayerIndexerDistiller


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
    from vllm_indexcache.families import family_for

    ids = family_for(type(model).__name__).indexer_layers(model.config)   # pattern character i -> layer ids[i]
    layers = model.model.layers
    return [p for i, c in zip(ids, pattern) if c == "F" for p in layers[i].self_attn.indexer.parameters()]


def distill(model, pattern: str, get_batch, *, warmup_steps: int, sparse_steps: int, indexer_lr: float = 1e-3,
            main_lr: float = 3e-5, kl_weight: float = 1.0, cross_layer: bool = True, grad_clip: float = 1.0,
            log_every: int = 10, progress: bool = True) -> list[dict]:
    """Run the warm-up and sparse stages in place on ``model`` (from :func:`~vllm_indexcache.tools.reference.
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



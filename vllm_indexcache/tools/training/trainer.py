"""The DSA training recipe: dense pre-training → indexer warm-up → sparse training (DeepSeek-V3.2 report §2.1).

Each stage of a :class:`~.config.TrainConfig` runs in ``<run_dir>/<stage name>/``:

* ``ckpt.pt`` — resumable checkpoint (fp32 model, optimizer, step, torch/CUDA RNG states). The data position is
  the step: batch ``i`` is a pure function of ``(seed, stage index, i)`` (:class:`~vllm_indexcache.tools.data.retrieval.
  TrainBatches`), so a resumed run sees exactly the batches an uninterrupted run would.
* ``log.jsonl`` — one line per logged step (loss, kl, lr, tokens/s).
* ``final.pt`` + ``export/`` (a Hugging Face directory: safetensors shards, ``config.json``, tokenizer) +
  ``done.json`` (steps, tokens, wall time, last losses) once the stage is complete.

A stage starts from the previous stage's ``final.pt`` (or its ``export/``); the first stage from a fresh
initialisation drawn with ``seed``. Which parameters train: dense — all but the indexers; warm-up — only the
indexers; sparse — all (the indexers from the KL only, the rest from the LM loss only; see :mod:`.model`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .config import StageConfig, TrainConfig
from .model import dsa_forward


def hf_config(mc, eos_id: int = 2, bos_id: int = 1, pad_id: int = 0):
    """A ``DeepseekV32Config`` for :class:`~.config.ModelConfig` ``mc``: every layer DSA with a dense MLP."""
    from transformers import DeepseekV32Config

    n = mc.num_layers
    cfg = DeepseekV32Config(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        moe_intermediate_size=mc.intermediate_size, num_hidden_layers=n, num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_heads, q_lora_rank=mc.q_lora_rank, kv_lora_rank=mc.kv_lora_rank,
        qk_nope_head_dim=mc.qk_nope_head_dim, qk_rope_head_dim=mc.qk_rope_head_dim, v_head_dim=mc.v_head_dim,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, first_k_dense_replace=n, mlp_layer_types=["dense"] * n,
        index_n_heads=mc.index_n_heads, index_head_dim=mc.index_head_dim, index_topk=mc.index_topk,
        max_position_embeddings=mc.max_position_embeddings, rms_norm_eps=1e-6, initializer_range=mc.init_std,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": mc.rope_theta},
    )
    cfg.indexer_rope_interleave = False
    cfg.topk_method = "noaux_tc"
    cfg.scoring_func = "sigmoid"
    cfg.architectures = ["DeepseekV32ForCausalLM"]
    return cfg


def new_model(cfg: TrainConfig):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(hf_config(cfg.model), dtype=torch.float32)


def export_model(model, out_dir: str | Path, dtype: str = "bfloat16", tokenizer_dir: str | Path | None = None,
                 max_shard_size: str = "15MB") -> Path:
    """Write ``model`` as a Hugging Face directory loadable by transformers and vLLM 0.32: safetensors shards of at
    most ``max_shard_size``, ``config.json`` with the keys vLLM reads (``indexer_rope_interleave``, ``topk_method``,
    ``scoring_func``) and the tokenizer files of ``tokenizer_dir``."""
    import copy

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    m = copy.deepcopy(model).to("cpu", getattr(torch, dtype))
    m.config.dtype = dtype
    m.save_pretrained(str(out), max_shard_size=max_shard_size)
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    from vllm_indexcache.families import family_for

    data.update(family_for("DeepseekV32ForCausalLM").implied, architectures=["DeepseekV32ForCausalLM"])
    cfg_path.write_text(json.dumps(data, indent=2) + "\n")
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
    return out


def _trainable(model, kind: str) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for name, p in model.named_parameters():
        is_idx = ".indexer." in name
        p.requires_grad_(kind == "sparse" or (kind == "dense") != is_idx)
        if p.requires_grad:
            out.append((name, p))
    return out


def lr_at(stage: StageConfig, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    frac = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _save(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_init(cfg: TrainConfig, index: int):
    """Model for stage ``index``: the previous stage's final weights, or a fresh initialisation."""
    from transformers import AutoModelForCausalLM

    model = new_model(cfg)
    if index == 0:
        return model
    prev = Path(cfg.run_dir) / cfg.stages[index - 1].name
    if (prev / "final.pt").exists():
        model.load_state_dict(torch.load(prev / "final.pt", map_location="cpu"))
    elif (prev / "export").exists():
        src = AutoModelForCausalLM.from_pretrained(str(prev / "export"), dtype=torch.float32)
        model.load_state_dict(src.state_dict())
    else:
        raise FileNotFoundError(f"stage {cfg.stages[index].name!r} needs stage {cfg.stages[index - 1].name!r} "
                                f"first ({prev}/final.pt or {prev}/export)")
    return model


def run_stage(cfg: TrainConfig, index: int, *, deadline: float | None = None, stop_after: int | None = None,
              progress: bool = True) -> dict:
    """Run (or resume) stage ``index`` of ``cfg``; returns ``{"status": "done"|"interrupted", ...}``.

    ``deadline`` (``time.monotonic()`` value) or ``stop_after`` (global step count) interrupt the stage after a
    step, writing a checkpoint so that the next call resumes it.
    """
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from ..data.corpus import load_tokens
    from ..data.retrieval import TrainBatches

    stage = cfg.stages[index]
    sdir = Path(cfg.run_dir) / stage.name
    sdir.mkdir(parents=True, exist_ok=True)
    if (sdir / "done.json").exists():
        return {"status": "done", **json.loads((sdir / "done.json").read_text())}
    dev = _device(cfg)
    model = _load_init(cfg, index)
    model.to(dev).train()
    params = _trainable(model, stage.kind)
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": stage.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=stage.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=dev.type == "cuda")
    step, wall = 0, 0.0
    ckpt = sdir / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, wall = state["step"], state["wall_s"]
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])

    def save_ckpt():
        _save(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "wall_s": wall,
                     "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state() if dev.type == "cuda" else None,
                     "stage": stage.model_dump()})

    data_dir = Path(cfg.data.dir)
    tok = Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json"))
    batches = TrainBatches(load_tokens(data_dir, "train"), tok, cfg.data.context, stage.batch_size,
                           seed=cfg.seed * 1000 + index, retrieval_fraction=cfg.data.retrieval_fraction,
                           max_needles=cfg.data.max_needles, max_questions=cfg.data.max_questions,
                           pack_lengths=cfg.data.pack_lengths)
    use_amp = cfg.autocast_dtype == "bfloat16"
    fwd = torch.compile(dsa_forward) if cfg.compile else dsa_forward
    log = open(sdir / "log.jsonl", "a")
    bar = tqdm(total=stage.steps, initial=step, desc=f"{stage.name} ({stage.kind})", disable=not progress,
               mininterval=1.0 if os.isatty(2) else 15.0)
    tokens_per_step = stage.batch_size * cfg.data.context
    status = "done"
    recent: list[dict] = []
    t_last, steps_last = time.monotonic(), step
    while step < stage.steps:
        if (stop_after is not None and step >= stop_after) or (deadline is not None and time.monotonic() > deadline):
            status = "interrupted"
            break
        t0 = time.monotonic()
        rows = torch.from_numpy(batches.get(step)).to(dev, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(stage, step)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            out = fwd(model, rows[:, :-1], rows[:, 1:], stage.kind)
        loss = torch.zeros((), device=dev)
        if out.loss is not None:
            loss = loss + out.loss
        if out.kl is not None and stage.kind != "dense":
            loss = loss + stage.kl_weight * out.kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], stage.grad_clip)
        opt.step()
        step += 1
        if step % stage.log_every == 0 or step == stage.steps:
            rec = {"step": step, "lr": lr_at(stage, step - 1), "grad_norm": float(gnorm)}
            if out.loss is not None:
                rec["loss"] = float(out.loss.detach())
            if out.kl is not None:
                rec["kl"] = float(out.kl.detach())
            now = time.monotonic()
            rec["tok_per_s"] = round((step - steps_last) * tokens_per_step / max(now - t_last, 1e-9))
            t_last, steps_last = now, step
            log.write(json.dumps(rec) + "\n")
            log.flush()
            recent = (recent + [rec])[-20:]
            bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "kl")})
        wall += time.monotonic() - t0
        bar.update(1)
        if step % stage.ckpt_every == 0 and step < stage.steps:
            save_ckpt()
    bar.close()
    log.close()
    if status == "interrupted":
        save_ckpt()
        return {"status": status, "step": step, "steps": stage.steps}
    torch.save(model.state_dict(), sdir / "final.pt")
    export_model(model, sdir / "export", cfg.export_dtype, data_dir / "tokenizer", cfg.export_max_shard)

    def _avg(key):
        vals = [r[key] for r in recent if key in r]
        return float(np.mean(vals[-5:])) if vals else None

    done = {"stage": stage.name, "kind": stage.kind, "steps": stage.steps, "batch_size": stage.batch_size,
            "context": cfg.data.context, "tokens": stage.steps * tokens_per_step, "wall_s": round(wall, 1),
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
            "final_loss": _avg("loss"), "final_kl": _avg("kl")}
    (sdir / "done.json").write_text(json.dumps(done, indent=1) + "\n")
    if ckpt.exists():
        ckpt.unlink()
    return {"status": "done", **done}


def train(cfg: TrainConfig, stages: list[str] | None = None, *, time_limit_s: float | None = None,
          stop_after: int | None = None, progress: bool = True) -> list[dict]:
    """Run the stages of ``cfg`` in order (only those named in ``stages`` if given), stopping at the first one
    that is interrupted. Returns one result per stage run."""
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "config.json").write_text(cfg.model_dump_json(indent=1) + "\n")
    results = []
    for i, st in enumerate(cfg.stages):
        if stages and st.name not in stages:
            continue
        r = run_stage(cfg, i, deadline=deadline, stop_after=stop_after, progress=progress)
        results.append(r)
        print(json.dumps(r), flush=True)
        if r["status"] != "done":
            break
    return results

"""Servable IndexCache checkpoints from a distilled model: :func:`export_checkpoint` writes one (S-layer indexer
weights left out, ``index_topk_pattern`` and every vLLM-only key in ``config.json``), :func:`load_distilled` reads
it back with the transformers reference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

_COPY_SKIP = (".safetensors", ".bin", ".pt")


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
    """Load a checkpoint written by :func:`export_checkpoint` into :mod:`vllm_indexcache.tools.reference` with the
    ``index_topk_pattern`` of its config (S layers' indexers are absent from the checkpoint and never run)."""
    import warnings

    from ..reference import load_reference

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_reference(str(model_dir), pattern=cfg.get("index_topk_pattern"), dtype=dtype, **kwargs)



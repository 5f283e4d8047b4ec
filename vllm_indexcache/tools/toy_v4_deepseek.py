"""A random DeepSeek-V4 checkpoint written directly in DeepSeek's layout from the config geometry, FP8 block-quantised
as CUDA vLLM's V4 path requires — no transformers model involved (transformers 5.17 and 5.19 name V4's weights
differently; DeepSeek's names are what vLLM loads).

The names and shapes are those of DeepSeek's V4 checkpoints as vLLM's loader reads them (vLLM 0.26
``vllm/models/deepseek_v4/nvidia/model.py``: ``_make_deepseek_v4_weights_mapper``, ``DeepseekV4Model.load_weights``
stacking ``wq_a``+``wkv`` → ``fused_wqa_wkv``, ``compressor.wkv``+``wgate`` → ``fused_wkv_wgate``, shared experts'
``w1``+``w3`` → ``gate_up_proj``; ``attention.py`` / ``compressor.py`` for the attention, compressor and indexer
parameters): the same set that :func:`vllm_indexcache.tools.toy_v4.to_deepseek_layout` produces from a transformers
5.19 model (``tests/unit/test_toy_v4_deepseek.py`` compares them).

FP8: vLLM's CUDA FlashMLA V4 attention multiplies by ``wo_a`` through DeepGEMM's ``fp8_einsum`` with
``wo_a.weight_scale_inv`` (``nvidia/ops/o_proj.py``), so the checkpoint carries ``quantization_config`` ``fp8`` with
128×128 blocks (vLLM picks ``DeepseekV4FP8Config``, ``quant_config.py``) and ``expert_dtype: "fp8"`` (FP8 block
experts with float32 scales, DeepSeek-V4-Flash-Base's format; the MXFP4 experts of V4-Flash need other kernels).
Every weight of a quantised linear layer (attention ``wq_a``/``wkv``/``wq_b``/``wo_a``/``wo_b``, indexer ``wq_b``,
routed and shared experts) is stored as ``float8_e4m3fn`` with a float32 ``<name minus .weight>.scale`` of shape
``[ceil(out/128), ceil(in/128)]`` (per-block ``amax / 448``); compressors (``quant_config=None``), the indexer's
``weights_proj``, router gates, norms, mHC and embeddings stay unquantised.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

#: DeepSeek-V4-Flash's attention and mHC geometry (transformers 5.19 ``DeepseekV4Config`` defaults, which are
#: V4-Flash's ``config.json``): 64 heads of 512 (64 RoPE), q_lora 1024, 8 output groups of rank 1024, lightning
#: indexer 64 heads × 128 picking 512 compressed entries, a 128-token sliding window, 4 hyper-connection streams.
V4_FLASH_ATTENTION = dict(hidden_size=4096, num_attention_heads=64, num_key_value_heads=1, head_dim=512,
                          qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, index_n_heads=64,
                          index_head_dim=128, index_topk=512, sliding_window=128, hc_mult=4, hc_sinkhorn_iters=20,
                          hc_eps=1e-6, rms_norm_eps=1e-6)

#: Small MoE and vocabulary so that the toy builds and loads in seconds: 64 routed experts (a power of two, as the
#: routing kernels take) of width 128 (one FP8 block), 6 per token, one shared expert.
SMALL_MOE = dict(n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1, moe_intermediate_size=128,
                 vocab_size=16384)


def flash_layout(num_layers: int) -> tuple[int, ...]:
    """transformers' default V4 layer layout (``configuration_deepseek_v4.py``: two HCA layers, then HCA and CSA
    alternating), as DeepSeek's ``compress_ratios``: 128 = HCA, 4 = CSA. 18 layers → CSA at 3, 5, ..., 17."""
    return tuple([128] * min(num_layers, 2) + [4 if i % 2 else 128 for i in range(max(num_layers - 2, 0))])


def deepseek_v4_config(compress_ratios, num_hash_layers: int = 3, max_position_embeddings: int = 135168,
                       quantize: bool = True, **overrides) -> dict:
    """DeepSeek-layout ``config.json`` (a dict) for a V4 toy: V4-Flash attention (:data:`V4_FLASH_ATTENTION`),
    :data:`SMALL_MOE`, the given per-layer ``compress_ratios`` (0, 4 or 128), hash routing on the first
    ``num_hash_layers`` layers, score routing (``noaux_tc``, ``sqrtsoftplus``) after, DeepSeek-V4's YaRN
    ``rope_scaling`` (factor 16 over 65,536 positions, as DeepSeek's V4 configs; flat, so hashable for ``get_rope``:
    vLLM 0.26's ``DeepseekV4Config`` uses ``rope_scaling or rope_parameters``, and its ``common/rope.py`` turns a
    non-default type into ``deepseek_yarn``, whose float32 ``cos_sin_cache`` the CUDA output projection asserts —
    ``fused_inv_rope_fp8_quant.py``: a default RoPE gets a bf16 cache and fails there, with or without the plugin;
    seen on an H100), no MTP layer; with ``quantize`` the FP8 ``quantization_config`` and ``expert_dtype: "fp8"``.

    Raises:
        ValueError: a ratio outside {0, 4, 128}; ``num_hash_layers`` outside ``[0, len(compress_ratios)]`` (one
            line naming the key).
    """
    ratios = [int(r) for r in compress_ratios]
    bad = [r for r in ratios if r not in (0, 4, 128)]
    if bad:
        raise ValueError(f"compress_ratios: {bad} not in (0, 4, 128)")
    if not 0 <= num_hash_layers <= len(ratios):
        raise ValueError(f"num_hash_layers={num_hash_layers}: expected 0..{len(ratios)}")
    cfg = dict(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", torch_dtype="bfloat16",
               **V4_FLASH_ATTENTION, **SMALL_MOE, num_hidden_layers=len(ratios), compress_ratios=ratios,
               num_hash_layers=num_hash_layers, num_nextn_predict_layers=0, hidden_act="silu", swiglu_limit=10.0,
               scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5,
               rope_theta=10000.0, compress_rope_theta=160000.0,
               rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                             "beta_fast": 32, "beta_slow": 1},
               max_position_embeddings=max_position_embeddings, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2, pad_token_id=0, initializer_range=0.02)
    if quantize:
        cfg["expert_dtype"] = "fp8"
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128]}
    cfg.update(overrides)
    return cfg


def checkpoint_shapes(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the DeepSeek-layout checkpoint of ``config`` (a DeepSeek-layout ``config.json`` dict):
    name → (shape, kind), kind one of ``"linear"`` (a weight of a layer vLLM quantises when the config has
    ``quantization_config``), ``"weight"`` (other matrices: bf16), ``"norm"`` (RMSNorm weights: ones), ``"f32"``
    (mHC, sinks, ``ape``, router bias), ``"tid2eid"`` (int32 hash-routing table). FP8 scales are not listed
    (:func:`build_toy_v4_deepseek` adds one per ``"linear"``).

    Source: vLLM 0.26 ``models/deepseek_v4/nvidia/model.py`` (``DeepseekV4DecoderLayer``, ``DeepseekV4MoE``,
    ``DeepseekV4Model``), ``attention.py`` (``DeepseekV4Attention``, ``DeepseekV4Indexer``), ``compressor.py``
    (``DeepseekCompressor``: ``coff = 2`` for ratio 4, overlapping windows; ``ape [ratio, coff * head_dim]``).
    """
    c = config
    h, n_heads, hd = c["hidden_size"], c["num_attention_heads"], c["head_dim"]
    q_lora, groups, o_lora = c["q_lora_rank"], c["o_groups"], c["o_lora_rank"]
    hc, e, inter = c["hc_mult"], c["n_routed_experts"], c["moe_intermediate_size"]
    mix_hc, hc_dim = (2 + hc) * hc, hc * h
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "embed.weight": ((c["vocab_size"], h), "weight"), "head.weight": ((c["vocab_size"], h), "weight"),
        "norm.weight": ((h,), "norm"), "hc_head_fn": ((hc, hc_dim), "f32"), "hc_head_base": ((hc,), "f32"),
        "hc_head_scale": ((1,), "f32")}

    def compressor(prefix: str, ratio: int, dim: int) -> None:
        coff = 2 if ratio == 4 else 1
        out[f"{prefix}.ape"] = ((ratio, coff * dim), "f32")
        out[f"{prefix}.wkv.weight"] = ((coff * dim, h), "weight")
        out[f"{prefix}.wgate.weight"] = ((coff * dim, h), "weight")
        out[f"{prefix}.norm.weight"] = ((dim,), "norm")

    for i, ratio in enumerate(c["compress_ratios"][: c["num_hidden_layers"]]):
        p = f"layers.{i}"
        out.update({f"{p}.attn_norm.weight": ((h,), "norm"), f"{p}.ffn_norm.weight": ((h,), "norm")})
        for part in ("attn", "ffn"):
            out.update({f"{p}.hc_{part}_fn": ((mix_hc, hc_dim), "f32"), f"{p}.hc_{part}_base": ((mix_hc,), "f32"),
                        f"{p}.hc_{part}_scale": ((3,), "f32")})
        a = f"{p}.attn"
        out.update({f"{a}.attn_sink": ((n_heads,), "f32"), f"{a}.wq_a.weight": ((q_lora, h), "linear"),
                    f"{a}.wkv.weight": ((hd, h), "linear"), f"{a}.q_norm.weight": ((q_lora,), "norm"),
                    f"{a}.kv_norm.weight": ((hd,), "norm"), f"{a}.wq_b.weight": ((n_heads * hd, q_lora), "linear"),
                    f"{a}.wo_a.weight": ((groups * o_lora, n_heads * hd // groups), "linear"),
                    f"{a}.wo_b.weight": ((h, groups * o_lora), "linear")})
        if ratio > 1:
            compressor(f"{a}.compressor", ratio, hd)
        if ratio == 4:
            ih, idim = c["index_n_heads"], c["index_head_dim"]
            out[f"{a}.indexer.wq_b.weight"] = ((ih * idim, q_lora), "linear")
            out[f"{a}.indexer.weights_proj.weight"] = ((ih, h), "weight")
            compressor(f"{a}.indexer.compressor", ratio, idim)
        f = f"{p}.ffn"
        out[f"{f}.gate.weight"] = ((e, h), "weight")
        if i < c["num_hash_layers"]:
            out[f"{f}.gate.tid2eid"] = ((c["vocab_size"], c["num_experts_per_tok"]), "tid2eid")
        else:
            out[f"{f}.gate.bias"] = ((e,), "f32")
        for x in range(e):
            out.update({f"{f}.experts.{x}.w1.weight": ((inter, h), "linear"),
                        f"{f}.experts.{x}.w3.weight": ((inter, h), "linear"),
                        f"{f}.experts.{x}.w2.weight": ((h, inter), "linear")})
        shared = inter * c["n_shared_experts"]
        out.update({f"{f}.shared_experts.w1.weight": ((shared, h), "linear"),
                    f"{f}.shared_experts.w3.weight": ((shared, h), "linear"),
                    f"{f}.shared_experts.w2.weight": ((h, shared), "linear")})
    return out


def quantize_fp8_blocks(w, block: int = 128):
    """Block-wise FP8 quantisation as DeepSeek's checkpoints store it: ``w [out, in]`` (any float dtype) →
    ``(w_fp8 [out, in] float8_e4m3fn, scale [ceil(out/block), ceil(in/block)] float32)`` with
    ``w ≈ w_fp8 * scale`` per block and ``scale = amax(|block|) / 448`` (vLLM's ``weight_scale_inv``)."""
    import torch
    import torch.nn.functional as F

    rows, cols = w.shape
    rb, cb = math.ceil(rows / block), math.ceil(cols / block)
    padded = F.pad(w.float(), (0, cb * block - cols, 0, rb * block - rows))
    blocks = padded.view(rb, block, cb, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(rb * block, cb * block)[:rows, :cols].contiguous(), scale.contiguous()


def build_toy_v4_deepseek(out_dir: str | Path, config: dict, seed: int = 0, device: str = "cpu",
                          init_std: float = 0.02) -> Path:
    """Write ``config.json`` and a random ``model.safetensors`` for ``config`` (:func:`deepseek_v4_config`) in
    DeepSeek's layout into ``out_dir``; returns the path.

    Values (``torch.Generator`` seeded with ``seed`` on ``device``): linear and other matrices N(0, ``init_std``)
    (bf16, or FP8 + scale for ``"linear"`` when the config is quantised), norms 1, hyper-connection ``fn`` N(0,
    ``init_std``), their ``base``, attention sinks and compressor ``ape`` N(0, 0.5), ``scale`` 1, router bias 0,
    ``tid2eid`` distinct experts per token (as :func:`vllm_indexcache.tools.toy_v4.build_toy_v4`).
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    quantize = "quantization_config" in config
    tensors = {}
    for name, (shape, kind) in checkpoint_shapes(config).items():
        if kind == "norm":
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16, device=device)
        elif kind == "tid2eid":
            noise = torch.rand(shape[0], config["n_routed_experts"], generator=gen, device=device)
            tensors[name] = noise.argsort(dim=1)[:, : shape[1]].to(torch.int32)
        elif kind == "f32":
            if name.endswith("_scale"):
                t = torch.ones(shape, dtype=torch.float32, device=device)
            elif name.endswith("gate.bias"):
                t = torch.zeros(shape, dtype=torch.float32, device=device)
            else:
                std = init_std if name.endswith("_fn") else 0.5
                t = torch.randn(shape, generator=gen, device=device) * std
            tensors[name] = t
        else:
            w = torch.randn(shape, generator=gen, device=device) * init_std
            if kind == "linear" and quantize:
                tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = quantize_fp8_blocks(w)
            else:
                tensors[name] = w.to(torch.bfloat16)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out

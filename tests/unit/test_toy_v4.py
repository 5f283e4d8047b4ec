"""The toy DeepSeek-V4 (tools/toy_v4.py): transformers' layout as ``save_pretrained`` writes it, and the converter to
DeepSeek's layout that vLLM 0.32 loads (names checked against vLLM's own V4 weight mapper)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vllm_indexcache.tools.toy_v4 import build_toy_v4, deepseek_config, deepseek_name, to_deepseek_layout

#: a 3-layer toy (sliding, CSA, HCA), small everywhere transformers allows
SMALL = dict(compress_ratios=(0, 4, 128), num_hash_layers=1, tokenizer=False, hidden_size=64, head_dim=64,
             partial_rotary_factor=0.25, q_lora_rank=32, o_lora_rank=16, moe_intermediate_size=16,
             n_routed_experts=8, num_experts_per_tok=2, index_head_dim=32, index_n_heads=2, vocab_size=64)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-v4")
    hf = build_toy_v4(root / "hf", seed=3, **SMALL)
    ds = to_deepseek_layout(hf, root / "ds")
    return hf, ds


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_names_map_as_vllm_expects():
    assert deepseek_name("model.embed_tokens.weight") == "embed.weight"
    assert deepseek_name("model.hc_head.hc_fn") == "hc_head_fn"
    assert deepseek_name("model.hc_head.hc_scale") == "hc_head_scale"
    assert deepseek_name("model.layers.7.attn.norm.weight") == "layers.7.attn.kv_norm.weight"
    # compressor norms keep their names (vLLM's DeepseekCompressor.norm)
    assert deepseek_name("model.layers.1.attn.compressor.norm.weight") == "layers.1.attn.compressor.norm.weight"
    assert (deepseek_name("model.layers.1.attn.indexer.compressor.norm.weight")
            == "layers.1.attn.indexer.compressor.norm.weight")
    assert deepseek_name("head.weight") == "head.weight"


def test_converted_checkpoint(layouts):
    hf, ds = layouts
    src, dst = _tensors(hf), _tensors(ds)
    assert len(src) == len(dst) and all(not k.startswith("model.") for k in dst)
    for name, t in src.items():
        new = dst[deepseek_name(name)]
        if name.endswith("tid2eid"):
            assert new.dtype == torch.int32 and torch.equal(new.long(), t.long())
        else:
            assert torch.equal(new, t)
    # the toy randomises what transformers initialises to zero: hash routing, position biases, sinks
    tid2eid = dst["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.shape == (64, 2) and (tid2eid[:, 0] != tid2eid[:, 1]).all() and tid2eid.unique().numel() > 4
    assert dst["layers.1.attn.indexer.compressor.ape"].abs().sum() > 0
    assert dst["layers.2.attn.attn_sink"].abs().sum() > 0
    assert "layers.1.attn.indexer.wq_b.weight" in dst and not any(k.startswith("layers.2.attn.indexer") for k in dst)


def test_every_name_reaches_vllms_namespace(layouts):
    """vLLM's own V4 mapper (``cpu/model.py`` ``_make_deepseek_v4_weights_mapper``) turns every converted name into
    one under ``model.`` or ``lm_head``; that each is a parameter of vLLM's model is checked by loading it
    (tests/engine/test_v4_cpu.py: vLLM refuses unknown and missing weights)."""
    from vllm.models.deepseek_v4.cpu.model import _make_deepseek_v4_weights_mapper

    mapper = _make_deepseek_v4_weights_mapper("fp4")
    for name in _tensors(layouts[1]):
        mapped = mapper.map_name(name)
        assert mapped is not None and mapped.startswith(("model.", "lm_head.")), (name, mapped)
    assert mapper.map_name("embed.weight") == "model.embed_tokens.weight"
    assert mapper.map_name("layers.0.ffn.gate.bias") == "model.layers.0.ffn.gate.e_score_correction_bias"


def test_converted_config(layouts):
    hf, ds = layouts
    data = json.loads((ds / "config.json").read_text())
    assert data["compress_ratios"] == [0, 4, 128]
    assert data["num_hash_layers"] == 1 and data["qk_rope_head_dim"] == 16 and data["topk_method"] == "noaux_tc"
    assert not {"layer_types", "mlp_layer_types", "compress_rates", "rope_parameters"} & set(data)
    assert data["rope_theta"] == 10000.0 and data["compress_rope_theta"] == 160000.0
    # transformers reads DeepSeek's fields back into the same layer layout
    from transformers import DeepseekV4Config

    back = DeepseekV4Config(**{k: v for k, v in data.items() if k not in ("model_type", "transformers_version")})
    assert back.layer_types == json.loads((hf / "config.json").read_text())["layer_types"]
    assert back.mlp_layer_types == ["hash_moe", "moe", "moe"]


def test_config_refusals():
    base = {"layer_types": ["sliding_attention"], "head_dim": 512}
    with pytest.raises(ValueError, match="hash_moe layers must come first"):
        deepseek_config({**base, "layer_types": ["sliding_attention"] * 2, "mlp_layer_types": ["moe", "hash_moe"]})
    with pytest.raises(ValueError, match="'full_attention' has no compress ratio"):
        deepseek_config({**base, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="layout='x'"):
        build_toy_v4("/nonexistent", layout="x")
    yarn = deepseek_config({**base, "rope_parameters": {
        "main": {"rope_type": "default", "rope_theta": 10000.0},
        "compress": {"rope_type": "yarn", "factor": 16.0, "rope_theta": 160000.0, "attention_factor": 1.0}}})
    assert yarn["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 16.0, "attention_factor": 1.0}

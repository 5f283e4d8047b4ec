"""A DeepSeek-V4 checkpoint in transformers' layout read as DeepSeek's: config keys derived (or a contradiction
refused in one line) and weight names mapped, by the one map in ``families/deepseek_v4.py`` that the serving glue
(``vllm_glue/deepseek_v4_layout.py``) and the toy converter (``tools/toy_v4.py``) share."""
from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from test_early_errors import _assert_one_line_exit_2, _run

from vllm_indexcache.families import FamilyError
from vllm_indexcache.families.deepseek_v4 import deepseek_config_fields, deepseek_weight_name
from vllm_indexcache.tools.toy_v4 import DEFAULT_COMPRESS_RATIOS, build_toy_v4, to_deepseek_layout, toy_v4_config

VLLM = __import__("pathlib").Path(sys.executable).parent / "vllm"
#: a 3-layer toy (sliding, CSA, HCA), small everywhere transformers allows (as in test_toy_v4.py)
SMALL = dict(compress_ratios=(0, 4, 128), num_hash_layers=1, tokenizer=False, hidden_size=64, head_dim=64,
             partial_rotary_factor=0.25, q_lora_rank=32, o_lora_rank=16, moe_intermediate_size=16,
             n_routed_experts=8, num_experts_per_tok=2, index_head_dim=32, index_n_heads=2, vocab_size=64)


@pytest.fixture(scope="module")
def hf_dict():
    """transformers' config.json dict of the 8-layer toy (as ``save_pretrained`` writes it)."""
    return json.loads(toy_v4_config().to_json_string())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-v4-layout")
    hf = build_toy_v4(root / "hf", seed=1, **SMALL)
    return hf, to_deepseek_layout(hf, root / "ds")


def test_deepseek_keys_filled_from_transformers_keys(hf_dict):
    assert "compress_ratios" not in hf_dict and hf_dict["mlp_layer_types"][:3] == ["hash_moe", "hash_moe", "moe"]
    out, filled = deepseek_config_fields(hf_dict)
    assert {k: (v, s) for k, v, s in filled} == {
        "compress_ratios": (list(DEFAULT_COMPRESS_RATIOS), "layer_types"),
        "num_hash_layers": (2, "mlp_layer_types"),
        "topk_method": ("noaux_tc", "mlp_layer_types"),
    }
    assert out["qk_rope_head_dim"] == 64 and out["rope_theta"] == 10000.0 and out["compress_rope_theta"] == 160000.0
    assert not {"layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters"} & set(
        out)
    # DeepSeek's layout (the result, or a checkpoint in it) passes unchanged, nothing filled
    assert deepseek_config_fields(out) == (out, [])
    # what a hand-written transformers config omits is filled from transformers' defaults
    bare = {k: v for k, v in hf_dict.items() if k not in ("qk_rope_head_dim", "partial_rotary_factor",
                                                             "compress_rope_theta", "rope_parameters")}
    filled = {k: (v, s) for k, v, s in deepseek_config_fields(bare)[1]}
    assert filled["qk_rope_head_dim"][0] == 64 and filled["compress_rope_theta"] == (160000.0, "transformers' default")
    # YaRN on the compressed layers becomes DeepSeek's flat rope_scaling
    yarn = dict(hf_dict, rope_parameters={"main": {"rope_type": "default", "rope_theta": 10000.0}, "compress": {
        "rope_type": "yarn", "factor": 16.0, "rope_theta": 160000.0, "attention_factor": 1.0}})
    assert deepseek_config_fields(yarn)[0]["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 16.0,
                                                               "attention_factor": 1.0}


@pytest.mark.parametrize("change, match", [
    (dict(compress_ratios=[0, 4, 4, 4, 4, 4, 128, 4]), r"compress_ratios=\[0, 4, 4, 4, 4, 4, 128, 4\] contradicts "
                                                       r"layer_types \(which gives \[0, 4, 4, 128, 4, 4, 128, 4\]\)"),
    (dict(num_hash_layers=3), r"num_hash_layers=3 contradicts mlp_layer_types \(which gives 2\)"),
    (dict(qk_rope_head_dim=32), r"qk_rope_head_dim=32 contradicts head_dim × partial_rotary_factor"),
    (dict(compress_rope_theta=50000.0), r"compress_rope_theta=50000.0 contradicts rope_parameters.compress"),
    (dict(mlp_layer_types=["moe", "hash_moe"] + ["moe"] * 6), "hash_moe layers must come first"),
    (dict(layer_types=["full_attention"] * 8), "'full_attention' has no compress ratio"),
])
def test_contradictions_refused_in_one_line(hf_dict, change, match):
    with pytest.raises(FamilyError, match=match) as e:
        deepseek_config_fields(dict(hf_dict, **change))
    assert "\n" not in str(e.value)


def test_agreeing_forms_pass(hf_dict):
    # DeepSeek's compress_ratios may go on with the MTP layer's entry; agreeing keys are kept, nothing filled twice
    both = dict(hf_dict, compress_ratios=list(DEFAULT_COMPRESS_RATIOS) + [4], num_hash_layers=2)
    out, filled = deepseek_config_fields(both)
    assert out["compress_ratios"] == list(DEFAULT_COMPRESS_RATIOS) + [4] and out["num_hash_layers"] == 2
    assert [k for k, _, _ in filled] == ["topk_method"]


def test_weight_names():
    assert deepseek_weight_name("model.embed_tokens.weight") == "embed.weight"
    assert deepseek_weight_name("model.hc_head.hc_base") == "hc_head_base"
    assert deepseek_weight_name("model.layers.7.attn.norm.weight") == "layers.7.attn.kv_norm.weight"
    assert deepseek_weight_name("model.layers.1.attn.indexer.compressor.norm.weight") == (
        "layers.1.attn.indexer.compressor.norm.weight")
    for name in ("embed.weight", "hc_head_fn", "layers.7.attn.kv_norm.weight", "layers.1.attn.compressor.norm.weight",
                 "head.weight", "layers.0.ffn.gate.tid2eid"):   # DeepSeek's own names: unchanged
        assert deepseek_weight_name(name) == name


def _names(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_load_time_mapper_equals_the_converter(small):
    """Every tensor name of a transformers-saved toy, through the plugin's mapper in front of vLLM's, lands where
    the converted DeepSeek-layout name lands through vLLM's mapper alone; DeepSeek's names are untouched by it."""
    from vllm.models.deepseek_v4.cpu.model import _make_deepseek_v4_weights_mapper

    from vllm_indexcache.vllm_glue.deepseek_v4_layout import int32_weights, transformers_weights_mapper

    hf, ds = small
    vllm_mapper = _make_deepseek_v4_weights_mapper("fp4")
    plugin_mapper = transformers_weights_mapper() | vllm_mapper
    hf_names, ds_names = _names(hf), _names(ds)
    assert any(n.startswith("model.") for n in hf_names) and hf_names["model.layers.0.ffn.gate.tid2eid"] == "I64"
    assert {plugin_mapper.map_name(n) for n in hf_names} == {vllm_mapper.map_name(n) for n in ds_names}
    assert all(plugin_mapper.map_name(n) == vllm_mapper.map_name(n) for n in ds_names)
    [(_, t)] = int32_weights([("layers.0.ffn.gate.tid2eid", torch.tensor([[3, 1]]))])
    assert t.dtype == torch.int32 and t.tolist() == [[3, 1]]


def test_vllm_parses_the_transformers_layout_as_deepseeks(small, caplog, monkeypatch):
    """vLLM's config parser (with the plugin's config class in its registry) reads both layouts of one toy into the
    same DeepSeek fields, one log line per filled key."""
    from vllm.transformers_utils.config import get_config

    from vllm_indexcache.vllm_glue import deepseek_v4_layout

    deepseek_v4_layout.install()
    hf, ds = small
    monkeypatch.delenv(deepseek_v4_layout.LOGGED_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="vllm.indexcache"):
        cfg_hf = get_config(str(hf), trust_remote_code=False)
        get_config(str(hf), trust_remote_code=False)   # built again (as in the spawned EngineCore): no new lines
    cfg_ds = get_config(str(ds), trust_remote_code=False)
    for key in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "topk_method", "rope_theta",
                "compress_rope_theta", "num_hidden_layers", "index_topk"):
        assert getattr(cfg_hf, key) == getattr(cfg_ds, key), key
    assert cfg_hf.compress_ratios == [0, 4, 128] and cfg_hf.num_hash_layers == 1 and cfg_hf.qk_rope_head_dim == 16
    assert getattr(cfg_hf, "mlp_layer_types", None) is None
    lines = [r.getMessage() for r in caplog.records if "DeepSeek-V4 config" in r.getMessage()]
    assert lines == ["IndexCache: DeepSeek-V4 config: compress_ratios filled from layer_types = [0, 4, 128]",
                     "IndexCache: DeepSeek-V4 config: num_hash_layers filled from mlp_layer_types = 1",
                     "IndexCache: DeepSeek-V4 config: topk_method filled from mlp_layer_types = noaux_tc"]


@pytest.mark.skipif(not VLLM.exists(), reason="vLLM's `vllm` launcher is not installed beside this Python")
def test_vllm_serve_refuses_contradicting_forms_before_load(small, tmp_path):
    hf, _ = small
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    data = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(data, compress_ratios=[0, 4, 4])))
    out = _run([str(VLLM), "serve", str(bad), "--attention-backend", "indexcache", "--port", "8019"])
    _assert_one_line_exit_2(out, "DeepseekV4 config: compress_ratios=[0, 4, 4] contradicts layer_types (which gives "
                                 "[0, 4, 128])")

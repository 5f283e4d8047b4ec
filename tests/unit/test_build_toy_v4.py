"""``vllm-indexcache build-toy --arch DeepseekV4ForCausalLM --layout transformers|deepseek``: the same random V4 toy in
both checkpoint layouts (issue 35, item 1), options for the other architectures refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from vllm_indexcache.cli import main
from vllm_indexcache.families.deepseek_v4 import deepseek_weight_name

V4 = "DeepseekV4ForCausalLM"
ARGS = ["--arch", V4, "--compress-ratios", "0,4,128", "--hash-layers", "1", "--seed", "5", "--dtype", "bfloat16"]


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("build-toy-v4")
    for layout in ("transformers", "deepseek"):
        assert main(["build-toy", str(root / layout), *ARGS, "--layout", layout]) == 0
    return root / "transformers", root / "deepseek"


def test_both_layouts_hold_the_same_toy(both, capsys):
    hf, ds = both
    hf_cfg, ds_cfg = (json.loads((p / "config.json").read_text()) for p in both)
    assert hf_cfg["layer_types"] == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    assert hf_cfg["mlp_layer_types"] == ["hash_moe", "moe", "moe"] and "compress_ratios" not in hf_cfg
    assert ds_cfg["compress_ratios"] == [0, 4, 128] and ds_cfg["num_hash_layers"] == 1
    assert "layer_types" not in ds_cfg and ds_cfg["architectures"] == hf_cfg["architectures"] == [V4]
    assert (hf / "tokenizer.json").exists() and (ds / "tokenizer.json").exists()
    src, dst = _tensors(hf), _tensors(ds)
    assert any(k.startswith("model.") for k in src) and not any(k.startswith("model.") for k in dst)
    assert {deepseek_weight_name(k) for k in src} == set(dst)
    for name, t in src.items():
        new = dst[deepseek_weight_name(name)]
        if name.endswith("tid2eid"):
            assert t.dtype == torch.int64 and new.dtype == torch.int32 and torch.equal(new.long(), t)
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(new, t), name


def test_build_toy_v4_help_and_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["build-toy", "--help"])
    text = capsys.readouterr().out
    assert "--layout {transformers,deepseek}" in text and "DeepseekV4ForCausalLM" in text and "CSA" in text
    assert main(["build-toy", str(tmp_path / "t"), *ARGS]) == 0
    assert "CSA layers [1], transformers layout, bfloat16" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["--layout", "deepseek"], "--layout deepseek: for DeepseekV4ForCausalLM only, not --arch DeepseekV32ForCausalLM"),
    (["--compress-ratios", "0,4"], "--compress-ratios: for DeepseekV4ForCausalLM only"),
    (["--arch", V4, "--mtp-layers", "1"], "--mtp-layers: for other architectures only, not --arch " + V4),
    (["--arch", V4, "--layers", "3"], "--layers=3: DeepSeek-V4 has one layer per --compress-ratios entry (8)"),
    (["--arch", V4, "--compress-ratios", "0,5"], "compress_ratios: [5] not in (0, 4, 128)"),
    (["--arch", V4, "--compress-ratios", "0;4"], "--compress-ratios='0;4': expected comma-separated integers"),
])
def test_wrong_options_refused_in_one_line(tmp_path, capsys, argv, fragment):
    assert main(["build-toy", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
    assert not (tmp_path / "x").exists()

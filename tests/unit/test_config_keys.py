"""Misspelled IndexCache keys are refused with the nearest valid key; real DSA keys are not (issue 36, item 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_indexcache.commands import pattern as pattern_cmd
from vllm_indexcache.config import KEYS, IndexCacheError
from vllm_indexcache.config_keys import check_model_keys, nearest_indexcache_key

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "models" / "tiny-dsa"


@pytest.mark.parametrize("key, nearest", [
    ("index_topk_patern", "index_topk_pattern"),
    ("index_topk_pattren", "index_topk_pattern"),
    ("Index-Topk-Pattern", "index_topk_pattern"),
    ("topk_pattern", "index_topk_pattern"),
    ("index_topk_fre", "index_topk_freq"),
    ("index_topk_frequency", "index_topk_freq"),
    ("index_skip_topk_ofset", "index_skip_topk_offset"),
    ("index_cache_presets", "index_cache_preset"),
    ("indexcache_preset", "index_cache_preset"),
])
def test_misspellings_name_the_nearest_key(key, nearest):
    assert nearest_indexcache_key(key) == nearest


def test_real_dsa_and_model_keys_are_not_indexcache_looking():
    from transformers import DeepseekV32Config, GlmMoeDsaConfig

    keys = set(json.loads((TINY / "config.json").read_text()))
    keys |= set(DeepseekV32Config().to_dict()) | set(GlmMoeDsaConfig().to_dict())
    keys |= {"index_topk", "index_head_dim", "index_n_heads", "indexer_n_heads", "indexer_rope_interleave",
             "indexer_types", "index_cache_source", "index_topks", "topk_group", "topk_method", "norm_topk_prob",
             "num_nextn_predict_layers", "max_position_embeddings", *KEYS}
    assert {k: nearest_indexcache_key(k) for k in keys if nearest_indexcache_key(k)} == {}
    check_model_keys(json.loads((TINY / "config.json").read_text()))      # the shipped model passes
    check_model_keys(GlmMoeDsaConfig(), {"index_topk_freq": 2, "index_topk": 64})


def test_refusal_is_one_line_naming_the_key_and_the_nearest():
    with pytest.raises(IndexCacheError) as err:
        check_model_keys({"index_topk": 128}, {"index_topk_patern": "FSFSFSFSFSFS"})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--hf-overrides key 'index_topk_patern'")
    assert "did you mean 'index_topk_pattern'" in msg
    with pytest.raises(IndexCacheError, match="^config.json key 'index_cache_presets'.*'index_cache_preset'"):
        check_model_keys({"index_topk": 128, "index_cache_presets": "x"})


def test_pattern_command_refuses_a_misspelled_key_in_config_json(tmp_path, capsys):
    config = json.loads((TINY / "config.json").read_text())
    config["index_topk_patern"] = config.pop("index_topk_pattern")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert pattern_cmd.main(type("A", (), dict(model=str(tmp_path), freq=None, offset=None, pattern=None,
                                               preset=None))()) == 2
    assert "'index_topk_patern' is not an IndexCache key; did you mean 'index_topk_pattern'" in capsys.readouterr().err


def test_vllm_model_config_refuses_a_misspelled_override_before_load():
    """vLLM's ModelConfig (built in the API-server process before any worker or weight) refuses the typo."""
    code = ("import vllm_indexcache; vllm_indexcache.register()\n"
            "from vllm.config import ModelConfig\n"
            f"ModelConfig(model={str(TINY)!r}, hf_overrides={{'index_topk_patern': 'FSFSFSFSFSFS'}})\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "--hf-overrides key 'index_topk_patern' is not an IndexCache key; did you mean 'index_topk_pattern'" \
        in out.stderr


@pytest.mark.parametrize("key,nearest", [("index_pattern", "index_topk_pattern"), ("index_freq", "index_topk_freq"),
                                         ("index_cache_pattern", "index_topk_pattern"),
                                         ("index_offset", "index_skip_topk_offset")])
def test_keys_naming_an_indexer_and_an_indexcache_word_are_refused(key, nearest):
    """Too far from any key for difflib, but an indexer key with a word only IndexCache keys have."""
    from vllm_indexcache.config_keys import nearest_indexcache_key

    assert nearest_indexcache_key(key) == nearest


@pytest.mark.parametrize("key", ["sliding_window_pattern", "moe_layer_freq", "index_source_layer_ids",
                                 "candidate_topk_blocks", "index_top_k"])
def test_other_models_keys_with_those_words_pass(key):
    from vllm_indexcache.config_keys import nearest_indexcache_key

    assert nearest_indexcache_key(key) is None

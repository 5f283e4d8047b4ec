"""DeepSeek-V4 as a DSA family: its CSA layers are the indexer layers, in DeepSeek's and transformers' layouts."""
import pytest

from vllm_indexcache.config import IndexCacheError, apply_to_hf_config, resolve_hf_config
from vllm_indexcache.dsa_config import complete_dsa_config
from vllm_indexcache.families import FamilyError, family_for
from vllm_indexcache.pattern import resolve_for_model
from vllm_indexcache.tools.toy_v4 import DEFAULT_COMPRESS_RATIOS, deepseek_config, toy_v4_config

V4 = "DeepseekV4ForCausalLM"
CSA = [1, 2, 4, 5, 7]   # DEFAULT_COMPRESS_RATIOS (0, 4, 4, 128, 4, 4, 128, 4)


@pytest.fixture(scope="module")
def hf_config():
    """transformers' DeepseekV4Config of the toy (``layer_types``, no ``compress_ratios``)."""
    return toy_v4_config()


@pytest.fixture
def ds_config(hf_config):
    """DeepSeek's config.json dict of the same toy (``compress_ratios``), as vLLM reads it."""
    return deepseek_config(hf_config.to_dict())


def test_csa_layers_in_both_layouts(hf_config, ds_config):
    fam = family_for(V4)
    assert family_for(hf_config) is fam is family_for(ds_config)
    assert not hasattr(hf_config, "compress_ratios") and "layer_types" not in ds_config
    assert fam.indexer_layers(hf_config) == CSA == fam.indexer_layers(ds_config)
    assert [i for i, r in enumerate(DEFAULT_COMPRESS_RATIOS) if r == 4] == CSA
    assert fam.num_indexer_layers(ds_config) == 5 and fam.layer_chars(ds_config, "FSFSF") == {
        1: "F", 2: "S", 4: "F", 5: "S", 7: "F"}
    assert (fam.hf_reuse, fam.vllm_reuse_key, fam.hf_indexer, fam.vllm_attention) == (
        "override", None, "compressor.indexer", "attn")


def test_mtp_entries_of_compress_ratios_are_not_pattern_layers(ds_config):
    # DeepSeek's compress_ratios may list the MTP layer after the backbone (vLLM deepseek_v41/attention.py)
    cfg = dict(ds_config, compress_ratios=list(DEFAULT_COMPRESS_RATIOS) + [4], num_nextn_predict_layers=1)
    assert family_for(cfg).indexer_layers(cfg) == CSA


@pytest.mark.parametrize("change, match", [
    (dict(compress_ratios=None), "neither compress_ratios"),
    (dict(compress_ratios=[0, 4]), "compress_ratios has 2 entries, fewer than num_hidden_layers=8"),
])
def test_unusable_layouts_are_one_line(ds_config, change, match):
    cfg = {k: v for k, v in dict(ds_config, **change).items() if v is not None}
    with pytest.raises(FamilyError, match=match) as e:
        family_for(cfg).indexer_layers(cfg)
    assert "\n" not in str(e.value)


def test_keys_resolve_over_csa_ordinals(ds_config, hf_config):
    assert resolve_hf_config(ds_config) == "FFFFF"
    # vLLM's uniform rule over the 5 CSA ordinals, not the 8 decoder layers
    assert resolve_hf_config(dict(ds_config, index_topk_freq=2)) == "FFSFS"
    assert resolve_hf_config(dict(ds_config, index_topk_freq=2, index_skip_topk_offset=1)) == "FSFSF"
    assert resolve_hf_config(dict(ds_config, index_topk_pattern="FSSFS")) == "FSSFS"
    assert resolve_for_model("every:4", ds_config) == "FSSSF" == resolve_for_model("every:4", hf_config)
    overrides = {"index_topk_freq": 2, "index_skip_topk_offset": 1}   # --hf-overrides, already applied by vLLM
    cfg = dict(ds_config, **overrides)
    assert apply_to_hf_config(cfg, overrides) == "FSFSF"
    assert cfg["index_topk_pattern"] == "FSFSF" and cfg["index_cache_source"] == "--hf-overrides"


@pytest.mark.parametrize("pattern, match", [
    ("FSFSFSFS", r"index_topk_pattern='FSFSFSFS': length 8 != 5 DSA layers of DeepseekV4ForCausalLM"),
    ("SFFFF", "layer 0 is S"),
    ("FsFSF", "only upper-case"),
])
def test_bad_patterns_refused_in_one_line(ds_config, pattern, match):
    with pytest.raises(IndexCacheError, match=match) as e:
        apply_to_hf_config(dict(ds_config, index_topk_pattern=pattern), {"index_topk_pattern": pattern})
    assert "\n" not in str(e.value)


def test_dsa_config_leaves_v4_moe_keys_alone(hf_config):
    cfg = hf_config.to_dict()      # transformers' mlp_layer_types (hash_moe, moe) is no first_k_dense_replace rule
    assert complete_dsa_config(cfg) == [] and "first_k_dense_replace" not in cfg

"""DSA families as data: the registry, and a family whose indexer layers are a subset of its decoder layers."""
import pytest

from vllm_indexcache import families
from vllm_indexcache.config import IndexCacheError, apply_to_hf_config, resolve_hf_config
from vllm_indexcache.families import Family, FamilyError, family_for
from vllm_indexcache.tools.toy import toy_config

V32, GLM = "DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"


@pytest.mark.parametrize("arch, name, reuse, interleave", [(V32, "DeepseekV32", "override", False),
                                                            (GLM, "GlmMoeDsa", "native", True)])
def test_both_families_index_every_backbone_layer(arch, name, reuse, interleave):
    cfg = toy_config(arch, 6)
    fam = family_for(cfg)
    assert fam is family_for(arch) is family_for(cfg.to_dict())
    assert (fam.architecture, fam.name, fam.hf_reuse) == (arch, name, reuse)
    assert fam.indexer_layers(cfg) == list(range(6)) and fam.num_indexer_layers(cfg) == 6
    assert fam.implied["indexer_rope_interleave"] is interleave and fam.vllm_reuse_key == "index_topk_pattern"
    cfg.num_nextn_predict_layers = 1                       # MTP layers are not indexer layers of the pattern
    assert fam.indexer_layers(cfg) == list(range(6))
    with pytest.raises(TypeError):
        fam.implied["scoring_func"] = "softmax"            # frozen


def test_mtp_draft_architecture_follows_its_backbone_rule():
    assert family_for("DeepseekV32MTPModel").indexer_layers({"num_hidden_layers": 3}) == [0, 1, 2]


def test_unknown_architecture_is_one_line_naming_it_and_the_supported_ones():
    with pytest.raises(FamilyError) as e:
        family_for({"architectures": ["DeepseekV41ForCausalLM"], "num_hidden_layers": 4})
    msg = str(e.value)
    assert "\n" not in msg and "'DeepseekV41ForCausalLM'" in msg and V32 in msg and GLM in msg
    with pytest.raises(FamilyError, match="architectures=None"):
        family_for({})


# --- a family whose indexer layers are a subset (DeepSeek-V4-like: CSA layers, compress_ratios[i] == 4) ----------
FAKE = Family(architecture="FakeCsaForCausalLM", name="FakeCsa", model_type="fake_csa",
              indexer_layers=lambda c: [i for i, r in enumerate(families.config_value(c, "compress_ratios")) if r == 4],
              hf_reuse="override", vllm_reuse_key=None, vllm_uniform_keys=None)


@pytest.fixture
def fake_family(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, FAKE.architecture, FAKE)
    return {"architectures": [FAKE.architecture], "num_hidden_layers": 5, "index_topk": 8,
            "compress_ratios": [0, 4, 4, 128, 4]}


def test_subset_family_patterns_have_one_char_per_indexer_layer(fake_family):
    assert FAKE.indexer_layers(fake_family) == [1, 2, 4]
    assert resolve_hf_config(fake_family) == "FFF"
    assert resolve_hf_config(dict(fake_family, index_topk_freq=2, index_skip_topk_offset=1)) == "FSF"
    assert resolve_hf_config(dict(fake_family, index_topk_pattern="FSS")) == "FSS"
    with pytest.raises(IndexCacheError, match=r"index_topk_pattern='FSSFS': length 5 != 3"):
        resolve_hf_config(dict(fake_family, index_topk_pattern="FSSFS"))
    assert FAKE.layer_chars(fake_family, "FSS") == {1: "F", 2: "S", 4: "S"}


def test_plan_stage_maps_pattern_characters_to_the_familys_layers(fake_family):
    from vllm.distributed.utils import get_pp_indices

    from vllm_indexcache.vllm_glue.model import plan_stage

    layers = FAKE.indexer_layers(fake_family)                       # [1, 2, 4]
    assert [get_pp_indices(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    first, second = (plan_stage("FSS", layers, 5, r, 2) for r in range(2))
    assert (first.indexer_layers, second.indexer_layers) == (2, 1)
    assert (first.sends, second.receives, second.first_layer) == (True, True, 4)   # stage 1 starts on S layer 4
    assert plan_stage("FSF", layers, 5, 1, 2).receives is False
    assert plan_stage("FSS", layers, 5, 1, 2, handoff=False).pattern == "FSF"
    # a middle stage without indexer layers passes the top-k on
    mid = [plan_stage("FS", [0, 5], 6, r, 3) for r in range(3)]
    assert [(p.receives, p.sends, p.indexer_layers) for p in mid] == [(False, True, 1), (True, True, 0),
                                                                       (True, False, 1)]
    with pytest.raises(ValueError, match="length 4 != 3 indexer layers"):
        plan_stage("FSSS", layers, 5, 0, 2)


def test_unknown_dsa_architecture_is_left_to_vllm_but_a_preset_is_refused():
    v4 = {"architectures": ["DeepseekV41ForCausalLM"], "num_hidden_layers": 4, "index_topk": 512}
    assert apply_to_hf_config(dict(v4)) is None
    cfg = dict(v4, index_topk_freq=2)
    assert apply_to_hf_config(cfg) is None and "index_topk_pattern" not in cfg
    with pytest.raises(IndexCacheError, match=r"^index_cache_preset='x': architectures='DeepseekV41ForCausalLM'"):
        apply_to_hf_config(dict(v4, index_cache_preset="x"))
    with pytest.raises(IndexCacheError, match="no IndexCache DSA family"):
        resolve_hf_config(v4)

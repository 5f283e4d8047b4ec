"""Uniform rule, pattern helpers and the shipped presets (configs/*.json) against the published numbers."""
import json

import pytest

from vllm_indexcache.pattern import (
    Preset,
    f_layers,
    list_presets,
    load_preset,
    parse_pattern,
    presets_dir,
    uniform_pattern,
)

LAYERS = {"GlmMoeDsaForCausalLM": 78, "DeepseekV32ForCausalLM": 61}
EXPECTED_PRESETS = {"glm5-searched-1of2", "glm5-searched-1of4", "glm5.2-uniform-freq4-offset3",
                    "deepseek-v3.2-uniform-1of2", "deepseek-v3.2-uniform-1of4"}


def test_uniform_freq4_offset2_78_layers():
    f = f_layers(uniform_pattern(78, 4, 2))
    assert f == [0] + list(range(1, 78, 4))
    assert f[:4] == [0, 1, 5, 9] and f[-1] == 77 and len(f) == 21


def test_uniform_freq4_offset3_78_layers_glm52():
    f = f_layers(uniform_pattern(78, 4, 3))
    assert f == [0, 1] + list(range(2, 75, 4))
    assert f[:5] == [0, 1, 2, 6, 10] and f[-1] == 74 and len(f) == 21


def test_uniform_small_cases():
    assert uniform_pattern(16, 4) == "FFSSSFSSSFSSSFSS"
    assert uniform_pattern(6, 2) == "FFSFSF"
    assert uniform_pattern(5, 1) == "FFFFF"
    assert uniform_pattern(5, 3, offset=1) == "FSSFS"


@pytest.mark.parametrize("args", [(0, 2, 2), (4, 0, 2), (4, 2, 0), (4, 2.0, 2), (4, True, 2)])
def test_uniform_rejects_bad_numbers(args):
    with pytest.raises(ValueError):
        uniform_pattern(*args)


def test_parse_pattern():
    assert parse_pattern("FSF", 3) == "FSF"
    with pytest.raises(ValueError, match="length 2 != 3 DSA layers of X"):
        parse_pattern("FS", 3, model="X")
    for bad in ("fsf", "FXF", "SFF", ""):
        with pytest.raises(ValueError, match="index_topk_pattern="):
            parse_pattern(bad, 3)


def test_shipped_presets_listed():
    assert presets_dir().name == "configs"
    assert EXPECTED_PRESETS <= set(list_presets())  # plus searched presets of the shipped model


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_matches_its_model(name):
    p = load_preset(name)
    assert p.name == name
    assert p.num_layers == LAYERS[p.architecture] == len(p.pattern)
    assert p.pattern[0] == "F" and set(p.pattern) <= {"F", "S"}
    assert p.source
    if p.index_topk_freq is not None:
        assert p.pattern == uniform_pattern(p.num_layers, p.index_topk_freq, p.index_skip_topk_offset or 2)


def test_glm5_searched_1of4_published_f_set():
    p = load_preset("glm5-searched-1of4.json")
    assert p.f_layers == [0, 1, 3, 7, 10, 12, 20, 27, 31, 33, 38, 39, 40, 41, 42, 46, 47, 51, 60, 64, 71, 73]
    assert (p.architecture, p.num_layers, p.retention) == ("GlmMoeDsaForCausalLM", 78, "1/4")


def test_glm5_searched_trajectory_is_nested():
    half, quarter = load_preset("glm5-searched-1of2"), load_preset("glm5-searched-1of4")
    assert len(half.f_layers) == 40
    assert set(quarter.f_layers) < set(half.f_layers)  # Algorithm 1 yields one nested trajectory


def test_uniform_presets_f_counts():
    assert len(load_preset("glm5.2-uniform-freq4-offset3").f_layers) == 21
    assert len(load_preset("deepseek-v3.2-uniform-1of2").f_layers) == 31  # 0 and the 30 odd layers 1..59
    assert load_preset("deepseek-v3.2-uniform-1of4").f_layers == [0] + list(range(1, 61, 4))


def test_load_preset_by_path(tmp_path):
    data = dict(name="mine", architecture="DeepseekV32ForCausalLM", num_layers=4, pattern="FFSF", retention="1/2",
                source="test", index_topk_freq=2)  # offset defaults to 2: F at 0, 1, 3
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    assert load_preset(str(path)).f_layers == [0, 1, 3]


@pytest.mark.parametrize("change, fragment", [
    (dict(pattern="FFSF", index_topk_freq=4), "does not match index_topk_freq=4"),
    (dict(pattern="FFS"), "length 3 != 4"),
    (dict(pattern="SFSF"), "layer 0 is S"),
    (dict(retention="half"), "retention='half'"),
])
def test_invalid_preset_file_one_line(tmp_path, change, fragment):
    data = dict(name="bad", architecture="DeepseekV32ForCausalLM", num_layers=4, pattern="FFSF", retention="1/2",
                source="test", index_topk_freq=2)
    data.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        load_preset(str(path))
    msg = str(e.value)
    assert "\n" not in msg and f"index_cache_preset={str(path)!r}" in msg and fragment in msg


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError) as e:
        load_preset("glm6")
    msg = str(e.value)
    assert "\n" not in msg and "index_cache_preset='glm6'" in msg
    assert all(name in msg for name in EXPECTED_PRESETS)


def test_preset_model_validates_directly():
    with pytest.raises(ValueError):
        Preset(name="x", architecture="A", num_layers=3, pattern="FFS", retention="1/2", source="s",
               index_topk_freq=2, index_skip_topk_offset=3)

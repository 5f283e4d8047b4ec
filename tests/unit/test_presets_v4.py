"""DeepSeek-V4-Flash / V4-Pro presets: uniform over their CSA layers, and refused on a model of another CSA layout."""
import json
import subprocess
import sys

import pytest

from vllm_indexcache.config import IndexCacheError, resolve_hf_config
from vllm_indexcache.families import family_for
from vllm_indexcache.pattern import load_preset, resolve_for_model, uniform_pattern

V4 = "DeepseekV4ForCausalLM"
# compress_ratios of the published config.json files (source in the preset files), MTP entry last.
FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4, 0]          # 43 layers: CSA 2, 4, ..., 42
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4, 0]        # 61 layers: CSA 2, 4, ..., 60


def v4_config(ratios, n, **keys):
    return {"architectures": [V4], "model_type": "deepseek_v4", "num_hidden_layers": n, "compress_ratios": ratios,
            "index_topk": 512, **keys}


FLASH, PRO = v4_config(FLASH_RATIOS, 43), v4_config(PRO_RATIOS, 61)


def test_published_layouts():
    assert len(FLASH_RATIOS) == 44 and len(PRO_RATIOS) == 62
    assert family_for(FLASH).indexer_layers(FLASH) == list(range(2, 43, 2))     # 21 CSA layers
    assert family_for(PRO).indexer_layers(PRO) == list(range(2, 61, 2))         # 30 CSA layers
    assert PRO_RATIOS[:61].count(128) == 31 and FLASH_RATIOS[:43].count(128) == 20


@pytest.mark.parametrize("name, config, k", [
    ("deepseek-v4-flash-uniform-1of2", FLASH, 2), ("deepseek-v4-flash-uniform-1of4", FLASH, 4),
    ("deepseek-v4-pro-uniform-1of2", PRO, 2), ("deepseek-v4-pro-uniform-1of4", PRO, 4),
])
def test_preset_is_uniform_over_the_csa_layers_of_its_model(name, config, k):
    p = load_preset(name)
    csa = family_for(config).indexer_layers(config)
    assert (p.architecture, p.retention, p.index_topk_freq, p.index_skip_topk_offset) == (V4, f"1/{k}", k, 2)
    assert p.indexer_layers == csa and p.num_layers == len(csa)
    assert p.pattern == uniform_pattern(len(csa), k, 2)
    assert p.description.startswith(f"uniform 1/{k} over the {len(csa)} CSA layers") and "not searched" in p.description
    assert "huggingface.co/deepseek-ai/DeepSeek-V4-" in p.source and "compress_ratios" in p.source
    # resolves on its model through the config key and through a spec
    assert resolve_hf_config(dict(config, index_cache_preset=name)) == p.pattern
    assert resolve_for_model(f"preset:{name}", config) == p.pattern


def test_flash_presets_f_layers():
    half, quarter = load_preset("deepseek-v4-flash-uniform-1of2"), load_preset("deepseek-v4-flash-uniform-1of4")
    assert half.f_layers == [0] + list(range(1, 21, 2))          # 11 of 21 CSA layers
    assert quarter.f_layers == [0, 1, 5, 9, 13, 17]              # 6 of 21
    assert [half.indexer_layers[i] for i in quarter.f_layers] == [2, 4, 12, 20, 28, 36]


def one_line(fn, *fragments):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_preset_refuses_another_csa_layout():
    # Pro's preset on Flash: other CSA count
    one_line(lambda: resolve_hf_config(dict(FLASH, index_cache_preset="deepseek-v4-pro-uniform-1of2")),
             "index_cache_preset='deepseek-v4-pro-uniform-1of2'", "2,4,6", "(30)", "(21)", "does not fit")
    # same number of CSA layers (21) at other positions: refused although the pattern length matches
    shifted = v4_config([0] + [4, 128] * 21 + [0], 43)
    assert len(family_for(shifted).indexer_layers(shifted)) == 21
    msg = one_line(lambda: resolve_hf_config(dict(shifted, index_cache_preset="deepseek-v4-flash-uniform-1of4")),
                   "index_cache_preset='deepseek-v4-flash-uniform-1of4'", "does not fit")
    assert "1,3,5" in msg and "2,4,6" in msg
    assert isinstance(pytest.raises(IndexCacheError, resolve_hf_config,
                                    dict(shifted, index_cache_preset="deepseek-v4-flash-uniform-1of4")).value,
                      IndexCacheError)
    one_line(lambda: resolve_for_model("preset:deepseek-v4-flash-uniform-1of4", shifted),
             "pattern='preset:deepseek-v4-flash-uniform-1of4'", "does not fit")
    # and a V4 preset on DeepSeek-V3.2 / a V3.2 preset on V4: the architecture
    v32 = {"architectures": ["DeepseekV32ForCausalLM"], "num_hidden_layers": 61, "index_topk": 2048}
    one_line(lambda: resolve_hf_config(dict(v32, index_cache_preset="deepseek-v4-pro-uniform-1of2")),
             "made for DeepseekV4ForCausalLM")
    one_line(lambda: resolve_hf_config(dict(PRO, index_cache_preset="deepseek-v3.2-uniform-1of2")),
             "made for DeepseekV32ForCausalLM")


@pytest.mark.parametrize("layers, fragment", [
    ([2, 4, 6], "indexer_layers has 3 entries, num_layers=4"),
    ([2, 6, 4, 8], "must be ascending"),
    ([-1, 2, 4, 6], "must be ascending"),
])
def test_bad_indexer_layers_in_a_preset_file(tmp_path, layers, fragment):
    data = dict(name="bad", architecture=V4, num_layers=4, pattern="FFSF", retention="1/2", source="test",
                index_topk_freq=2, indexer_layers=layers)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    one_line(lambda: load_preset(str(path)), f"index_cache_preset={str(path)!r}", fragment)


def test_pattern_command_with_a_v4_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FLASH))
    run = [sys.executable, "-m", "vllm_indexcache.cli", "pattern", str(tmp_path)]
    r = subprocess.run(run + ["--preset", "deepseek-v4-flash-uniform-1of4"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "IndexCache: 21 DSA layers, 6 F / 15 S: FFSSSFSSSFSSSFSSSFSSS (from command-line options, preset "
        "deepseek-v4-flash-uniform-1of4)",
        "F indexer-layer ordinals (positions in the pattern): 0 1 5 9 13 17",
        "DeepseekV4 indexer layers (decoder layer ids): 2 4 6 8 10 12 14 16 18 20 22 24 26 28 30 32 34 36 38 40 42; "
        "F: 2 4 12 20 28 36; S: 6 8 10 14 16 18 22 24 26 30 32 34 38 40 42",
        "index_source_layer_ids: [2, 4, 12, 20, 28, 36]"]
    r = subprocess.run(run + ["--preset", "deepseek-v4-pro-uniform-1of4"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "does not fit" in r.stderr

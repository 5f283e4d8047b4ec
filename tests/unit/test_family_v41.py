"""DeepSeek-V4.1's declared index sources as IndexCache patterns: read, written back, round trips, contradictions."""
import itertools
import json
import subprocess
import sys

import pytest

from vllm_indexcache.families import FAMILIES, FamilyError, family_for
from vllm_indexcache.families import deepseek_v41 as v41

V41 = "DeepseekV41ForCausalLM"


def v41_config(ratios, kv, index, n=None, candidate=None, nested=True, **extra):
    """A V4.1 config.json dict; ``nested``: text fields under ``text_config`` as DeepSeek ships them."""
    text = {"num_hidden_layers": len(ratios) if n is None else n, "compress_ratios": ratios,
            "kv_source_layer_ids": kv, "index_source_layer_ids": index, "index_topk": 64, **extra}
    if candidate is not None:
        text["candidate_source_layer_id"] = candidate
    top = {"architectures": [V41], "model_type": "deepseek_v41"}
    return {**top, "text_config": text} if nested else {**top, **text}


# Full (KV + index source) 1, Reuse 2, Full 3, Reindex (index source only) 4: the topology of vLLM's V4.1 fixtures.
SMALL = v41_config([0, 2, 2, 1, 1], kv=[1, 3], index=[1, 3, 4], candidate=3)


def test_declared_index_sources_read_as_a_pattern():
    assert v41.is_deepseek_v41(SMALL) and V41 not in FAMILIES       # not a serving family
    assert v41.compressed_layers(SMALL) == [1, 2, 3, 4]             # the sliding-window layer 0 is no pattern layer
    assert v41.declared_pattern(SMALL) == "FSFF"
    flat = v41_config([0, 2, 2, 1, 1], kv=[1, 3], index=[1, 3, 4], candidate=3, nested=False)
    assert v41.declared_pattern(flat) == "FSFF"


def all_patterns(n):
    return ["F" + "".join(t) for t in itertools.product("FS", repeat=n - 1)]


def test_round_trip_every_pattern_of_the_small_model():
    ok = {}
    for pattern in all_patterns(4):
        try:
            sources = v41.index_sources_for(SMALL, pattern)
        except FamilyError as e:
            assert "\n" not in str(e) and str(e).startswith(f"pattern={pattern!r}")
            continue
        written = v41.with_index_sources(SMALL, sources)
        assert written["text_config"]["index_source_layer_ids"] == sources
        assert v41.declared_pattern(written) == pattern               # pattern -> sources -> pattern
        assert v41.index_sources_for(written, pattern) == sources     # and again from the written config
        ok[pattern] = sources
    # F only on the declared sources 1, 3, 4; layer 3 is the candidate source; layer 4 needs layer 3's K cache
    assert ok == {"FSFF": [1, 3, 4], "FSFS": [1, 3]}
    assert v41.index_sources_for(SMALL, v41.declared_pattern(SMALL)) == [1, 3, 4]


def test_round_trip_on_a_longer_model_with_both_ratios():
    # layers: 0-1 sliding window, then groups of (KV+index source, reuse) with ratios 2 and 1 alternating
    ratios = [0, 0] + [2, 2, 1, 1] * 4
    kv = list(range(2, 18, 2))
    cfg = v41_config(ratios, kv=kv, index=kv)
    assert v41.compressed_layers(cfg) == list(range(2, 18)) and v41.declared_pattern(cfg) == "FS" * 8
    for pattern in ("FS" * 8, "FSSS" * 4, "F" + "S" * 15, "FSSSFSSSSSSSFSSS"):
        sources = v41.index_sources_for(cfg, pattern)
        assert sources == [layer for layer, c in zip(range(2, 18), pattern) if c == "F"]
        assert v41.declared_pattern(v41.with_index_sources(cfg, sources)) == pattern


def test_sources_past_the_backbone_are_kept_but_not_pattern_layers():
    cfg = v41_config([0, 1, 1, 1, 1], kv=[1, 3], index=[1, 3, 5], n=5)   # 5: an MTP layer id, ignored by vLLM
    assert v41.declared_pattern(cfg) == "FSFS"
    assert v41.index_sources_for(cfg, "FSSS") == [1, 5]


def test_vllm_flattened_config_object():
    # vLLM's own parser of the nested config.json (flattens text_config onto the config object)
    from vllm.transformers_utils.configs.deepseek_v41 import DeepseekV41Config

    hf = DeepseekV41Config(text_config=dict(SMALL["text_config"]), architectures=[V41])
    assert hf.compress_ratios == [0, 2, 2, 1, 1] and hf.index_source_layer_ids == [1, 3, 4]
    assert v41.is_deepseek_v41(hf) and v41.declared_pattern(hf) == "FSFF"
    assert v41.index_sources_for(hf, "FSFS") == [1, 3]


@pytest.mark.parametrize("config, fragment", [
    (v41_config([0, 4, 4], kv=[1], index=[1]), "compress_ratios[1]=4: DeepSeek-V4.1 takes 0"),
    (v41_config([0, 1, 1], kv=[], index=[1]), "kv_source_layer_ids=[]: DeepSeek-V4.1 needs it"),
    (v41_config([0, 1, 1], kv=[1], index=None), "index_source_layer_ids=None: DeepSeek-V4.1 needs it"),
    (v41_config([0, 1, 1], kv=[1], index=[0, 1]), "layer 0 is a sliding-window layer"),
    (v41_config([0, 1, 1], kv=[1], index=[2]), "compressed layer 1 has no source at or below it"),
    (v41_config([0, 1, 1, 1], kv=[1], index=[1, 3]), None),                    # valid: Reindex at 3
    (v41_config([0, 1, 1, 1], kv=[1, 2], index=[1, 3]), "layer 3 shares the indexer K cache of its KV source 2"),
    (v41_config([0, 1, 1], kv=[1], index=[1], candidate=2), "candidate_source_layer_id=2: not in"),
    (v41_config([0, 1, 1], kv=[1], index=[1, "2"]), "index_source_layer_ids=[1, '2']: must be a list"),
    ({"architectures": [V41], "text_config": {"num_hidden_layers": 2}}, "has no compress_ratios"),
])
def test_contradictions_are_one_line(config, fragment):
    if fragment is None:
        assert v41.declared_pattern(config) == "FSF"
        return
    with pytest.raises(FamilyError) as e:
        v41.declared_pattern(config)
    assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)


def test_pattern_length_is_checked():
    with pytest.raises(FamilyError, match=r"length 3 != 4 compressed layers of DeepseekV41ForCausalLM \(1,2,3,4\)"):
        v41.index_sources_for(SMALL, "FSF")


def test_a_v4_pattern_is_the_index_sources_of_the_same_layout_in_v41():
    """One pattern language: a V4 pattern over CSA layers gives the index_source_layer_ids that, in a V4.1 config
    whose compressed layers are those CSA layers (each its own KV source), read back as the same pattern."""
    ratios = [0, 0] + [4, 128] * 20 + [4, 0]                              # DeepSeek-V4-Flash's layout
    v4 = {"architectures": ["DeepseekV4ForCausalLM"], "num_hidden_layers": 43, "compress_ratios": ratios}
    csa = family_for(v4).indexer_layers(v4)
    pattern = "FFSSSFSSSFSSSFSSSFSSS"
    chars = family_for(v4).layer_chars(v4, pattern)
    sources = [layer for layer, c in chars.items() if c == "F"]
    as_v41 = v41_config([1 if r == 4 else 0 for r in ratios], kv=csa, index=sources, n=43)
    assert v41.compressed_layers(as_v41) == csa and v41.declared_pattern(as_v41) == pattern


def run_cli(path, *args):
    return subprocess.run([sys.executable, "-m", "vllm_indexcache.cli", "pattern", str(path), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_reads_and_writes_v41_index_sources(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    r = run_cli(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "IndexCache: 4 DSA layers, 3 F / 1 S: FSFF (from index_source_layer_ids (model config))",
        "F indexer-layer ordinals (positions in the pattern): 0 2 3", "index_source_layer_ids: [1, 3, 4]"]
    r = run_cli(tmp_path, "--pattern", "FSFS")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "index_source_layer_ids: [1, 3]"
    assert r.stdout.splitlines()[0] == "spec 'FSFS' -> FSFS (2 F / 4 indexer layers)"
    for args, fragment in ((["--pattern", "all-F"], "F on layer(s) 2, which have no indexer in this checkpoint"),
                           (["--pattern", "FSSF"], "layer 4 shares the indexer K cache of its KV source 3"),
                           (["--preset", "deepseek-v3.2-uniform-1of2"], "made for DeepseekV32ForCausalLM")):
        r = run_cli(tmp_path, *args)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert fragment in r.stderr, r.stderr
    (tmp_path / "config.json").write_text(json.dumps(dict(SMALL, index_topk_freq=2)))
    r = run_cli(tmp_path)
    assert r.returncode == 2 and "index_topk_freq=2: vLLM does not read IndexCache keys" in r.stderr


def test_cli_prints_the_index_sources_of_a_v4_pattern(tmp_path):
    ratios = [0, 4, 4, 128, 4, 4, 128, 4]
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["DeepseekV4ForCausalLM"], "num_hidden_layers": 8, "compress_ratios": ratios,
         "index_topk": 512, "index_topk_pattern": "FSSFS"}))
    r = run_cli(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == ["F indexer-layer ordinals (positions in the pattern): 0 3",
                                         "DeepseekV4 indexer layers (decoder layer ids): 1 2 4 5 7; F: 1 5; S: 2 4 7",
                                         "index_source_layer_ids: [1, 5]"]

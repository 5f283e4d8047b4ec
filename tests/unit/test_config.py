"""IndexCacheConfig: key reading, precedence, hf-config application, one-line errors, and the `pattern` CLI."""
import json
import re
import subprocess
import sys

import pytest

from vllm_indexcache.config import (
    SOURCE_KEY,
    IndexCacheConfig,
    IndexCacheError,
    apply_to_hf_config,
    pattern_source,
    resolve_hf_config,
    summary,
)
from vllm_indexcache.pattern import load_preset, resolve_spec
from vllm_indexcache.tools.toy import toy_config

V32, GLM = "DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"
GLM4 = load_preset("glm5-searched-1of4").pattern


def dsa_dict(arch=V32, layers=4, **keys):
    """A minimal config.json of a DSA model (index_topk present), plus IndexCache keys."""
    return dict(architectures=[arch], num_hidden_layers=layers, index_topk=2048, num_nextn_predict_layers=1, **keys)


def one_line_error(fn, *fragments):
    with pytest.raises(IndexCacheError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_defaults_all_f():
    assert IndexCacheConfig().resolve(5) == "FFFFF"
    assert resolve_hf_config(dsa_dict(layers=5)) == "FFFFF"  # MTP layer (num_nextn_predict_layers) not counted


def test_freq_offset():
    assert IndexCacheConfig(index_topk_freq=4).resolve(16) == "FFSSSFSSSFSSSFSS"
    assert IndexCacheConfig(index_topk_freq=4, index_skip_topk_offset=3).resolve(8) == "FFFSSSFS"


def test_precedence_preset_over_pattern_over_freq():
    assert IndexCacheConfig(index_topk_pattern="FSFF", index_topk_freq=2).resolve(4) == "FSFF"
    cfg = IndexCacheConfig(index_cache_preset="glm5-searched-1of4", index_topk_pattern=GLM4)  # agreeing: fine
    assert cfg.resolve(78, GLM) == GLM4
    same = IndexCacheConfig(index_cache_preset="glm5.2-uniform-freq4-offset3", index_topk_freq=4,
                            index_skip_topk_offset=3)
    assert same.resolve(78, GLM) == load_preset("glm5.2-uniform-freq4-offset3").pattern


def test_from_hf_config_object_and_dict():
    obj = toy_config(GLM, 8, index_topk_freq=2, index_skip_topk_offset=3)
    for src in (obj, obj.to_dict()):
        cfg = IndexCacheConfig.from_hf_config(src)
        assert (cfg.index_topk_freq, cfg.index_skip_topk_offset, cfg.index_topk_pattern) == (2, 3, None)
    assert IndexCacheConfig.from_hf_config({"index_topk_pattern": ["full", "shared"]}).index_topk_pattern == "FS"


def test_resolve_hf_config_non_dsa():
    llama = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4}
    assert resolve_hf_config(llama) is None
    assert apply_to_hf_config(llama) is None and "index_topk_pattern" not in llama


def test_apply_to_glm_config_sets_indexer_types_and_is_idempotent():
    cfg = toy_config(GLM, 16, index_topk_freq=4)
    assert apply_to_hf_config(cfg) == "FFSSSFSSSFSSSFSS"
    assert cfg.index_topk_pattern == "FFSSSFSSSFSSSFSS"
    assert cfg.indexer_types[:6] == ["full", "full", "shared", "shared", "shared", "full"]
    assert apply_to_hf_config(cfg) == "FFSSSFSSSFSSSFSS"


def test_apply_preset_to_dict_removes_preset():
    d = dsa_dict(GLM, 78, index_cache_preset="glm5-searched-1of4", indexer_types=["full"] * 78)
    assert apply_to_hf_config(d) == GLM4
    assert d["index_topk_pattern"] == GLM4 and "index_cache_preset" not in d
    assert [i for i, t in enumerate(d["indexer_types"]) if t == "full"] == load_preset("glm5-searched-1of4").f_layers
    assert apply_to_hf_config(d) == GLM4  # idempotent


def test_apply_preset_to_object_removes_preset():
    cfg = toy_config(V32, 61, index_cache_preset="deepseek-v3.2-uniform-1of4")
    assert apply_to_hf_config(cfg) == load_preset("deepseek-v3.2-uniform-1of4").pattern
    assert not hasattr(cfg, "index_cache_preset") and not hasattr(cfg, "indexer_types")


def test_summary_exact():
    assert summary("FFSSSFSSSFSSSFSS") == "IndexCache: 16 DSA layers, 5 F / 11 S: FFSSSFSSSFSSSFSS"
    assert summary("FSFS", "model config") == "IndexCache: 4 DSA layers, 2 F / 2 S: FSFS (from model config)"


def test_pattern_source_and_overrides_replace_the_models_keys():
    shipped = dsa_dict(layers=4, index_topk_pattern="FSSF")
    assert pattern_source(dict(shipped)) == "model config"
    assert pattern_source(dsa_dict(layers=4)) == "default (no IndexCache keys: all F)"
    # vLLM has applied --hf-overrides onto the config: an override replaces the model's own keys as a whole
    cfg = dict(shipped, index_topk_freq=2, index_skip_topk_offset=1)
    assert apply_to_hf_config(cfg, {"index_topk_freq": 2, "index_skip_topk_offset": 1}) == "FSFS"
    assert cfg[SOURCE_KEY] == "--hf-overrides" and cfg["index_topk_pattern"] == "FSFS"
    cfg = dict(shipped, index_cache_preset="x")
    assert pattern_source(cfg, {"index_cache_preset": "x"}) == "--hf-overrides, preset x"
    # overrides without IndexCache keys leave the model's pattern in force
    cfg = dict(shipped)
    assert apply_to_hf_config(cfg, {"max_position_embeddings": 64}) == "FSSF" and cfg[SOURCE_KEY] == "model config"


@pytest.mark.parametrize("fn, fragments", [
    (lambda: IndexCacheConfig(index_topk_pattern="FFS").resolve(4, V32),
     ["index_topk_pattern='FFS'", "length 3 != 4 DSA layers of DeepseekV32ForCausalLM"]),
    (lambda: IndexCacheConfig(index_topk_pattern="FfS"), ["index_topk_pattern='FfS'", "'f'"]),
    (lambda: IndexCacheConfig(index_topk_pattern="FXS"), ["index_topk_pattern='FXS'", "'X'"]),
    (lambda: IndexCacheConfig(index_topk_pattern="SFFF"), ["index_topk_pattern='SFFF'", "layer 0 is S"]),
    (lambda: IndexCacheConfig(index_topk_freq=0), ["index_topk_freq=0"]),
    (lambda: IndexCacheConfig(index_topk_freq="4"), ["index_topk_freq='4'"]),
    (lambda: IndexCacheConfig(index_topk_freq=2.5), ["index_topk_freq=2.5"]),
    (lambda: IndexCacheConfig(index_skip_topk_offset=0), ["index_skip_topk_offset=0"]),
    (lambda: IndexCacheConfig(index_skip_topk_offset=None), ["index_skip_topk_offset=None"]),
    (lambda: IndexCacheConfig(index_cache_preset="glm6"),
     ["index_cache_preset='glm6'", "unknown preset", "glm5-searched-1of4", "deepseek-v3.2-uniform-1of2"]),
    (lambda: IndexCacheConfig(index_cache_preset="glm5-searched-1of4").resolve(61, V32),
     ["index_cache_preset='glm5-searched-1of4'", "GlmMoeDsaForCausalLM with 78", "DeepseekV32ForCausalLM with 61"]),
    (lambda: IndexCacheConfig(index_cache_preset="glm5-searched-1of4").resolve(77, GLM),
     ["index_cache_preset='glm5-searched-1of4'", "77 DSA layers"]),
    (lambda: IndexCacheConfig(index_cache_preset="glm5-searched-1of4", index_topk_pattern="F" * 78).resolve(78, GLM),
     ["index_cache_preset='glm5-searched-1of4'", "conflicts with index_topk_pattern='FFF"]),
    (lambda: IndexCacheConfig(index_cache_preset="glm5-searched-1of4", index_topk_freq=4,
                              index_skip_topk_offset=3).resolve(78, GLM),
     ["index_cache_preset='glm5-searched-1of4'", "index_topk_freq=4", "index_skip_topk_offset=3"]),
    (lambda: resolve_hf_config({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4,
                                "index_topk_freq": 4}),
     ["index_topk_freq=4", "LlamaForCausalLM", "no lightning indexer"]),
    (lambda: resolve_hf_config({"num_hidden_layers": 4, "index_topk_pattern": "FFSF"}),
     ["index_topk_pattern='FFSF'", "no lightning indexer"]),
    (lambda: resolve_hf_config(dsa_dict(layers=4, index_topk_pattern="FFSFS")),
     ["index_topk_pattern='FFSFS'", "length 5 != 4"]),
])
def test_errors_are_one_line_with_key_and_value(fn, fragments):
    one_line_error(fn, *fragments)


@pytest.mark.parametrize("spec", ["every:2", "1/4", "freq:4", "freq:4:3", "uniform:3:1",
                                  "preset:tiny-dsa-searched-1of4", "all-F"])
def test_spec_in_the_pattern_key_names_the_keys_that_say_it(spec):
    """A command-line spec written into index_topk_pattern is refused in one line naming it as a spec, and the keys
    the line suggests resolve to the pattern the spec names (12 layers: the shipped model's count)."""
    msg = one_line_error(lambda: IndexCacheConfig(index_topk_pattern=spec), f"index_topk_pattern={spec!r}",
                         "a pattern spec, not an F/S string")
    keys = {k: v.strip("'") for k, v in re.findall(r"(index_\w+)=('[^']*'|\d+)", msg.split(":", 1)[1])}
    keys = {k: v if k == "index_cache_preset" else int(v) for k, v in keys.items()}
    assert bool(keys) != (spec == "all-F"), msg   # all-F: the default, no key
    architecture = V32 if spec.startswith("preset:") else None
    assert IndexCacheConfig(**keys).resolve(12, architecture) == resolve_spec(spec, 12, architecture=architecture)


def test_malformed_spec_in_the_pattern_key_lists_the_bad_characters_in_order():
    one_line_error(lambda: IndexCacheConfig(index_topk_pattern="every:0"), "invalid character(s) 'evry:0'")


def test_error_is_value_error():
    assert issubclass(IndexCacheError, ValueError)


# --- CLI ---------------------------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vllm_indexcache.cli", "pattern", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def glm52_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dsa_dict(GLM, 78, index_topk_freq=4, index_skip_topk_offset=3)))
    return tmp_path


def test_cli_model_keys(glm52_dir):
    r = run_cli(glm52_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("IndexCache: 78 DSA layers, 21 F / 57 S: FFFSSSFSSS")
    assert lines[1] == "F layers: " + " ".join(map(str, [0, 1] + list(range(2, 75, 4))))


def test_cli_options_replace_model_keys(glm52_dir):
    r = run_cli(glm52_dir, "--preset", "glm5-searched-1of4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == (f"IndexCache: 78 DSA layers, 22 F / 56 S: {GLM4} "
                                        "(from command-line options, preset glm5-searched-1of4)")
    r = run_cli(glm52_dir / "config.json", "--freq", "4", "--offset", "2")
    assert r.returncode == 0, r.stderr
    assert "21 F / 57 S" in r.stdout and r.stdout.splitlines()[1].startswith("F layers: 0 1 5 9 ")


def test_cli_pattern_takes_a_spec_and_prints_it_in_full(glm52_dir):
    every4 = "".join("F" if i % 4 == 0 else "S" for i in range(78))
    for spec in ("every:4", "1/4"):
        r = run_cli(glm52_dir, "--pattern", spec)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"spec {spec!r} -> {every4} (20 F / 78 indexer layers)"
        assert lines[1] == f"IndexCache: 78 DSA layers, 20 F / 58 S: {every4} (from command-line options)"
    r = run_cli(glm52_dir, "--pattern", "freq:4:3")           # the model's own keys, written as a spec
    assert r.returncode == 0 and r.stdout.splitlines()[1].startswith("IndexCache: 78 DSA layers, 21 F / 57 S: FFFSSSF")


@pytest.mark.parametrize("args, fragment", [
    (["--pattern", "freq:0"], "index_topk_pattern='freq:0': K and OFFSET of freq:K[:OFFSET] must be"),
    (["--pattern", "FFS"], "index_topk_pattern='FFS': length 3 != 78 DSA layers of GlmMoeDsaForCausalLM"),
    (["--freq", "0"], "index_topk_freq=0"),
    (["--preset", "deepseek-v3.2-uniform-1of2"], "index_cache_preset='deepseek-v3.2-uniform-1of2'"),
    (["--preset", "nope"], "available: "),
    (["--offset", "3"], "index_skip_topk_offset=3"),
])
def test_cli_errors_exit_2(glm52_dir, args, fragment):
    r = run_cli(glm52_dir, *args)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr


def test_cli_missing_config_exit_2(tmp_path):
    r = run_cli(tmp_path / "nowhere")
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_cli_non_dsa_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}))
    assert run_cli(tmp_path).returncode == 0
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
                                                      "index_topk_freq": 2}))
    r = run_cli(tmp_path)
    assert r.returncode == 2 and "no lightning indexer" in r.stderr


# ---------------------------------------------------------------------------------------------- vLLM-only DSA keys
def test_vllm_only_keys_are_filled_checked_or_refused():
    from vllm_indexcache.dsa_config import DSAConfigError, complete_dsa_config
    from vllm_indexcache.families import FAMILIES

    IMPLIED = {a: dict(f.implied) for a, f in FAMILIES.items()}

    cfg = {"architectures": ["GlmMoeDsaForCausalLM"], "num_hidden_layers": 4, "n_routed_experts": 4,
           "first_k_dense_replace": 1, "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]}
    lines = complete_dsa_config(cfg)
    assert {k: cfg[k] for k in IMPLIED["GlmMoeDsaForCausalLM"]} == {"scoring_func": "sigmoid",
                                                                   "topk_method": "noaux_tc",
                                                                   "indexer_rope_interleave": True}
    assert ("info", "IndexCache: config.json has no scoring_func; using 'sigmoid' as transformers' GlmMoeDsa does") \
        in lines and len(lines) == 3
    assert complete_dsa_config(cfg) == []                                   # idempotent, nothing left to say
    wrong = {"architectures": ["DeepseekV32ForCausalLM"], "scoring_func": "softmax", "topk_method": "noaux_tc",
             "indexer_rope_interleave": True}
    lines = complete_dsa_config(wrong)
    assert [level for level, _ in lines] == ["warning", "warning"] and wrong["scoring_func"] == "softmax"
    assert "scoring_func='softmax' contradicts transformers' DeepseekV32 ('sigmoid')" in lines[0][1]
    # MoE layers every other layer from 2: expressible, written as first_k_dense_replace / moe_layer_freq
    cfg = dict(IMPLIED["DeepseekV32ForCausalLM"], architectures=["DeepseekV32ForCausalLM"], num_hidden_layers=6,
               n_routed_experts=4, first_k_dense_replace=1, mlp_layer_types=["dense", "dense", "sparse", "dense",
                                                                            "sparse", "dense"])
    assert complete_dsa_config(cfg)[0][0] == "info" and (cfg["first_k_dense_replace"], cfg["moe_layer_freq"]) == (2, 2)
    cfg["mlp_layer_types"] = ["dense", "sparse", "sparse", "dense", "sparse", "sparse"]
    with pytest.raises(DSAConfigError, match=r"^mlp_layer_types=\['dense', 'sparse'"):
        complete_dsa_config(cfg)
    assert complete_dsa_config({"architectures": ["LlamaForCausalLM"]}) == []


@pytest.mark.parametrize("arch", ["DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"])
def test_checkpoints_this_project_writes_carry_every_vllm_only_key(tmp_path, arch):
    import torch

    from vllm_indexcache.families import family_for
    from vllm_indexcache.tools.distill.export import export_checkpoint
    from vllm_indexcache.tools.reference import load_reference
    from vllm_indexcache.tools.toy import build_toy_model
    from vllm_indexcache.tools.training.trainer import export_model

    IMPLIED = {arch: dict(family_for(arch).implied)}
    toy = build_toy_model(tmp_path / "toy", arch, num_layers=4)
    assert {k: json.loads((toy / "config.json").read_text())[k] for k in IMPLIED[arch]} == IMPLIED[arch]
    bare = build_toy_model(tmp_path / "bare", arch, num_layers=4, bare=True)
    out = export_checkpoint(load_reference(str(bare)), "FSFS", bare, tmp_path / "distilled", dtype=torch.float32)
    assert {k: json.loads((out / "config.json").read_text())[k] for k in IMPLIED[arch]} == IMPLIED[arch]
    if arch == "DeepseekV32ForCausalLM":          # the training recipe trains DeepSeek-V3.2 models only
        out = export_model(load_reference(str(toy)), tmp_path / "trained", dtype="float32")
        assert {k: json.loads((out / "config.json").read_text())[k] for k in IMPLIED[arch]} == IMPLIED[arch]

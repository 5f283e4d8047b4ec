"""The one pattern-spec syntax (:func:`vllm_indexcache.pattern.resolve_spec`): each form, and bad specs."""
import pytest

from vllm_indexcache.pattern import describe_spec, f_layers, load_preset, resolve_spec


def test_explicit_and_all_f():
    assert resolve_spec("FSFS", 4) == "FSFS"
    assert resolve_spec("all-F", 5) == "FFFFF"
    assert resolve_spec("all-f", 3) == resolve_spec("allF", 3) == "FFF"


def test_freq_is_vllms_rule_and_every_is_f_every_k_from_0():
    # vLLM's index_topk_freq=4 (offset 2): F at 0, 1, 5, 9; every:4: F at 0, 4, 8 (the two "uniform 1/4"s)
    assert f_layers(resolve_spec("freq:4", 12)) == [0, 1, 5, 9]
    assert f_layers(resolve_spec("freq:4:3", 12)) == [0, 1, 2, 6, 10]
    assert f_layers(resolve_spec("freq:4:1", 12)) == [0, 4, 8]
    assert resolve_spec("uniform:4", 12) == resolve_spec("freq:4", 12)        # the old distill form
    assert f_layers(resolve_spec("every:4", 12)) == [0, 4, 8]
    assert resolve_spec("1/4", 12) == resolve_spec("every:4", 12)             # the old bench form: every:K
    assert resolve_spec("1/4", 6) == "FSSSFS"                                 # ceil(n/k) F layers
    assert resolve_spec("every:1", 3) == resolve_spec("freq:1", 3) == "FFF"


def test_preset_forms():
    p = load_preset("tiny-dsa-searched-1of4")
    assert resolve_spec("preset:tiny-dsa-searched-1of4", 12) == p.pattern == "FSFSSSSSSSFS"
    assert resolve_spec("tiny-dsa-searched-1of4", 12) == p.pattern          # a bare preset name (old bench form)
    assert resolve_spec("preset:tiny-dsa-searched-1of4", 12, architecture="DeepseekV32ForCausalLM") == p.pattern


def test_describe_spec():
    assert describe_spec("freq:4", resolve_spec("freq:4", 12)) == \
        "spec 'freq:4' -> FFSSSFSSSFSS (4 F / 12 indexer layers)"


@pytest.mark.parametrize("spec, n, fragment", [
    ("FSF", 4, "length 3 != 4"),
    ("SFFF", 4, "layer 0 is S"),
    ("FsFF", 4, "'s'"),
    ("freq:0", 4, "K and OFFSET of freq:K[:OFFSET] must be integers >= 1"),
    ("freq:x", 4, "not a pattern spec"),
    ("every:0", 4, "K of every:K (1/K) must be an integer >= 1"),
    ("2/4", 4, "1/K means every:K"),
    ("1/0", 4, "K of every:K (1/K) must be an integer >= 1"),
    ("fraq:4", 4, "not a pattern spec"),
    ("preset:nope", 4, "unknown preset"),
    ("preset:tiny-dsa-searched-1of4", 8, "length 12 != 8"),
    ("", 4, "empty pattern spec"),
])
def test_bad_specs_are_one_line_value_errors_naming_the_spec(spec, n, fragment):
    with pytest.raises(ValueError) as e:
        resolve_spec(spec, n, key="--patterns")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--patterns={spec!r}") and fragment in msg, msg


def test_preset_for_another_architecture_is_refused():
    with pytest.raises(ValueError, match=r"^pattern='preset:glm5-searched-1of4': .*GlmMoeDsaForCausalLM.*"
                                         r"DeepseekV32ForCausalLM"):
        resolve_spec("preset:glm5-searched-1of4", 78, architecture="DeepseekV32ForCausalLM")


def test_pure_rules_import_without_torch():
    import subprocess
    import sys

    code = "import sys, vllm_indexcache.pattern, vllm_indexcache.families; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_resolve_for_model_asks_the_family():
    """The length comes from the config's family; a preset for another architecture and an unknown family are one-line
    errors; ``eval --pattern`` takes the same specs."""
    import argparse

    from vllm_indexcache.pattern import resolve_for_model
    from vllm_indexcache.tools.training import evaluate

    config = {"architectures": ["GlmMoeDsaForCausalLM"], "num_hidden_layers": 6, "index_topk": 8}
    assert resolve_for_model("every:2", config) == "FSFSFS"
    with pytest.raises(ValueError, match=r"^--pattern='freq:x'") as e:
        resolve_for_model("freq:x", config, key="--pattern")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        resolve_for_model("all-F", {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2})
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    assert "SPEC" in parser.format_help() and "every:K" in parser.format_help()

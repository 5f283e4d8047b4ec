"""The plugin's tokenizer-mode rule (``vllm_glue.config_hook.tokenizer_mode_for``): a local DeepSeek-V3.2 or
DeepSeek-V4 model that ships its own chat template is served with it (``hf``), not with vLLM's DeepSeek encoding."""
import json

import pytest

from vllm_indexcache.vllm_glue.config_hook import tokenizer_mode_for


def _model(tmp_path, architecture, template):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    if template:
        (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    return str(tmp_path)


@pytest.mark.parametrize("architecture", ["DeepseekV32ForCausalLM", "DeepseekV4ForCausalLM"])
def test_own_chat_template_uses_hf(tmp_path, architecture):
    assert tokenizer_mode_for(_model(tmp_path, architecture, True), None, "auto") == "hf"


@pytest.mark.parametrize("architecture,template,mode,want", [
    ("DeepseekV4ForCausalLM", False, "auto", "auto"),          # no template of its own: DeepSeek's encoding
    ("DeepseekV4ForCausalLM", True, "deepseek_v4", "deepseek_v4"),   # an explicit mode is never changed
    ("GlmMoeDsaForCausalLM", True, "auto", "auto"),            # vLLM's default already reads the template
])
def test_other_cases_unchanged(tmp_path, architecture, template, mode, want):
    assert tokenizer_mode_for(_model(tmp_path, architecture, template), None, mode) == want

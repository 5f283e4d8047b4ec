"""Resolve and validate IndexCache keys when vLLM builds a model config — before any weight is loaded; and keep a
DSA model's own chat template. The vLLM-only keys transformers does not save are filled first
(:mod:`vllm_indexcache.dsa_config`).

vLLM source: ``vllm/config/model.py`` — ``ModelConfig.__post_init__`` applies ``--hf-overrides`` to the HF config and
then calls ``_try_verify_and_update_model_config`` (once per config). This hook runs there, in the API-server
process, for every architecture: it replaces ``index_topk_freq`` / ``index_skip_topk_offset`` / ``index_topk_pattern``
/ ``index_cache_preset`` by one explicit ``index_topk_pattern`` (which vLLM's own per-layer rule in
``deepseek_v2.py`` and transformers' ``indexer_types`` both follow), or raises
:class:`vllm_indexcache.config.IndexCacheError` with a one-line message naming the key and the value.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

_ORIGINAL = None
_ORIGINAL_POST_INIT = None
logger = logging.getLogger("vllm.indexcache")


def ships_chat_template(directory) -> bool:
    """Whether a local model/tokenizer directory has its own chat template (``chat_template.jinja`` or a
    ``chat_template`` in ``tokenizer_config.json``)."""
    path = Path(str(directory))
    if (path / "chat_template.jinja").exists():
        return True
    config = path / "tokenizer_config.json"
    try:
        return config.exists() and "chat_template" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _architecture(model) -> str | None:
    try:
        archs = json.loads((Path(str(model)) / "config.json").read_text()).get("architectures") or [None]
    except (OSError, ValueError, AttributeError):
        return None
    return archs[0]


#: architectures for which vLLM picks DeepSeek's own chat encoding (``deepseek_v32`` / ``deepseek_v4``)
DEEPSEEK_ENCODING_ARCHITECTURES = ("DeepseekV32ForCausalLM", "DeepseekV4ForCausalLM")


def tokenizer_mode_for(model, tokenizer, tokenizer_mode: str) -> str:
    """The tokenizer mode to use: ``"hf"`` instead of ``"auto"`` for a local ``DeepseekV32ForCausalLM`` or
    ``DeepseekV4ForCausalLM`` whose tokenizer ships its own chat template (vLLM would pick ``deepseek_v32`` /
    ``deepseek_v4``, DeepSeek's own chat encoding, which ignores that template, so ``LLM.chat`` and ``vllm serve``
    would not format chats as the model was trained); otherwise ``tokenizer_mode`` unchanged. An explicit
    ``--tokenizer-mode`` is never changed."""
    if tokenizer_mode != "auto" or _architecture(model) not in DEEPSEEK_ENCODING_ARCHITECTURES:
        return tokenizer_mode
    return "hf" if ships_chat_template(tokenizer or model) else tokenizer_mode


def _exit_on_error(err: Exception) -> None:
    """In ``vllm serve`` print the one-line error and exit 2 instead of a pydantic/traceback dump."""
    if any(arg == "serve" for arg in sys.argv[1:2]) and "vllm" in sys.argv[0]:
        print(f"ERROR: {err}", file=sys.stderr)
        raise SystemExit(2)


def install() -> None:
    """Wrap ``ModelConfig._try_verify_and_update_model_config`` and ``ModelConfig.__post_init__`` (idempotent)."""
    global _ORIGINAL, _ORIGINAL_POST_INIT
    from vllm.config.model import ModelConfig

    if _ORIGINAL is not None:
        return
    _ORIGINAL = ModelConfig._try_verify_and_update_model_config
    _ORIGINAL_POST_INIT = ModelConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        mode = tokenizer_mode_for(self.model, self.tokenizer, self.tokenizer_mode)
        if mode != self.tokenizer_mode:
            logger.info("IndexCache: %s ships its own chat template; tokenizer_mode=%r (not vLLM's DeepSeek chat "
                        "encoding; pass --tokenizer-mode to choose)", self.model, mode)
            self.tokenizer_mode = mode
        return _ORIGINAL_POST_INIT(self, *args, **kwargs)

    ModelConfig.__post_init__ = __post_init__

    def _try_verify_and_update_model_config(self):
        from vllm_indexcache.config import IndexCacheError, apply_to_hf_config
        from vllm_indexcache.config_keys import check_model_keys
        from vllm_indexcache.dsa_config import complete_dsa_config

        try:
            for level, line in complete_dsa_config(self.hf_config):
                getattr(logger, level)(line)
            check_model_keys(self.hf_config, self.hf_overrides)  # misspelled IndexCache keys (issue 36)
            apply_to_hf_config(self.hf_config, self.hf_overrides)
        except IndexCacheError as err:
            _exit_on_error(err)
            raise
        return _ORIGINAL(self)

    ModelConfig._try_verify_and_update_model_config = _try_verify_and_update_model_config

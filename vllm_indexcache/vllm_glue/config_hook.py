"""Resolve and validate IndexCache keys when vLLM builds a model config — before any weight is loaded.

vLLM source: ``vllm/config/model.py`` — ``ModelConfig.__post_init__`` applies ``--hf-overrides`` to the HF config and
then calls ``_try_verify_and_update_model_config`` (once per config). This hook runs there, in the API-server
process, for every architecture: it replaces ``index_topk_freq`` / ``index_skip_topk_offset`` / ``index_topk_pattern``
/ ``index_cache_preset`` by one explicit ``index_topk_pattern`` (which vLLM's own per-layer rule in
``deepseek_v2.py`` and transformers' ``indexer_types`` both follow), or raises
:class:`vllm_indexcache.config.IndexCacheError` with a one-line message naming the key and the value.
"""
from __future__ import annotations

import sys

_ORIGINAL = None


def _exit_on_error(err: Exception) -> None:
    """In ``vllm serve`` print the one-line error and exit 2 instead of a pydantic/traceback dump."""
    if any(arg == "serve" for arg in sys.argv[1:2]) and "vllm" in sys.argv[0]:
        print(f"ERROR: {err}", file=sys.stderr)
        raise SystemExit(2)


def install() -> None:
    """Wrap ``ModelConfig._try_verify_and_update_model_config`` (idempotent)."""
    global _ORIGINAL
    from vllm.config.model import ModelConfig

    if _ORIGINAL is not None:
        return
    _ORIGINAL = ModelConfig._try_verify_and_update_model_config

    def _try_verify_and_update_model_config(self):
        from vllm_indexcache.config import IndexCacheError, apply_to_hf_config

        try:
            apply_to_hf_config(self.hf_config)
        except IndexCacheError as err:
            _exit_on_error(err)
            raise
        return _ORIGINAL(self)

    ModelConfig._try_verify_and_update_model_config = _try_verify_and_update_model_config

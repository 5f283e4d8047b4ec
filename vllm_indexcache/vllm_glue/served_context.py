"""A DSA checkpoint's served context: ``max_seq_len`` by default, up to ``max_position_embeddings`` when asked.

vLLM source (0.32): ``vllm/config/model.py`` — ``ModelConfig.get_and_verify_max_len`` takes the smallest of
``max_position_embeddings``, ``max_seq_len``, … (``transformers_utils/model_arch_config_convertor.py``:
``derive_max_model_len_and_key``) as the default ``max_model_len`` and refuses a larger ``--max-model-len`` unless
``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``. A checkpoint trained at a shorter context than its RoPE table (the shipped
``examples/models/tiny-dsa``: trained at 2048, ``max_position_embeddings`` 8192) declares the trained length as
``max_seq_len``, so every entry point serves 2048 tokens by default; :func:`beyond_trained_context` lets an explicit
``--max-model-len`` up to ``max_position_embeddings`` through with one warning line (the positions exist; the model
was not trained there); beyond ``max_position_embeddings`` :func:`beyond_positions` refuses it in one line (exit 2
in ``vllm serve``) instead of vLLM's pydantic dump, which names ``max_seq_len`` as the limit and suggests
``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` (with that variable set, vLLM decides as before).
"""
from __future__ import annotations

import logging
import os

from vllm_indexcache.config import IndexCacheError

logger = logging.getLogger("vllm.indexcache")
_ORIGINAL = None


def _declared(hf_config, max_model_len: int | None) -> tuple[int, int] | None:
    """``(max_seq_len, max_position_embeddings)`` of a DSA checkpoint (one with ``index_topk``) that declares both,
    when ``max_model_len`` was given explicitly; else None (vLLM decides)."""
    trained = getattr(hf_config, "max_seq_len", None)
    positions = getattr(hf_config, "max_position_embeddings", None)
    if (max_model_len is None or max_model_len == -1 or getattr(hf_config, "index_topk", None) is None
            or not isinstance(trained, int) or not isinstance(positions, int)):
        return None
    return trained, positions


def beyond_trained_context(hf_config, max_model_len: int | None) -> str | None:
    """The warning for an explicit ``max_model_len`` with ``max_seq_len < max_model_len <= max_position_embeddings``
    on a DSA model (one with ``index_topk``), else None (vLLM decides: default, within ``max_seq_len``, or refused)."""
    declared = _declared(hf_config, max_model_len)
    if declared is None or not declared[0] < max_model_len <= declared[1]:
        return None
    trained, positions = declared
    return (f"IndexCache: --max-model-len {max_model_len} is beyond the context the model declares as trained "
            f"(max_seq_len={trained}, the default); allowed up to max_position_embeddings={positions}, but quality "
            "there is what the model card says")


def beyond_positions(hf_config, max_model_len: int | None) -> IndexCacheError | None:
    """The one-line error for an explicit ``max_model_len`` above ``max_position_embeddings`` of a DSA checkpoint that
    declares ``max_seq_len`` (the case :func:`beyond_trained_context` extends), else None; None too when
    ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` asks vLLM to allow it."""
    declared = _declared(hf_config, max_model_len)
    if (declared is None or max_model_len <= declared[1]
            or os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").lower() in ("1", "true")):
        return None
    trained, positions = declared
    return IndexCacheError(f"--max-model-len={max_model_len}: beyond the model's max_position_embeddings={positions} "
                           f"(its default is max_seq_len={trained}); at most {positions}")


def install() -> None:
    """Wrap ``ModelConfig.get_and_verify_max_len`` (idempotent)."""
    global _ORIGINAL
    if _ORIGINAL is not None:
        return
    from vllm.config.model import ModelConfig

    _ORIGINAL = ModelConfig.get_and_verify_max_len

    def get_and_verify_max_len(self, max_model_len):
        if (err := beyond_positions(self.hf_text_config, max_model_len)) is not None:
            from vllm_indexcache.vllm_glue.config_hook import _exit_on_error

            _exit_on_error(err)
            raise err
        if (warning := beyond_trained_context(self.hf_text_config, max_model_len)) is not None:
            logger.warning(warning)
            return int(max_model_len)
        return _ORIGINAL(self, max_model_len)

    ModelConfig.get_and_verify_max_len = get_and_verify_max_len

"""Settings refused in the API-server process, before any EngineCore or worker starts: one line, exit status 2.

vLLM source (0.32): ``vllm/engine/arg_utils.py`` — ``EngineArgs.__post_init__`` runs ``load_general_plugins()``
(so this plugin's ``register()``) before ``create_engine_config`` builds ``ModelConfig`` and then ``VllmConfig``
(whose ``__post_init__`` calls ``Platform.check_and_update_config``); only afterwards are the engine processes
spawned. Two settings used to fail late or as a traceback:

* ``--hf-overrides`` that is not a JSON object (e.g. a missing ``}``): vLLM's parser keeps it as a string and
  ``ModelConfig``'s pydantic validation prints a traceback. :func:`parse_hf_overrides` refuses it in
  ``EngineArgs.create_model_config``.
* a DeepSeek-V4 ``config.json`` whose transformers and DeepSeek keys contradict (:func:`check_v4_layout`).
* ``--attention-backend X`` (X not ``indexcache``) for a DSA model on CPU: the refusal came from the worker's
  backend selection, after ~240 log lines and two tracebacks. :func:`check_cpu_backend` runs it from
  ``CpuPlatform.check_and_update_config`` (:mod:`.cpu.platform`).

In ``vllm serve`` / ``vllm-indexcache serve`` the error is printed as one ``ERROR:`` line and the process exits 2
(``config_hook._exit_on_error``); in Python (``LLM(...)``) it is raised.
"""
from __future__ import annotations

import json

from vllm_indexcache import BACKEND_NAME
from vllm_indexcache.config import IndexCacheError

_ORIGINAL = None
EXAMPLE = '\'{"index_topk_pattern": "FSFSFSFSFSFS"}\''


def parse_hf_overrides(value):
    """``value`` unchanged unless it is a string (vLLM's parser keeps ``--hf-overrides`` a string when it does not
    look like ``{…}``): then its JSON object as a dict.

    Raises:
        IndexCacheError: one line naming ``--hf-overrides``, the value and the JSON error.
    """
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise IndexCacheError(f"--hf-overrides={value!r}: not valid JSON ({e}); expected an object such as "
                              f"{EXAMPLE}") from None
    if not isinstance(parsed, dict):
        raise IndexCacheError(f"--hf-overrides={value!r}: expected a JSON object such as {EXAMPLE}")
    return parsed


def check_cpu_backend(backend_name: str | None, is_dsa: bool) -> None:
    """Refuse an explicit attention backend other than INDEXCACHE for a DSA model on CPU (the only sparse MLA
    backend there; vLLM's ``CpuPlatform.get_attn_backend_cls`` would raise "Sparse Attention is not supported").

    Raises:
        IndexCacheError: one line naming ``attention_backend`` and the value.
    """
    if is_dsa and backend_name is not None and backend_name != BACKEND_NAME:
        raise IndexCacheError(f"attention_backend={backend_name}: sparse (DSA) attention on CPU needs "
                              f"--attention-backend {BACKEND_NAME.lower()}")


def check_v4_layout(model) -> None:
    """A DeepSeek-V4 ``config.json`` in transformers' layout whose DeepSeek keys contradict it, refused in one line
    (:func:`vllm_indexcache.vllm_glue.deepseek_v4_layout.check_checkpoint`; vLLM's config parser would retry and log
    it twice as "Error parsing config")."""
    from vllm_indexcache.vllm_glue.deepseek_v4_layout import check_checkpoint

    check_checkpoint(model)


def install() -> None:
    """Wrap ``EngineArgs.create_model_config`` (idempotent)."""
    global _ORIGINAL
    if _ORIGINAL is not None:
        return
    from vllm.engine.arg_utils import EngineArgs

    from vllm_indexcache.vllm_glue.config_hook import _exit_on_error

    _ORIGINAL = EngineArgs.create_model_config

    def create_model_config(self):
        try:
            self.hf_overrides = parse_hf_overrides(self.hf_overrides)
            check_v4_layout(self.model)
        except IndexCacheError as err:
            _exit_on_error(err)
            raise
        return _ORIGINAL(self)

    EngineArgs.create_model_config = create_model_config

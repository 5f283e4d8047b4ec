"""A DeepSeek-V4 checkpoint saved by transformers (``DeepseekV4ForCausalLM.save_pretrained``) served as that model.

vLLM 0.32 reads DeepSeek's own layout only: its config class (``vllm/transformers_utils/configs/deepseek_v4.py``,
registered as ``_CONFIG_REGISTRY["deepseek_v4"]`` in ``vllm/transformers_utils/config.py``) passes the fields of
``config.json`` through, so transformers' ``mlp_layer_types`` (``hash_moe``) fails transformers' own layer-type
validation and ``compress_ratios`` / ``num_hash_layers`` / ``compress_rope_theta`` are missing; its weight mapper
(``models/deepseek_v4/cpu/model.py`` ``_make_deepseek_v4_weights_mapper``) expects DeepSeek's names.

* Config: :class:`DeepseekV4Config` replaces vLLM's class in that registry. Built from a transformers-layout dict, it
  first derives DeepSeek's keys (:func:`vllm_indexcache.families.deepseek_v4.deepseek_config_fields`), logging one
  start-up line per filled key, then runs vLLM's ``__init__``; a DeepSeek-layout dict passes unchanged.
  :func:`check_checkpoint` refuses a ``config.json`` whose two forms contradict, in one line, from
  ``EngineArgs.create_model_config`` (:mod:`.early_errors`), before vLLM parses it (exit 2 in ``vllm serve``).
* Weights: :func:`transformers_weights_mapper` (a vLLM ``WeightsMapper`` from
  :data:`~vllm_indexcache.families.deepseek_v4.TRANSFORMERS_WEIGHT_RENAMES`) goes in front of vLLM's own mapper on
  the plugin's V4 model (``cpu/deepseek_v4/model.py``), which also stores ``tid2eid`` as int32
  (:func:`int32_weights`). DeepSeek's names match none of its rules.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from vllm.transformers_utils.configs.deepseek_v4 import DeepseekV4Config as VllmDeepseekV4Config

from vllm_indexcache.config import IndexCacheError
from vllm_indexcache.families import FamilyError
from vllm_indexcache.families.deepseek_v4 import (
    INT32_WEIGHTS,
    TRANSFORMERS_WEIGHT_RENAMES,
    deepseek_config_fields,
)

logger = logging.getLogger("vllm.indexcache")

MODEL_TYPE = "deepseek_v4"
#: environment variable holding the fill lines already logged (:func:`_log_filled`)
LOGGED_ENV = "VLLM_INDEXCACHE_V4_CONFIG_LOGGED"
_ORIGINAL_CLASS = None


def _fields(data: dict) -> tuple[dict, list]:
    try:
        return deepseek_config_fields(data)
    except FamilyError as err:
        raise IndexCacheError(str(err)) from None


def _log_filled(filled) -> None:
    """One INFO line per filled key per server start: vLLM builds the config again in the process that started it
    and in the EngineCore it spawns (after engine start-up), so lines already logged are remembered in
    :data:`LOGGED_ENV`, which spawned processes inherit."""
    logged = set(filter(None, os.environ.get(LOGGED_ENV, "").split("\n")))
    for key, value, source in filled:
        line = f"IndexCache: DeepSeek-V4 config: {key} filled from {source} = {value}"
        if line not in logged:
            logged.add(line)
            logger.info(line)
    os.environ[LOGGED_ENV] = "\n".join(sorted(logged))


def check_checkpoint(model) -> None:
    """Refuse a local DeepSeek-V4 ``config.json`` whose transformers and DeepSeek forms contradict (one line).

    Args:
        model: the ``--model`` argument; anything that is not a local directory with a ``config.json`` of
            ``model_type`` ``deepseek_v4`` is left alone.

    Raises:
        IndexCacheError: naming both keys and values (:func:`deepseek_config_fields`).
    """
    path = Path(str(model)) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("model_type") == MODEL_TYPE:
        _fields(data)


def transformers_weights_mapper():
    """vLLM ``WeightsMapper`` from transformers 5.19's weight names to DeepSeek's (applied before vLLM's own)."""
    import re

    from vllm.model_executor.models.utils import WeightsMapper

    return WeightsMapper(orig_to_new_regex={re.compile(p): r for p, r in TRANSFORMERS_WEIGHT_RENAMES})


def int32_weights(weights: Iterable) -> Iterator:
    """``(name, tensor)`` pairs with the :data:`~vllm_indexcache.families.deepseek_v4.INT32_WEIGHTS` (``tid2eid``,
    int64 in transformers' checkpoints) as int32, the dtype of vLLM's parameter."""
    import torch

    for name, tensor in weights:
        if name.endswith(INT32_WEIGHTS) and tensor.dtype != torch.int32:
            tensor = tensor.to(torch.int32)
        yield name, tensor


class DeepseekV4Config(VllmDeepseekV4Config):
    """vLLM's ``DeepseekV4Config`` with transformers' layout read as DeepSeek's (module docstring). Defined at module
    level so that spawned engine processes unpickle it by name before plugins load."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        kwargs, filled = _fields(kwargs)
        _log_filled(filled)
        super().__init__(**kwargs)


def install() -> None:
    """Put :class:`DeepseekV4Config` in vLLM's config registry (idempotent)."""
    global _ORIGINAL_CLASS
    from vllm.transformers_utils import config as vllm_config

    if _ORIGINAL_CLASS is not None:
        return
    _ORIGINAL_CLASS = vllm_config._CONFIG_REGISTRY[MODEL_TYPE]
    vllm_config._CONFIG_REGISTRY[MODEL_TYPE] = DeepseekV4Config

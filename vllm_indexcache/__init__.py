"""vllm-indexcache: IndexCache (arXiv 2603.12201, cross-layer lightning-indexer reuse) for DeepSeek-Sparse-Attention
models in vLLM.

``register()`` is the ``vllm.general_plugins`` entry point; vLLM calls it once in every process (API server,
EngineCore, workers). Everything that touches vLLM internals lives in :mod:`vllm_indexcache.vllm_glue`.
"""
from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: register the INDEXCACHE backend and the IndexCache hooks (idempotent)."""
    from vllm_indexcache.vllm_glue import install

    install()


def __getattr__(name: str):
    # Lazy re-exports so that `import vllm_indexcache` stays cheap (no pydantic/torch at import time).
    if name == "BACKEND_NAME":  # the attention backend's name (``--attention-backend indexcache``)
        from vllm_indexcache.vllm_glue import BACKEND_NAME

        return BACKEND_NAME
    if name in ("IndexCacheConfig", "IndexCacheError"):
        from vllm_indexcache import config

        return getattr(config, name)
    raise AttributeError(name)

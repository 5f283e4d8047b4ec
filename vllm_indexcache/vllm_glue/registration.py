"""Registration of the ``INDEXCACHE`` attention backend in vLLM's backend registry.

vLLM source: ``vllm/v1/attention/backends/registry.py`` (``register_backend``, ``AttentionBackendEnum.register``).

Pickling pitfall (vLLM 0.32, Python 3.11): the ``VllmConfig`` holding ``AttentionBackendEnum.INDEXCACHE`` is pickled
into the spawned EngineCore and worker processes and unpickled *before* their plugins load; plain ``Enum`` pickling
then fails with ``ValueError: '<path>' is not a valid AttentionBackendEnum``. The member therefore reduces to
:func:`_indexcache_member`, which registers it on demand in the child.
"""
from __future__ import annotations

from vllm_indexcache.vllm_glue import BACKEND_NAME

#: Class path registered for ``INDEXCACHE`` on CPU; on CUDA the Triton fallback (``cuda_platform`` picks vLLM's
#: native sparse kernels instead where they exist).
BACKEND_PATH = "vllm_indexcache.vllm_glue.cpu.sparse_mla.IndexCacheSparseMLABackend"


def backend_path() -> str:
    """``INDEXCACHE``'s class path on this platform."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        from vllm_indexcache.vllm_glue.cuda.platform import TRITON_BACKEND_PATH

        return TRITON_BACKEND_PATH
    return BACKEND_PATH


def _indexcache_member():
    """Unpickling target: return ``AttentionBackendEnum.INDEXCACHE``, registering it first if needed."""
    register_backend()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[BACKEND_NAME]


def _add_member(enum_cls, name: str, path: str) -> None:
    """vLLM 0.26's ``register_backend`` only re-points existing members (``_ATTN_OVERRIDES``); add ``name`` to the
    enum itself (value = class path, as vLLM's own members) so that ``AttentionBackendEnum[name]`` resolves."""
    member = object.__new__(enum_cls)
    member._name_, member._value_ = name, path
    member.__objclass__ = enum_cls
    enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[path] = member


def register_backend() -> None:
    """Register ``INDEXCACHE`` (idempotent) so that ``--attention-backend indexcache`` parses and selects it."""
    from vllm.v1.attention.backends import registry

    enum_cls = registry.AttentionBackendEnum
    if BACKEND_NAME not in enum_cls._member_map_:
        registry.register_backend(BACKEND_NAME, backend_path())
    if BACKEND_NAME not in enum_cls._member_map_:
        _add_member(enum_cls, BACKEND_NAME, backend_path())
    if not getattr(enum_cls, "_indexcache_pickle_patched", False):
        original = enum_cls.__reduce_ex__

        def __reduce_ex__(self, protocol):
            if self._name_ == BACKEND_NAME:
                return (_indexcache_member, ())
            return original(self, protocol)

        enum_cls.__reduce_ex__ = __reduce_ex__
        enum_cls._indexcache_pickle_patched = True

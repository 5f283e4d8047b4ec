"""vLLM 0.26's DeepSeek-V4 KV-cache grouping with CSA layers that have no lightning indexer.

vLLM source: ``vllm/v1/core/kv_cache_utils.py``. ``group_and_unify_kv_cache_specs`` puts every ``SlidingWindowMLASpec``
with the same ``(block_size, sliding_window)`` into one group, so a CSA layer's two compressor states — the main
compressor's (``2 * 2 * head_dim`` fp32 per slot) and its indexer compressor's (``2 * 2 * index_head_dim``) — share a
group. ``_get_kv_cache_groups_uniform_groups`` then pairs that group's layers by page size with ``zip`` and asserts
``len(set(len(layers) for layers in layers_per_size.values())) == 1`` ("inside a UniformKV group, each page_size
should have the same number of layers"): with S CSA layers (no indexer, so no indexer compressor state) there are
more main states than indexer states and vLLM stops at that assert.

:func:`split_by_page_size` runs after vLLM's grouping and splits only such a group — page sizes with unequal layer
counts — into one group per page size; vLLM then pads and packs each as it does its other sliding-window groups
(the indexer compressor states take as many 8640-byte slots per block as there are F layers, not CSA layers). A
model whose groups pair up (all F, or any model without S layers) is grouped exactly as by vLLM.
"""
from __future__ import annotations

import os
from collections import defaultdict

_PATCHED = False
#: the vLLM function this patch wraps; vLLM 0.33+ regrouped its KV-cache code and has no such function, so the patch
#: is not installed there and a pattern with S CSA layers is refused (:func:`problem`) instead of guessed at
WRAPPED = "group_and_unify_kv_cache_specs"


#: diagnostic only (``scripts/bench_v4_gpu.py`` configurations ending in ``+split``): ``always`` splits every
#: sliding-window group with more than one page size, so an all-F engine gets the KV-cache groups of an S pattern
#: (to time the extra group alone)
SPLIT_ENV = "VLLM_INDEXCACHE_V4_SPLIT_GROUPS"


def split_by_page_size(groups, always: bool | None = None):
    """``groups`` (vLLM's ``group_and_unify_kv_cache_specs`` result: a full-MLA ``UniformTypeKVCacheSpecs`` first, then
    sliding-window ones, or None) with every sliding-window group whose page sizes hold unequal numbers of layers
    split into one ``UniformTypeKVCacheSpecs`` per page size (layer order kept); others unchanged. ``always``
    (default: ``$VLLM_INDEXCACHE_V4_SPLIT_GROUPS == "always"``) splits every group with several page sizes."""
    if not groups:
        return groups
    if always is None:
        always = os.environ.get(SPLIT_ENV, "") == "always"
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    out = [groups[0]]
    for group in groups[1:]:
        by_size = defaultdict(dict)
        for name, spec in group.kv_cache_specs.items():
            by_size[spec.page_size_bytes][name] = spec
        if len({len(specs) for specs in by_size.values()}) > 1 or (always and len(by_size) > 1):
            out.extend(UniformTypeKVCacheSpecs.from_specs(specs) for specs in by_size.values())
        else:
            out.append(group)
    return out


def problem() -> str | None:
    """Why S CSA layers cannot be served by this vLLM (its KV-cache grouping has no ``WRAPPED`` function to fix:
    vLLM 0.33+, never run with S layers), or None (vLLM 0.26, where the patch applies)."""
    from vllm.v1.core import kv_cache_utils

    if hasattr(kv_cache_utils, WRAPPED):
        return None
    import vllm

    return (f"DeepSeek-V4 with S CSA layers on CUDA needs vLLM 0.26's KV-cache grouping "
            f"(vllm.v1.core.kv_cache_utils.{WRAPPED}), which vLLM {vllm.__version__} does not have; "
            "serve all-F (index_topk_pattern all-F) or use vLLM 0.26")


def install() -> None:
    """Wrap ``kv_cache_utils.group_and_unify_kv_cache_specs`` (read by ``get_kv_cache_groups`` as a module global)
    with :func:`split_by_page_size` (idempotent). Where vLLM has no such function (:func:`problem`) nothing is
    installed: all-F serves as vLLM does, and the model class refuses a pattern with S CSA layers."""
    global _PATCHED
    if _PATCHED or problem() is not None:
        return
    _PATCHED = True
    from vllm.v1.core import kv_cache_utils

    original = getattr(kv_cache_utils, WRAPPED)

    def group_and_unify_kv_cache_specs(kv_cache_spec):
        return split_by_page_size(original(kv_cache_spec))

    setattr(kv_cache_utils, WRAPPED, group_and_unify_kv_cache_specs)

"""DeepSeek-V4's paged key caches in the model dtype ("plain rows", vLLM's non-``fp8_ds_mla`` layout): one
``[head]`` row per cache entry, no scales. vLLM ``models/deepseek_v4/attention.py`` ``_resolve_dsv4_kv_cache_dtype``
(``auto`` / ``bfloat16`` → bfloat16 rows) and ``DeepseekV4IndexerCache``; the FP8 layouts are in :mod:`.cpu`.

A cache is ``[num_blocks, block_size * head]`` (a per-layer view ``kv_cache.view(num_blocks, -1)``; any row
stride), ``block_size`` entries per block, entry ``i`` of a block at elements ``head * i .. head * (i + 1)``.
Used for the sliding-window and compressed KV (head 512: 1,024 B an entry in bfloat16) and the lightning indexer K
(head 128: 256 B an entry).
"""
from __future__ import annotations

import torch


def is_rows(cache_2d: torch.Tensor) -> bool:
    """Whether ``cache_2d`` holds plain rows (a floating dtype) rather than an FP8 byte layout (uint8)."""
    return cache_2d.dtype.is_floating_point


def _index(slots: torch.Tensor, block_size: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    slots = slots.long()
    block, entry = slots // block_size, slots % block_size
    return block[:, None], entry[:, None] * head + torch.arange(head)


def write_rows(cache_2d: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, block_size: int) -> None:
    """Store ``rows [N, head]`` (any float dtype; rounded to the cache's) at ``slots [N]`` (all valid, global
    ``block * block_size + entry``) of ``cache_2d [num_blocks, block_size * head]``, in place."""
    if slots.numel() == 0:
        return
    block, cols = _index(slots, block_size, rows.shape[-1])
    cache_2d[block, cols] = rows.to(cache_2d.dtype)


def read_rows(cache_2d: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[N, head]`` float32 entries of ``cache_2d [num_blocks, block_size * head]`` at ``slots [N]`` (all valid)."""
    head = cache_2d.shape[1] // block_size
    block, cols = _index(slots, block_size, head)
    return cache_2d[block, cols].float()

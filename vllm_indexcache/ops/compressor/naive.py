"""DeepSeek-V4 KV compression one closing token at a time, in float64: the reference of :mod:`.cpu`.

Source: vLLM ``models/deepseek_v4/common/ops/fused_compress_quant_cache.py``
(``_fused_kv_compress_norm_rope_insert_sparse_attn`` / ``..._indexer_attn``), DeepSeek-V4 report §2.3; transformers
``models/deepseek_v4/modeling_deepseek_v4.py`` ``DeepseekV4CSACompressor`` (overlapping windows of ``2 * ratio``).
"""
from __future__ import annotations

import math

import torch

from vllm_indexcache.ops.fp8_cache.naive import (
    gptj_rope_naive,
    write_ds_mla_naive,
    write_indexer_k_naive,
    write_row_naive,
)


def compressed_entry_naive(state_cache, window_slots, rms_norm_weight, eps, ratio) -> torch.Tensor:
    """``[D]`` float64 RMS-normalised softmax pool of one window's state rows (``window_slots``: state slots,
    ``-1`` = none; the first ``ratio`` rows of an overlapping window read state columns ``0..D-1``, the rest
    ``D..2D-1``; scores ``width`` columns after their values)."""
    head = rms_norm_weight.shape[0]
    width = state_cache.shape[-1] // 2
    state_bs = state_cache.shape[1]
    overlap = len(window_slots) > ratio
    pooled = torch.zeros(head, dtype=torch.float64)
    for d in range(head):
        terms = []
        for j, slot in enumerate(window_slots):
            if slot < 0:
                continue
            col = d + (head if overlap and j >= ratio else 0)
            row = state_cache[slot // state_bs, slot % state_bs]
            terms.append((float(row[width + col]), float(row[col])))
        m = max(s for s, _ in terms)
        den = sum(math.exp(s - m) for s, _ in terms)
        pooled[d] = sum(math.exp(s - m) / den * v for s, v in terms)
    return pooled / math.sqrt(float((pooled * pooled).mean()) + eps) * rms_norm_weight.double()


def compress_norm_rope_store_naive(state_cache, gather_slots, positions, kv_slot_mapping, rms_norm_weight, eps,
                                   cos_sin_cache, kv_cache_2d, kv_cache_block_size, ratio, indexer: bool) -> None:
    """Store the entry of every token that closes a window (``(p + 1) % ratio == 0``) and has a compressed slot:
    RoPE on the last 64 dims at position ``(p // ratio) * ratio``; ``indexer``: the whole roped entry rounded to
    bfloat16 in the indexer K layout, else the ``fp8_ds_mla`` layout with the NoPE dims rounded to bfloat16; a
    floating ``kv_cache_2d`` (plain rows) gets the whole roped entry in its dtype."""
    for t in range(gather_slots.shape[0]):
        p, slot = int(positions[t]), int(kv_slot_mapping[t])
        if (p + 1) % ratio or slot < 0:
            continue
        normed = compressed_entry_naive(state_cache, [int(s) for s in gather_slots[t]], rms_norm_weight, eps, ratio)
        roped = gptj_rope_naive(normed, cos_sin_cache[(p // ratio) * ratio])
        if kv_cache_2d.dtype.is_floating_point:
            write_row_naive(kv_cache_2d, slot, roped, kv_cache_block_size)
        elif indexer:
            write_indexer_k_naive(kv_cache_2d, slot, roped.float().to(torch.bfloat16).float(), kv_cache_block_size)
        else:
            entry = torch.cat([normed[:448].float().to(torch.bfloat16).float(), roped[448:].float()])
            write_ds_mla_naive(kv_cache_2d, slot, entry, kv_cache_block_size)

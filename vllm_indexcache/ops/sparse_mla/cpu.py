"""Sparse MLA attention over selected latent-cache rows: vectorised torch implementation for CPU.

Same maths as :mod:`vllm_indexcache.ops.sparse_mla.naive` (see there for the absorption identity and sources:
vLLM 0.32 ``v1/attention/backends/mla/flashmla_sparse.py``, DeepSeek-V3.2 report §2.1). Per chunk of tokens: one
``index_select`` of the selected cache rows, two batched matmuls and a softmax. Chunks are small — the gathered
``[C, K, L+R]`` rows in float32 stay under ``max_chunk_bytes`` (default 1.5 MiB, i.e. in a core's L2/L3) — so the
rows are converted to float32 and read by both matmuls while still in cache.
"""
from __future__ import annotations

import torch

from .naive import check_sparse_mla_inputs

__all__ = ["sparse_mla"]


def sparse_mla(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
               softmax_scale: float, max_chunk_bytes: int = 3 << 19) -> torch.Tensor:
    """Absorbed MLA attention of each query over its selected latent-cache slots (CPU path of the backend).

    Args:
        q_latent: ``[T, N, L]`` queries already absorbed through ``W_UK`` (``L = kv_lora_rank``).
        q_pe: ``[T, N, R]`` rotary part of the queries, RoPE applied.
        kv_cache: ``[num_slots, L + R]`` latent cache, row = ``[kv_c | k_pe]`` (float dtype; vLLM's
            ``[num_blocks, block_size, L+R]`` cache viewed flat; rows must be contiguous).
        slots: ``[T, K]`` integer global slot ids per query; ``-1`` = no key.
        softmax_scale: multiplies the logits.
        max_chunk_bytes: bound, in bytes, on one chunk's gathered float32 rows (at least one token per chunk).

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
    out = torch.empty((T, N, L), dtype=acc, device=q_latent.device)
    if T == 0:
        return out.to(q_latent.dtype)
    if K == 0:
        return out.zero_().to(q_latent.dtype)
    step = max(1, int(max_chunk_bytes) // max(1, acc.itemsize * K * D))
    q = torch.cat([q_latent, q_pe], dim=-1).to(acc)                  # [T, N, L+R]
    sl = slots.long()
    invalid = sl < 0                                                 # [T, K]
    idx = sl.clamp_min(0)
    bad = invalid.any(dim=1)                                         # [T]: some slot is -1
    chunk_bad = [bool(x) for x in torch.nn.functional.pad(bad, (0, (-T) % step)).view(-1, step).any(dim=1)]
    cache = kv_cache if kv_cache.is_contiguous() else kv_cache.contiguous()
    for c, a in enumerate(range(0, T, step)):
        b = min(T, a + step)
        rows = cache.index_select(0, idx[a:b].reshape(-1)).view(b - a, K, D).to(acc)   # [C, K, L+R]
        score = torch.bmm(q[a:b], rows.transpose(1, 2)).mul_(softmax_scale)        # [C, N, K]
        if chunk_bad[c]:
            score.masked_fill_(invalid[a:b, None, :], float("-inf"))
        p = torch.softmax(score, dim=-1)
        if chunk_bad[c]:
            p = torch.nan_to_num_(p, nan=0.0)                        # rows without a valid slot → 0
        torch.bmm(p, rows[:, :, :L], out=out[a:b])
    return out.to(q_latent.dtype)

"""Sparse MLA attention over selected latent-cache rows: readable reference (loops over tokens allowed).

MLA in "absorbed" form (DeepSeek-V2 report §2.1.2 / DeepSeek-V3.2 report §2.1; vLLM 0.32
``v1/attention/backends/mla/flashmla_sparse.py`` and ``model_executor/layers/attention/mla_attention.py``): the
per-head key ``k_nope[s,n] = W_UK[n] · kv_c[s]`` is never materialised; instead the query is pulled into the latent
space, ``q_latent[t,n] = W_UK[n]^T · q_nope[t,n]``, so that ``q_nope · k_nope = q_latent · kv_c``. Likewise the
value ``v[s,n] = W_UV[n] · kv_c[s]`` is applied after the weighted sum. For query ``t``, head ``n`` and the selected
slots ``K_t`` (top-k of the lightning indexer, mapped to global cache slots)::

    score[t,n,j] = (q_latent[t,n] · kv_c[slot_j] + q_pe[t,n] · k_pe[slot_j]) · softmax_scale
    p[t,n,:]     = softmax_j(score[t,n,:])            over valid slots only (slot ≥ 0)
    out[t,n]     = Σ_j p[t,n,j] · kv_c[slot_j]        (latent; the caller applies W_UV then o_proj)

The latent cache row is vLLM's MLA layout ``[kv_c (kv_lora_rank) | k_pe (qk_rope_head_dim)]`` flattened over
blocks (slot = block_id · block_size + offset).
"""
from __future__ import annotations

import torch

__all__ = ["sparse_mla_naive", "check_sparse_mla_inputs"]


def check_sparse_mla_inputs(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                            slots: torch.Tensor) -> None:
    """Validate shapes and slot ids shared by the naive and CPU sparse MLA.

    Raises:
        ValueError: wrong ranks, mismatched sizes, a float ``slots`` tensor, or a slot id outside
            ``[-1, num_slots)``.
    """
    if q_latent.dim() != 3 or q_pe.dim() != 3 or kv_cache.dim() != 2 or slots.dim() != 2:
        raise ValueError(f"expected q_latent [T,N,L], q_pe [T,N,R], kv_cache [num_slots,L+R], slots [T,K]; got "
                         f"{tuple(q_latent.shape)}, {tuple(q_pe.shape)}, {tuple(kv_cache.shape)}, "
                         f"{tuple(slots.shape)}")
    T, N, L = q_latent.shape
    if q_pe.shape[:2] != (T, N):
        raise ValueError(f"q_pe must be [T={T}, N={N}, R], got {tuple(q_pe.shape)}")
    R = q_pe.shape[2]
    if kv_cache.shape[1] != L + R:
        raise ValueError(f"kv_cache rows must have L+R={L + R} values, got {kv_cache.shape[1]}")
    if slots.shape[0] != T:
        raise ValueError(f"slots must have T={T} rows, got {slots.shape[0]}")
    if slots.dtype.is_floating_point or slots.dtype == torch.bool:
        raise ValueError(f"slots must be an integer tensor, got {slots.dtype}")
    if slots.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # value range needs a host read, which a CUDA-graph capture forbids; shapes were checked above
    if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= kv_cache.shape[0]):
        raise ValueError(f"slot ids must lie in [-1, {kv_cache.shape[0]}); got range "
                         f"[{int(slots.min())}, {int(slots.max())}]")


def sparse_mla_naive(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
                     softmax_scale: float) -> torch.Tensor:
    """Absorbed MLA attention of each query over its selected latent-cache slots (reference implementation).

    Args:
        q_latent: ``[T, N, L]`` queries already absorbed through ``W_UK`` (``L = kv_lora_rank``).
        q_pe: ``[T, N, R]`` rotary part of the queries (``R = qk_rope_head_dim``), RoPE applied.
        kv_cache: ``[num_slots, L + R]`` latent cache, row = ``[kv_c | k_pe]`` (float dtype).
        slots: ``[T, K]`` integer global slot ids per query; ``-1`` = no key. Duplicates count twice.
        softmax_scale: multiplies the logits (vLLM: ``qk_head_dim^-0.5``, times the YaRN mscale² if any).

    Returns:
        ``[T, N, L]`` latent attention output in ``q_latent.dtype`` (accumulated in float32, or float64 for
        float64 inputs). A row with no valid slot is all zeros.

    Raises:
        ValueError: see :func:`check_sparse_mla_inputs`.
    """
    check_sparse_mla_inputs(q_latent, q_pe, kv_cache, slots)
    T, N, L = q_latent.shape
    acc = torch.promote_types(q_latent.dtype, torch.float32)       # float32, or float64 for float64 inputs
    out = torch.zeros((T, N, L), dtype=acc, device=q_latent.device)
    for t in range(T):
        valid = [int(s) for s in slots[t].tolist() if s >= 0]
        if not valid:
            continue
        rows = kv_cache[valid].to(acc)                  # [n, L+R]
        kv_c, k_pe = rows[:, :L], rows[:, L:]
        score = (q_latent[t].to(acc) @ kv_c.T + q_pe[t].to(acc) @ k_pe.T) * softmax_scale   # [N, n]
        p = torch.softmax(score, dim=-1)
        out[t] = p @ kv_c
    return out.to(q_latent.dtype)

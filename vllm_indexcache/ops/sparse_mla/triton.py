"""Sparse MLA attention over selected latent-cache slots as a Triton kernel for CUDA GPUs (beside :mod:`.naive`).

Same maths and contract as :func:`vllm_indexcache.ops.sparse_mla.naive.sparse_mla_naive`::

    score[t,n,j] = (q_latent[t,n] · kv_c[slot_j] + q_pe[t,n] · k_pe[slot_j]) · scale      (slot_j ≥ 0 only)
    out[t,n]     = Σ_j softmax_j(score[t,n,:]) · kv_c[slot_j]

One program per (query token, block of ``BLOCK_N`` heads): it walks the token's ``K`` selected slots in tiles of
``BLOCK_K``, gathers the ``[BLOCK_K, L]`` latent rows and ``[BLOCK_K, R]`` rope rows once for all heads of the
block (the MQA structure of absorbed MLA: one latent "head" shared by every query head), and runs an online softmax
(FlashAttention style) with a ``[BLOCK_N, L]`` fp32 accumulator. Prefill and decode use the same kernel — every
query token carries its own slot list. A token without valid slots gets zeros, as the reference.
Used by the CUDA Triton fallback of the INDEXCACHE backend (:mod:`vllm_indexcache.vllm_glue.cuda.sparse_mla`); the CPU
backend uses :mod:`.cpu`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .naive import check_sparse_mla_inputs


def _prec(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ("ieee"), not TF32 (Triton's default on NVIDIA GPUs); others: the dtype's."""
    return "ieee" if dtype == torch.float32 else "tf32"


__all__ = ["sparse_mla"]


@triton.jit
def _sparse_mla_kernel(ql_ptr, qp_ptr, kv_ptr, slot_ptr, out_ptr, N, K, scale,
                       stride_qlt, stride_qln, stride_qpt, stride_qpn, stride_kv, stride_st, stride_ot, stride_on,
                       L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rl = tl.arange(0, BLOCK_L)
    rr = tl.arange(0, BLOCK_R)
    n_mask = rn < N
    l_mask = rl < L
    r_mask = rr < R
    ql = tl.load(ql_ptr + t * stride_qlt + rn[:, None] * stride_qln + rl[None, :],
                 mask=n_mask[:, None] & l_mask[None, :], other=0.0)                        # [BLOCK_N, BLOCK_L]
    qp = tl.load(qp_ptr + t * stride_qpt + rn[:, None] * stride_qpn + rr[None, :],
                 mask=n_mask[:, None] & r_mask[None, :], other=0.0)                        # [BLOCK_N, BLOCK_R]
    if UPCAST:  # see vllm_indexcache.ops.indexer.triton._upcast: the interpreter's bf16 tl.dot is wrong
        ql = ql.to(tl.float32)
        qp = qp.to(tl.float32)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        slot = tl.load(slot_ptr + t * stride_st + rk, mask=rk < K, other=-1).to(tl.int64)
        valid = slot >= 0
        base = tl.where(valid, slot, 0) * stride_kv
        kv_c = tl.load(kv_ptr + base[:, None] + rl[None, :], mask=valid[:, None] & l_mask[None, :],
                       other=0.0).to(ql.dtype)                                            # [BLOCK_K, BLOCK_L]
        k_pe = tl.load(kv_ptr + base[:, None] + L + rr[None, :], mask=valid[:, None] & r_mask[None, :],
                       other=0.0).to(qp.dtype)                                            # [BLOCK_K, BLOCK_R]
        s = (tl.dot(ql, tl.trans(kv_c), out_dtype=tl.float32, input_precision=PREC)
             + tl.dot(qp, tl.trans(k_pe), out_dtype=tl.float32, input_precision=PREC))
        s = tl.where(valid[None, :], s * scale, float("-inf"))                            # [BLOCK_N, BLOCK_K]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_c.dtype), kv_c, out_dtype=tl.float32, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + t * stride_ot + rn[:, None] * stride_on + rl[None, :], out.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & l_mask[None, :])


def sparse_mla(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
               softmax_scale: float, block_n: int = 16, block_k: int = 32) -> torch.Tensor:
    """Absorbed MLA attention of each query over its selected latent-cache slots (Triton; CUDA or interpreter).

    Args:
        q_latent: ``[T, N, L]`` queries absorbed through ``W_UK``; bf16/fp16/fp32.
        q_pe: ``[T, N, R]`` rotary part of the queries, RoPE applied.
        kv_cache: ``[num_slots, L + R]`` latent cache (vLLM's ``[blocks, block_size, L+R]`` viewed flat); its rows
            are cast to the query dtype for the matmuls (fp32 accumulation).
        slots: ``[T, K]`` integer global slot ids, ``-1`` = none.
        softmax_scale: multiplies the logits.

    Returns:
        ``[T, N, L]`` in ``q_latent.dtype``; zeros for a token without valid slots.
    """
    check_sparse_mla_inputs(q_latent, q_pe, kv_cache, slots)
    T, N, L = q_latent.shape
    R = q_pe.shape[2]
    K = slots.shape[1]
    ql = q_latent.contiguous()
    qp = q_pe.to(ql.dtype).contiguous()
    kv = kv_cache if kv_cache.stride(1) == 1 else kv_cache.contiguous()
    sl = slots.to(torch.int32).contiguous()
    out = torch.empty((T, N, L), dtype=ql.dtype, device=ql.device)
    if T == 0:
        return out
    grid = (T, triton.cdiv(N, block_n))
    _sparse_mla_kernel[grid](ql, qp, kv, sl, out, N, K, float(softmax_scale),
                             ql.stride(0), ql.stride(1), qp.stride(0), qp.stride(1), kv.stride(0), sl.stride(0),
                             out.stride(0), out.stride(1), L=L, R=R, BLOCK_L=max(16, triton.next_power_of_2(L)),
                             BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_N=block_n, BLOCK_K=block_k,
                             PREC=_prec(ql.dtype),
                             UPCAST=os.environ.get("TRITON_INTERPRET") == "1")
    return out

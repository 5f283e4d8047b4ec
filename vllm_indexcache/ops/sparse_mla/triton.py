"""Sparse MLA attention over selected latent-cache slots as a Triton kernel for CUDA GPUs (beside :mod:`.naive`).

Same maths and contract as :func:`vllm_indexcache.ops.sparse_mla.naive.sparse_mla_naive`::

    score[t,n,j] = (q_latent[t,n] · kv_c[slot_j] + q_pe[t,n] · k_pe[slot_j]) · scale      (slot_j ≥ 0 only)
    out[t,n]     = Σ_j softmax_j(score[t,n,:]) · kv_c[slot_j]

One program per (query token, block of ``BLOCK_N`` heads): it walks the token's ``K`` selected slots in tiles of
``BLOCK_K``, gathers the ``[BLOCK_K, L]`` latent rows and ``[BLOCK_K, R]`` rope rows once for all heads of the
block (the MQA structure of absorbed MLA: one latent "head" shared by every query head), and runs an online softmax
(FlashAttention style, in base 2) with a ``[BLOCK_N, L]`` fp32 accumulator. Prefill and decode use the same
kernel — every query token carries its own slot list. When the tokens × head blocks do not fill the GPU (decode),
the slot list is split across ``splits`` programs (split-K, FlashDecoding style): each writes its normalised
partial output and log2-sum-exp, and a second kernel combines them. A token without valid slots gets zeros, as
the reference. Tile defaults (:data:`DEFAULT_CONFIG`; :data:`SMALL_BATCH_CONFIG` for at most
:data:`SMALL_BATCH_TOKENS` tokens) are the fastest of ``scripts/profile_triton_gpu.py`` on an H200
(docs/log/benchmarks-2026-11-to-12.md §8), for bf16/fp16.

**Shared memory.** The program keeps its ``[BLOCK_N, L + R]`` queries and a ``[BLOCK_K, L + R]`` tile of gathered
cache rows in shared memory (the two operands of the tensor-core product), so it needs about
``(BLOCK_N + BLOCK_K) · (L + R) · bytes`` — num_stages changes little. At DeepSeek-V3.2's ``L + R = 576`` the bf16
default needs 147,968 B, but fp32 inputs (the search scorer runs the model in float32) need 312,320 B, over the
232,448 B a Hopper GPU (H100, H200) gives one program (Triton 3.9 for sm_90; the error seen on an H100 with
Triton 3.6: ``OutOfResources: shared memory, Required: 312320, Hardware limit: 232448``). 4-byte inputs (queries
or cache) therefore use :data:`FP32_CONFIG` (151,808 B there). On GPUs with less shared memory per program (e.g.
Ada's 99 KB) a tile that does not compile is halved (:func:`smaller_config`) until it does, once per shape class,
with a warning: the kernel runs wherever it fits rather than stopping the engine.
Used by the CUDA Triton fallback of the INDEXCACHE backend (:mod:`vllm_indexcache.vllm_glue.cuda.sparse_mla`); the CPU
backend uses :mod:`.cpu`.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..gpu import interpreting, num_sms
from .naive import check_sparse_mla_inputs


def _prec(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ("ieee"), not TF32 (Triton's default on NVIDIA GPUs); others: the dtype's."""
    return "ieee" if dtype == torch.float32 else "tf32"


__all__ = ["sparse_mla", "launch_config", "smaller_config", "DEFAULT_CONFIG", "FP32_CONFIG", "SMALL_BATCH_CONFIG",
           "SMALL_BATCH_TOKENS"]

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634

#: Tile and launch options of :func:`sparse_mla` (heads × slots per program, warps, pipeline stages).
DEFAULT_CONFIG = {"block_n": 64, "block_k": 64, "num_warps": 8, "num_stages": 3}
#: The options for batches of at most :data:`SMALL_BATCH_TOKENS` query tokens (decode at batch 1: smaller tiles
#: give more programs to split over; 0.015 against 0.021 ms per layer at one token in the H200 profile).
SMALL_BATCH_CONFIG = {"block_n": 16, "block_k": 32, "num_warps": 4, "num_stages": 2}
SMALL_BATCH_TOKENS = 4
#: The options for more than :data:`SMALL_BATCH_TOKENS` tokens when the queries or the cache hold 4-byte (fp32)
#: elements: :data:`DEFAULT_CONFIG`'s 64 × 64 tile needs 312,320 B of shared memory there at ``L + R = 576``, this
#: one 151,808 B (Triton 3.9, sm_90; the limit on Hopper is 232,448 B). The small-batch tile fits in fp32 as it is
#: (112,832 B).
FP32_CONFIG = {"block_n": 32, "block_k": 32, "num_warps": 8, "num_stages": 2}
#: ``(device index, element bytes, base config)`` → the smaller config that compiled on this GPU, after
#: :class:`~triton.runtime.errors.OutOfResources` for the base one.
_FITTED: dict[tuple, dict] = {}


@triton.jit
def _sparse_mla_kernel(ql_ptr, qp_ptr, kv_ptr, slot_ptr, out_ptr, part_ptr, lse_ptr, N, K, K_PER_SPLIT, qk_scale,
                       stride_qlt, stride_qln, stride_qpt, stride_qpn, stride_kv, stride_st, stride_ot, stride_on,
                       L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                       UPCAST: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    sp = tl.program_id(2)
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
    k_begin = sp * K_PER_SPLIT
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        slot = tl.load(slot_ptr + t * stride_st + rk, mask=rk < k_end, other=-1).to(tl.int64)
        valid = slot >= 0
        base = tl.where(valid, slot, 0) * stride_kv
        kv_c = tl.load(kv_ptr + base[:, None] + rl[None, :], mask=valid[:, None] & l_mask[None, :],
                       other=0.0).to(ql.dtype)                                            # [BLOCK_K, BLOCK_L]
        k_pe = tl.load(kv_ptr + base[:, None] + L + rr[None, :], mask=valid[:, None] & r_mask[None, :],
                       other=0.0).to(qp.dtype)                                            # [BLOCK_K, BLOCK_R]
        s = (tl.dot(ql, tl.trans(kv_c), out_dtype=tl.float32, input_precision=PREC)
             + tl.dot(qp, tl.trans(k_pe), out_dtype=tl.float32, input_precision=PREC))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))                         # log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_c.dtype), kv_c, out_dtype=tl.float32, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:  # partial output of this split (normalised) and its log2-sum-exp; -inf where it saw no valid slot
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        row = (t * tl.num_programs(2) + sp) * N + rn
        tl.store(lse_ptr + row, lse, mask=n_mask)
        tl.store(part_ptr + row[:, None] * BLOCK_L + rl[None, :], out, mask=n_mask[:, None] & l_mask[None, :])
    else:
        tl.store(out_ptr + t * stride_ot + rn[:, None] * stride_on + rl[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & l_mask[None, :])


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, N, stride_ot, stride_on, SPLITS: tl.constexpr, L: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_SP: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1)
    rsp = tl.arange(0, BLOCK_SP)
    rl = tl.arange(0, BLOCK_L)
    sp_mask = rsp < SPLITS
    row = (t * SPLITS + rsp) * N + n
    lse = tl.load(lse_ptr + row, mask=sp_mask, other=float("-inf"))                     # [BLOCK_SP]
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wgt = tl.exp2(lse - m_safe)                                                          # 0 for empty splits
    part = tl.load(part_ptr + row[:, None] * BLOCK_L + rl[None, :], mask=sp_mask[:, None] & (rl < L)[None, :],
                   other=0.0)
    tot = tl.sum(wgt, axis=0)
    out = tl.sum(part * wgt[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out_ptr + t * stride_ot + n * stride_on + rl, out.to(out_ptr.dtype.element_ty), mask=rl < L)


def _num_splits(programs: int, K: int, block_k: int, sms: int) -> int:
    """Key splits so that about two waves of programs fill the GPU (decode: few tokens × head blocks), rounded down
    to a power of two (equal splits of a power-of-two top-k: 4 splits ran 0.106 ms where 5 ran 0.121 ms at 32
    tokens on the H200); each split keeps at least two ``block_k`` tiles. 1 when the tokens alone fill it
    (prefill)."""
    if programs >= sms:
        return 1
    n = max(1, min(-(-2 * sms // programs), K // (2 * block_k)))
    return 1 << (n.bit_length() - 1)


def launch_config(num_tokens: int, element_bytes: int) -> dict:
    """The default tile and launch options of :func:`sparse_mla` for ``num_tokens`` query tokens whose queries or
    cache hold ``element_bytes``-byte elements: :data:`SMALL_BATCH_CONFIG` for at most :data:`SMALL_BATCH_TOKENS`
    tokens, else :data:`FP32_CONFIG` for 4-byte elements and :data:`DEFAULT_CONFIG` otherwise (a copy)."""
    if num_tokens <= SMALL_BATCH_TOKENS:
        return dict(SMALL_BATCH_CONFIG)
    return dict(FP32_CONFIG if element_bytes >= 4 else DEFAULT_CONFIG)


def smaller_config(cfg: dict) -> dict | None:
    """The next tile to try when ``cfg`` needs more shared memory than the GPU has: the larger of ``block_k`` /
    ``block_n`` halved (``block_k`` first on a tie; shared memory grows with ``block_n + block_k``), down to 16
    each, then one pipeline stage; ``None`` when nothing is left to shrink."""
    bn, bk = cfg["block_n"], cfg["block_k"]
    if max(bn, bk) > 16:
        return {**cfg, "block_k": bk // 2} if bk >= bn else {**cfg, "block_n": bn // 2}
    if cfg["num_stages"] > 1:
        return {**cfg, "num_stages": 1}
    return None


def sparse_mla(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
               softmax_scale: float, block_n: int | None = None, block_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None,
               splits: int | None = None) -> torch.Tensor:
    """Absorbed MLA attention of each query over its selected latent-cache slots (Triton; CUDA or interpreter).

    Args:
        q_latent: ``[T, N, L]`` queries absorbed through ``W_UK``; bf16/fp16/fp32.
        q_pe: ``[T, N, R]`` rotary part of the queries, RoPE applied.
        kv_cache: ``[num_slots, L + R]`` latent cache (vLLM's ``[blocks, block_size, L+R]`` viewed flat); its rows
            are cast to the query dtype for the matmuls (fp32 accumulation).
        slots: ``[T, K]`` integer global slot ids, ``-1`` = none.
        softmax_scale: multiplies the logits.
        block_n, block_k, num_warps, num_stages: tile of heads × slots per program and Triton launch options;
            ``None`` = those of :func:`launch_config` (by token count and element size). With all four left
            ``None``, a tile that needs more shared memory than the GPU has is shrunk (:func:`smaller_config`,
            logged once per GPU and shape class); an explicit option is used as given.
        splits: programs per (token, head block) along the K slots (split-K, combined by log-sum-exp in a second
            kernel); ``None`` = chosen from the shapes so that small batches (decode) fill the GPU. Depends only
            on shapes, so the call stays capturable in a CUDA graph.

    Returns:
        ``[T, N, L]`` in ``q_latent.dtype``; zeros for a token without valid slots.

    Raises:
        ValueError: from :func:`~vllm_indexcache.ops.sparse_mla.naive.check_sparse_mla_inputs` on bad shapes.
        triton.runtime.errors.OutOfResources: an explicitly given tile does not fit the GPU, or not even 16 × 16
            with one stage does.
    """
    check_sparse_mla_inputs(q_latent, q_pe, kv_cache, slots)
    T, N, L = q_latent.shape
    ql = q_latent.contiguous()
    qp = q_pe.to(ql.dtype).contiguous()
    kv = kv_cache if kv_cache.stride(1) == 1 else kv_cache.contiguous()
    sl = slots.to(torch.int32).contiguous()
    out = torch.empty((T, N, L), dtype=ql.dtype, device=ql.device)
    if T == 0:
        return out
    element_bytes = max(ql.element_size(), kv.element_size())
    base = launch_config(T, element_bytes)
    given = {"block_n": block_n, "block_k": block_k, "num_warps": num_warps, "num_stages": num_stages}
    cfg = {**base, **{k: v for k, v in given.items() if v is not None}}
    if any(v is not None for v in given.values()):
        _launch(ql, qp, kv, sl, out, softmax_scale, cfg, splits)
        return out
    key = (ql.device.index, element_bytes, tuple(sorted(base.items())))
    cfg = _FITTED.get(key, cfg)
    while True:
        try:
            _launch(ql, qp, kv, sl, out, softmax_scale, cfg, splits)
            break
        except OutOfResources as err:
            smaller = smaller_config(cfg)
            if smaller is None:
                raise
            logger.warning("sparse_mla: tile %s does not fit this GPU (%s); trying %s", cfg, err, smaller)
            cfg = _FITTED[key] = smaller
    return out


def _launch(ql, qp, kv, sl, out, softmax_scale: float, cfg: dict, splits: int | None) -> None:
    """One launch of the sparse MLA kernel (and of the split-K combine) with tile/launch options ``cfg``."""
    T, N, L = ql.shape
    R = qp.shape[2]
    K = sl.shape[1]
    bn, bk = cfg["block_n"], cfg["block_k"]
    n_blocks = triton.cdiv(N, bn)
    if splits is None:
        splits = _num_splits(T * n_blocks, K, bk, num_sms(ql.device))
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), max(splits, 1)), bk) * bk
    splits = max(1, triton.cdiv(K, k_per_split))
    block_l = max(16, triton.next_power_of_2(L))
    if splits > 1:
        part = torch.empty((T, splits, N, block_l), dtype=torch.float32, device=ql.device)
        lse = torch.empty((T, splits, N), dtype=torch.float32, device=ql.device)
    else:
        part = lse = out   # unused
    interp = interpreting()
    launch = {} if interp else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    _sparse_mla_kernel[(T, n_blocks, splits)](
        ql, qp, kv, sl, out, part, lse, N, K, k_per_split, float(softmax_scale) * _LOG2E,
        ql.stride(0), ql.stride(1), qp.stride(0), qp.stride(1), kv.stride(0), sl.stride(0),
        out.stride(0), out.stride(1), L=L, R=R, BLOCK_L=block_l, BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_N=bn, BLOCK_K=bk, SPLIT=splits > 1, PREC=_prec(ql.dtype), UPCAST=interp, **launch)
    if splits > 1:
        _combine_kernel[(T, N)](part, lse, out, N, out.stride(0), out.stride(1), SPLITS=splits, L=L,
                                BLOCK_L=block_l, BLOCK_SP=max(2, triton.next_power_of_2(splits)))

"""Exact top-k of each row's valid prefix as a radix select in Triton (beside :mod:`.naive`, same output).

The top-k of the lightning indexer (DeepSeek-V3.2 report §2.1): per query row, the ``topk`` (2048) best of up to
``N`` (128K+) float32 scores. ``torch.topk`` on such rows costs more than the scores themselves on an H200
(docs/log/benchmarks-2026-11-to-12.md §8) and breaks ties arbitrarily; this is the radix select that GPU top-k
kernels use (as in vLLM's ``top_k_per_row`` CUDA op, ``csrc/sampler.cu``), written so that its result is exact and
deterministic:

1. every score becomes an order-preserving ``uint32`` key (``-0.0`` as ``+0.0``);
2. four histogram passes, one per byte from the most significant, find the exact key ``τ`` of the k-th largest
   score and how many of the keys equal to ``τ`` are taken (``_hist_kernel``: each program histograms its
   segment of the row, ``tl.atomic_add`` merges the programs of a row; every later pass re-derives the prefix
   from the earlier histograms, so there is no host read and no extra kernel);
3. ``_count_kernel`` counts, per segment, the keys above and equal to ``τ`` (skipped with one segment per row);
4. ``_scatter_kernel`` writes the positions of the keys above ``τ`` and of the first remaining keys equal to ``τ``
   (lowest positions win the tie), each segment at its exclusive prefix of the counts: the result lists positions
   in ascending order.

Rows are split into segments over a second grid axis, so a single decode row still spreads over the GPU. Shapes
depend only on ``[R, N]`` (valid lengths are read on the device), so the call can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu import interpreting, num_sms
from .naive import check_topk_inputs

__all__ = ["topk_rows"]

_BINS = 256
_PASSES = 4


@triton.jit
def _key(v):
    """Order-preserving uint32 of float32 ``v`` (larger score → larger key; ``-0.0`` → key of ``+0.0``)."""
    v = tl.where(v == 0.0, 0.0, v)
    b = v.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, ~b, b | 0x80000000)


@triton.jit
def _walk(hist_row, k, PASSES: tl.constexpr):
    """Prefix of the k-th largest key after ``PASSES`` bytes, and how many keys sharing that prefix remain to take."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), dtype=tl.uint32)
    remaining = k
    for j in tl.static_range(PASSES):
        h = tl.load(hist_row + j * 256 + bins)
        ge = tl.sum(h, 0) - tl.cumsum(h, 0) + h            # keys (with the prefix) whose byte j is >= d
        d = tl.max(tl.where(ge >= remaining, bins, -1), 0)
        remaining = remaining - tl.sum(tl.where(bins > d, h, 0), 0)
        prefix = prefix | (d.to(tl.uint32) << (24 - 8 * j))
    return prefix, remaining


@triton.jit
def _segment(len_ptr, len_offset, N, SEG):
    """This program's row ``r``, the row's valid length ``n`` and its segment ``[lo, hi)`` of it."""
    r = tl.program_id(0)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + r).to(tl.int32) + len_offset, 0), N)
    lo = tl.program_id(1) * SEG
    return r, n, lo, tl.minimum(lo + SEG, n)


@triton.jit
def _hist_kernel(x_ptr, stride_x, len_ptr, len_offset, N, K, SEG, hist_ptr,
                 PASS: tl.constexpr, BLOCK: tl.constexpr):
    r, n, lo, hi = _segment(len_ptr, len_offset, N, SEG)
    if (n > K) & (lo < hi):
        hist_row = hist_ptr + r.to(tl.int64) * (4 * 256)
        prefix, remaining = _walk(hist_row, K, PASS)
        row = x_ptr + r.to(tl.int64) * stride_x
        acc = tl.zeros((256,), dtype=tl.int32)
        skipped = 0
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            u = _key(tl.load(row + offs, mask=m, other=0.0))
            if PASS > 0:
                m = m & ((u >> (32 - 8 * PASS)) == (prefix >> (32 - 8 * PASS)))
            digit = ((u >> (24 - 8 * PASS)) & 255).to(tl.int32)
            acc += tl.histogram(tl.where(m, digit, 0), 256)     # non-matching keys counted in bin 0 ...
            skipped += tl.sum((~m).to(tl.int32), 0)
        acc -= tl.where(tl.arange(0, 256) == 0, skipped, 0)   # ... and taken out again
        tl.atomic_add(hist_row + PASS * 256 + tl.arange(0, 256), acc)


@triton.jit
def _count_kernel(x_ptr, stride_x, len_ptr, len_offset, N, K, SEG, hist_ptr, cnt_ptr, P,
                  BLOCK: tl.constexpr):
    r, n, lo, hi = _segment(len_ptr, len_offset, N, SEG)
    gt = 0
    eq = 0
    if n > K:
        tau, remaining = _walk(hist_ptr + r.to(tl.int64) * (4 * 256), K, 4)
        row = x_ptr + r.to(tl.int64) * stride_x
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            u = _key(tl.load(row + offs, mask=m, other=0.0))
            gt += tl.sum((m & (u > tau)).to(tl.int32), 0)
            eq += tl.sum((m & (u == tau)).to(tl.int32), 0)
    cnt = cnt_ptr + (r.to(tl.int64) * P + tl.program_id(1)) * 2
    tl.store(cnt, gt)
    tl.store(cnt + 1, eq)


@triton.jit
def _scatter_kernel(x_ptr, stride_x, len_ptr, len_offset, N, K, SEG, hist_ptr, cnt_ptr, P, out_ptr, stride_o,
                    BLOCK: tl.constexpr, P_POW2: tl.constexpr):
    r, n, lo, hi = _segment(len_ptr, len_offset, N, SEG)
    out_row = out_ptr + r.to(tl.int64) * stride_o
    if n <= K:  # every valid position is selected
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(out_row + offs, offs, mask=offs < hi)
    else:
        tau, remaining = _walk(hist_ptr + r.to(tl.int64) * (4 * 256), K, 4)
        j = tl.arange(0, P_POW2)
        before = j < tl.program_id(1)
        cnt = cnt_ptr + r.to(tl.int64) * P * 2 + j * 2
        taken = tl.sum(tl.load(cnt, mask=before, other=0), 0)
        ties = tl.sum(tl.load(cnt + 1, mask=before, other=0), 0)
        taken += tl.minimum(ties, remaining)
        row = x_ptr + r.to(tl.int64) * stride_x
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            u = _key(tl.load(row + offs, mask=m, other=0.0))
            eq = m & (u == tau)
            take = (m & (u > tau)) | (eq & (ties + tl.cumsum(eq.to(tl.int32), 0) <= remaining))
            slot = taken + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(out_row + slot, offs, mask=take)
            taken += tl.sum(take.to(tl.int32), 0)
            ties += tl.sum(eq.to(tl.int32), 0)


def _segments(R: int, N: int, block: int, device: torch.device) -> int:
    """Segment length (a multiple of ``block``) so that about four programs per SM cover ``R`` rows."""
    per_row = max(1, min(triton.cdiv(N, block), triton.cdiv(4 * num_sms(device), max(R, 1))))
    return triton.cdiv(triton.cdiv(N, per_row), block) * block


def topk_rows(scores: torch.Tensor, lens: torch.Tensor, topk: int, len_offset: int = 0, block: int = 1024,
              segment: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Top-k positions of each row's valid prefix, exact (same result as
    :func:`~vllm_indexcache.ops.topk.naive.topk_rows_naive`).

    Args:
        scores: ``[R, N]`` float32 on a CUDA device (or CPU under ``TRITON_INTERPRET=1``), last dim contiguous;
            no NaN. Entries past a row's valid prefix are never read.
        lens: ``[R]`` integers on the same device; row ``r`` has ``clamp(lens[r] + len_offset, 0, N)`` valid entries.
        topk: positions kept per row (``index_topk``), ≥ 1.
        len_offset: added to ``lens`` on the device (``1`` when ``lens`` holds each row's last visible position).
        block: entries per program iteration (power of two).
        segment: entries per program along a row (a multiple of ``block``); ``None`` = chosen from ``[R, N]`` and
            the GPU's SM count.
        num_warps: Triton launch option of the kernels (``None``: Triton's default, 4).

    Returns:
        ``[R, topk]`` int32 positions of the ``min(topk, n_r)`` largest scores (ties towards the lower position) in
        ascending order, then ``-1``.

    Raises:
        ValueError: see :func:`~vllm_indexcache.ops.topk.naive.check_topk_inputs`; ``scores`` not float32 or
            without a contiguous last dim.
    """
    check_topk_inputs(scores, lens, topk)
    if scores.dtype != torch.float32 or (scores.shape[1] > 1 and scores.stride(1) != 1):
        raise ValueError(f"scores must be float32 with a contiguous last dim, got {scores.dtype} "
                         f"strides {scores.stride()}")
    R, N = scores.shape
    out = torch.full((R, topk), -1, dtype=torch.int32, device=scores.device)
    if R == 0 or N == 0:
        return out
    seg = segment if segment is not None else _segments(R, N, block, scores.device)
    if seg % block:
        raise ValueError(f"segment={seg} must be a multiple of block={block}")
    P = triton.cdiv(N, seg)
    lens = lens.contiguous()
    hist = torch.zeros((R, _PASSES, _BINS), dtype=torch.int32, device=scores.device)
    cnt = torch.empty((R, P, 2), dtype=torch.int32, device=scores.device)
    grid = (R, P)
    args = (scores, scores.stride(0), lens, len_offset, N, topk, seg, hist)
    launch = {"num_warps": num_warps} if num_warps and not interpreting() else {}
    for pass_ in range(_PASSES):
        _hist_kernel[grid](*args, PASS=pass_, BLOCK=block, **launch)
    if P > 1:  # one segment per row: the scatter needs no counts of earlier segments
        _count_kernel[grid](*args, cnt, P, BLOCK=block, **launch)
    _scatter_kernel[grid](*args, cnt, P, out, out.stride(0), BLOCK=block, P_POW2=max(2, triton.next_power_of_2(P)),
                          **launch)
    return out

"""Lightning indexer scores + top-k as Triton kernels for CUDA GPUs (beside :mod:`.naive`, same maths and output).

``I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s])`` for ``s ≤ pos[t]`` (else ``-inf``); per query token the
``min(topk, pos[t] + 1)`` best keys, ties towards the lower position (the selection of
:mod:`vllm_indexcache.ops.indexer.naive`), listed in **ascending position**, then ``-1`` padding: sparse MLA reads a
set, and the exact radix select of :mod:`vllm_indexcache.ops.topk.triton` yields that order.

* **Prefill** (:func:`indexer_topk`, one request, contiguous keys ``k [S, D]``): the kernel
  ``_prefill_scores_kernel`` computes a ``[BLOCK_T, BLOCK_S]`` tile of scores per program, looping over the H heads
  with one ``tl.dot`` ``[BLOCK_T, D] × [D, BLOCK_S]`` each (fp32 accumulation, bf16/fp16 inputs stay in their
  dtype for the tensor cores). Rows are processed in chunks sized so that the fp32 scores of a chunk against its
  visible keys stay under ``max_chunk_bytes`` (128K+ contexts fit); keys past the chunk's last visible one are not
  scored (causality).
* **Decode** (:func:`indexer_topk_decode`, a batch of requests, one query token each, keys in vLLM's paged indexer
  K-cache ``[num_slots, D]``): ``_decode_scores_kernel`` handles one query row per program and a tile of
  ``BLOCK_S`` key positions, gathering key slots through the block table; heads are one ``tl.dot``
  ``[BLOCK_H, D] × [D, BLOCK_S]``.

The top-k of both paths is :func:`vllm_indexcache.ops.topk.triton.topk_rows` (exact radix select over each row's
visible prefix, no host read).
Used by the CUDA Triton fallback of the INDEXCACHE backend (:mod:`vllm_indexcache.vllm_glue.cuda.indexer`); the CPU
backend uses :mod:`.cpu`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu import interpreting
from ..topk.triton import topk_rows
from .naive import check_indexer_inputs


def _upcast() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``) computes bf16 ``tl.dot`` wrongly (measured with triton 3.9:
    errors of 1e10 on unit-scale inputs); there the kernels upcast the tiles to fp32 first, which gives the same
    result as bf16 × bf16 products accumulated in fp32 (every bf16 product is exact in fp32). Compiled kernels on a GPU
    keep the input dtype."""
    return interpreting()


def _prec(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ("ieee"), not TF32 (Triton's default on NVIDIA GPUs); others: the dtype's."""
    return "ieee" if dtype == torch.float32 else "tf32"


__all__ = ["indexer_scores", "indexer_topk", "indexer_scores_decode", "indexer_topk_decode"]


@triton.jit
def _prefill_scores_kernel(q_ptr, k_ptr, w_ptr, pos_ptr, out_ptr, T, S, H,
                           stride_qt, stride_qh, stride_ks, stride_wt, stride_ot,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                           PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)              # key positions
    rd = tl.arange(0, BLOCK_D)
    t_mask = rt < T
    s_mask = rs < S
    d_mask = rd < D
    pos = tl.load(pos_ptr + rt, mask=t_mask, other=-1)
    kt = tl.load(k_ptr + rs[None, :] * stride_ks + rd[:, None],
                 mask=s_mask[None, :] & d_mask[:, None], other=0.0)                     # [BLOCK_D, BLOCK_S]
    if UPCAST:
        kt = kt.to(tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    # causal tile skip: a tile whose first key lies past every row's position is all -inf (no head loop)
    heads = tl.where(pid_s * BLOCK_S <= tl.max(pos, axis=0), H, 0)
    for h in range(0, heads):
        qh = tl.load(q_ptr + rt[:, None] * stride_qt + h * stride_qh + rd[None, :],
                     mask=t_mask[:, None] & d_mask[None, :], other=0.0)                  # [BLOCK_T, BLOCK_D]
        wh = tl.load(w_ptr + rt * stride_wt + h, mask=t_mask, other=0.0).to(tl.float32)
        if UPCAST:
            qh = qh.to(tl.float32)
        logit = tl.dot(qh, kt, out_dtype=tl.float32, input_precision=PREC)
        acc += tl.maximum(logit, 0.0) * wh[:, None]
    visible = rs[None, :] <= pos[:, None]
    acc = tl.where(visible, acc, float("-inf"))
    tl.store(out_ptr + rt[:, None] * stride_ot + rs[None, :], acc, mask=t_mask[:, None] & s_mask[None, :])


@triton.jit
def _decode_scores_kernel(q_ptr, kc_ptr, w_ptr, bt_ptr, seqlen_ptr, out_ptr, H, S_max,
                          stride_qt, stride_qh, stride_kb, stride_ko, stride_wt, stride_bt, stride_ot,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                          PAGE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    rh = tl.arange(0, BLOCK_H)
    seq_len = tl.load(seqlen_ptr + b)
    s_mask = rs < seq_len
    d_mask = rd < D
    h_mask = rh < H
    block = tl.load(bt_ptr + b * stride_bt + rs // PAGE, mask=s_mask, other=0)
    row = block.to(tl.int64) * stride_kb + (rs % PAGE).to(tl.int64) * stride_ko
    kt = tl.load(kc_ptr + row[None, :] + rd[:, None], mask=s_mask[None, :] & d_mask[:, None],
                 other=0.0)                                                                # [BLOCK_D, BLOCK_S]
    q = tl.load(q_ptr + b * stride_qt + rh[:, None] * stride_qh + rd[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)                         # [BLOCK_H, BLOCK_D]
    w = tl.load(w_ptr + b * stride_wt + rh, mask=h_mask, other=0.0).to(tl.float32)
    if UPCAST:
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    logit = tl.dot(q, kt, out_dtype=tl.float32, input_precision=PREC)  # [BLOCK_H, BLOCK_S]
    score = tl.sum(tl.maximum(logit, 0.0) * w[:, None], axis=0)
    score = tl.where(s_mask, score, float("-inf"))
    tl.store(out_ptr + b * stride_ot + rs, score, mask=rs < S_max)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


#: Tile and launch options of the prefill scores kernel (rows × keys per program, warps, pipeline stages).
PREFILL_CONFIG = {"block_t": 64, "block_s": 128, "num_warps": 4, "num_stages": 3}


def _prefill_scores_chunk(q, k, w, pos, key_len: int, **config) -> torch.Tensor:
    T, H, D = q.shape
    cfg = {**PREFILL_CONFIG, **config}
    out = torch.empty((T, key_len), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, cfg["block_t"]), triton.cdiv(key_len, cfg["block_s"]))
    launch = {} if _upcast() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    _prefill_scores_kernel[grid](q, k, w, pos, out, T, key_len, H,
                                 q.stride(0), q.stride(1), k.stride(0), w.stride(0), out.stride(0),
                                 D=D, BLOCK_D=_pow2(D), BLOCK_T=cfg["block_t"], BLOCK_S=cfg["block_s"],
                                 PREC=_prec(q.dtype), UPCAST=_upcast(), **launch)
    return out


def _prep(q, k, weights, q_positions):
    check_indexer_inputs(q, k, weights, q_positions)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    return q.contiguous(), k.contiguous(), weights.float().contiguous(), q_positions.to(torch.int64).contiguous()


def indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """``[T, S]`` float32 scores (``-inf`` where invisible); the Triton counterpart of
    :func:`~vllm_indexcache.ops.indexer.naive.indexer_scores_naive`. Intended for tests and small shapes."""
    q, k, w, pos = _prep(q, k, weights, q_positions)
    return _prefill_scores_chunk(q, k, w, pos, k.shape[0])


def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor, topk: int,
                 max_chunk_bytes: int = 1 << 30) -> torch.Tensor:
    """Prefill top-k of one request (the selection of :func:`vllm_indexcache.ops.indexer.cpu.indexer_topk`).

    Args:
        q: ``[T, H, D]`` indexer queries (bf16/fp16/fp32, RoPE applied) of one request.
        k: ``[S, D]`` the request's keys at positions ``0..S-1`` (cast to q's dtype).
        weights: ``[T, H]`` per-head weights including ``H^-0.5 · D^-0.5``.
        q_positions: ``[T]`` integer positions; key ``s`` visible iff ``s ≤ q_positions[t]``.
        topk: keys kept per query (``index_topk``).
        max_chunk_bytes: bound on one ``[rows, visible keys]`` float32 score block (at least one row is scored).

    Returns:
        ``[T, topk]`` int32 request-local key positions in ascending order, ``-1`` padding.

    Raises:
        ValueError: ``topk < 1`` or invalid inputs
            (see :func:`~vllm_indexcache.ops.indexer.naive.check_indexer_inputs`).
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    q, k, w, pos = _prep(q, k, weights, q_positions)
    T, S = q.shape[0], k.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    rows = max(1, min(T, max_chunk_bytes // (4 * max(S, 1))))
    for a in range(0, T, rows):
        b = min(T, a + rows)
        p = pos[a:b]
        last = min(S, int(p.max()) + 1)             # keys beyond are invisible to every row of this chunk
        sc = _prefill_scores_chunk(q[a:b], k, w[a:b], p, last)
        out[a:b] = topk_rows(sc, p, topk, len_offset=1)
    return out


def _decode_launch(q, k_cache, weights, block_table, seq_lens, block_size: int, max_len: int | None,
                   block_s: int = 128) -> torch.Tensor:
    B, H, D = q.shape
    q = q.contiguous()
    if k_cache.dtype != q.dtype:
        k_cache = k_cache.to(q.dtype)
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if k_cache.dim() == 3:
        if k_cache.shape[1] != block_size:
            raise ValueError(f"k_cache [num_blocks, block_size, D] has block_size {k_cache.shape[1]}, "
                             f"expected {block_size}")
        stride_kb, stride_ko = k_cache.stride(0), k_cache.stride(1)
    else:
        stride_kb, stride_ko = block_size * k_cache.stride(0), k_cache.stride(0)
    w = weights.float().contiguous()
    bt = block_table.to(torch.int32).contiguous()
    sl = seq_lens.to(torch.int32).contiguous()
    S_max = max_len if max_len is not None else (int(seq_lens.max()) if B else 0)
    out = torch.empty((B, S_max), dtype=torch.float32, device=q.device)
    if B == 0 or S_max == 0:
        return out
    grid = (B, triton.cdiv(S_max, block_s))
    _decode_scores_kernel[grid](q, k_cache, w, bt, sl, out, H, S_max,
                                q.stride(0), q.stride(1), stride_kb, stride_ko, w.stride(0), bt.stride(0),
                                out.stride(0), D=D, BLOCK_D=_pow2(D), BLOCK_H=_pow2(H), BLOCK_S=block_s,
                                PAGE=block_size, PREC=_prec(q.dtype), UPCAST=_upcast())
    return out


def indexer_scores_decode(q: torch.Tensor, k_cache: torch.Tensor, weights: torch.Tensor, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, block_size: int, max_len: int | None = None) -> torch.Tensor:
    """``[B, S]`` float32 scores of one decode query per request over its paged keys (``-inf`` at positions
    ``>= seq_lens[b]``).

    Args:
        q: ``[B, H, D]`` one query token per request (at position ``seq_lens[b] - 1``: every cached key visible).
        k_cache: ``[num_slots, D]`` the layer's indexer K-cache viewed flat (slot = block · block_size + offset), or
            ``[num_blocks, block_size, D]`` with any block/offset strides (vLLM may pad pages; last dim contiguous).
        weights: ``[B, H]``.
        block_table: ``[B, max_blocks]`` int block ids per request.
        seq_lens: ``[B]`` number of keys per request (query included).
        block_size: tokens per block.
        max_len: ``S``, the number of key positions scored per row; ``None`` = ``max(seq_lens)``, read back to the
            host (not capturable in a CUDA graph). A fixed value such as ``max_blocks · block_size`` needs no
            host read.
    """
    return _decode_launch(q, k_cache, weights, block_table, seq_lens, block_size, max_len)


def indexer_topk_decode(q: torch.Tensor, k_cache: torch.Tensor, weights: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, block_size: int, topk: int, max_len: int | None = None) -> torch.Tensor:
    """``[B, topk]`` int32 request-local key positions for one decode query per request (paged keys): the selection
    of the prefill path (query position = ``seq_lens[b] - 1``), ascending positions, ``-1`` padding.

    Scores ``[B, S]`` come from ``_decode_scores_kernel``; :func:`~vllm_indexcache.ops.topk.triton.topk_rows`
    selects over each row's first ``seq_lens[b]`` entries on the device (work follows the real lengths, not
    ``S``). With ``max_len`` given (e.g. ``block_table.shape[1] · block_size``) the whole call has fixed shapes and
    no host synchronisation: it can be captured in a CUDA graph (the INDEXCACHE Triton fallback's decode graphs).
    Other arguments as :func:`indexer_scores_decode`.
    """
    scores = _decode_launch(q, k_cache, weights, block_table, seq_lens, block_size, max_len)
    return topk_rows(scores, seq_lens, topk)

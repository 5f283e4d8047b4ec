"""Lightning indexer of DeepSeek Sparse Attention (DSA): vectorised torch oracle (any device; not the serving path).

Same maths and output convention as :mod:`vllm_indexcache.ops.indexer.naive` (the reference; see there for the
formula and sources: DeepSeek-V3.2 report §2.1, vLLM 0.32 ``model_executor/layers/sparse_attn_indexer.py``,
transformers ``modeling_deepseek_v32.py``). No Python loop over tokens: query rows are processed in chunks sized so
that the ``[rows, H, S]`` float32 intermediate stays under ``max_chunk_bytes``; the ``[T, S]`` scores are built.

The CPU backend runs :mod:`.cpu_blockwise` (via :mod:`.paged_cpu`) instead. This module is kept only as the oracle
that is fast enough where the naive loop is not, and plain enough to trust: the transformers reference's
``ties="lower"`` selection (:mod:`vllm_indexcache.tools.reference`, hence analyze and the engine tests),
``tests/unit/test_ops_indexer.py`` (against the naive reference, and as the reference of the blockwise indexer),
the Triton benchmark's reference on GPU (``scripts/bench_triton_gpu.py``) and the baseline of
``scripts/bench_cpu_indexer.py``.
"""
from __future__ import annotations

import torch

from .naive import check_indexer_inputs

__all__ = ["indexer_scores", "indexer_topk", "rows_per_chunk"]


def rows_per_chunk(bytes_per_row: int, max_chunk_bytes: int) -> int:
    """Number of rows whose intermediates fit in ``max_chunk_bytes`` (at least 1)."""
    return max(1, int(max_chunk_bytes) // max(1, int(bytes_per_row)))


def _scores_chunk(q: torch.Tensor, kT: torch.Tensor, w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Scores of a chunk of rows: q ``[C,H,D]`` float32, kT ``[D,S]`` float32, w ``[C,H]``, pos ``[C]`` → ``[C,S]``."""
    logits = torch.matmul(q, kT)                                     # [C, H, S]
    logits.relu_()
    scores = torch.bmm(w.unsqueeze(1), logits).squeeze(1)            # [C, S] = Σ_h w · ReLU(q·k)
    key_pos = torch.arange(kT.shape[1], device=q.device)
    return scores.masked_fill_(key_pos[None, :] > pos[:, None], float("-inf"))


def _chunked_scores(q, k, weights, q_positions, max_chunk_bytes):
    """Yield ``(a, b, pos, scores)`` for consecutive row chunks ``[a, b)``: ``scores [b-a, S]`` float32, ``-inf``
    where invisible; chunks sized so the ``[rows, H, S]`` float32 intermediate stays under ``max_chunk_bytes``."""
    check_indexer_inputs(q, k, weights, q_positions)
    T, H, _ = q.shape
    kT = k.float().T.contiguous()
    step = rows_per_chunk(H * k.shape[0] * 4, max_chunk_bytes)
    for a in range(0, T, step):
        b = min(T, a + step)
        pos = q_positions[a:b].long()
        yield a, b, pos, _scores_chunk(q[a:b].float(), kT, weights[a:b].float(), pos)


def indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor,
                   max_chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Vectorised :func:`~vllm_indexcache.ops.indexer.naive.indexer_scores_naive`.

    Args:
        q: ``[T, H, D]`` indexer queries (any float dtype, RoPE applied).
        k: ``[S, D]`` the request's indexer keys at positions ``0..S-1``.
        weights: ``[T, H]`` per-head weights including ``H^-0.5 · D^-0.5``.
        q_positions: ``[T]`` integer query positions; key ``s`` visible iff ``s ≤ q_positions[t]``.
        max_chunk_bytes: bound on the ``[rows, H, S]`` float32 intermediate, in bytes.

    Returns:
        ``[T, S]`` float32 scores, ``-inf`` where invisible.

    Raises:
        ValueError: invalid shapes or positions (see :func:`~vllm_indexcache.ops.indexer.naive.check_indexer_inputs`).
    """
    out = torch.empty((q.shape[0], k.shape[0]), dtype=torch.float32, device=q.device)
    for a, b, _, scores in _chunked_scores(q, k, weights, q_positions, max_chunk_bytes):
        out[a:b] = scores
    return out


def _select(scores: torch.Tensor, pos: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k of ``scores [C,S]`` with ties towards the lower position, ``-1`` beyond the visible count → int32."""
    C, S = scores.shape
    kk = min(topk, S)
    # Threshold = k-th largest value. Keys above it are in; keys equal to it fill the remaining places in
    # position order. This makes the tie rule exact without sorting whole rows.
    kth = torch.topk(scores, kk, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values   # [C, 1]
    above = scores > kth
    equal = scores == kth
    need = kk - above.sum(dim=-1, keepdim=True)
    chosen = above | (equal & (torch.cumsum(equal, dim=-1) <= need))                           # exactly kk / row
    # nonzero() lists the chosen positions row-major, i.e. ascending within each row; a stable sort by descending
    # score then keeps lower positions first among equal scores.
    idx = torch.nonzero(chosen)[:, 1].view(C, kk)                                               # [C, kk]
    vals = torch.gather(scores, 1, idx)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    idx = torch.gather(idx, 1, order)
    out = torch.full((C, topk), -1, dtype=torch.int32, device=scores.device)
    visible = torch.arange(kk, device=scores.device)[None, :] <= pos[:, None]                  # j < pos + 1
    out[:, :kk] = torch.where(visible, idx, -1).to(torch.int32)
    return out


def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor, topk: int,
                 max_chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Top-k key selection of the lightning indexer, vectorised and row-chunked (CPU path of the backend).

    Identical results to :func:`~vllm_indexcache.ops.indexer.naive.indexer_topk_naive` (same scores up to float32
    rounding of the matmul, same ordering rule).

    Args:
        q: ``[T, H, D]`` indexer queries (bf16/fp16/fp32; computed in float32), RoPE applied.
        k: ``[S, D]`` the request's indexer keys at positions ``0..S-1``.
        weights: ``[T, H]`` per-head weights including ``H^-0.5 · D^-0.5``.
        q_positions: ``[T]`` integer query positions; key ``s`` visible iff ``s ≤ q_positions[t]``.
        topk: keys kept per query (``index_topk``), ≥ 1.
        max_chunk_bytes: bound, in bytes, on the ``[rows, H, S]`` float32 intermediate of one chunk of rows.

    Returns:
        ``[T, topk]`` int32 request-local key positions: the ``min(topk, q_positions[t] + 1)`` best keys by
        descending score, ties towards the lower position, then ``-1`` padding.

    Raises:
        ValueError: ``topk < 1`` or invalid inputs.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    out = torch.empty((q.shape[0], topk), dtype=torch.int32, device=q.device)
    for a, b, pos, scores in _chunked_scores(q, k, weights, q_positions, max_chunk_bytes):
        out[a:b] = _select(scores, pos, topk)
    return out

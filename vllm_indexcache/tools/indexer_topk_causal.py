"""Lightning-indexer top-k (ties → lower position) in causal row chunks: the search's fast path of the
reference's ``ties="lower"`` selection, identical output to :func:`vllm_indexcache.ops.indexer.cpu.indexer_topk`.

The oracle (:mod:`vllm_indexcache.ops.indexer.cpu`) scores every query row against every key (``[T, S]``, half of it
``-inf`` for a causal prefill) in chunks of thousands of rows, then selects with a dozen full passes over the scores
(threshold, ``cumsum`` of ties, ``nonzero``, sort). Here, for query rows ``[a, b)``:

* only keys ``0 .. max(q_positions[a:b])`` are scored (the others are invisible to every row of the chunk; the
  score of a visible key is the same float32 computation, per row, as the oracle's — checked bit for bit in
  ``tests/unit/test_indexer_topk_causal.py``);
* ``torch.topk`` picks ``topk + 1`` candidates; a row whose next score is below its k-th is exact as it is (the
  set is forced) and, where it holds equal scores, is re-ordered (descending score, then lower position); the rows
  where equal scores straddle the boundary (and rows with fewer visible keys than ``topk``) go through the oracle's
  own selection, :func:`vllm_indexcache.ops.indexer.cpu._select`.

Maths and conventions: :mod:`vllm_indexcache.ops.indexer.naive` (DeepSeek-V3.2 report §2.1).
"""
from __future__ import annotations

import torch

from vllm_indexcache.ops.indexer.cpu import _select
from vllm_indexcache.ops.indexer.naive import check_indexer_inputs

__all__ = ["indexer_topk_causal"]


def _select_fast(scores: torch.Tensor, pos: torch.Tensor, topk: int) -> torch.Tensor:
    """:func:`~vllm_indexcache.ops.indexer.cpu._select` (same output): ``scores [C, S]`` float32 (``-inf`` where
    invisible), ``pos [C]`` → ``[C, topk]`` int32."""
    C, S = scores.shape
    kk = min(topk, S)
    # one more than needed: the set is forced when the next score is below the k-th (no equal score left out)
    vals, idx = torch.topk(scores, min(kk + 1, S), dim=-1, sorted=True)
    forced = pos + 1 >= kk                                                  # the k-th score is a visible key's
    if S > kk:
        forced &= vals[:, kk] < vals[:, kk - 1]
        vals, idx = vals[:, :kk], idx[:, :kk]
    out = torch.full((C, topk), -1, dtype=torch.int32, device=scores.device)
    out[:, :kk] = idx.to(torch.int32)
    # equal scores inside the set: descending score, ties → lower position (sort by position, then stable by score)
    tied = ((vals[:, 1:] == vals[:, :-1]).any(dim=-1) & forced).nonzero()[:, 0]
    if tied.numel():
        t_idx, by_pos = torch.sort(idx[tied], dim=-1)
        t_vals = torch.gather(vals[tied], 1, by_pos)
        order = torch.sort(t_vals, dim=-1, descending=True, stable=True).indices
        out[tied, :kk] = torch.gather(t_idx, 1, order).to(torch.int32)
    rest = (~forced).nonzero()[:, 0]
    if rest.numel():
        out[rest] = _select(scores[rest], pos[rest], topk)
    return out


def indexer_topk_causal(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor,
                        topk: int, rows: int = 128) -> torch.Tensor:
    """Top-k key selection of the lightning indexer, scoring only the keys each chunk of query rows can see.

    Args:
        q: ``[T, H, D]`` indexer queries (any float dtype; computed in float32), RoPE applied.
        k: ``[S, D]`` the request's indexer keys at positions ``0..S-1``.
        weights: ``[T, H]`` per-head weights including ``H^-0.5 · D^-0.5``.
        q_positions: ``[T]`` integer query positions; key ``s`` visible iff ``s ≤ q_positions[t]``.
        topk: keys kept per query (``index_topk``), ≥ 1.
        rows: query rows per chunk.

    Returns:
        ``[T, topk]`` int32, as :func:`vllm_indexcache.ops.indexer.cpu.indexer_topk`: the
        ``min(topk, q_positions[t] + 1)`` best keys by descending score, ties towards the lower position, then
        ``-1`` padding.

    Raises:
        ValueError: ``topk < 1``, ``rows < 1`` or invalid inputs.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    check_indexer_inputs(q, k, weights, q_positions)
    T = q.shape[0]
    kT = k.float().T.contiguous()                                            # [D, S]
    out = torch.empty((T, topk), dtype=torch.int32, device=q.device)
    for a in range(0, T, rows):
        b = min(T, a + rows)
        pos = q_positions[a:b].long()
        hi = min(kT.shape[1], int(pos.max()) + 1)
        logits = torch.matmul(q[a:b].float(), kT[:, :hi])                    # [C, H, hi]
        logits.relu_()
        scores = torch.bmm(weights[a:b].float().unsqueeze(1), logits).squeeze(1)
        lo = min(hi, int(pos.min()) + 1)                                     # keys < lo: visible to every row
        tail = scores[:, lo:]
        tail.masked_fill_(torch.arange(lo, hi, device=q.device)[None, :] > pos[:, None], float("-inf"))
        out[a:b] = _select_fast(scores, pos, topk)
    return out

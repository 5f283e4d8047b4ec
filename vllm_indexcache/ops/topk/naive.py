"""Exact top-k of each row's valid prefix: readable reference of :mod:`.triton` (loops over rows allowed).

Row ``r`` of a ``[R, N]`` float32 score matrix has ``n_r = clamp(lens[r] + len_offset, 0, N)`` valid entries
(positions ``0 .. n_r - 1``); its top-k is the ``min(topk, n_r)`` positions with the largest scores, ties at the
k-th score broken towards the lower position (the lightning indexer's convention,
:mod:`vllm_indexcache.ops.indexer.naive`), ``-0.0`` equal to ``+0.0``. The result lists the selected positions in
**ascending position order**, then ``-1`` padding — sparse MLA reads a set, so the order carries no meaning;
ascending order is what the Triton kernel produces deterministically.
"""
from __future__ import annotations

import torch

__all__ = ["topk_rows_naive", "valid_lengths", "check_topk_inputs", "to_ascending"]


def valid_lengths(lens: torch.Tensor, len_offset: int, num_cols: int) -> torch.Tensor:
    """``clamp(lens + len_offset, 0, num_cols)`` as int64: the valid prefix of each row."""
    return (lens.to(torch.int64) + len_offset).clamp(0, num_cols)


def topk_rows_naive(scores: torch.Tensor, lens: torch.Tensor, topk: int, len_offset: int = 0) -> torch.Tensor:
    """Top-k positions of each row's valid prefix (reference).

    Args:
        scores: ``[R, N]`` float32 scores (no NaN).
        lens: ``[R]`` integers; row ``r`` has ``clamp(lens[r] + len_offset, 0, N)`` valid entries.
        topk: positions kept per row, ≥ 1.
        len_offset: added to ``lens`` (e.g. ``1`` when ``lens`` holds the last visible position).

    Returns:
        ``[R, topk]`` int32: selected positions in ascending order, then ``-1``.

    Raises:
        ValueError: ``topk < 1`` or ``scores`` not 2-D / ``lens`` not ``[R]``.
    """
    check_topk_inputs(scores, lens, topk)
    R, N = scores.shape
    n = valid_lengths(lens, len_offset, N).tolist()
    out = torch.full((R, topk), -1, dtype=torch.int32, device=scores.device)
    for r in range(R):
        row = scores[r, : n[r]].tolist()
        best = sorted(range(n[r]), key=lambda s: (-(row[s] + 0.0), s))[:topk]
        out[r, : len(best)] = torch.tensor(sorted(best), dtype=torch.int32)
    return out


def check_topk_inputs(scores: torch.Tensor, lens: torch.Tensor, topk: int) -> None:
    """Validate the arguments shared by :func:`topk_rows_naive` and the Triton kernel.

    Raises:
        ValueError: naming the offending argument.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [R, N], got {tuple(scores.shape)}")
    if lens.dim() != 1 or lens.shape[0] != scores.shape[0]:
        raise ValueError(f"lens must be [R] = [{scores.shape[0]}], got {tuple(lens.shape)}")
    if lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise ValueError(f"lens must be an integer tensor, got {lens.dtype}")


def to_ascending(topk: torch.Tensor) -> torch.Tensor:
    """``[R, k]`` int32 top-k rows in any order (e.g. best first, as :mod:`vllm_indexcache.ops.indexer.naive`
    and ``.cpu`` list them) → the same positions in ascending order, ``-1`` padding last (this op's order)."""
    big = torch.iinfo(torch.int32).max
    s = torch.where(topk < 0, big, topk.to(torch.int32)).sort(dim=1).values
    return torch.where(s == big, -1, s).to(torch.int32)

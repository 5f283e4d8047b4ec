"""Paged-cache index helpers: request-local key positions → global cache slots, token → request.

Semantics of vLLM 0.32 ``v1/attention/backends/mla/sparse_utils.py`` ``triton_convert_req_index_to_global_index``
(without the prefill workspace / context-parallel options), but returning flat slot ids in int64.
"""
from __future__ import annotations

import torch

__all__ = ["local_to_global_slots", "token_to_request"]


def local_to_global_slots(topk_local: torch.Tensor, req_idx: torch.Tensor, block_table: torch.Tensor,
                          block_size: int) -> torch.Tensor:
    """Map request-local key positions to global slots of the paged KV cache.

    ``out[t, j] = block_table[req_idx[t], i // block_size] * block_size + i % block_size`` with
    ``i = topk_local[t, j]``. As in vLLM's kernel, a negative ``i`` (``-1`` = no key) and an ``i`` whose block
    lies beyond ``block_table.shape[1]`` both give ``-1``.

    Args:
        topk_local: ``[T, K]`` integer (int32 from the indexer) request-local key positions.
        req_idx: ``[T]`` integer batch index of each token's request (row of ``block_table``).
        block_table: ``[R, max_blocks]`` integer physical block ids per request.
        block_size: tokens per cache block (> 0).

    Returns:
        ``[T, K]`` int64 global slot ids (``block_id * block_size + offset``), ``-1`` where invalid.

    Raises:
        ValueError: bad ranks/sizes, ``block_size <= 0`` or a ``req_idx`` outside ``[0, R)``.
    """
    if topk_local.dim() != 2 or req_idx.dim() != 1 or block_table.dim() != 2:
        raise ValueError(f"expected topk_local [T,K], req_idx [T], block_table [R,max_blocks]; got "
                         f"{tuple(topk_local.shape)}, {tuple(req_idx.shape)}, {tuple(block_table.shape)}")
    if req_idx.shape[0] != topk_local.shape[0]:
        raise ValueError(f"req_idx has {req_idx.shape[0]} entries for {topk_local.shape[0]} tokens")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    R, max_blocks = block_table.shape
    req = req_idx.long()
    if req.numel() and (int(req.min()) < 0 or int(req.max()) >= R):
        raise ValueError(f"req_idx must lie in [0, {R}), got range [{int(req.min())}, {int(req.max())}]")
    idx = topk_local.long()
    if max_blocks == 0:
        return torch.full_like(idx, -1)
    block = torch.div(idx, block_size, rounding_mode="floor")
    invalid = (idx < 0) | (block >= max_blocks)
    # one flat index_select into the table (faster on CPU than 2-D advanced indexing with broadcast indices)
    flat = block.clamp_(0, max_blocks - 1).add_((req * max_blocks)[:, None])
    out = block_table.reshape(-1).long().index_select(0, flat.view(-1)).view(idx.shape)
    out.mul_(block_size).add_(idx % block_size)
    return out.masked_fill_(invalid, -1)


def token_to_request(query_start_loc: torch.Tensor) -> torch.Tensor:
    """Request index of each scheduled token from vLLM's cumulative ``query_start_loc``.

    Args:
        query_start_loc: ``[R + 1]`` non-decreasing integers, ``query_start_loc[0] = 0``; request ``r`` owns tokens
            ``[query_start_loc[r], query_start_loc[r+1])``.

    Returns:
        ``[T]`` int64 with ``T = query_start_loc[-1]``.

    Raises:
        ValueError: not 1-D, empty, not starting at 0, or decreasing.
    """
    if query_start_loc.dim() != 1 or query_start_loc.numel() == 0:
        raise ValueError(f"query_start_loc must be 1-D [R+1], got shape {tuple(query_start_loc.shape)}")
    loc = query_start_loc.long()
    if int(loc[0]) != 0:
        raise ValueError(f"query_start_loc must start at 0, got {int(loc[0])}")
    lens = loc[1:] - loc[:-1]
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError("query_start_loc must be non-decreasing")
    return torch.repeat_interleave(torch.arange(lens.numel(), device=loc.device), lens)

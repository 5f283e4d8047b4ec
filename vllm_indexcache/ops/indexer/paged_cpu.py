"""One step of the lightning indexer over a paged, unquantised K-cache on CPU, on :mod:`.cpu` (no vLLM import).

The per-step work of an F layer's indexer in the CPU INDEXCACHE backend (:mod:`vllm_indexcache.vllm_glue.cpu.indexer`
hands it the step's metadata): write this step's keys at ``slot_mapping``, then for each request score its query
tokens against its keys ``0..seq_len-1`` read in place from the cache — runs of consecutive blocks are views, no
copy of the request's keys (:func:`~vllm_indexcache.ops.indexer.cpu_blockwise.paged_key_segments`) — and write their
top-k with the fused blockwise indexer (ties → lower position, the rule of
:func:`~vllm_indexcache.ops.indexer.naive.indexer_topk_naive`). Rows hold request-local key positions, ``-1`` where
fewer than ``topk`` keys are visible — the contract of vLLM's ``topk_indices_buffer``.
"""
from __future__ import annotations

import torch

from .cpu_blockwise import indexer_topk_segments, paged_key_segments

__all__ = ["paged_indexer_step_cpu"]


def paged_indexer_step_cpu(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor,
                           slot_mapping: torch.Tensor, block_table: torch.Tensor, query_start_loc_host: list[int],
                           seq_lens_host: list[int], positions: torch.Tensor, block_size: int, topk: int,
                           out: torch.Tensor, num_tokens: int) -> None:
    """Insert keys, then write ``out[t]`` for every query token of the step.

    Args:
        q: ``[T', H, D]`` indexer queries (RoPE applied), model dtype; ``T' >= T``.
        k: ``[T', D]`` this step's indexer keys (RoPE applied).
        weights: ``[T', H]`` float32 head weights, scales included.
        cache: ``[num_slots, D]`` the paged K-cache viewed flat (slot = block · block_size + offset).
        slot_mapping: ``[>= T]`` global slot of each query token's key (``-1`` = do not store).
        block_table: ``[R, max_blocks]`` block ids per request.
        query_start_loc_host: ``R + 1`` cumulative query starts (host ints).
        seq_lens_host: ``R`` keys per request after this step (host ints).
        positions: ``[>= T]`` int64 token positions (query ``t`` sees keys ``0..positions[t]``).
        block_size: tokens per cache block.
        topk: ``index_topk``.
        out: ``[>= T, topk]`` int32 top-k buffer; rows ``[0, T)`` are overwritten.
        num_tokens: ``T``, the step's query tokens.

    Raises:
        ValueError: ``topk < 1``.
    """
    slots = slot_mapping[:num_tokens].long()
    valid = slots >= 0
    cache[slots[valid]] = k[:num_tokens][valid].to(cache.dtype)
    out[:num_tokens] = -1
    qsl = query_start_loc_host
    for r in range(len(qsl) - 1):
        start, end = qsl[r], qsl[r + 1]
        if end == start:
            continue
        n_keys = seq_lens_host[r]
        ids = block_table[r, :-(-n_keys // block_size)].tolist()

        def segments(max_keys, ids=ids, n_keys=n_keys):
            return paged_key_segments(cache, ids, n_keys, block_size, max_keys)

        out[start:end] = indexer_topk_segments(q[start:end], weights[start:end], positions[start:end], topk, segments)

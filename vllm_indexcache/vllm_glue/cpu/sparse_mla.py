"""The INDEXCACHE sparse MLA attention backend (CPU).

Implements vLLM's attention-backend interface (``vllm/v1/attention/backend.py``) for sparse MLA layers of DSA models:
each query token attends to the ``index_topk`` latent-cache rows that the lightning indexer of its layer's F layer
selected (DeepSeek-V3.2 report, §2.1; IndexCache paper §3). The top-k rows of the step live in the model's
``topk_indices_buffer`` (``[max_num_batched_tokens, index_topk]`` int32, request-local positions, -1 = none): an F
layer's indexer writes it, and that F layer and the S layers after it read it — an S layer simply reads what the
nearest preceding F layer wrote in the same forward pass.

Maths per token (``ops/sparse_mla``): ``softmax(scale · (q_latent·kv_c + q_pe·k_pe)) · kv_c`` over the selected
rows of the paged latent cache ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]``; vLLM's
``MLAAttention`` absorbs ``W_UK`` into the query before and applies ``W_UV`` after.

F layers' indexers are switched to the unquantised CPU lightning indexer here (:mod:`.indexer`), because the impl
is the first object vLLM builds per layer that knows the backend.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionLayer, MultipleOf
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from vllm_indexcache.ops.paging import local_to_global_slots
from vllm_indexcache.ops.sparse_mla.cpu import sparse_mla
from vllm_indexcache.vllm_glue import BACKEND_NAME
from vllm_indexcache.vllm_glue.cpu.indexer import adopt_indexer
from vllm_indexcache.vllm_glue.cpu.metadata import IndexCacheMetadata, IndexCacheMetadataBuilder


class IndexCacheSparseMLABackend(CPUMLABackend):
    """Sparse MLA backend ``INDEXCACHE``: float32/bfloat16/float16 latent cache, any block size multiple of 16."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any kv_lora_rank + qk_rope_head_dim

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size % 16 == 0

    @classmethod
    def is_sparse(cls) -> bool:
        return True

    @staticmethod
    def get_impl_cls() -> type[IndexCacheSparseMLAImpl]:
        return IndexCacheSparseMLAImpl

    @staticmethod
    def get_builder_cls() -> type[IndexCacheMetadataBuilder]:
        return IndexCacheMetadataBuilder


class IndexCacheSparseMLAImpl(CPUMLAImpl):
    """Sparse MLA over the selected latent-cache rows; cache writes as vLLM's ``CPUMLAImpl``."""

    is_sparse = True
    masked_mha_available = False

    def __init__(self, *args, topk_indices_buffer: torch.Tensor | None = None, index_group_builder=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if topk_indices_buffer is None:
            raise ValueError("INDEXCACHE backend: sparse MLA layer built without a topk_indices_buffer")
        self.topk_indices_buffer = topk_indices_buffer
        if self.indexer is not None:  # F layer: run the unquantised CPU lightning indexer
            adopt_indexer(self.indexer)

    def record_logical_topk_ready(self) -> None:
        """Called by vLLM after the indexer ran (``mla.py``); the CPU path has no side stream to signal."""

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: IndexCacheMetadata,
                    layer: AttentionLayer) -> tuple[torch.Tensor, None]:
        """Sparse attention for all ``T`` tokens of the step.

        Args:
            q: ``(q_latent [T, N, kv_lora_rank], q_pe [T, N, qk_rope_head_dim])`` (or their concatenation).
            kv_c_and_k_pe_cache: ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]``.
        Returns:
            ``([T, N, kv_lora_rank] latent output in q's dtype, None)``.
        """
        if isinstance(q, tuple):
            q_latent, q_pe = q
        else:
            q_latent, q_pe = q.split([self.kv_lora_rank, q.shape[-1] - self.kv_lora_rank], dim=-1)
        num_tokens = q_latent.shape[0]
        m = attn_metadata
        slots = local_to_global_slots(self.topk_indices_buffer[:num_tokens], m.req_idx[:num_tokens],
                                      m.block_table, m.block_size)
        cache = kv_c_and_k_pe_cache.view(-1, kv_c_and_k_pe_cache.shape[-1])
        out = sparse_mla(q_latent, q_pe, cache, slots, self.scale)
        return out, None

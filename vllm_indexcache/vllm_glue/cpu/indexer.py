"""The lightning indexer of F layers on CPU: unquantised keys in a paged K-cache, top-k per query token.

DeepSeek-V3.2 report §2.1: ``I[t,s] = Σ_h w[t,h] · ReLU(q[t,h] · k[s])`` with ``q = wq_b(q_latent)`` (MLA's query
latent after ``q_a_layernorm``), ``k = LayerNorm(wk(x))`` (one shared key head), ``w = weights_proj(x) · H^-½ · D^-½``,
RoPE on the first ``qk_rope_head_dim`` dims of q and k (NeoX unless ``indexer_rope_interleave``); causal; the
``index_topk`` best keys per query token become the sparse attention's selection.

vLLM 0.32's ``deepseek_v2.Indexer`` computes q and k the same way but quantises both to FP8 (UE8M0 scales) and scores
them with DeepGEMM/Triton kernels that do not exist on CPU (``model_executor/layers/sparse_attn_indexer.py``; its
``forward_cpu`` is DeepSeek-V4's ``index_topk == 512`` path). Here the F layer's ``Indexer`` and its
``DeepseekV32IndexerCache`` are switched (``adopt_indexer``) to subclasses that keep keys in the model dtype —
so selections match transformers' reference — and score with the fused blockwise indexer
(:func:`vllm_indexcache.ops.indexer.cpu_blockwise.indexer_topk_segments`, keys read in place from the paged cache).
Only F layers own an ``Indexer``, so S layers allocate no indexer K-cache at all.

Observers (:func:`add_observer`, :func:`observing`) see every indexer call of a real step (:class:`IndexerCall`: layer,
selections, wall time, the step's positions and inputs): the benchmark's indexer timing and the tests' top-k capture
(:mod:`vllm_indexcache.vllm_glue.hooks`) use them; with none registered nothing is timed.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.deepseek_v2 import DeepseekV32IndexerCache, Indexer
from vllm.v1.attention.backend import AttentionBackend, MultipleOf
from vllm.v1.kv_cache_interface import MLAAttentionSpec, SparseCacheRole

from vllm_indexcache.ops.indexer.paged_cpu import paged_indexer_step_cpu
from vllm_indexcache.vllm_glue.cpu.metadata import IndexCacheMetadata, IndexCacheMetadataBuilder
from vllm_indexcache.vllm_glue.indexer_projection import indexer_qkw


class IndexCacheIndexerBackend(AttentionBackend):
    """Metadata-only backend of the indexer K-cache (the indexer itself runs inside the MLA layer's forward)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]

    @staticmethod
    def get_name() -> str:
        return "INDEXCACHE_INDEXER"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the indexer K-cache has no attention impl")

    @staticmethod
    def get_builder_cls() -> type[IndexCacheMetadataBuilder]:
        return IndexCacheMetadataBuilder


class IndexCacheIndexerKCache(DeepseekV32IndexerCache):
    """Indexer K-cache ``[num_blocks, block_size, index_head_dim]`` in the model dtype (vLLM's holds 132 B FP8+scale
    per token); bound by vLLM through ``bind_kv_cache``."""

    def get_kv_cache_spec(self, vllm_config) -> MLAAttentionSpec:
        return MLAAttentionSpec(block_size=self.cache_config.block_size, num_kv_heads=1, max_tp_shards=1,
                                head_size=self.head_dim, dtype=self.dtype, cache_role=SparseCacheRole.INDEXER)

    def get_attn_backend(self) -> type[AttentionBackend]:
        return IndexCacheIndexerBackend


class IndexCacheIndexer(Indexer):
    """vLLM's ``Indexer`` with an unquantised forward on CPU (weights and module layout unchanged)."""

    def forward(self, hidden_states: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor,
                rotary_emb) -> None:
        """Score and select keys for every token of the step; writes ``topk_indices_buffer[:T]``.

        Args:
            hidden_states: ``[T, hidden_size]`` layer input.
            qr: ``[T, q_lora_rank]`` MLA query latent after ``q_a_layernorm``.
            positions: ``[T]`` int64 token positions.
            rotary_emb: the indexer's RoPE module.
        """
        # forward_native: vLLM's CPU rotary kernel mis-rotates these layouts (see vllm_glue/model.py)
        q, k, weights = indexer_qkw(self, hidden_states, qr, positions, rotary_emb.forward_native)
        run_lightning_indexer(q, k, weights, self.k_cache, self.topk_indices_buffer, self.topk_tokens)


@dataclass(frozen=True)
class IndexerCall:
    """One F layer's indexer call in one forward step, as observers see it (right after the call; the tensors are
    the engine's own buffers and inputs: an observer that keeps them copies them).

    Attributes:
        layer: global layer index (from the K-cache prefix ``...layers.N...``; ``-1`` if it has none).
        topk: ``[T, index_topk]`` int32 view of ``topk_indices_buffer[:T]`` just written (request-local key
            positions, ``-1`` padding).
        seconds: wall time of the call (K-cache insert, scores, top-k), ``time.perf_counter`` seconds.
        decode: the step is a decode step (its query tokens equal its requests).
        positions: ``[T]`` int64 token positions.
        query_start_loc: ``num_reqs + 1`` cumulative query starts (host ints).
        q: ``[T', H, D]``, k: ``[T', D]`` (model dtype, RoPE applied), weights: ``[T', H]`` float32; ``T' >= T``.
    """

    layer: int
    topk: torch.Tensor
    seconds: float
    decode: bool
    positions: torch.Tensor
    query_start_loc: list[int]
    q: torch.Tensor
    k: torch.Tensor
    weights: torch.Tensor


#: Callables ``fn(call: IndexerCall) -> None``, called in order after each indexer call of a real step.
_OBSERVERS: list[Callable[[IndexerCall], None]] = []


def add_observer(fn: Callable[[IndexerCall], None]) -> Callable[[], None]:
    """Register ``fn`` for every later indexer call of this process (a worker, or the engine's process when vLLM runs
    in-process); returns the function that removes it. The same ``fn`` added twice is called twice."""
    _OBSERVERS.append(fn)

    def remove() -> None:
        if fn in _OBSERVERS:
            _OBSERVERS.remove(fn)

    return remove


@contextmanager
def observing(fn: Callable[[IndexerCall], None]) -> Iterator[None]:
    """``with observing(fn): ...`` — :func:`add_observer` for the block's duration."""
    remove = add_observer(fn)
    try:
        yield
    finally:
        remove()


def run_lightning_indexer(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                          k_cache: IndexCacheIndexerKCache, topk_buffer: torch.Tensor, topk: int) -> None:
    """Insert this step's keys into the paged indexer K-cache, then write each query token's top-k
    (:func:`vllm_indexcache.ops.indexer.paged_cpu.paged_indexer_step_cpu` on this step's metadata); then call the
    observers (:func:`add_observer`) with an :class:`IndexerCall`.

    Args:
        q: ``[T, H, D]`` indexer queries (RoPE applied), model dtype.
        k: ``[T, D]`` indexer keys of this step's tokens (RoPE applied), model dtype.
        weights: ``[T, H]`` float32 head weights, scales included.
        k_cache: the layer's K-cache module (``kv_cache`` bound to ``[num_blocks, block_size, D]``).
        topk_buffer: ``[max_num_batched_tokens, index_topk]`` int32; rows ``[0, T)`` are overwritten with
            request-local key positions, -1 where fewer than ``topk`` keys are visible.
        topk: ``index_topk``.
    """
    t0 = time.perf_counter() if _OBSERVERS else 0.0
    attn_metadata = get_forward_context().attn_metadata
    if not isinstance(attn_metadata, dict):  # profile / dummy run: nothing cached, nothing read, nothing observed
        return
    m: IndexCacheMetadata = attn_metadata[k_cache.prefix]
    paged_indexer_step_cpu(q, k, weights, k_cache.kv_cache.view(-1, k_cache.kv_cache.shape[-1]), m.slot_mapping,
                           m.block_table, m.query_start_loc_host[:m.num_reqs + 1], m.seq_lens_host, m.positions,
                           m.block_size, topk, topk_buffer, m.num_actual_tokens)
    if _OBSERVERS:
        seconds = time.perf_counter() - t0
        T = m.num_actual_tokens
        layer = re.search(r"layers\.(\d+)\.", k_cache.prefix + ".")
        call = IndexerCall(layer=int(layer.group(1)) if layer else -1, topk=topk_buffer[:T], seconds=seconds,
                           decode=T == m.num_reqs, positions=m.positions[:T],
                           query_start_loc=m.query_start_loc_host[:m.num_reqs + 1], q=q, k=k, weights=weights)
        for fn in list(_OBSERVERS):
            fn(call)


def adopt_indexer(indexer: Indexer) -> None:
    """Switch an F layer's vLLM ``Indexer`` (and its K-cache) to the unquantised CPU implementation, in place.

    Must run before vLLM collects KV-cache specs (it does: called from the layer's attention impl constructor)."""
    indexer.__class__ = IndexCacheIndexer
    cache = indexer.k_cache
    cache.__class__ = IndexCacheIndexerKCache
    cache.head_dim = indexer.head_dim
    cache.dtype = torch.get_default_dtype()

"""The lightning indexer of F layers without DeepGEMM (CUDA vLLM 0.26, Triton fallback of INDEXCACHE).

vLLM 0.26's ``deepseek_v2.Indexer`` quantises q and k to FP8 (UE8M0 scales), stores 132 B per key and scores with
DeepGEMM (``sparse_attn_indexer`` custom op; its metadata builder ``DeepseekV32IndexerMetadataBuilder`` also calls
DeepGEMM's ``get_paged_mqa_logits_metadata``). ``SparseAttnIndexer.__init__`` raises "Sparse Attention Indexer CUDA
op requires DeepGEMM support" when DeepGEMM is absent.

Route chosen: an **unquantised K-cache** as on CPU (``vllm_glue/cpu/indexer.py``), because it needs no DeepGEMM
anywhere: the F layer's ``Indexer`` and its ``DeepseekV32IndexerCache`` are switched in place
(:func:`adopt_indexer_cuda`, called from the sparse MLA impl's constructor, before vLLM collects KV-cache specs) to
subclasses whose K-cache is ``[num_blocks, block_size, index_head_dim]`` in the model dtype, whose metadata comes from
:class:`TritonIndexerMetadataBuilder` (no DeepGEMM, no batch-order assumption) and whose forward computes q, k and the
head weights as vLLM's unfused branch does (minus FP8) and then runs
:func:`vllm_indexcache.ops.indexer.paged_triton.paged_indexer_step` inside the opaque custom op
``torch.ops.vllm.indexcache_triton_indexer`` (writes ``topk_indices_buffer`` like vLLM's op: request-local positions,
``-1`` padding). S layers own no indexer and read the buffer unchanged.

CUDA graphs: the builder reports ``AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE``. A uniform decode batch
(every request one query token) takes the step's ``decode_only`` path, which has fixed shapes and reads nothing back
to the host, so vLLM captures it in its full decode graphs. Other batches (prefill, chunked prefill, mixed) read
request boundaries on the host; the op is therefore one of vLLM's splitting ops (:func:`register_splitting_op`), so
that piecewise graphs run it eagerly between captured pieces, as vLLM does with its own ``sparse_attn_indexer``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer
from vllm.model_executor.models.deepseek_v2 import DeepseekV32IndexerCache, Indexer
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadata,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerBackend
from vllm.v1.kv_cache_interface import MLAAttentionSpec

from vllm_indexcache.ops.indexer.paged_triton import paged_indexer_step
from vllm_indexcache.vllm_glue.indexer_projection import indexer_qkw

_GUARD_INSTALLED = False


@dataclass
class TritonIndexerMetadata(AttentionMetadata):
    """Per-step metadata of the indexer K-cache (R requests, T = ``num_actual_tokens``)."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor            # [T]
    block_table: torch.Tensor             # [R, max_blocks]
    seq_lens: torch.Tensor                # [R] device
    query_start_loc_host: list[int] | None  # R + 1 (None when decode_only)
    seq_lens_host: list[int] | None       # R, exact for multi-token requests (None when decode_only)
    decode_only: bool = False             # uniform decode batch (R == T): graph-safe path, no host lists


class TritonIndexerMetadataBuilder(AttentionMetadataBuilder[TritonIndexerMetadata]):
    """No DeepGEMM, no batch reordering requested (works with whatever order the MLA builder asks); full CUDA graphs
    for uniform single-token decode batches."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in vLLM 0.26's base class
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TritonIndexerMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        base = dict(num_actual_tokens=cm.num_actual_tokens, slot_mapping=cm.slot_mapping[: cm.num_actual_tokens],
                    block_table=cm.block_table_tensor[:num_reqs], seq_lens=cm.seq_lens[:num_reqs])
        if cm.max_query_len == 1 and cm.num_actual_tokens == num_reqs:
            return TritonIndexerMetadata(**base, query_start_loc_host=None, seq_lens_host=None, decode_only=True)
        qsl = np.asarray(cm.query_start_loc_cpu[: num_reqs + 1], dtype=np.int64)
        upper = cm.seq_lens_cpu_upper_bound
        # vLLM: the upper bound is exact for requests with several query tokens (prefills); one-token requests
        # read the device seq_lens instead.
        seq_lens_host = (upper[:num_reqs] if upper is not None else cm.seq_lens[:num_reqs].cpu()).tolist()
        return TritonIndexerMetadata(**base, query_start_loc_host=qsl.tolist(),
                                     seq_lens_host=[int(x) for x in seq_lens_host])


class TritonIndexerBackend(DeepseekV32IndexerBackend):
    """Metadata-only backend of the unquantised indexer K-cache (block size 64 like vLLM's indexer)."""

    @staticmethod
    def get_name() -> str:
        return "INDEXCACHE_TRITON_INDEXER"   # not DEEPSEEK_V32_INDEXER: vLLM's warmup of its DeepGEMM metadata skips it

    @staticmethod
    def get_builder_cls() -> type[TritonIndexerMetadataBuilder]:
        return TritonIndexerMetadataBuilder


class TritonIndexerKCache(DeepseekV32IndexerCache):
    """Indexer K-cache ``[num_blocks, block_size, index_head_dim]`` in the model dtype (vLLM's: 132 B FP8+scale)."""

    def get_kv_cache_spec(self, vllm_config) -> MLAAttentionSpec:
        return MLAAttentionSpec(block_size=self.cache_config.block_size, num_kv_heads=1, head_size=self.head_dim,
                                dtype=self.dtype)

    def get_attn_backend(self):
        return TritonIndexerBackend


class TritonIndexer(Indexer):
    """vLLM's ``Indexer`` with an unquantised forward on the Triton kernels (weights and module layout unchanged)."""

    def forward(self, hidden_states: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, rotary_emb):
        q, k, weights = indexer_qkw(self, hidden_states, qr, positions, rotary_emb)
        torch.ops.vllm.indexcache_triton_indexer(q, k, weights, self.topk_indices_buffer, self.k_cache.prefix,
                                                 self.topk_tokens)
        return self.topk_indices_buffer


def _indexer_op(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk_indices_buffer: torch.Tensor,
                k_cache_prefix: str, topk: int) -> None:
    ctx = get_forward_context()
    attn_metadata = ctx.attn_metadata
    if not isinstance(attn_metadata, dict):  # profile / dummy run: nothing cached, nothing read
        topk_indices_buffer[: q.shape[0]] = -1
        return
    m: TritonIndexerMetadata = attn_metadata[k_cache_prefix]
    kv_cache = ctx.no_compile_layers[k_cache_prefix].kv_cache
    paged_indexer_step(q, k, weights, kv_cache, m.slot_mapping, m.block_table, m.query_start_loc_host,
                       m.seq_lens_host, m.seq_lens, topk, topk_indices_buffer, decode_only=m.decode_only)


def _indexer_op_fake(q, k, weights, topk_indices_buffer, k_cache_prefix: str, topk: int) -> None:
    return None


direct_register_custom_op(op_name="indexcache_triton_indexer", op_func=_indexer_op,
                          mutates_args=["topk_indices_buffer"], fake_impl=_indexer_op_fake)

#: The op as vLLM's compilation config names it.
INDEXER_OP = "vllm::indexcache_triton_indexer"


def register_splitting_op() -> None:
    """Add :data:`INDEXER_OP` to vLLM's attention ops (``CompilationConfig._attention_ops``, the default
    ``splitting_ops``), idempotent. Piecewise CUDA graphs then split the model there and run the op eagerly (its
    prefill path reads request boundaries on the host); full decode graphs still capture it. Must run before
    the ``VllmConfig`` is built: ``vllm_glue.install()`` does it through the CUDA platform hook."""
    from vllm.config.compilation import CompilationConfig

    if INDEXER_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(INDEXER_OP)


def adopt_indexer_cuda(indexer: Indexer) -> None:
    """Switch an F layer's ``Indexer`` and its K-cache to the unquantised Triton implementation, in place.

    Must run before vLLM collects KV-cache specs (it does: called from the sparse MLA impl's constructor)."""
    indexer.__class__ = TritonIndexer
    cache = indexer.k_cache
    cache.__class__ = TritonIndexerKCache
    cache.head_dim = indexer.head_dim
    cache.dtype = indexer.vllm_config.model_config.dtype


def install_deep_gemm_guard() -> None:
    """Let ``Indexer`` be *constructed* without DeepGEMM (idempotent).

    ``SparseAttnIndexer.__init__`` raises at its very end (all attributes already set) when DeepGEMM is missing,
    long before the layer's attention impl can adopt the indexer. The wrapper defers that error to the op's first
    forward, which never comes for adopted (fallback) layers and still fails loudly for native ones. Must be
    installed before the model is built: ``vllm_glue.install()`` does it through the CUDA platform hook.
    """
    global _GUARD_INSTALLED
    if _GUARD_INSTALLED:
        return
    _GUARD_INSTALLED = True
    original_init = SparseAttnIndexer.__init__
    original_forward = SparseAttnIndexer.forward_cuda

    def __init__(self, *args, **kwargs):
        try:
            original_init(self, *args, **kwargs)
        except RuntimeError as e:
            if "DeepGEMM" not in str(e):
                raise
            self._indexcache_deferred_error = str(e)

    def forward_cuda(self, *args, **kwargs):
        err = getattr(self, "_indexcache_deferred_error", None)
        if err is not None:
            raise RuntimeError(err)
        return original_forward(self, *args, **kwargs)

    SparseAttnIndexer.__init__ = __init__
    SparseAttnIndexer.forward_cuda = forward_cuda


"""Triton fallback of the INDEXCACHE sparse MLA backend for CUDA vLLM 0.26 (no FlashMLA, no DeepGEMM).

Selected by ``vllm_glue/cuda/platform.py`` when ``--attention-backend indexcache`` is asked for on a GPU where no
native sparse MLA backend validates, or when ``VLLM_INDEXCACHE_KERNELS=triton`` forces it. Built on vLLM 0.26's
``FlashMLASparseBackend`` (``v1/attention/backends/mla/flashmla_sparse.py``), bf16 latent cache only:

* **Backend** — name ``INDEXCACHE`` (what the user selected; also keeps vLLM's ``FLASHMLA_SPARSE``-only switches off:
  ``_canonicalize_sparse_mla_kv_cache_dtype`` would turn fp8 into ``fp8_ds_mla``, and the sparse-MLA warmup would
  warm FlashMLA metadata paths), kv-cache dtype ``auto``/``bfloat16`` (fp8 refused with a reason), compute
  capability >= 8.0, block size 64 (vLLM's DSA indexer cache needs 64 too).
* **Builder** — ``FlashMLASparseMetadataBuilder`` unchanged (CUDA graphs: ``UNIFORM_BATCH``, as natively): with a
  bf16 cache its ``build`` only runs the shared ``SparseMLACommonMetadataBuilder.build`` (decode/prefill split,
  ``req_id_per_token``, dense-MHA prefill metadata) and never calls FlashMLA's ``get_mla_metadata`` (fp8 only);
  its constructor allocates a few small buffers. The Triton sparse MLA kernel has fixed shapes and no host reads;
  the indexer's builder (``UNIFORM_SINGLE_TOKEN_DECODE``) is what limits full graphs to uniform decode batches.
* **Impl** — ``FlashMLASparseImpl`` whose ``forward_mqa`` (bf16 cache) runs
  :func:`vllm_indexcache.ops.sparse_mla.triton.sparse_mla` on the latent and rotary halves of q instead of
  ``concat_mla_q`` + ``flash_mla_sparse_fwd`` (no head padding, any latent/rope width: the shipped tiny DSA model
  has 128 + 32, which ``concat_mla_q`` refuses). vLLM's own Triton ``triton_convert_req_index_to_global_index``
  still maps request-local top-k to slots; short prefills (``seq_len <= index_topk``) still go to vLLM's dense MHA
  prefill backend, exactly as natively. F layers' indexers
  are adopted by :func:`vllm_indexcache.vllm_glue.cuda.indexer.adopt_indexer_cuda` (unquantised keys, Triton top-k).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.mla.flashmla_sparse import (
    FlashMLASparseBackend,
    FlashMLASparseImpl,
    FlashMLASparseMetadataBuilder,
    triton_convert_req_index_to_global_index,
)

from vllm_indexcache.ops.sparse_mla.triton import sparse_mla
from vllm_indexcache.vllm_glue import BACKEND_NAME
from vllm_indexcache.vllm_glue.cuda.indexer import adopt_indexer_cuda

_FP8_REASON = ("kv_cache_dtype {0!r}: the INDEXCACHE Triton fallback keeps the MLA latent cache in bfloat16 "
               "(FlashMLA's fp8_ds_mla layout needs FlashMLA kernels); use --kv-cache-dtype auto")


class IndexCacheTritonSparseMLABackend(FlashMLASparseBackend):
    """Sparse MLA backend ``INDEXCACHE`` on Triton kernels (SM80+), bf16 latent cache."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [64]

    @staticmethod
    def get_builder_cls() -> type[IndexCacheTritonSparseMLAMetadataBuilder]:
        return IndexCacheTritonSparseMLAMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type[IndexCacheTritonSparseMLAImpl]:
        return IndexCacheTritonSparseMLAImpl

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, *args, **kwargs) -> str | None:
        if kv_cache_dtype is not None and kv_cache_dtype not in cls.supported_kv_cache_dtypes:
            return _FP8_REASON.format(kv_cache_dtype)
        return None

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        if cache_dtype_str not in ("auto", "bfloat16"):
            raise ValueError(_FP8_REASON.format(cache_dtype_str))
        return (num_blocks, block_size, head_size)


class IndexCacheTritonSparseMLAMetadataBuilder(FlashMLASparseMetadataBuilder):
    """vLLM's sparse MLA builder (bf16 path: no FlashMLA calls; CUDA graphs as vLLM's)."""


class IndexCacheTritonSparseMLAImpl(FlashMLASparseImpl):
    """``FlashMLASparseImpl`` with its bf16 MQA path (``concat_mla_q`` + FlashMLA) replaced by the project's Triton
    sparse MLA."""

    def __init__(self, *args, indexer=None, **kwargs):
        super().__init__(*args, indexer=indexer, **kwargs)
        if self.kv_cache_dtype not in ("auto", "bfloat16"):
            raise ValueError(_FP8_REASON.format(self.kv_cache_dtype))
        if self.topk_indices_buffer is None:
            raise ValueError("INDEXCACHE Triton backend: sparse MLA layer built without a topk_indices_buffer")
        if indexer is not None:  # F layer: unquantised keys + Triton top-k instead of FP8 + DeepGEMM
            adopt_indexer_cuda(indexer)

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata, layer):
        """vLLM 0.26's ``FlashMLASparseImpl.forward_mqa`` (bf16 cache) without ``concat_mla_q``, whose CUDA op needs
        a latent dim that is a multiple of 512 (the shipped tiny DSA model has 128; seen on the H200): the Triton
        kernel takes the latent and rotary halves of ``q`` separately.

        Returns ``(out [T, H, kv_lora_rank], None)``."""
        if isinstance(q, tuple):
            ql_nope, q_pe = q
        else:
            ql_nope, q_pe = q[..., : self.kv_lora_rank], q[..., self.kv_lora_rank:]
        num_tokens = ql_nope.shape[0]
        topk_indices = self.topk_indices_buffer[:num_tokens]
        slots = triton_convert_req_index_to_global_index(
            attn_metadata.req_id_per_token[:num_tokens], attn_metadata.block_table, topk_indices,
            BLOCK_SIZE=attn_metadata.block_size, NUM_TOPK_TOKENS=topk_indices.shape[1])
        cache = kv_c_and_k_pe_cache.view(-1, kv_c_and_k_pe_cache.shape[-1])
        return sparse_mla(ql_nope, q_pe, cache, slots.view(num_tokens, -1), self.softmax_scale), None

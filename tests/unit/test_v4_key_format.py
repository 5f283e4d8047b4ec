"""The DeepSeek-V4 CPU key format chosen by ``--kv-cache-dtype`` (``vllm_glue/cpu/deepseek_v4/key_format.py``)."""
from __future__ import annotations

import pytest
import torch

from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import key_format


@pytest.mark.parametrize("cache_dtype,fp8", [("auto", False), ("bfloat16", False), ("fp8", True),
                                             ("fp8_e4m3", True), ("fp8_ds_mla", True)])
def test_cache_dtype_selects_the_key_format(cache_dtype, fp8):
    assert key_format.uses_fp8_keys(cache_dtype) is fp8


@pytest.mark.parametrize("cache_dtype", ["float16", "fp8_e5m2"])
def test_unsupported_cache_dtype_is_refused_in_one_line(cache_dtype):
    with pytest.raises(ValueError, match=f"--kv-cache-dtype '{cache_dtype}'") as err:
        key_format.uses_fp8_keys(cache_dtype)
    assert "\n" not in str(err.value)


def test_install_switches_vllm_cpu_hooks_both_ways(monkeypatch):
    """bfloat16 keys: plain-row layout (vLLM then resolves bfloat16 caches), the row insert, the unquantised
    indexer query, the torch ops that read rows; fp8 restores vLLM's own hooks."""
    import importlib

    from vllm.models.deepseek_v4.attention import _resolve_dsv4_kv_cache_dtype
    from vllm.models.deepseek_v4.cpu import cpu_sparse

    from vllm_indexcache.vllm_glue.cpu.deepseek_v4.ops import C_NAMESPACE, TORCH_OPS, WRAPPERS

    for op in key_format.ROW_OPS:       # the bound torch ops are undone after the test (other tests read _C's)
        for name in {TORCH_OPS[op][0], WRAPPERS}:
            target = torch.ops._C if name == C_NAMESPACE else importlib.import_module(name)
            monkeypatch.setattr(target, op, getattr(target, op, None), raising=False)

    from vllm_indexcache.ops.v4_indexer.cpu import indexer_q_rope

    attention = cpu_sparse.DeepseekV4CPUAttention
    original_insert = attention._fused_qnorm_rope_kv_insert
    original_q = cpu_sparse._fused_indexer_q_rope_quant_cpu
    try:
        assert key_format.install("auto") is False
        assert attention.use_fp8_ds_mla_layout is False
        assert _resolve_dsv4_kv_cache_dtype(attention.use_fp8_ds_mla_layout, "auto", None) == ("auto", torch.bfloat16)
        assert attention._fused_qnorm_rope_kv_insert is key_format._swa_insert_rows
        assert cpu_sparse._fused_indexer_q_rope_quant_cpu is indexer_q_rope
        import vllm.models.deepseek_v4.cpu.cpu_compressor as cpu_compressor

        from vllm_indexcache.ops.compressor.cpu import compress_norm_rope_store

        assert cpu_compressor.compress_norm_rope_store_cpu is compress_norm_rope_store
        assert key_format.install("fp8") is True
        assert attention.use_fp8_ds_mla_layout is True
        assert attention._fused_qnorm_rope_kv_insert is original_insert
        assert cpu_sparse._fused_indexer_q_rope_quant_cpu is original_q
    finally:
        key_format.install("fp8")


def test_apply_makes_built_indexer_k_caches_bfloat16():
    """Only built indexers change (S CSA layers have ``indexer = None``); fp8 changes nothing."""
    class Cache(torch.nn.Module):
        head_dim, dtype = 132, torch.uint8

    class Indexer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim, self.k_cache = 128, Cache()

    class Attn(torch.nn.Module):
        def __init__(self, indexer):
            super().__init__()
            self.indexer = indexer

    class Layer(torch.nn.Module):
        def __init__(self, indexer):
            super().__init__()
            self.attn = Attn(indexer)

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Layer(Indexer()), Layer(None), Layer(Indexer())])
    assert key_format.apply(model, fp8=True) == 0 and model.layers[0].attn.indexer.k_cache.dtype == torch.uint8
    assert key_format.apply(model, fp8=False) == 2
    for i in (0, 2):
        cache = model.layers[i].attn.indexer.k_cache
        assert (cache.head_dim, cache.dtype) == (128, torch.bfloat16)

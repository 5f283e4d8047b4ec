"""The CUDA platform hook's backend choice (vllm_glue/cuda/platform.py), with vLLM's selector replaced by fakes.

The hook itself only runs inside CUDA vLLM (checked on the H200 by scripts/bench_vllm_gpu.py); what it decides is
plain logic and is checked here on CPU.
"""
from types import SimpleNamespace

import pytest

from vllm_indexcache.vllm_glue.cuda import platform as cp

NATIVE = "vllm.v1.attention.backends.mla.flashmla_sparse.FlashMLASparseBackend"
DEFAULT = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"


def _original(native_ok=True):
    calls = []

    def original(cls, selected, cfg, num_heads=None):
        calls.append(selected)
        if selected is not None:
            return f"explicit:{selected.name}"
        if cfg.use_sparse:
            if not native_ok:
                raise ValueError("No valid attention backend found for cuda")
            return NATIVE
        return DEFAULT

    return original, calls


INDEXCACHE = SimpleNamespace(name="INDEXCACHE")
SPARSE, DENSE = SimpleNamespace(use_sparse=True, head_size=576), SimpleNamespace(use_sparse=False, head_size=128)
V32 = SimpleNamespace(index_n_heads=64, index_head_dim=128)     # DeepSeek-V3.2's indexer
TINY = SimpleNamespace(index_n_heads=4, index_head_dim=128)     # examples/models/tiny-dsa's indexer


@pytest.fixture(autouse=True)
def _fallback_available(monkeypatch):
    """The selection logic with the Triton fallback available (CUDA vLLM 0.26); see test_fallback_unavailable."""
    monkeypatch.setattr(cp, "triton_fallback_problem", lambda: None)


@pytest.mark.parametrize("env", [None, "triton"])
def test_fallback_unavailable_raises_one_line_native_still_works(monkeypatch, env):
    if env is None:
        monkeypatch.delenv(cp.KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(cp.KERNELS_ENV, env)
    lacks = "vLLM 0.33.0 lacks AttentionBackend.get_kv_cache_shape"
    monkeypatch.setattr(cp, "triton_fallback_problem", lambda: lacks)
    original, _ = _original(native_ok=False)
    with pytest.raises(ValueError, match=lacks):
        cp.select_backend(original, None, INDEXCACHE, SPARSE)
    if env is None:
        assert cp.select_backend(_original(native_ok=True)[0], None, INDEXCACHE, SPARSE) == NATIVE


@pytest.mark.parametrize("env,native_ok,expected", [
    (None, True, NATIVE), ("auto", True, NATIVE), ("native", True, NATIVE), ("triton", True, cp.TRITON_BACKEND_PATH),
    (None, False, cp.TRITON_BACKEND_PATH), ("triton", False, cp.TRITON_BACKEND_PATH)])
def test_sparse_layers_pick_native_or_triton(monkeypatch, env, native_ok, expected):
    if env is None:
        monkeypatch.delenv(cp.KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(cp.KERNELS_ENV, env)
    original, calls = _original(native_ok)
    assert cp.select_backend(original, None, INDEXCACHE, SPARSE) == expected
    # vLLM is always asked without a selection, so it ranks its own sparse backends
    assert all(c is None for c in calls)


def test_native_without_native_kernels_raises_vllms_error(monkeypatch):
    monkeypatch.setenv(cp.KERNELS_ENV, "native")
    original, _ = _original(native_ok=False)
    with pytest.raises(ValueError, match="No valid attention backend"):
        cp.select_backend(original, None, INDEXCACHE, SPARSE)


def test_bad_kernel_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv(cp.KERNELS_ENV, "cutlass")
    original, _ = _original()
    with pytest.raises(ValueError, match=r"^VLLM_INDEXCACHE_KERNELS='cutlass': expected one of auto, native, triton$"):
        cp.select_backend(original, None, INDEXCACHE, SPARSE)


def test_importing_the_hook_does_not_import_vllm():
    # vLLM imports Triton; tests/unit/test_ops_triton*.py need Triton imported only after they set TRITON_INTERPRET
    import subprocess
    import sys

    code = "import sys, vllm_indexcache.vllm_glue.cuda.platform; print('vllm' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_other_selections_and_dense_layers_pass_through():
    original, calls = _original()
    flash = SimpleNamespace(name="FLASHMLA_SPARSE")
    assert cp.select_backend(original, None, flash, SPARSE) == "explicit:FLASHMLA_SPARSE"
    assert cp.select_backend(original, None, None, SPARSE) == NATIVE
    # INDEXCACHE asked for a model without an indexer: vLLM's default backend, not an error
    assert cp.select_backend(original, None, INDEXCACHE, DENSE) == DEFAULT
    assert calls[-1] is None


@pytest.mark.parametrize("head_size,hf_config,problem", [
    (576, V32, None), (576, None, None),
    (160, TINY, "MLA head size 160 (FlashMLA sparse needs 576 = 512 latent + 64 rope)"),
    (576, TINY, "index_n_heads=4 (DeepGEMM's indexer kernels need one of (16, 32, 64))"),
    (576, SimpleNamespace(index_n_heads=32, index_head_dim=64),
     "index_head_dim=64 (DeepGEMM's FP8 indexer needs 128)")])
def test_native_geometry_problem(head_size, hf_config, problem):
    assert cp.native_geometry_problem(head_size, hf_config) == problem


@pytest.mark.parametrize("env,expected", [(None, cp.TRITON_BACKEND_PATH), ("native", NATIVE)])
def test_auto_skips_native_kernels_the_geometry_cannot_use(monkeypatch, env, expected):
    # seen on the H200: vLLM validates FLASHMLA_SPARSE for the tiny DSA model, then DeepGEMM asserts at prefill
    if env is None:
        monkeypatch.delenv(cp.KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(cp.KERNELS_ENV, env)
    monkeypatch.setattr(cp, "_current_hf_config", lambda: TINY)
    original, _ = _original(native_ok=True)
    assert cp.select_backend(original, None, INDEXCACHE, SimpleNamespace(use_sparse=True, head_size=160)) == expected
    monkeypatch.setattr(cp, "_current_hf_config", lambda: V32)
    assert cp.select_backend(original, None, INDEXCACHE, SPARSE) == NATIVE

"""DeepSeek-V4 CPU ops in a float32 model (``--dtype float32``, keys in float32 with ``--kv-cache-dtype auto``)
against their naive float64 references, at float32 precision: nothing on the path may round to bfloat16.

vllm/_C's V4 ops take bfloat16 activations only (:data:`~vllm_indexcache.vllm_glue.cpu.deepseek_v4.ops.BF16_ONLY_OPS`),
so a float32 model runs the torch versions of mHC, the sliding-window insert, the sparse attention and the grouped
output projection (``vllm_glue/cpu/deepseek_v4/ops.py`` ``select_for_dtype``) with float32 row caches
(``key_format.apply``). Tolerances: float32 rounds at 2^-24 relative; ``|got - want| <= FP32_RTOL · |want| + atol``
with :data:`FP32_RTOL` 2^-18 (64 units) and ``atol`` 1e-6 (1e-5 for sums over 512 products) bounds the few
roundings of each op. Measured (each test's largest share of its bound): at most 0.82 (the index logits), under
0.2 for the others; the same sparse attention with bfloat16 queries and the output projection with vLLM's bfloat16
cast exceed it 1,900 and 700 times (both checked below).
"""
from __future__ import annotations

import types

import pytest
import torch
from test_ops_v4_bf16_keys import prefill_case, sparse_case
from test_ops_v4_fp8_cpu import _cos_sin

from vllm_indexcache.ops.fp8_cache import rows
from vllm_indexcache.ops.mhc import cpu as mhc
from vllm_indexcache.ops.mhc import naive as mhc_naive
from vllm_indexcache.ops.o_proj import cpu as o_proj
from vllm_indexcache.ops.o_proj import naive as o_proj_naive
from vllm_indexcache.ops.v4_attention import cpu as attn
from vllm_indexcache.ops.v4_attention import naive as attn_naive
from vllm_indexcache.ops.v4_indexer import cpu as indexer
from vllm_indexcache.ops.v4_indexer import naive as indexer_naive
from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import key_format
from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import ops as v4_ops

FP32_RTOL = 2.0 ** -18


def _close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-6) -> bool:
    return bool(((got.double() - want.double()).abs() <= FP32_RTOL * want.double().abs() + atol).all())


def _row_cache(num_blocks, block_size, head, fill=7.0):
    """A float32 plain-row cache as a layer's view of vLLM's allocation: blocks padded apart."""
    return torch.full((num_blocks, block_size * head + 256), fill)[:, : block_size * head]


# ---------------------------------------------------------------- _C refuses float32 (why the torch ops run)


def _refused(name, *args):
    import vllm._custom_ops  # noqa: F401  (loads vllm/_C on AVX512-BF16 CPUs)
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, name):
        pytest.skip(f"torch.ops._C.{name} is not in this CPU's vLLM build (AVX512-BF16 only)")
    with pytest.raises(RuntimeError):
        getattr(torch.ops._C, name)(*args)


def test_vllm_c_v4_ops_refuse_float32():
    """The premise of ``BF16_ONLY_OPS``: vLLM's ``_C`` versions raise on float32 activations."""
    x = torch.randn(3, 4, 64)
    fn, scale, base = torch.randn(24, 256) * 0.05, torch.ones(3), torch.zeros(24)
    _refused("hc_pre_fused_cpu", x, fn, scale, base, 4, 20, 1e-6, 1e-6)
    _refused("hc_post_fused_cpu", torch.randn(3, 64), x, torch.rand(3, 4), torch.rand(3, 4, 4))
    _refused("hc_head_fused_cpu", x, fn[:4], scale[:1], base[:4], 1e-6, 1e-6)
    q, cache, slots = torch.randn(3, 4, 512), _row_cache(2, 16, 512), torch.arange(3)
    _refused("fused_qnorm_rope_kv_insert_cpu", q, torch.randn(3, 512), slots, cache, slots, _cos_sin(), 4, 1e-6, 16)
    _refused("flash_mla_with_kvcache_cpu", torch.zeros(3, 4, 512), q, cache, slots[:, None], 16, cache,
             slots[:, None], 16, torch.zeros(4), 0.05)
    _refused("inverse_gptj_rope_o_proj_cpu", q, slots, _cos_sin(), 64)
    assert set(v4_ops.BF16_ONLY_OPS) <= set(v4_ops.TORCH_OPS)


# ---------------------------------------------------------------- mHC and the grouped output projection


def _mhc_inputs(hc=4, d=256, tokens=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hc, d, generator=g)
    fn = torch.randn(2 * hc + hc * hc, hc * d, generator=g) * 0.05
    return x, fn, torch.rand(3, generator=g) + 0.5, torch.randn(2 * hc + hc * hc, generator=g) * 0.5


def test_mhc_float32():
    x, fn, scale, base = _mhc_inputs()
    y, post, comb = mhc.hc_pre(x, fn, scale, base, 4, 20, 1e-6, 1e-6)
    y_ref, post_ref, comb_ref = mhc_naive.hc_pre_naive(x, fn, scale, base, 20, 1e-6, 1e-6)
    assert y.dtype == torch.float32 and _close(y, y_ref, 1e-5)
    assert _close(post, post_ref) and _close(comb, comb_ref)
    out = torch.randn(9, 256)
    got = mhc.hc_post(out, x, post, comb)
    assert got.dtype == torch.float32 and _close(got, mhc_naive.hc_post_naive(out, x, post, comb), 1e-5)
    got = mhc.hc_head(x, fn[:4], scale[:1], base[:4], 1e-6, 1e-6)
    assert got.dtype == torch.float32 and _close(got, mhc_naive.hc_head_naive(x, fn[:4], scale[:1], base[:4],
                                                                               1e-6, 1e-6), 1e-5)


def _o_proj_layer(groups=2, heads=4, head_dim=512, rank=64, hidden=96, seed=3):
    g = torch.Generator().manual_seed(seed)
    wo_a = torch.randn(groups, rank, heads // groups * head_dim, generator=g) * 0.05
    wo_b = torch.randn(hidden, groups * rank, generator=g) * 0.1
    layer = types.SimpleNamespace(hidden_size=hidden, n_local_groups=groups, head_dim=head_dim, o_lora_rank=rank,
                                  _wo_a_packed=wo_a, rotary_emb=types.SimpleNamespace(cos_sin_cache=_cos_sin()),
                                  wo_b=lambda z: z @ wo_b.t())
    return layer, wo_a, wo_b


def test_o_proj_model_dtype_keeps_float32(monkeypatch):
    """``_o_proj`` of a float32 model (the torch inverse RoPE and grouped bmm, ``wo_a`` unpacked in float32) against
    the float64 composition of the naive pieces; vLLM's body casts the grouped output to bfloat16 (error ~2^-9)."""
    import importlib

    import vllm.forward_context as forward_context

    custom_ops = importlib.import_module(v4_ops.WRAPPERS)

    monkeypatch.setattr(custom_ops, "inverse_gptj_rope_o_proj_cpu", o_proj.inverse_gptj_rope, raising=False)
    monkeypatch.setattr(custom_ops, "bmm_cpu", o_proj.bmm, raising=False)
    monkeypatch.setattr(forward_context, "get_forward_context", lambda: types.SimpleNamespace(attn_metadata={}))
    layer, wo_a, wo_b = _o_proj_layer()
    g = torch.Generator().manual_seed(4)
    o, positions = torch.randn(5, 4, 512, generator=g), torch.tensor([0, 3, 17, 100, 2999])
    got = v4_ops.o_proj_model_dtype(layer, o, positions)
    derot = o_proj_naive.inverse_gptj_rope_naive(o, positions, _cos_sin(), 64).double()
    z = o_proj_naive.grouped_bmm_naive(derot.reshape(5, 2, 1024).transpose(0, 1), wo_a)    # [G, T, rank]
    want = z.transpose(0, 1).reshape(5, -1) @ wo_b.double().t()
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    assert _close(got, want, 1e-5)
    bf16 = (z.transpose(0, 1).reshape(5, -1).to(torch.bfloat16).double() @ wo_b.double().t())
    assert not _close(bf16, want, 1e-5)                        # a bfloat16 rounding would fail this tolerance


# ---------------------------------------------------------------- keys as float32 rows


def test_qnorm_rope_kv_insert_float32():
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(13, 4, 512, generator=g) * 3, torch.randn(13, 512, generator=g) * 2
    positions = torch.randint(0, 5000, (13,), generator=g)
    slots = torch.randperm(64, generator=g)[:12]
    slots[::5] = -1
    cache, ref = _row_cache(4, 16, 512), _row_cache(4, 16, 512)
    got = attn.qnorm_rope_kv_insert(q, kv, positions, cache, slots, _cos_sin(), 6, 1e-6, 16)
    want = attn_naive.qnorm_rope_kv_insert_naive(q, kv, positions, ref, slots, _cos_sin(), 6, 1e-6, 16)
    assert got.dtype == torch.float32 and got.shape == (13, 6, 512) and (got[:, 4:] == 0).all()
    assert _close(got, want)
    written = slots[slots >= 0]
    assert torch.equal(cache != 7, ref != 7)
    assert _close(rows.read_rows(cache, written, 16), rows.read_rows(ref, written, 16))


@pytest.mark.parametrize("window,topk", [(128, 40), (100, 300)])
def test_flash_mla_with_kvcache_float32(window, topk):
    """No bfloat16 rounding of the softmax weights for float32 queries (vLLM's ``_C`` rounding is kept for
    bfloat16 ones, ``test_ops_v4_bf16_keys.py``)."""
    args = sparse_case(window, topk, torch.float32)
    out = torch.full((7, 4, 512), 3.0)
    attn.flash_mla_with_kvcache(out, *args)
    want = attn_naive.sparse_attention_naive(*args)
    assert _close(out, want) and (out[2] == 0).all()
    bf16_q = torch.full((7, 4, 512), 3.0, dtype=torch.bfloat16)            # the bfloat16 path rounds: not this close
    attn.flash_mla_with_kvcache(bf16_q, args[0].to(torch.bfloat16), *args[1:])
    assert not _close(bf16_q, want)


@pytest.mark.parametrize("max_chunk_bytes", [64 << 20, 300_000, 1])
def test_flash_mla_with_kvcache_float32_prefill(max_chunk_bytes):
    """Many tokens sharing their keys (``test_ops_v4_bf16_keys.prefill_case``), in one chunk, in halved chunks
    and one token at a time."""
    args = prefill_case(torch.float32)
    out = torch.full(args[0].shape, 3.0)
    attn.flash_mla_with_kvcache(out, *args, max_chunk_bytes=max_chunk_bytes)
    assert _close(out, attn_naive.sparse_attention_naive(*args))


def test_indexer_q_rope_float32():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(11, 4, 128, generator=g) * 2
    positions = torch.randint(0, 8000, (11,), generator=g)
    w = torch.randn(11, 4, generator=g)
    q_out, w_out = indexer.indexer_q_rope(positions, q, _cos_sin(), w, 128 ** -0.5, 0.5)
    q_ref, w_ref = indexer_naive.indexer_q_rope_naive(positions, q, _cos_sin(), w, 128 ** -0.5, 0.5)
    assert q_out.dtype == torch.float32 and q_ref.dtype == torch.float32
    assert _close(q_out, q_ref) and _close(w_out, w_ref)
    assert torch.equal(q_out[:, :, :64], q[:, :, :64])


def test_paged_mqa_logits_float32():
    g = torch.Generator().manual_seed(6)
    block_size, num_blocks = 64, 12
    cache = _row_cache(num_blocks, block_size, 128)
    rows.write_rows(cache, torch.arange(num_blocks * block_size),
                    torch.randn(num_blocks * block_size, 128, generator=g), block_size)
    q, w = torch.randn(9, 4, 128, generator=g), torch.randn(9, 4, generator=g)
    lens = torch.tensor([0, 1, 63, 64, 65, 300, 500, 511, 200], dtype=torch.int32)
    pages = torch.stack([torch.randperm(num_blocks, generator=g)[:8] for _ in range(9)]).to(torch.int32)
    got = indexer.fp8_paged_mqa_logits(q, cache, w, lens, pages, block_size, 520)
    want = indexer_naive.paged_index_logits_naive(q, cache, w, lens, pages, block_size)
    for t in range(9):
        assert _close(got[t, : lens[t]], want[t], 1e-5)


# ---------------------------------------------------------------- the glue: ops bound, caches switched


def test_select_for_dtype_binds_the_bf16_only_ops(monkeypatch):
    import importlib

    from vllm.models.deepseek_v4.cpu import cpu_sparse

    custom_ops = importlib.import_module(v4_ops.WRAPPERS)
    for op in v4_ops.BF16_ONLY_OPS:                                 # restored after the test
        for name in {v4_ops.TORCH_OPS[op][0], v4_ops.WRAPPERS}:
            mod = torch.ops._C if name == v4_ops.C_NAMESPACE else importlib.import_module(name)
            monkeypatch.setattr(mod, op, getattr(mod, op, None), raising=False)
    for op in ("inverse_gptj_rope_o_proj_cpu", "bmm_cpu"):
        monkeypatch.setattr(custom_ops, op, getattr(custom_ops, op))
    attention = cpu_sparse.DeepseekV4CPUAttention
    for attr in ("_o_proj", "_wrap_wo_a_process_weights_after_loading"):
        monkeypatch.setattr(attention, attr, getattr(attention, attr))
    original_o_proj = attention._o_proj
    assert v4_ops.select_for_dtype(torch.bfloat16) == []
    assert attention._o_proj is original_o_proj
    bound = v4_ops.select_for_dtype(torch.float32)
    assert bound == [*v4_ops.BF16_ONLY_OPS, *v4_ops.O_PROJ_OPS]
    assert custom_ops.hc_pre_fused_cpu is mhc.hc_pre and custom_ops.hc_post_fused_cpu is mhc.hc_post
    assert custom_ops.fused_qnorm_rope_kv_insert_cpu is attn.qnorm_rope_kv_insert
    assert torch.ops._C.flash_mla_with_kvcache_cpu is attn.flash_mla_with_kvcache
    assert custom_ops.bmm_cpu is o_proj.bmm and attention._o_proj is v4_ops.o_proj_model_dtype


def test_key_format_float32_caches():
    """``auto`` keys of a float32 model are float32 rows: every attention layer's sliding-window and compressed KV
    and every built indexer K cache; ``bfloat16`` keeps bfloat16 indexer keys and leaves vLLM's bfloat16 caches."""
    assert key_format.key_dtype("auto", torch.float32) == torch.float32
    assert key_format.key_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert key_format.key_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert key_format.key_dtype("fp8", torch.float32) is None

    class Attn(torch.nn.Module):
        def __init__(self, indexer):
            super().__init__()
            self.indexer, self.kv_cache_torch_dtype = indexer, torch.bfloat16
            self.swa_cache_layer = types.SimpleNamespace(dtype=torch.bfloat16)

    class Indexer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim, self.k_cache = 128, types.SimpleNamespace(head_dim=132, dtype=torch.uint8)

    def model():
        m = torch.nn.Module()
        m.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
        m.layers[0].attn, m.layers[1].attn = Attn(Indexer()), Attn(None)
        return m

    m = model()
    assert key_format.apply(m, False, torch.float32) == 1
    assert m.layers[0].attn.indexer.k_cache.dtype == torch.float32
    assert all(layer.attn.kv_cache_torch_dtype == torch.float32 and layer.attn.swa_cache_layer.dtype == torch.float32
               for layer in m.layers)
    m = model()
    assert key_format.apply(m, False, torch.bfloat16) == 1
    assert m.layers[0].attn.indexer.k_cache.dtype == torch.bfloat16
    assert m.layers[1].attn.kv_cache_torch_dtype == torch.bfloat16

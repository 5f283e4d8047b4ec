"""DeepSeek-V4 CPU ops with the keys in the model dtype (plain bfloat16 rows: sliding-window and compressed KV,
lightning-indexer K) against their naive float64 references; the FP8 layouts are tested in test_ops_v4_fp8_cpu.py."""
from __future__ import annotations

import pytest
import torch
from test_ops_v4_fp8_cpu import BF16_ULP, _compressor_case, _cos_sin

from vllm_indexcache.ops.compressor import cpu as comp
from vllm_indexcache.ops.compressor import naive as comp_naive
from vllm_indexcache.ops.fp8_cache import naive as fp8_naive
from vllm_indexcache.ops.fp8_cache import rows
from vllm_indexcache.ops.v4_attention import cpu as attn
from vllm_indexcache.ops.v4_attention import naive as attn_naive
from vllm_indexcache.ops.v4_indexer import cpu as indexer
from vllm_indexcache.ops.v4_indexer import naive as indexer_naive


def _row_cache(num_blocks, block_size, head, fill=7.0, dtype=torch.bfloat16):
    """A plain-row cache (bfloat16 unless ``dtype``) as a layer's view of vLLM's allocation: blocks padded apart."""
    return torch.full((num_blocks, block_size * head + 256), fill, dtype=dtype)[:, : block_size * head]


def test_rows_round_trip_matches_naive():
    g = torch.Generator().manual_seed(0)
    cache, ref = _row_cache(3, 16, 128), _row_cache(3, 16, 128)
    slots = torch.randperm(48, generator=g)[:20]
    x = torch.randn(20, 128, generator=g)
    rows.write_rows(cache, slots, x, 16)
    for i, s in enumerate(slots.tolist()):
        fp8_naive.write_row_naive(ref, s, x[i], 16)
    assert torch.equal(cache, ref)
    assert torch.equal(rows.read_rows(cache, slots, 16), x.to(torch.bfloat16).float())
    untouched = torch.ones(48, dtype=torch.bool)
    untouched[slots] = False
    assert (rows.read_rows(cache, torch.nonzero(untouched).flatten(), 16) == 7).all()


def test_qnorm_rope_kv_insert_rows():
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(13, 4, 512, generator=g) * 3).to(torch.bfloat16)
    kv = (torch.randn(13, 512, generator=g) * 2).to(torch.bfloat16)
    positions = torch.randint(0, 5000, (13,), generator=g)
    slots = torch.randperm(64, generator=g)[:12]
    slots[::5] = -1
    cos_sin = _cos_sin()
    cache, ref = _row_cache(4, 16, 512), _row_cache(4, 16, 512)
    got = attn.qnorm_rope_kv_insert(q, kv, positions, cache, slots, cos_sin, 6, 1e-6, 16)
    want = attn_naive.qnorm_rope_kv_insert_naive(q, kv, positions, ref, slots, cos_sin, 6, 1e-6, 16)
    assert got.shape == (13, 6, 512) and (got[:, 4:] == 0).all()
    assert ((got.double() - want).abs() <= BF16_ULP * want.abs() + 1e-6).all()
    written = slots[slots >= 0]
    a, b = rows.read_rows(cache, written, 16), rows.read_rows(ref, written, 16)
    assert ((a - b).abs() <= BF16_ULP * b.abs() + 1e-6).all() and (a != 7).any(-1).all()
    assert torch.equal(cache != 7, ref != 7)                                  # the same entries written


def sparse_case(window, topk, dtype):
    """Seven decode-like tokens over plain-row caches in ``dtype`` (window and compressed), a third of the slots
    invalid, token 2 with no valid key, head 1 without sink: the arguments of ``flash_mla_with_kvcache`` after
    ``out``."""
    g = torch.Generator().manual_seed(window + topk)
    win_cache = _row_cache(3, 64, 512, dtype=dtype)
    comp_cache = _row_cache(8, 16, 512, dtype=dtype)
    rows.write_rows(win_cache, torch.arange(192), torch.randn(192, 512, generator=g) * 2, 64)
    rows.write_rows(comp_cache, torch.arange(128), torch.randn(128, 512, generator=g) * 2, 16)
    q = (torch.randn(7, 4, 512, generator=g) * 0.3).to(dtype)
    win_slots = torch.randint(0, 192, (7, window), generator=g)
    win_slots[torch.rand(7, window, generator=g) < 0.3] = -1
    comp_slots = torch.randint(0, 128, (7, topk), generator=g)
    comp_slots[torch.rand(7, topk, generator=g) < 0.3] = -1
    win_slots[2], comp_slots[2] = -1, -1
    sink = torch.randn(4, generator=g)
    sink[1] = -float("inf")
    return q, win_cache, win_slots, 64, comp_cache, comp_slots, 16, sink, 512 ** -0.5


@pytest.mark.parametrize("window,topk", [(128, 40), (100, 300)])
def test_flash_mla_with_kvcache_rows(window, topk):
    args = sparse_case(window, topk, torch.bfloat16)
    out = torch.full((7, 4, 512), 3.0, dtype=torch.bfloat16)
    attn.flash_mla_with_kvcache(out, *args)
    want = attn_naive.sparse_attention_naive(*args)
    assert ((out.double() - want).abs() <= BF16_ULP * want.abs() + 2.0 ** -9 * 8).all()
    assert (out[2] == 0).all()


def prefill_case(dtype, tokens=40, window=16, topk=150, ratio=4, heads=2, seed=11):
    """One sequence's prefill over plain-row caches in ``dtype``: token ``t`` sees its ``window`` previous tokens
    and ``topk`` random compressed entries among the ``ratio · t`` it sees (more than one key tile), so neighbouring
    tokens share most keys; the first tokens have no compressed entry (no key at all with ``window`` 0)."""
    g = torch.Generator().manual_seed(seed)
    n_comp = ratio * tokens
    win_cache = torch.full((2, 64 * 512 + 256), 7.0, dtype=dtype)[:, : 64 * 512]
    comp_cache = torch.full((n_comp // 16 + 1, 16 * 512 + 256), 7.0, dtype=dtype)[:, : 16 * 512]
    rows.write_rows(win_cache, torch.arange(tokens), torch.randn(tokens, 512, generator=g) * 2, 64)
    rows.write_rows(comp_cache, torch.arange(n_comp), torch.randn(n_comp, 512, generator=g) * 2, 16)
    t = torch.arange(tokens)[:, None]
    win_slots = t - torch.arange(window)[None, :]
    win_slots[win_slots < 0] = -1
    pick = torch.rand(tokens, n_comp, generator=g).argsort(-1)[:, :topk]
    comp_slots = torch.where(pick < ratio * t, pick, -1)
    q = (torch.randn(tokens, heads, 512, generator=g) * 0.3).to(dtype)
    sink = torch.randn(heads, generator=g)
    return q, win_cache, win_slots, 64, comp_cache, comp_slots, 16, sink, 512 ** -0.5


@pytest.mark.parametrize("max_chunk_bytes", [64 << 20, 300_000, 1])
def test_flash_mla_with_kvcache_rows_prefill(max_chunk_bytes):
    """Many tokens sharing their keys, in one chunk, in halved chunks and one token at a time."""
    args = prefill_case(torch.bfloat16)
    out = torch.full(args[0].shape, 3.0, dtype=torch.bfloat16)
    attn.flash_mla_with_kvcache(out, *args, max_chunk_bytes=max_chunk_bytes)
    want = attn_naive.sparse_attention_naive(*args)
    assert ((out.double() - want).abs() <= BF16_ULP * want.abs() + 2.0 ** -9 * 8).all()


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, BF16_ULP), (torch.float32, 2.0 ** -18)])
@pytest.mark.parametrize("ratio,head,length", [(4, 512, 40), (128, 512, 260), (4, 128, 40)])
def test_compress_norm_rope_store_rows(ratio, head, length, dtype, rtol):
    """Both compressor stores into plain-row caches of the model dtype vs the naive reference (float32: within
    2^-18 relative, no rounding below float32)."""
    state, gather, positions, kv_slots, weight, fp8_cache, kv_bs = _compressor_case(ratio, head, ratio + head, length)
    cache = _row_cache(fp8_cache.shape[0], kv_bs, head, dtype=dtype)
    ref = _row_cache(fp8_cache.shape[0], kv_bs, head, dtype=dtype)
    fn = comp.compress_norm_rope_store if head == 512 else comp.compress_norm_rope_store_indexer
    args = (state, gather, positions, kv_slots, weight, 1e-6, _cos_sin())
    fn(*args, cache, kv_bs, ratio)
    comp_naive.compress_norm_rope_store_naive(*args, ref, kv_bs, ratio, indexer=head == 128)
    written = kv_slots[kv_slots >= 0]
    assert written.numel() == length // ratio - 1 and torch.equal(cache != 7, ref != 7)
    a, b = rows.read_rows(cache, written, kv_bs), rows.read_rows(ref, written, kv_bs)
    assert ((a.double() - b.double()).abs() <= rtol * b.double().abs() + 1e-6).all()


def test_indexer_q_rope():
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(11, 4, 128, generator=g) * 2).to(torch.bfloat16)
    positions = torch.randint(0, 8000, (11,), generator=g)
    w = torch.randn(11, 4, generator=g).to(torch.bfloat16)
    q_out, w_out = indexer.indexer_q_rope(positions, q, _cos_sin(), w, 128 ** -0.5, 0.5)
    q_ref, w_ref = indexer_naive.indexer_q_rope_naive(positions, q, _cos_sin(), w, 128 ** -0.5, 0.5)
    assert q_out.dtype == torch.bfloat16 and w_out.dtype == torch.float32
    assert torch.allclose(w_out.double(), w_ref, rtol=1e-6, atol=0)
    assert ((q_out.double() - q_ref.double()).abs() <= BF16_ULP * q_ref.double().abs() + 1e-6).all()
    assert torch.equal(q_out[:, :, :64], q[:, :, :64])                       # unrotated dims unchanged


def test_paged_mqa_logits_rows():
    g = torch.Generator().manual_seed(6)
    block_size, num_blocks = 64, 12
    cache = _row_cache(num_blocks, block_size, 128)
    rows.write_rows(cache, torch.arange(num_blocks * block_size),
                    torch.randn(num_blocks * block_size, 128, generator=g), block_size)
    q = torch.randn(9, 4, 128, generator=g).to(torch.bfloat16)
    w = torch.randn(9, 4, generator=g)
    lens = torch.tensor([0, 1, 63, 64, 65, 300, 500, 511, 200], dtype=torch.int32)
    pages = torch.stack([torch.randperm(num_blocks, generator=g)[:8] for _ in range(9)]).to(torch.int32)
    pages[2] = pages[3]
    got = indexer.fp8_paged_mqa_logits(q, cache, w, lens, pages, block_size, 520)
    want = indexer_naive.paged_index_logits_naive(q, cache, w, lens, pages, block_size)
    valid = torch.arange(520)[None, :] < lens[:, None]
    assert got.shape == (9, 520) and torch.isneginf(got[~valid]).all()
    for t in range(9):
        assert torch.allclose(got[t, : lens[t]].double(), want[t], rtol=1e-5, atol=1e-3)

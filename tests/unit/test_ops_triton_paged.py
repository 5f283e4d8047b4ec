"""Triton pieces of the CUDA fallback backend against the naive references (``TRITON_INTERPRET=1`` on CPU).

* ``indexer_scores_decode`` on a 3-D K-cache whose pages are padded (block stride > block_size · D), as vLLM lays
  out KV-cache groups of unequal page sizes;
* ``paged_indexer_step`` (the F-layer indexer step of ``vllm_glue/cuda/indexer.py``) on a mixed batch: two decodes,
  a one-token prefill, a fresh prefill and a chunked prefill continuing a cached context, with padding rows —
  key insertion and every request's top-k checked against ``indexer_topk_naive``.
"""
from __future__ import annotations

import pytest
import torch
from pagedkit import mixed_batch
from tritonkit import DEV  # sets TRITON_INTERPRET (no GPU) before vllm_indexcache imports Triton

from vllm_indexcache.ops.indexer import triton as tri_idx
from vllm_indexcache.ops.indexer.naive import indexer_scores_naive, indexer_topk_naive
from vllm_indexcache.ops.indexer.paged_triton import paged_indexer_step
from vllm_indexcache.ops.topk.naive import to_ascending


def _same_selection(got: torch.Tensor, q, keys, w, pos, topk: int) -> None:
    ref = indexer_topk_naive(q, keys, w, pos, topk)
    scores = indexer_scores_naive(q, keys, w, pos)
    assert torch.equal(got < 0, ref < 0)
    for t in range(got.shape[0]):
        g, r = got[t][got[t] >= 0].long(), ref[t][ref[t] >= 0].long()
        assert len(set(g.tolist())) == g.numel() and (g.numel() == 0 or int(g.max()) <= int(pos[t]))
        torch.testing.assert_close(scores[t, g].sort().values, scores[t, r].sort().values, rtol=1e-5, atol=1e-5)


def test_decode_scores_on_padded_3d_cache():
    torch.manual_seed(3)
    H, D, bs, num_blocks, pad = 4, 32, 16, 8, 24
    storage = torch.randn(num_blocks, bs * D + pad, device=DEV)
    cache3d = storage[:, : bs * D].view(num_blocks, bs, D)          # block stride bs*D + pad
    assert cache3d.stride(0) == bs * D + pad
    seq_lens = [9, 40]
    block_table = torch.tensor([[5, 0, 0], [2, 7, 1]], dtype=torch.int32, device=DEV)
    q = torch.randn(2, H, D, device=DEV)
    w = torch.randn(2, H, device=DEV)
    got = tri_idx.indexer_scores_decode(q, cache3d, w, block_table, torch.tensor(seq_lens, device=DEV), bs).cpu()
    for b, n in enumerate(seq_lens):
        p = torch.arange(n)
        keys = cache3d.cpu()[block_table.cpu()[b, p // bs].long(), p % bs]
        ref = indexer_scores_naive(q.cpu()[b:b + 1], keys, w.cpu()[b:b + 1], torch.tensor([n - 1]))
        torch.testing.assert_close(got[b:b + 1, :n], ref, rtol=1e-4, atol=1e-4)


def test_paged_indexer_step_mixed_batch():
    torch.manual_seed(4)
    H, D, bs, topk, num_blocks = 4, 32, 16, 24, 20
    b = mixed_batch(num_blocks, bs, D)
    reqs, block_table, cache, all_keys, qsl, slots = (b[k] for k in ("reqs", "block_table", "cache", "all_keys",
                                                                       "qsl", "slots"))
    T, pad = qsl[-1], 3
    q = torch.randn(T + pad, H, D)
    w = torch.randn(T + pad, H)
    k = torch.cat([b["new_k"], torch.randn(pad, D)])
    seq_lens = b["seq_lens"]
    out = torch.full((T + pad + 5, topk), 7, dtype=torch.int32)
    dev = lambda x: x.to(DEV)  # noqa: E731
    cache_d, out_d = dev(cache), dev(out)
    paged_indexer_step(dev(q), dev(k), dev(w), cache_d, dev(torch.tensor(slots)), dev(block_table), qsl, seq_lens,
                       dev(torch.tensor(seq_lens, dtype=torch.int32)), topk, out_d)
    out, cache = out_d.cpu(), cache_d.cpu()
    assert (out[T:T + pad] == -1).all() and (out[T + pad:] == 7).all()
    for r, (ctx, ql) in enumerate(reqs):
        p = torch.arange(ctx + ql)
        keys = cache[block_table[r, p // bs].long(), p % bs]
        torch.testing.assert_close(keys, all_keys[r])
        s, e = qsl[r], qsl[r + 1]
        _same_selection(out[s:e], q[s:e], keys, w[s:e], torch.arange(ctx, ctx + ql), topk)


def _decode_case(seed: int, seq_lens: list[int], H=4, D=32, bs=16, max_blocks=6, integer=False):
    """Decode batch over a shuffled paged cache; ``integer``: small-integer q/k/w so that scores tie often."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 1 + sum(-(-n // bs) for n in seq_lens)
    rnd = (lambda *s: torch.randint(-2, 3, s, generator=g).float()) if integer else \
        (lambda *s: torch.randn(*s, generator=g))
    cache = rnd(num_blocks, bs, D)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1           # block 0 = vLLM's null block (padding rows)
    block_table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(seq_lens):
        nb = -(-n // bs)
        block_table[b, :nb] = perm[used:used + nb].int()
        used += nb
    return cache, block_table, rnd(len(seq_lens), H, D), rnd(len(seq_lens), H)


@pytest.mark.parametrize("integer", [False, True])
def test_decode_topk_fixed_len_equals_naive_exactly(integer):
    """Fixed-shape decode top-k (``max_len`` = block-table width, as in CUDA graphs): exactly the selection of the
    naive reference — ties towards the lower position — in ascending positions, rows of seq_len 0 all ``-1``."""
    H, D, bs, topk = 4, 32, 16, 24
    seq_lens = [1, 23, 24, 25, 70, 0, 96]
    cache, bt, q, w = _decode_case(7, seq_lens, H, D, bs, integer=integer)
    got = tri_idx.indexer_topk_decode(q.to(DEV), cache.to(DEV), w.to(DEV), bt.to(DEV),
                                      torch.tensor(seq_lens, device=DEV), bs, topk, max_len=bt.shape[1] * bs).cpu()
    assert got.shape == (len(seq_lens), topk) and got.dtype == torch.int32
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert (got[b] == -1).all()
            continue
        p = torch.arange(n)
        keys = cache[bt[b, p // bs].long(), p % bs]
        ref = indexer_topk_naive(q[b:b + 1], keys, w[b:b + 1], torch.tensor([n - 1]), topk)
        assert torch.equal(got[b:b + 1], to_ascending(ref)), (b, got[b], ref)
    if integer:  # the case must really exercise ties at the top-k boundary (some row with n > topk)
        ties = 0
        for b, n in enumerate(seq_lens):
            if n > topk:
                p = torch.arange(n)
                s = indexer_scores_naive(q[b:b + 1], cache[bt[b, p // bs].long(), p % bs], w[b:b + 1],
                                         torch.tensor([n - 1]))[0]
                ties += int((s == s.sort(descending=True).values[topk - 1]).sum()) > 1
        assert ties > 0


def test_paged_indexer_step_decode_only_is_the_general_path():
    """``decode_only=True`` (no host lists, fixed shapes) inserts the same keys and selects the same top-k as the
    general path on a uniform decode batch with a padding request (seq_len 0, slot -1, block 0)."""
    H, D, bs, topk = 4, 32, 16, 20
    seq_lens = [40, 1, 77, 0]
    cache, bt, q, w = _decode_case(11, seq_lens, H, D, bs)
    k = torch.randn(len(seq_lens), D)
    slots = torch.tensor([int(bt[b, (n - 1) // bs]) * bs + (n - 1) % bs if n else -1
                          for b, n in enumerate(seq_lens)])
    outs, caches = [], []
    for decode_only in (False, True):
        c, o = cache.clone().to(DEV), torch.full((6, topk), 7, dtype=torch.int32, device=DEV)
        qsl = None if decode_only else [0, 1, 2, 3, 4]
        paged_indexer_step(q.to(DEV), k.to(DEV), w.to(DEV), c, slots.to(DEV), bt.to(DEV), qsl,
                           None if decode_only else seq_lens, torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
                           topk, o, decode_only=decode_only)
        outs.append(o.cpu())
        caches.append(c.cpu())
    assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0], caches[1])
    assert (outs[1][3] == -1).all() and (outs[1][4:] == 7).all()
    assert torch.equal(caches[1][0], cache[0])                         # the padding row wrote nothing
    for b, n in enumerate(seq_lens[:3]):
        p = torch.arange(n)
        keys = caches[1][bt[b, p // bs].long(), p % bs]
        torch.testing.assert_close(keys[-1], k[b])
        ref = indexer_topk_naive(q[b:b + 1], keys, w[b:b + 1], torch.tensor([n - 1]), topk)
        assert torch.equal(outs[1][b:b + 1], to_ascending(ref))

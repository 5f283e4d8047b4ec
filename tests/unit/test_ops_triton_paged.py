"""Triton pieces of the CUDA fallback backend against the naive references (``TRITON_INTERPRET=1`` on CPU).

* ``indexer_scores_decode`` on a 3-D K-cache whose pages are padded (block stride > block_size · D), as vLLM lays
  out KV-cache groups of unequal page sizes;
* ``paged_indexer_step`` (the F-layer indexer step of ``vllm_glue/cuda/indexer.py``) on a mixed batch: two decodes,
  a one-token prefill, a fresh prefill and a chunked prefill continuing a cached context, with padding rows —
  key insertion and every request's top-k checked against ``indexer_topk_naive``.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from pagedkit import mixed_batch  # noqa: E402

from vllm_indexcache.ops.indexer import triton as tri_idx  # noqa: E402
from vllm_indexcache.ops.indexer.naive import indexer_scores_naive, indexer_topk_naive  # noqa: E402
from vllm_indexcache.ops.indexer.paged_triton import paged_indexer_step  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


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

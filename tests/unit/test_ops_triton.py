"""Triton kernels (``ops/*/triton.py``) against the naive references.

On a machine without a CUDA GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/tritonkit.py`` before the kernels are imported; it executes each program with numpy, so shapes are kept
small). With a GPU they run on it.
"""
from __future__ import annotations

import pytest
import torch
from tritonkit import DEV  # sets TRITON_INTERPRET (no GPU) before vllm_indexcache imports Triton

from vllm_indexcache.ops.indexer import triton as tri_idx
from vllm_indexcache.ops.indexer.naive import indexer_scores_naive, indexer_topk_naive
from vllm_indexcache.ops.sparse_mla import triton as tri_mla
from vllm_indexcache.ops.sparse_mla.naive import sparse_mla_naive
from vllm_indexcache.ops.topk.naive import to_ascending


def _check_topk(got: torch.Tensor, scores: torch.Tensor, pos: torch.Tensor, topk: int, ref: torch.Tensor) -> None:
    """Same selection as the reference, in ascending positions: identical where the k-th and (k+1)-th scores are
    apart, and in any case the selected scores equal the reference's top scores (robust to float rounding at
    near-ties)."""
    assert got.shape == ref.shape and got.dtype == torch.int32
    assert torch.equal(got < 0, ref < 0)
    for t in range(got.shape[0]):
        g, r = got[t][got[t] >= 0].long(), ref[t][ref[t] >= 0].long()
        assert g.numel() == 0 or int(g.max()) <= int(pos[t])
        assert torch.equal(g, g.sort().values) and len(set(g.tolist())) == g.numel()
        torch.testing.assert_close(scores[t, g].sort().values, scores[t, r].sort().values, rtol=1e-5, atol=1e-5)
    assert (got == to_ascending(ref)).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_prefill_matches_naive(dtype):
    torch.manual_seed(0)
    T, S, H, D, topk = 40, 150, 4, 32, 16
    q = torch.randn(T, H, D, device=DEV).to(dtype)
    k = torch.randn(S, D, device=DEV).to(dtype)
    w = torch.randn(T, H, device=DEV)
    pos = torch.sort(torch.randperm(S, device=DEV)[:T]).values      # a chunk of rows at scattered positions
    pos[0] = 3                                                        # fewer visible keys than topk: -1 padding
    ref_scores = indexer_scores_naive(q.cpu(), k.cpu(), w.cpu(), pos.cpu())
    got_scores = tri_idx.indexer_scores(q, k, w, pos).cpu()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    fin = torch.isfinite(ref_scores)
    assert torch.equal(fin, torch.isfinite(got_scores))
    torch.testing.assert_close(got_scores[fin], ref_scores[fin], rtol=tol, atol=tol)
    ref = indexer_topk_naive(q.cpu(), k.cpu(), w.cpu(), pos.cpu(), topk)
    # small row budget: row chunks of 16 rows (each scored against its own visible keys only)
    got = tri_idx.indexer_topk(q, k, w, pos, topk, max_chunk_bytes=4 * 16 * S).cpu()
    _check_topk(got, ref_scores if dtype == torch.float32 else got_scores, pos.cpu(), topk, ref)


def test_indexer_decode_paged_matches_naive():
    """Decode top-k over paged keys, with ``max_len`` from the lengths and fixed as in the CUDA-graph path (the same
    selection both ways)."""
    torch.manual_seed(1)
    H, D, topk, bs = 4, 32, 16, 16
    seq_lens = [5, 37, 70]
    num_blocks = 16
    k_cache = torch.randn(num_blocks * bs, D, device=DEV)
    perm = torch.randperm(num_blocks, device=DEV)
    block_table = torch.zeros(len(seq_lens), 6, dtype=torch.int32, device=DEV)
    used = 0
    for b, n in enumerate(seq_lens):
        nb = -(-n // bs)
        block_table[b, :nb] = perm[used:used + nb].int()
        used += nb
    q = torch.randn(len(seq_lens), H, D, device=DEV)
    w = torch.randn(len(seq_lens), H, device=DEV)
    sl = torch.tensor(seq_lens, device=DEV)
    got = tri_idx.indexer_topk_decode(q, k_cache, w, block_table, sl, bs, topk).cpu()
    fixed = tri_idx.indexer_topk_decode(q, k_cache, w, block_table, sl, bs, topk, max_len=6 * bs).cpu()
    assert torch.equal(fixed, got)
    for b, n in enumerate(seq_lens):
        p = torch.arange(n)
        keys = k_cache.cpu()[block_table.cpu()[b, p // bs].long() * bs + p % bs]
        pos = torch.tensor([n - 1])
        ref = indexer_topk_naive(q.cpu()[b:b + 1], keys, w.cpu()[b:b + 1], pos, topk)
        scores = indexer_scores_naive(q.cpu()[b:b + 1], keys, w.cpu()[b:b + 1], pos)
        _check_topk(got[b:b + 1], scores, pos, topk, ref)


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_matches_naive(dtype, splits):
    torch.manual_seed(2)
    T, N, L, R, K, slots_total = 6, 5, 64, 32, 40, 300
    ql = torch.randn(T, N, L, device=DEV).to(dtype)
    qp = torch.randn(T, N, R, device=DEV).to(dtype)
    kv = torch.randn(slots_total, L + R, device=DEV).to(dtype)
    slots = torch.randint(0, slots_total, (T, K), device=DEV)
    slots[1, 10:] = -1          # few valid slots
    slots[2] = -1               # none: zeros
    slots[3, ::3] = -1          # holes
    scale = (L + R) ** -0.5
    ref = sparse_mla_naive(ql.cpu(), qp.cpu(), kv.cpu(), slots.cpu(), scale)
    # splits=3: split-K over the slots (16 per tile, 3 splits; token 1's last splits see no valid slot), combined
    got = tri_mla.sparse_mla(ql, qp, kv, slots, scale, block_k=16 if splits else None, splits=splits).cpu()
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.count_nonzero(got[2]) == 0

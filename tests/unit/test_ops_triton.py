"""Triton kernels (``ops/*/triton.py``) against the naive references.

On a machine without a CUDA GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/tritonkit.py`` before the kernels are imported; it executes each program with numpy, so shapes are kept
small). With a GPU they run on it.
"""
from __future__ import annotations

import pytest
import torch
from tritonkit import DEV, triton  # sets TRITON_INTERPRET (no GPU) before vllm_indexcache imports Triton

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


# DeepSeek-V3.2's MLA geometry (latent 512 + rope 64): the tile shapes the fallback gets from vLLM, in every dtype the
# engine can run (the search scorer runs float32: DEFAULT_CONFIG's 64 × 64 tile needs 312,320 B of shared memory
# there, over Hopper's 232,448; issue 34).
V32_L, V32_R = 512, 64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _v32_inputs(dtype, T, N=5, K=40, slots_total=200, seed=3):
    g = torch.Generator().manual_seed(seed)
    ql = torch.randn(T, N, V32_L, generator=g).to(dtype).to(DEV)
    qp = torch.randn(T, N, V32_R, generator=g).to(dtype).to(DEV)
    kv = torch.randn(slots_total, V32_L + V32_R, generator=g).to(dtype).to(DEV)
    slots = torch.randint(0, slots_total, (T, K), generator=g).to(DEV)
    slots[0, ::4] = -1
    return ql, qp, kv, slots, (V32_L + V32_R) ** -0.5


def _check_v32(got, ql, qp, kv, slots, scale):
    ref = sparse_mla_naive(ql.cpu().double(), qp.cpu().double(), kv.cpu().double(), slots.cpu(), scale)
    assert got.dtype == ql.dtype and got.shape == ref.shape
    tol = 1e-4 if ql.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [tri_mla.SMALL_BATCH_TOKENS, tri_mla.SMALL_BATCH_TOKENS + 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mla_v32_geometry_default_tiles(dtype, T, monkeypatch):
    """The default launch (no options) at V3.2 geometry, per dtype: right result; on a Hopper GPU the tile chosen
    by :func:`launch_config` compiles as it is (no shrinking recorded)."""
    monkeypatch.setattr(tri_mla, "_FITTED", {})
    ql, qp, kv, slots, scale = _v32_inputs(dtype, T)
    _check_v32(tri_mla.sparse_mla(ql, qp, kv, slots, scale), ql, qp, kv, slots, scale)
    expected = tri_mla.SMALL_BATCH_CONFIG if T <= tri_mla.SMALL_BATCH_TOKENS else (
        tri_mla.FP32_CONFIG if dtype == torch.float32 else tri_mla.DEFAULT_CONFIG)
    assert tri_mla.launch_config(T, ql.element_size()) == expected
    if DEV == "cuda" and torch.cuda.get_device_capability()[0] == 9:
        assert tri_mla._FITTED == {}


@pytest.mark.parametrize("name", ["DEFAULT_CONFIG", "FP32_CONFIG", "SMALL_BATCH_CONFIG"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mla_v32_geometry_every_tile(dtype, name):
    """Each configured tile shape (heads × slots) at each dtype, given explicitly, split-K included (3 splits)."""
    cfg = getattr(tri_mla, name)
    if DEV == "cuda" and name == "DEFAULT_CONFIG" and dtype == torch.float32:
        pytest.skip("the bf16 tile does not fit a GPU's shared memory in fp32 (FP32_CONFIG is used instead)")
    ql, qp, kv, slots, scale = _v32_inputs(dtype, 6, K=3 * cfg["block_k"], seed=4)
    for splits in (1, 3):
        got = tri_mla.sparse_mla(ql, qp, kv, slots, scale, splits=splits, **cfg)
        _check_v32(got, ql, qp, kv, slots, scale)


def test_smaller_config_sequence():
    seq, cfg = [], dict(tri_mla.DEFAULT_CONFIG)
    while cfg is not None:
        seq.append((cfg["block_n"], cfg["block_k"], cfg["num_stages"]))
        cfg = tri_mla.smaller_config(cfg)
    assert seq == [(64, 64, 3), (64, 32, 3), (32, 32, 3), (32, 16, 3), (16, 16, 3), (16, 16, 1)]


class _SmallGPU:
    """Stands in for ``_sparse_mla_kernel`` on a GPU with less shared memory: a launch whose
    ``BLOCK_N + BLOCK_K`` exceeds ``limit`` raises Triton's ``OutOfResources`` (as at compile time, before running);
    others run the real kernel."""

    def __init__(self, kernel, limit):
        self.kernel, self.limit, self.refused, self.ran = kernel, limit, [], []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            tile = (kw["BLOCK_N"], kw["BLOCK_K"])
            if sum(tile) > self.limit:
                self.refused.append(tile)
                raise triton.runtime.errors.OutOfResources(sum(tile), self.limit, "shared memory")
            self.ran.append(tile)
            return self.kernel[grid](*args, **kw)
        return launch


def test_sparse_mla_shrinks_a_tile_that_does_not_fit(monkeypatch, caplog):
    """Default options on a GPU where the tile does not fit: halved until it compiles (logged), the result still
    right, and the next call starts from the tile that fitted. Explicit options are not changed: the error stands."""
    small = _SmallGPU(tri_mla._sparse_mla_kernel, limit=48)
    monkeypatch.setattr(tri_mla, "_sparse_mla_kernel", small)
    monkeypatch.setattr(tri_mla, "_FITTED", {})
    ql, qp, kv, slots, scale = _v32_inputs(torch.float32, 6, seed=5)
    with caplog.at_level("WARNING", logger=tri_mla.__name__):
        _check_v32(tri_mla.sparse_mla(ql, qp, kv, slots, scale), ql, qp, kv, slots, scale)
    assert small.refused == [(32, 32)] and small.ran[-1] == (32, 16)
    assert "does not fit" in caplog.text
    tri_mla.sparse_mla(ql, qp, kv, slots, scale)
    assert small.refused == [(32, 32)] and small.ran[-1] == (32, 16)
    with pytest.raises(triton.runtime.errors.OutOfResources):
        tri_mla.sparse_mla(ql, qp, kv, slots, scale, block_n=64, block_k=64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_indexer_v32_geometry(dtype):
    """The indexer's prefill and decode scores kernels at DeepSeek-V3.2's indexer geometry (64 heads × 128) with
    their default tiles (prefill 64 rows × 128 keys; decode 64 heads × 128 keys), per dtype, and their top-k."""
    g = torch.Generator().manual_seed(6)
    H, D, S, T, topk, bs = 64, 128, 200, 70, 32, 64
    q = torch.randn(T, H, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(S, D, generator=g).to(dtype).to(DEV)
    w = (torch.randn(T, H, generator=g) * H ** -0.5).to(DEV)
    pos = torch.arange(S - T, S, device=DEV)
    pos[0] = 5
    ref_scores = indexer_scores_naive(q.cpu().double(), k.cpu().double(), w.cpu().double(), pos.cpu()).float()
    got_scores = tri_idx.indexer_scores(q, k, w, pos).cpu()
    fin = torch.isfinite(ref_scores)
    assert torch.equal(fin, torch.isfinite(got_scores))
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got_scores[fin], ref_scores[fin], rtol=tol, atol=tol)
    ref = indexer_topk_naive(q.cpu().float(), k.cpu().float(), w.cpu(), pos.cpu(), topk)
    _check_topk(tri_idx.indexer_topk(q, k, w, pos, topk).cpu(), got_scores, pos.cpu(), topk, ref)
    # decode: the last 3 rows as one-token requests over the same keys in a paged cache (pages in reverse order)
    nb = -(-S // bs)
    cache = torch.zeros(nb, bs, D, dtype=dtype, device=DEV)
    table = torch.arange(nb - 1, -1, -1, dtype=torch.int32, device=DEV)
    for p in range(S):
        cache[table[p // bs], p % bs] = k[p]
    rows = [T - 3, T - 2, T - 1]
    sl = pos[rows] + 1
    got = tri_idx.indexer_scores_decode(q[rows], cache, w[rows], table.expand(3, nb), sl, bs, max_len=nb * bs).cpu()
    for i, r in enumerate(rows):
        n = int(sl[i])
        torch.testing.assert_close(got[i, :n], got_scores[r, :n], rtol=tol, atol=tol)
        assert torch.isinf(got[i, n:]).all()

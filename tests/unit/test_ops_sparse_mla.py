"""Sparse MLA over latent-cache slots (naive vs CPU kernel, naive vs dense attention on expanded K/V) and the paging
helpers (hand-computed example).

Tolerances: float32 inputs, CPU vs naive ``rtol = atol = 1e-5`` (both accumulate in float32, only the matmul order
differs); bf16 inputs: outputs are rounded to bf16 at the end, so ``rtol = atol = 1.6e-2`` (about two bf16 ulps).
Absorbed vs expanded attention (float64 to isolate the algebra): ``1e-10``.
"""
from __future__ import annotations

import pytest
import torch

from vllm_indexcache.ops.paging import local_to_global_slots, token_to_request
from vllm_indexcache.ops.sparse_mla.cpu import sparse_mla
from vllm_indexcache.ops.sparse_mla.naive import sparse_mla_naive

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def _random_case(T, N, L, R, K, num_slots, dtype, seed, invalid_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    q_latent = torch.randn(T, N, L, generator=g).to(dtype)
    q_pe = torch.randn(T, N, R, generator=g).to(dtype)
    kv = torch.randn(num_slots, L + R, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(num_slots, generator=g)[:K] for _ in range(T)])
    slots[torch.rand(T, K, generator=g) < invalid_frac] = -1
    if T > 2:
        slots[1] = -1                                     # a row with no valid key
    return q_latent, q_pe, kv, slots


# (T, N, L, R, K, num_slots)
SHAPES = [(1, 4, 64, 32, 8, 16), (7, 2, 32, 16, 32, 40), (33, 8, 128, 64, 64, 200), (5, 16, 512, 64, 16, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_matches_naive(shape, dtype):
    T, N, L, R, K, num_slots = shape
    q_latent, q_pe, kv, slots = _random_case(T, N, L, R, K, num_slots, dtype, seed=T + K)
    scale = (L + R) ** -0.5
    ref = sparse_mla_naive(q_latent, q_pe, kv, slots, scale)
    assert ref.shape == (T, N, L) and ref.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(sparse_mla(q_latent, q_pe, kv, slots, scale), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(sparse_mla(q_latent, q_pe, kv, slots, scale, max_chunk_bytes=1), ref,
                               rtol=tol, atol=tol)
    if T > 2:
        assert torch.all(ref[1] == 0)
        assert torch.all(sparse_mla(q_latent, q_pe, kv, slots, scale)[1] == 0)


def test_single_slot_returns_its_latent():
    q_latent, q_pe, kv, _ = _random_case(3, 2, 16, 8, 4, 10, torch.float32, seed=1)
    slots = torch.tensor([[4, -1, -1, -1], [-1, -1, 7, -1], [-1, -1, -1, -1]])
    out = sparse_mla(q_latent, q_pe, kv, slots, 0.3)
    torch.testing.assert_close(out[0], kv[4, :16].expand(2, 16))
    torch.testing.assert_close(out[1], kv[7, :16].expand(2, 16))
    assert torch.all(out[2] == 0)


def test_absorbed_equals_dense_attention_on_expanded_kv():
    """MLA absorption: attention with per-head K = [W_UK·kv_c | k_pe], V = W_UV·kv_c over the selected keys
    (dense softmax with a mask) equals W_UV · sparse_mla(W_UK^T q_nope, q_pe, paged latent cache, global slots)."""
    torch.manual_seed(0)
    dt = torch.float64
    N, L, R, dn, dv, S, T, topk, bs = 4, 32, 16, 24, 20, 50, 50, 12, 8
    W_UK = torch.randn(N, dn, L, dtype=dt) * 0.2
    W_UV = torch.randn(N, dv, L, dtype=dt) * 0.2
    kv_c = torch.randn(S, L, dtype=dt)
    k_pe = torch.randn(S, R, dtype=dt)
    q_nope = torch.randn(T, N, dn, dtype=dt)
    q_pe = torch.randn(T, N, R, dtype=dt)
    scale = (dn + R) ** -0.5
    pos = torch.arange(T)
    # Request-local selection: random visible keys, padded with -1 (like the indexer's output).
    sel = torch.full((T, topk), -1, dtype=torch.int32)
    for t in range(T):
        cand = torch.randperm(t + 1)[:topk]
        sel[t, : len(cand)] = cand.to(torch.int32)

    # Dense reference over expanded keys/values with a selection mask.
    k_nope = torch.einsum("ndl,sl->snd", W_UK, kv_c)                       # [S, N, dn]
    v = torch.einsum("nvl,sl->snv", W_UV, kv_c)                            # [S, N, dv]
    logits = (torch.einsum("tnd,snd->nts", q_nope, k_nope) + torch.einsum("tnr,sr->nts", q_pe, k_pe)) * scale
    mask = torch.zeros(T, S, dtype=torch.bool)
    for t in range(T):
        mask[t, sel[t][sel[t] >= 0].long()] = True
    assert not torch.any(mask & (torch.arange(S)[None] > pos[:, None]))
    p = torch.softmax(logits.masked_fill(~mask[None], float("-inf")), dim=-1)
    dense = torch.einsum("nts,snv->tnv", p, v)

    # Absorbed path through a paged cache with a shuffled block table.
    num_blocks = (S + bs - 1) // bs + 3
    block_table = torch.randperm(num_blocks)[: (S + bs - 1) // bs].to(torch.int32)[None]
    cache = torch.zeros(num_blocks * bs, L + R, dtype=dt)
    phys = block_table[0].long()[torch.arange(S) // bs] * bs + torch.arange(S) % bs
    cache[phys] = torch.cat([kv_c, k_pe], dim=-1)
    slots = local_to_global_slots(sel, torch.zeros(T, dtype=torch.long), block_table, bs)
    q_latent = torch.einsum("tnd,ndl->tnl", q_nope, W_UK)
    for fn in (sparse_mla_naive, sparse_mla):
        latent = fn(q_latent, q_pe, cache, slots, scale)
        out = torch.einsum("tnl,nvl->tnv", latent, W_UV)
        torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_paging_hand_example():
    block_table = torch.tensor([[7, 2, 5], [3, 9, 0]], dtype=torch.int32)
    topk_local = torch.tensor([[0, 5, 11, -1], [4, 3, 12, 1]], dtype=torch.int32)
    req = torch.tensor([0, 1])
    # bs=4: 0 -> 7*4+0; 5 -> blk 1 = 2 -> 8+1; 11 -> blk 2 = 5 -> 20+3; -1 stays -1.
    #       4 -> blk 1 = 9 -> 36; 3 -> blk 0 = 3 -> 12+3; 12 -> blk 3 is past the table -> -1; 1 -> 12+1.
    expected = torch.tensor([[28, 9, 23, -1], [36, 15, -1, 13]], dtype=torch.int64)
    out = local_to_global_slots(topk_local, req, block_table, 4)
    assert out.dtype == torch.int64
    assert torch.equal(out, expected)
    assert torch.equal(token_to_request(torch.tensor([0, 2, 2, 5], dtype=torch.int32)),
                       torch.tensor([0, 0, 2, 2, 2]))
    assert token_to_request(torch.tensor([0])).numel() == 0


def test_errors():
    q_latent, q_pe, kv, slots = _random_case(3, 2, 16, 8, 4, 10, torch.float32, seed=1)
    with pytest.raises(ValueError, match="slot ids"):
        sparse_mla(q_latent, q_pe, kv, slots + 100, 1.0)
    with pytest.raises(ValueError, match="L\\+R"):
        sparse_mla_naive(q_latent, q_pe, kv[:, :20], slots, 1.0)
    with pytest.raises(ValueError, match="req_idx"):
        local_to_global_slots(slots.int(), torch.tensor([0, 0, 5]), torch.zeros(2, 3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        token_to_request(torch.tensor([0, 3, 2]))

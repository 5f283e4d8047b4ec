"""Lightning indexer: vectorised CPU kernel vs the naive reference, and the naive reference vs transformers' own
indexer modules (``DeepseekV32Indexer``, ``GlmMoeDsaIndexer``) on the same weights.

Tolerances: scores are float32 in both implementations and differ only by the summation order of the matmuls:
``rtol = atol = 1e-5`` (bf16 inputs are upcast exactly, so the same bound holds). Top-k indices must be identical
(random inputs are far from ties; exact ties are tested with small integers, where float32 arithmetic is exact).

Against transformers the selected *sets* must match except among keys with exactly equal scores: with ReLU, a key
whose dot products are negative for every head scores exactly 0 (probability 2^-H; the toy has H = 4), and
``torch.topk`` breaks ties in an unspecified order, so such rows may pick different zero-score keys.
"""
from __future__ import annotations

import pytest
import torch

from vllm_indexcache.ops.indexer import cpu_blockwise
from vllm_indexcache.ops.indexer.cpu import indexer_scores, indexer_topk
from vllm_indexcache.ops.indexer.cpu_blockwise import indexer_topk_blockwise, paged_key_segments
from vllm_indexcache.ops.indexer.naive import indexer_scores_naive, indexer_topk_naive
from vllm_indexcache.tools.reference import indexer_qkw
from vllm_indexcache.tools.toy import build_toy_model

RTOL = ATOL = 1e-5


def _inputs(T, S, H, D, dtype, seed, positions=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    k = torch.randn(S, D, generator=g).to(dtype)
    w = (torch.randn(T, H, generator=g) * (H ** -0.5) * (D ** -0.5)).to(dtype)
    pos = torch.arange(S - T, S) if positions is None else positions
    return q, k, w, pos


# (T, S, H, D, topk): prefill with T < topk, T > topk, T == S (whole prompt), chunked prefill (last T of S),
# a single decode token, topk > S.
SHAPES = [
    (8, 8, 4, 32, 16),
    (40, 40, 4, 32, 16),
    (64, 96, 8, 64, 32),
    (17, 300, 4, 128, 64),
    (1, 50, 2, 16, 8),
    (5, 5, 2, 16, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_matches_naive(shape, dtype):
    T, S, H, D, topk = shape
    q, k, w, pos = _inputs(T, S, H, D, dtype, seed=T * 1000 + S)
    ref_scores = indexer_scores_naive(q, k, w, pos)
    scores = indexer_scores(q, k, w, pos)
    assert ref_scores.dtype == scores.dtype == torch.float32
    assert torch.equal(torch.isinf(ref_scores), torch.isinf(scores))
    finite = torch.isfinite(ref_scores)
    torch.testing.assert_close(scores[finite], ref_scores[finite], rtol=RTOL, atol=ATOL)

    ref = indexer_topk_naive(q, k, w, pos, topk)
    assert ref.dtype == torch.int32 and ref.shape == (T, topk)
    assert torch.equal(indexer_topk(q, k, w, pos, topk), ref)
    # Tiny chunks (one row at a time) give the same answer.
    assert torch.equal(indexer_topk(q, k, w, pos, topk, max_chunk_bytes=1), ref)
    # Row counts: min(topk, visible) keys, then -1; every index visible and distinct.
    n_valid = (ref >= 0).sum(1)
    assert torch.equal(n_valid, torch.clamp(pos + 1, max=topk).to(n_valid.dtype))
    for t in range(T):
        row = ref[t, : n_valid[t]]
        assert int(row.max()) <= int(pos[t]) and len(set(row.tolist())) == len(row)
        assert torch.all(ref[t, n_valid[t]:] == -1)
    # The fused blockwise indexer: default blocks, one query row per block, and 64-key blocks (forced below).
    assert torch.equal(indexer_topk_blockwise(q, k, w, pos, topk), ref)
    assert torch.equal(indexer_topk_blockwise(q, k, w, pos, topk, q_block_rows=1), ref)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("shape", SHAPES + [(300, 700, 4, 32, 50), (40, 2000, 4, 32, 50), (3, 1500, 2, 16, 300)])
def test_blockwise_matches_naive_with_many_key_blocks(shape, blocks, monkeypatch):
    """Default key blocks (the lower-bound pre-filter of a not-yet-full running set when a block holds >= 4·topk
    keys) and 64-key blocks (running top-k merged across many blocks, causal skip, diagonal blocks)."""
    if blocks == "small":
        monkeypatch.setattr(cpu_blockwise, "_BLOCK_ELEMS", 1)
    T, S, H, D, topk = shape
    q, k, w, pos = _inputs(T, S, H, D, torch.bfloat16, seed=T + S)
    ref = indexer_topk_naive(q, k, w, pos, topk)
    for rows in (None, 1, 7):
        assert torch.equal(indexer_topk_blockwise(q, k, w, pos, topk, q_block_rows=rows), ref)


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_blockwise_exact_ties_at_scale(blocks, monkeypatch):
    """Small-integer inputs (exact in float32) over 1,500 keys: many equal scores at every block's and every row's
    selection boundary, negative weights included (scores −0.0 and +0.0 must tie), key blocks of 64 or default."""
    if blocks == "small":
        monkeypatch.setattr(cpu_blockwise, "_BLOCK_ELEMS", 1)
    g = torch.Generator().manual_seed(5)
    T, S, H, D, topk = 48, 1500, 3, 8, 40
    q = torch.randint(-2, 3, (T, H, D), generator=g).float()
    k = torch.randint(-2, 3, (S, D), generator=g).float()
    w = torch.randint(-1, 3, (T, H), generator=g).float()
    pos = torch.cat([torch.arange(0, 8), torch.randint(8, S, (T - 8,), generator=g)])
    ref = indexer_topk_naive(q, k, w, pos, topk)
    for rows in (None, 1, 5):
        assert torch.equal(indexer_topk_blockwise(q, k, w, pos, topk, q_block_rows=rows), ref)


def test_paged_key_segments_cover_every_key_in_order():
    """Runs of consecutive blocks come back as views (no copy), short runs gathered; positions ascending, exact."""
    bs, D, nb = 16, 4, 40
    cache = torch.randn(nb * bs, D)
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 3, 30, 31, 0, 21, 22]
    n_keys = len(ids) * bs - 5
    want = cache[torch.tensor([ids[p // bs] * bs + p % bs for p in range(n_keys)])]
    for max_keys, min_run in [(1000, 256), (64, 256), (50, 16), (7, 1)]:
        segs = list(paged_key_segments(cache, ids, n_keys, bs, max_keys, min_run_keys=min_run))
        assert [s0 for s0, _ in segs] == sorted(s0 for s0, _ in segs)
        assert all(keys.shape[0] <= max(max_keys, bs) for _, keys in segs)
        got = torch.cat([keys for _, keys in segs])
        assert torch.equal(got, want) and sum(keys.shape[0] for _, keys in segs) == n_keys
        assert all(segs[i + 1][0] == segs[i][0] + segs[i][1].shape[0] for i in range(len(segs) - 1))
    first = next(paged_key_segments(cache, ids, n_keys, bs, 1000))[1]
    assert first.data_ptr() == cache[5 * bs].data_ptr()                         # the long run is read in place


def test_errors():
    q, k, w, pos = _inputs(4, 10, 2, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="topk"):
        indexer_topk(q, k, w, pos, 0)
    with pytest.raises(ValueError, match="q_positions"):
        indexer_topk_naive(q, k, w, torch.tensor([0, 1, 2, 10]), 4)
    with pytest.raises(ValueError, match="weights"):
        indexer_topk(q, k, w[:, :1], pos, 4)
    with pytest.raises(ValueError, match="head dim"):
        indexer_scores(q, k[:, :4], w, pos)
    with pytest.raises(ValueError, match="topk"):
        indexer_topk_blockwise(q, k, w, pos, 0)
    with pytest.raises(ValueError, match="q_positions"):
        indexer_topk_blockwise(q, k, w, torch.tensor([0, 1, 2, 10]), 4)


@pytest.fixture(scope="module", params=["DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"])
def toy_model(request, tmp_path_factory):
    from vllm_indexcache.tools.reference import model_class

    path = build_toy_model(tmp_path_factory.mktemp(request.param), request.param, num_layers=2, tokenizer=False)
    # explicit class: importing vLLM (other tests) re-maps transformers' AutoConfig for deepseek_v32
    return model_class(path).from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("seq_len", [20, 90])
def test_naive_matches_transformers_indexer(toy_model, seq_len):
    """Same weights, same inputs: the naive top-k set equals the transformers indexer's, row by row."""
    cfg = toy_model.config
    attn = toy_model.model.layers[1].self_attn
    indexer = attn.indexer
    g = torch.Generator().manual_seed(seq_len)
    x = torch.randn(1, seq_len, cfg.hidden_size, generator=g)
    q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
    position_ids = torch.arange(seq_len)[None]
    cos_sin = toy_model.model.rotary_emb(x, position_ids)
    causal = torch.full((seq_len, seq_len), torch.finfo(torch.float32).min).triu(1)[None]   # like transformers
    with torch.no_grad():
        hf = indexer(x, q_resid, cos_sin, causal, position_ids)[0]                          # [S, min(topk, S)]
        q, k, w = indexer_qkw(indexer, x, q_resid, cos_sin)
    topk = cfg.index_topk
    pos = position_ids[0]
    ours = indexer_topk_naive(q, k, w, pos, topk)
    assert torch.equal(indexer_topk(q, k, w, pos, topk), ours)
    scores = indexer_scores_naive(q, k, w, pos)
    tie_rows = 0
    for t in range(seq_len):
        n = min(topk, t + 1)
        row = hf[t].tolist()
        assert all(s > t for s in row[n:])                # transformers pads short rows with future keys
        mine, theirs = set(ours[t, :n].tolist()), set(row[:n])
        if mine != theirs:                                # only exact ties at the boundary may differ
            tie_rows += 1
            kth = scores[t, ours[t, n - 1]]
            assert all(scores[t, s] == kth for s in mine ^ theirs), f"row {t}"
    assert tie_rows <= seq_len // 10


def test_paged_cpu_step_on_a_mixed_batch_equals_the_naive_topk():
    """``paged_indexer_step_cpu`` (the CPU backend's per-step driver): keys land at their slots and every request's
    top-k equals ``indexer_topk_naive`` on its gathered keys — decodes, a one-token prefill, a fresh prefill and a
    chunked prefill continuing a cached context in one step."""
    from pagedkit import mixed_batch

    from vllm_indexcache.ops.indexer.naive import indexer_topk_naive
    from vllm_indexcache.ops.indexer.paged_cpu import paged_indexer_step_cpu

    torch.manual_seed(4)
    H, D, bs, topk, num_blocks = 4, 32, 16, 24, 20
    b = mixed_batch(num_blocks, bs, D)
    reqs, block_table, all_keys, qsl = b["reqs"], b["block_table"], b["all_keys"], b["qsl"]
    cache = b["cache"].view(num_blocks * bs, D)
    T = qsl[-1]
    q, w = torch.randn(T, H, D), torch.randn(T, H)
    out = torch.full((T + 4, topk), 7, dtype=torch.int32)
    paged_indexer_step_cpu(q, b["new_k"], w, cache, torch.tensor(b["slots"]), block_table, qsl, b["seq_lens"],
                           torch.tensor(b["positions"]), bs, topk, out, T)
    assert (out[T:] == 7).all()
    for r, (ctx, ql) in enumerate(reqs):
        p = torch.arange(ctx + ql)
        keys = cache[block_table[r, p // bs].long() * bs + p % bs]
        torch.testing.assert_close(keys, all_keys[r])
        s, e = qsl[r], qsl[r + 1]
        want = indexer_topk_naive(q[s:e], keys, w[s:e], torch.arange(ctx, ctx + ql), topk)
        assert torch.equal(out[s:e], want)

"""The search's fast path of the transformers reference (``reference.set_fast``) against the eager reference:
top-k attention through SDPA (:mod:`vllm_indexcache.tools.topk_attention`) and the causal row-chunked top-k
(:mod:`vllm_indexcache.tools.indexer_topk_causal`)."""
import numpy as np
import pytest
import torch

from vllm_indexcache.ops.indexer.cpu import indexer_topk
from vllm_indexcache.tools.indexer_topk_causal import indexer_topk_causal
from vllm_indexcache.tools.reference import (
    get_fast,
    load_reference,
    prompt_logprobs,
    record_topk,
    set_fast,
    set_pattern,
)
from vllm_indexcache.tools.search.scorers import HFScorer
from vllm_indexcache.tools.topk_attention import topk_sdpa_attention, topk_visible_mask
from vllm_indexcache.tools.toy import build_toy_model


# ------------------------------------------------------------------------------------------ causal top-k
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("T,topk", [(200, 32), (50, 64), (130, 128)])
def test_causal_topk_equals_the_oracle_with_many_exact_ties(rows, T, topk):
    """Heavy ties: a quarter of the query heads zero (ReLU(0) = 0 ties) and keys on a coarse grid, so equal
    scores straddle the top-k boundary in many rows (the oracle's tie rule: lower position first)."""
    g = torch.Generator().manual_seed(T + topk)
    H, D = 4, 16
    q = torch.randint(-2, 3, (T, H, D), generator=g).float()
    q[:, 0] = 0
    k = torch.randint(-2, 3, (T, D), generator=g).float()
    w = torch.randint(-1, 3, (T, H), generator=g).float()
    pos = torch.arange(T)
    want = indexer_topk(q, k, w, pos, topk)
    got = indexer_topk_causal(q, k, w, pos, topk, rows=rows)
    assert torch.equal(got, want)
    if T <= topk:                                       # every row has fewer visible keys than topk: fallback
        return
    # the construction does produce boundary ties (else the fallback path would go untested)
    scores = torch.einsum("thd,sd->ths", q, k).relu().mul(w[..., None]).sum(1)
    scores = scores.masked_fill(torch.arange(T)[None] > pos[:, None], float("-inf"))
    kth = scores.topk(min(topk, T), dim=-1).values[:, -1:]
    assert int(((scores == kth).sum(-1) > 1)[topk:].sum()) > 0


def test_causal_topk_equals_the_oracle_on_random_floats_and_offset_positions():
    g = torch.Generator().manual_seed(0)
    T, S, H, D = 90, 300, 4, 32
    q, k, w = torch.randn(T, H, D, generator=g), torch.randn(S, D, generator=g), torch.randn(T, H, generator=g)
    pos = torch.arange(S - T, S)                        # a chunk of queries at the end of a longer prefix
    assert torch.equal(indexer_topk_causal(q, k, w, pos, 64, rows=16), indexer_topk(q, k, w, pos, 64))
    with pytest.raises(ValueError, match="rows must be >= 1"):
        indexer_topk_causal(q, k, w, pos, 64, rows=0)


# ------------------------------------------------------------------------------------------ SDPA attention
def test_topk_sdpa_attention_equals_eager_masked_attention():
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import eager_attention_forward

    g = torch.Generator().manual_seed(1)
    B, H, S, D, Dv, K = 1, 3, 300, 24, 16, 40
    q, k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, Dv,
                                                                                                      generator=g)
    lowest = torch.finfo(torch.float32).min
    causal = torch.full((S, S), lowest).triu(1)[None, None]                       # eager_mask's additive form
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(S)])[None].int()
    idx[0, :, 0] = torch.arange(S)                                                # every query sees itself

    class Module(torch.nn.Module):
        num_key_value_groups = 1

    index_mask = torch.ones((B, S, S), dtype=torch.bool).scatter(-1, idx.long(), False).unsqueeze(1)
    want, _ = eager_attention_forward(Module().eval(), q, k, v, causal.masked_fill(index_mask, lowest), 0.3)
    for rows in (512, 64, 1):
        got, weights = topk_sdpa_attention(Module().eval(), q, k, v, causal, 0.3, indices=idx, rows=rows)
        assert weights is None and got.shape == want.shape == (B, S, H, Dv)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    visible = topk_visible_mask(idx, causal)
    assert int(visible.sum()) == int(((~index_mask) & (causal == 0)).sum()) < S * K
    with pytest.raises(ValueError, match="additive float mask"):
        topk_visible_mask(idx, causal + 1.0)


# ------------------------------------------------------------------------------------------ whole model
@pytest.fixture(scope="module", params=["DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"])
def toy(request, tmp_path_factory):
    model_dir = build_toy_model(tmp_path_factory.mktemp("fast") / "m", request.param, num_layers=4, seed=7,
                                tokenizer=False)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 500, size=n).tolist() for n in (150, 97)]      # longer than index_topk (32): sparse
    return model_dir, load_reference(str(model_dir), ties="lower"), seqs


def test_fast_reference_selects_the_same_top_k_and_matches_eager_logprobs(toy):
    model_dir, model, seqs = toy
    for pattern in ("FFFF", "FSFS", "FSSS"):
        set_pattern(model, pattern)
        set_fast(model, False)
        want_lp, want_topk = prompt_logprobs(model, seqs[0]), record_topk(model, seqs[0])
        set_fast(model, True)
        assert get_fast(model) and model.config._attn_implementation == "indexcache_topk_sdpa"
        got_lp, got_topk = prompt_logprobs(model, seqs[0]), record_topk(model, seqs[0])
        set_fast(model, False)
        assert model.config._attn_implementation == "eager"
        assert got_topk.keys() == want_topk.keys()
        for i in want_topk:
            assert torch.equal(got_topk[i], want_topk[i]), (pattern, i)
        torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-5)


def test_fast_scorer_losses_equal_the_eager_scorer_to_float_rounding(toy):
    model_dir, model, seqs = toy
    fast = HFScorer(model_dir, seqs, "lm-loss", model=model, layer_cache=True)
    slow = HFScorer(model_dir, seqs, "lm-loss", model=model, layer_cache=False, fast=False)
    assert fast.fast and not slow.fast
    fast.set_base("FFFF")
    for pattern in ("FFFF", "FSFF", "FFSF", "FFFS"):
        a, b = fast(pattern), slow(pattern)
        assert abs(a - b) <= 1e-6 * abs(b), (pattern, a, b)


def test_fast_scorer_runs_the_lm_head_only_at_the_weighted_positions_of_sparse_targets(toy):
    from vllm_indexcache.tools.search.objectives import Targets

    model_dir, model, seqs = toy
    fast = HFScorer(model_dir, seqs, "lm-loss", model=model, layer_cache=True)
    slow = HFScorer(model_dir, seqs, "lm-loss", model=model, layer_cache=False, fast=False)
    weights = [np.zeros(len(s) - 1) for s in seqs]
    weights[0][[5, 60, 148]] = [0.5, 1.0, 2.0]                 # a needle document: a few answer positions
    weights[1][:] = 1 / (len(seqs[1]) - 1)                     # a calibration window: every position
    fast.targets = slow.targets = Targets(seqs, weights)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    try:
        fast.set_base("FFFF")
        for pattern in ("FFFF", "FSFF", "FFFS"):
            rows.clear()
            a = fast(pattern)
            # one forward per sequence (two when the layer cache records a new base first)
            assert rows in ([3, len(seqs[1])], [3, 3, len(seqs[1]), len(seqs[1])]), rows
            b = slow(pattern)
            assert abs(a - b) <= 1e-6 * abs(b), (pattern, a, b)
    finally:
        hook.remove()

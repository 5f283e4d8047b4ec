"""Transformers reference with IndexCache reuse (``vllm_indexcache.tools.reference``), on 4-layer toy models of both DSA
architectures (index_topk 32; prompts of 80 tokens so that selection is really sparse).

Comparisons are exact (``torch.equal``) unless stated: the patches only route existing tensors.
"""
from __future__ import annotations

import pytest
import torch

from vllm_indexcache.ops.indexer.naive import indexer_topk_naive
from vllm_indexcache.tools.reference import (
    default_pattern,
    get_pattern,
    greedy_generate,
    indexer_qkw,
    load_reference,
    prompt_logprobs,
    record_topk,
    set_pattern,
)
from vllm_indexcache.tools.toy import build_toy_model

ARCHS = ["DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"]
PATTERNS = ["FSSS", "FSFS", "FFSF", "FSSF"]
LONG = 80          # > index_topk (32)


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def _nearest_f(pattern, i):
    return max(j for j in range(i + 1) if pattern[j] == "F")


@pytest.fixture(scope="module", params=ARCHS)
def toy_dir(request, tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp(request.param), request.param, num_layers=4, tokenizer=False)


@pytest.fixture(scope="module")
def model(toy_dir):
    return load_reference(toy_dir)


def test_pattern_none_is_unpatched_transformers(toy_dir, model):
    from vllm_indexcache.tools.reference import model_class

    plain = model_class(toy_dir).from_pretrained(toy_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _prompt(LONG)
    set_pattern(model, "FSFS")
    set_pattern(model, None)                              # a round trip leaves no trace
    assert get_pattern(model) == "FFFF"
    ref = _logits(plain, ids)
    assert torch.equal(_logits(model, ids), ref)
    expected_lp = torch.log_softmax(ref[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    lp = prompt_logprobs(model, ids)
    assert lp.shape == (LONG - 1,) and lp.dtype == torch.float32
    assert torch.equal(lp, expected_lp)
    with torch.no_grad():
        hf = plain.generate(torch.tensor([ids[:40]]), max_new_tokens=4, do_sample=False)[0, 40:].tolist()
    assert greedy_generate(model, ids[:40], 4) == hf


@pytest.mark.parametrize("pattern", PATTERNS)
def test_s_layers_reuse_preceding_f(model, pattern):
    ids = _prompt(LONG, seed=1)
    set_pattern(model, None)
    dense_logits = _logits(model, ids)
    all_f = record_topk(model, ids)
    set_pattern(model, pattern)
    try:
        rec = record_topk(model, ids)
        logits = _logits(model, ids)
    finally:
        set_pattern(model, None)
    assert sorted(rec) == [0, 1, 2, 3]
    for i, c in enumerate(pattern):
        assert rec[i].shape == (LONG, 32) and rec[i].dtype == torch.int32
        if c == "S":
            assert torch.equal(rec[i], rec[_nearest_f(pattern, i)]), f"layer {i}"
    assert torch.equal(rec[0], all_f[0])                  # layer 0 sees the same input under every pattern
    # Reuse is real: the S layers' selections differ from their own indexers', and so do the logits.
    assert any(not torch.equal(rec[i], all_f[i]) for i, c in enumerate(pattern) if c == "S")
    assert not torch.allclose(logits, dense_logits)


def test_record_topk_rows(model):
    """Rows list min(topk, t+1) distinct visible keys, then -1 (transformers' future-key padding removed)."""
    ids = _prompt(LONG, seed=2)
    rec = record_topk(model, ids)
    for topk in rec.values():
        n_valid = (topk >= 0).sum(1)
        assert torch.equal(n_valid, torch.clamp(torch.arange(LONG) + 1, max=32))
        for t in range(LONG):
            row = topk[t, : n_valid[t]].tolist()
            assert max(row) <= t and len(set(row)) == len(row)
    short = record_topk(model, ids[:10])                 # S < index_topk: width stays index_topk
    assert short[0].shape == (10, 32) and torch.all(short[0][:, 10:] == -1)


@pytest.mark.parametrize("n", [20, 32])
def test_short_prompts_identical_for_all_patterns(model, n):
    ids = _prompt(n, seed=3)
    set_pattern(model, None)
    ref = _logits(model, ids)
    try:
        for pattern in PATTERNS:
            set_pattern(model, pattern)
            assert torch.equal(_logits(model, ids), ref), pattern
    finally:
        set_pattern(model, None)


def test_lower_ties_oracle_matches_ops(toy_dir):
    """``ties="lower"``: every F layer's top-k equals the naive op on that layer's own q/k/weights, exactly (order
    included); S layers reuse it; for short prompts the logits equal transformers' own."""
    model = load_reference(toy_dir, "FSFF", ties="lower")
    captured, ran = {}, []
    hooks = []
    for i, layer in enumerate(model.model.layers):
        ind = layer.self_attn.indexer
        if ind is not None:
            def pre(module, args, i=i):
                captured[i] = args[:3]                   # hidden_states, q_resid, position_embeddings
            hooks.append(ind.register_forward_pre_hook(pre))
            hooks.append(ind.wq_b.register_forward_pre_hook(lambda module, args, i=i: ran.append(i)))
    ids = _prompt(LONG, seed=4)
    try:
        rec = record_topk(model, ids)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 2, 3]                              # S layers do not compute their indexer (DeepSeek patch too)
    for i in (0, 2, 3):
        q, k, w = indexer_qkw(model.model.layers[i].self_attn.indexer, *captured[i])
        assert torch.equal(rec[i], indexer_topk_naive(q, k, w, torch.arange(LONG), 32)), f"layer {i}"
    assert torch.equal(rec[1], rec[0])
    plain = load_reference(toy_dir, "FSFF")
    assert torch.equal(_logits(model, ids[:30]), _logits(plain, ids[:30]))


def test_glm_matches_native_shared_layers(tmp_path):
    """GLM: ``set_pattern`` on an all-F load equals transformers' native ``indexer_types`` path; a checkpoint saved
    without S-layer indexer weights (GLM-5.2 style) loads with its own pattern and refuses F on those layers."""
    from vllm_indexcache.tools.reference import model_class

    path = build_toy_model(tmp_path / "glm", "GlmMoeDsaForCausalLM", num_layers=4, tokenizer=False)
    pattern = "FSSF"
    types = ["full" if c == "F" else "shared" for c in pattern]
    native = model_class(path).from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                  indexer_types=types).eval()
    assert native.model.layers[1].self_attn.indexer is None
    ids = _prompt(LONG, seed=5)
    ours = load_reference(path, pattern)
    assert torch.equal(_logits(ours, ids), _logits(native, ids))
    assert ours.config.indexer_types == types

    native.save_pretrained(tmp_path / "glm_shared")
    shipped = load_reference(tmp_path / "glm_shared")
    assert default_pattern(shipped) == get_pattern(shipped) == pattern
    assert torch.equal(_logits(shipped, ids), _logits(native, ids))
    set_pattern(shipped, "FSSS")
    with pytest.raises(ValueError, match="no indexer weights"):
        set_pattern(shipped, "FFSF")


def test_pattern_errors(toy_dir, model):
    for bad in ["FSF", "FSFSF", "SFFF", "fsff", "FXFF", ""]:
        with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[")):
            set_pattern(model, bad)
    with pytest.raises(ValueError, match="'SFFF'"):
        load_reference(toy_dir, "SFFF")
    with pytest.raises(ValueError, match="ties"):
        load_reference(toy_dir, ties="random")
    assert get_pattern(model) == "FFFF"

"""Transformers reference with IndexCache reuse over DeepSeek-V4's CSA layers (``vllm_indexcache.tools.reference``).

Toy: :mod:`vllm_indexcache.tools.toy_v4` (8 layers, CSA at 1, 2, 4, 5, 7) with ``index_topk`` 16, so that a
200-token prompt (50 compressed entries) makes the indexer select. Comparisons are exact: the override only routes
existing tensors.
"""
from __future__ import annotations

import pytest
import torch

from vllm_indexcache.tools.reference import get_pattern, load_reference, record_topk, set_pattern, set_ties

TOPK = 16
LONG = 200        # 50 compressed entries > TOPK
SHORT = 60        # 15 compressed entries <= TOPK: every entry is selected, whatever the pattern


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from vllm_indexcache.tools.toy_v4 import build_toy_v4

    return str(build_toy_v4(tmp_path_factory.mktemp("v4ref"), seed=0, index_topk=TOPK, tokenizer=False))


@pytest.fixture(scope="module")
def model(toy_dir):
    return load_reference(toy_dir)


def test_all_f_is_plain_transformers(toy_dir, model):
    from transformers import DeepseekV4ForCausalLM

    plain = DeepseekV4ForCausalLM.from_pretrained(toy_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _prompt(LONG)
    assert get_pattern(model) == "FFFFF"                    # one character per CSA layer
    set_pattern(model, "FSFSF")
    set_pattern(model, None)                                # a round trip leaves no trace
    assert torch.equal(_logits(model, ids), _logits(plain, ids))
    set_pattern(model, "FFFFF")
    assert torch.equal(_logits(model, ids), _logits(plain, ids))


@pytest.mark.parametrize("pattern", ["FSFSF", "FSSSS", "FFSFS"])
def test_s_layers_reuse_the_last_f_csa_layers_topk(model, pattern):
    ids = _prompt(LONG)
    set_pattern(model, "FFFFF")
    ref = _logits(model, ids)
    own = record_topk(model, ids)
    set_pattern(model, pattern)
    try:
        got = record_topk(model, ids)
        out = _logits(model, ids)
    finally:
        set_pattern(model, None)
    assert sorted(got) == list(range(5)) and got[0].shape == (LONG, TOPK)
    for i in range(len(pattern)):
        last_f = max(j for j in range(i + 1) if pattern[j] == "F")
        assert torch.equal(got[i], got[last_f])             # S: exactly the last F CSA layer's ids
        if all(c2 == "F" for c2 in pattern[: i + 1]):
            assert torch.equal(got[i], own[i])              # layers before the first S compute as all-F
    # the CSA layers really select differently, so reuse changes what S layers attend to and the output
    s_layers = [i for i, c in enumerate(pattern) if c == "S"]
    assert any(not torch.equal(own[i], got[i]) for i in s_layers)
    assert (out - ref).abs().max() > 1e-3


def test_short_prompts_are_identical_for_every_pattern(model):
    ids = _prompt(SHORT, seed=1)
    set_pattern(model, "FFFFF")
    ref = _logits(model, ids)
    set_pattern(model, "FSSSS")
    try:
        assert torch.equal(_logits(model, ids), ref)
    finally:
        set_pattern(model, None)


def test_v4_refuses_other_tie_rules_and_bad_patterns(model):
    with pytest.raises(ValueError, match="ties='lower': DeepseekV4ForCausalLM supports only"):
        set_ties(model, "lower")
    with pytest.raises(ValueError, match="length 8 != 5"):
        set_pattern(model, "FSFSFSFS")
    with pytest.raises(ValueError, match="layer 0 is S"):
        set_pattern(model, "SFFFF")

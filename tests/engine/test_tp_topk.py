"""Tensor parallelism: every TP rank selects the same top-k, also when scores tie exactly at the k-th position.

How consistency is obtained: **a deterministic tie rule on replicated scores, no communication; cost: none.**
vLLM replicates the whole indexer across TP ranks (``model_executor/models/deepseek_v2.py`` ``Indexer``:
``wq_b`` is a ``ReplicatedLinear``, ``wk_weights_proj`` a ``MergedColumnParallelLinear(disable_tp=True)``, ``k_norm``
a plain ``LayerNorm``; its inputs — the layer's normed hidden state and MLA's ``q_c`` from
``DeepSeekV2FusedQkvAProjLinear(disable_tp=True)`` — are the all-reduced residual stream, identical on every rank).
Each rank therefore computes bit-identical scores, and the CPU backend's selection
(:func:`vllm_indexcache.ops.indexer.cpu.indexer_topk`: descending score, ties towards the lower position) is a
function of the scores alone, so equal scores give equal selections without broadcasting anything. (The rank-equal
residual stream rests on the all-reduce returning the same bits on every rank; with 2 ranks that holds for any
reduction order because float addition is commutative. Not checked here for more ranks.)

The toy makes exact ties at the k-th place common: one indexer head (``index_n_heads=1``) and ``index_topk=4``.
With one head a score is ``w[t] · ReLU(q[t] · k[s])``: every key with ``q·k < 0`` scores exactly 0 (about half the
keys), and for rows with ``w[t] < 0`` those zeros are the *best* score, so the 4 places are filled from a tie of
many keys. The test checks that such ties actually occur at the k-th place.
"""
from __future__ import annotations

import gc
import random
from contextlib import contextmanager
from functools import partial

import pytest
import torch

TOPK = 4
PATTERN = "FSFS"
PROMPT_LENS = (24, 41)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def tie_model(tmp_path_factory):
    from vllm_indexcache.tools.toy import build_toy_model

    root = tmp_path_factory.mktemp("tp-ties")
    return str(build_toy_model(root / "ties", "DeepseekV32ForCausalLM", num_layers=4, seed=7, tokenizer=False,
                               index_n_heads=1, index_topk=TOPK))


@contextmanager
def engine(model_dir, pattern, **kwargs):
    """The float32 eager engine of ``test_engine.py`` (same settings)."""
    from vllm import LLM

    llm = LLM(model=model_dir, attention_backend="indexcache", dtype="float32", max_model_len=1024,
              kv_cache_memory_bytes=128 << 20, enforce_eager=True, seed=0, max_num_seqs=8,
              hf_overrides={"index_topk_pattern": pattern}, skip_tokenizer_init=True, **kwargs)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def _run(model, tp, prompts):
    """Greedy tokens per prompt and ``{rank: records}`` (:func:`vllm_indexcache.vllm_glue.hooks.capture_topk`), one
    request at a time so that every prefill step is one whole prompt."""
    from vllm import SamplingParams

    from vllm_indexcache.vllm_glue.hooks import capture_topk, captured_topk

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, detokenize=False, ignore_eos=True)
    extra = dict(tensor_parallel_size=tp, distributed_executor_backend="mp") if tp > 1 else {}
    tokens, records = [], {}
    with engine(model, PATTERN, **extra) as llm:
        ranks = llm.apply_model(partial(capture_topk, inputs=True))  # a lambda does not pickle
        assert sorted(ranks) == list(range(tp))
        for p in prompts:
            out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)
            tokens.append(list(out[0].outputs[0].token_ids))
        for rank, recs in llm.apply_model(captured_topk):
            records[rank] = [_as_tensors(rec) for rec in recs]
    return tokens, records


def _as_tensors(rec):
    """A record of :func:`captured_topk` (nested lists) back to tensors of the worker's dtypes."""
    out = dict(rec)
    out["topk"] = torch.tensor(rec["topk"], dtype=torch.int32)
    out["positions"] = torch.tensor(rec["positions"], dtype=torch.int64)
    for key in ("q", "k", "weights"):
        out[key] = torch.tensor(rec[key], dtype=torch.float32)
    return out


def _check_against_reference(recs):
    """Each whole-prompt prefill's selection equals the naive indexer's on the same q/k/weights (ties → lower
    position); returns the number of rows with an exact tie between the k-th and (k+1)-th best score."""
    from vllm_indexcache.ops.indexer.naive import indexer_scores_naive, indexer_topk_naive

    ties, checked = 0, 0
    for rec in recs:
        pos = rec["positions"]
        if len(rec["query_start_loc"]) != 2 or int(pos[0]) != 0 or pos.numel() < 2:
            continue
        want = indexer_topk_naive(rec["q"], rec["k"], rec["weights"], pos, TOPK)
        assert torch.equal(rec["topk"], want), f"layer {rec['layer']}: selection differs from the naive tie rule"
        scores = indexer_scores_naive(rec["q"], rec["k"], rec["weights"], pos)
        for t in range(pos.numel()):
            n = int(pos[t]) + 1
            if n > TOPK:
                s = torch.sort(scores[t, :n], descending=True).values
                ties += int(s[TOPK - 1] == s[TOPK])
        checked += 1
    assert checked, "no whole-prompt prefill step recorded"
    return ties


def test_tp2_ranks_select_identical_topk_under_exact_ties(tie_model, monkeypatch):
    """TP 2 (mp executor, one core per rank): both ranks' top-k rows of every F layer at every step are identical,
    prefill selections equal the naive reference's tie rule on rows with exact ties at the k-th place, and greedy
    tokens equal TP 1."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (vLLM binds per NUMA node otherwise)
    rng = random.Random(40)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]
    tokens1, records1 = _run(tie_model, 1, prompts)
    tokens2, records2 = _run(tie_model, 2, prompts)

    r0, r1 = records2[0], records2[1]
    assert r0 and len(r0) == len(r1), f"rank 0 recorded {len(r0)} indexer calls, rank 1 {len(r1)}"
    for i, (a, b) in enumerate(zip(r0, r1)):
        assert a["layer"] == b["layer"] and torch.equal(a["positions"], b["positions"])
        assert torch.equal(a["topk"], b["topk"]), f"call {i} (layer {a['layer']}): TP ranks selected different keys"
    assert {rec["layer"] for rec in r0} == {i for i, c in enumerate(PATTERN) if c == "F"}
    ties = [_check_against_reference(recs) for recs in (records1[0], r0, r1)]
    print(f"prefill rows with an exact tie at the k-th place (TP1, TP2 rank 0, rank 1): {ties}")
    assert min(ties) >= 5, f"the toy must produce exact ties at the k-th place, got {ties}"
    assert tokens2 == tokens1, "greedy tokens TP 2 != TP 1"

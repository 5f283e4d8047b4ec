"""The checks of ``vllm-indexcache reliability`` (bounded load, disconnects, KV pressure, bad input, search faults),
each a function over a running :class:`~vllm_indexcache.tools.testing.server.Server` or a scratch directory."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from pathlib import Path

from vllm_indexcache.tools.testing.server import CLI, Server, free_port, sigkill_after_first_step

NON_DSA_WARNING = "this model has no lightning indexer"


def make_prompts(n: int, min_len: int, max_len: int, vocab: tuple[int, int], seed: int) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths geometric from ``min_len`` to ``max_len`` (both included),
    in a seeded random order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.unique(np.round(np.geomspace(min_len, max_len, n)).astype(int)) if n > 1 else np.array([max_len])
    while len(lengths) < n:  # rounding merged some short lengths
        lengths = np.unique(np.concatenate([lengths, rng.integers(min_len, max_len + 1, n - len(lengths))]))
    lengths = rng.permutation(lengths)
    return [rng.integers(vocab[0], vocab[1], int(n_)).tolist() for n_ in lengths]


def _client(base_url: str, timeout: float):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=timeout)


async def stream_one(client, model: str, prompt: list[int], max_tokens: int, disconnect_after: int | None = None):
    """One greedy streaming completion; returns its token ids, status and timing (never raises)."""
    import openai

    rec = {"prompt_len": len(prompt), "tokens": [], "status": 200, "error": None, "disconnected": False,
           "finish_reason": None}
    t0 = time.perf_counter()
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True,
                                                 extra_body={"return_token_ids": True, "ignore_eos": True})
        async for chunk in stream:
            for choice in chunk.choices:
                rec["tokens"] += list(getattr(choice, "token_ids", None) or [])
                rec["finish_reason"] = choice.finish_reason or rec["finish_reason"]
            if rec["tokens"]:
                rec.setdefault("ttft_s", round(time.perf_counter() - t0, 3))
            if disconnect_after is not None and len(rec["tokens"]) >= disconnect_after:
                await stream.close()
                rec["disconnected"] = True
                break
    except openai.APIStatusError as e:
        rec["status"], rec["error"] = e.status_code, str(e)[:300]
    except Exception as e:  # connection errors, timeouts
        rec["status"], rec["error"] = None, repr(e)[:300]
    rec["latency_s"] = round(time.perf_counter() - t0, 3)
    return rec


async def run_concurrent(base_url, model, prompts, max_tokens, disconnect_prompts=(), disconnect_after=(),
                         timeout=1200.0, disconnect_max_tokens: list[int] | None = None):
    """All ``prompts`` at once (greedy, ``max_tokens`` each), plus clients that close their stream after
    ``disconnect_after[i]`` tokens of ``disconnect_prompts[i]``. Those ask for ``disconnect_max_tokens[i]`` tokens
    (default ``max_tokens``): give them far more than they read, so that the server normally sees the
    disconnect while it is still generating (a client lagging far behind the stream on a loaded machine can still
    close only after the last token was sent).
    Returns ``(records, disconnect_records, wall_s)``."""
    client = _client(base_url, timeout)
    dmt = disconnect_max_tokens or [max_tokens] * len(disconnect_prompts)
    try:
        tasks = [stream_one(client, model, p, max_tokens) for p in prompts]
        tasks += [stream_one(client, model, p, m, k) for p, k, m in zip(disconnect_prompts, disconnect_after, dmt)]
        t0 = time.perf_counter()
        recs = await asyncio.gather(*tasks)
        return recs[:len(prompts)], recs[len(prompts):], time.perf_counter() - t0
    finally:
        await client.close()


async def run_sequential(base_url, model, prompts, max_tokens, timeout=1200.0):
    client = _client(base_url, timeout)
    try:
        t0 = time.perf_counter()
        recs = [await stream_one(client, model, p, max_tokens) for p in prompts]
        return recs, time.perf_counter() - t0
    finally:
        await client.close()


def compare(recs: list[dict], reference: list[dict], max_tokens: int) -> dict:
    """Request-by-request comparison of token ids against the reference (sequential) run."""
    mismatched = [i for i, (r, ref) in enumerate(zip(recs, reference)) if r["tokens"] != ref["tokens"]]
    first_diff = {}
    for i in mismatched:
        a, b = recs[i]["tokens"], reference[i]["tokens"]
        first_diff[i] = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
    return {
        "requests": len(recs),
        "completed": sum(r["status"] == 200 and len(r["tokens"]) == max_tokens for r in recs),
        "errors": sum(r["status"] != 200 for r in recs),
        "status_5xx": sum(r["status"] is not None and r["status"] >= 500 for r in recs),
        "tokens_compared": sum(min(len(r["tokens"]), len(ref["tokens"])) for r, ref in zip(recs, reference)),
        "identical_requests": len(recs) - len(mismatched),
        "mismatched_requests": mismatched,
        "first_divergence_token": first_diff,
        "mismatch_prompt_lens": [recs[i]["prompt_len"] for i in mismatched],
    }


def summarise_disconnects(recs: list[dict]) -> dict:
    return {"clients": len(recs), "disconnected": sum(r["disconnected"] for r in recs),
            "tokens_before_disconnect": [len(r["tokens"]) for r in recs],
            "errors": sum(r["status"] != 200 for r in recs)}


def vocab_range(model: str) -> tuple[int, int]:
    cfg = json.loads((Path(model) / "config.json").read_text())
    return 3, int(cfg["vocab_size"])  # ids 0-2: pad, bos, eos


# -------------------------------------------------------------------------------------------------------- phases
def phase_load(server: Server, prompts, disc_prompts, disc_after, max_tokens, timeout,
               disc_max_tokens: list[int] | None = None) -> tuple[dict, list[dict]]:
    before, aborted_before = server.metrics(), server.aborted_requests()
    conc, disc, conc_s = asyncio.run(run_concurrent(server.base_url, server.model, prompts, max_tokens, disc_prompts,
                                                    disc_after, timeout, disc_max_tokens))
    mid = server.metrics()
    time.sleep(1)
    aborted = server.aborted_requests() - aborted_before
    seq, seq_s = asyncio.run(run_sequential(server.base_url, server.model, prompts, max_tokens, timeout))
    after = server.metrics()
    cmp = compare(conc, seq, max_tokens)
    seq_ok = sum(r["status"] == 200 and len(r["tokens"]) == max_tokens for r in seq)
    res = {
        "concurrency": len(prompts) + len(disc_prompts),
        "prompt_lens": [len(p) for p in prompts],
        "prompt_tokens": sum(len(p) for p in prompts),
        "max_tokens": max_tokens,
        "concurrent": cmp,
        "concurrent_wall_s": round(conc_s, 1),
        "concurrent_ttft_s_max": max((r.get("ttft_s") or 0) for r in conc),
        "disconnects": summarise_disconnects(disc),
        "aborted_per_vllm_log": aborted,
        "finished_per_vllm_metrics": after["finished"] - before["finished"],
        "preemptions": mid["num_preemptions"] - before["num_preemptions"],
        "sequential": {"requests": len(seq), "completed": seq_ok, "errors": sum(r["status"] != 200 for r in seq),
                       "status_5xx": sum(r["status"] is not None and r["status"] >= 500 for r in seq),
                       "wall_s": round(seq_s, 1)},
        "server_healthy_after": server.healthy(),
    }
    res["checks"] = {
        "all_concurrent_complete": cmp["completed"] == len(prompts),
        "all_sequential_complete": seq_ok == len(prompts),
        "zero_5xx": cmp["status_5xx"] == 0 and res["sequential"]["status_5xx"] == 0,
        "concurrent_equals_sequential": not cmp["mismatched_requests"],
        "disconnects_happened": res["disconnects"]["disconnected"] == len(disc_prompts),
        # each disconnected request is aborted by vLLM, or — where a lagging client closed only after the server had
        # sent every token — finished; never both, never lost (the others finish twice: concurrent + sequential)
        "disconnects_aborted_or_finished": 0 <= res["finished_per_vllm_metrics"] - 2 * len(prompts)
        == len(disc_prompts) - aborted,
        "server_healthy_after": res["server_healthy_after"],
    }
    return res, seq


def phase_pressure(server: Server, prompts, reference, max_tokens, timeout) -> dict:
    before = server.metrics()
    conc, _, conc_s = asyncio.run(run_concurrent(server.base_url, server.model, prompts, max_tokens,
                                                 timeout=timeout))
    after = server.metrics()
    cmp = compare(conc, reference, max_tokens)
    res = {"kv_cache_tokens": server.kv_cache_tokens(), "requests": len(prompts), "concurrent": cmp,
           "wall_s": round(conc_s, 1), "preemptions": after["num_preemptions"] - before["num_preemptions"],
           "server_healthy_after": server.healthy()}
    res["checks"] = {"preemptions_forced": res["preemptions"] > 0,
                     "all_complete": cmp["completed"] == len(prompts), "zero_5xx": cmp["status_5xx"] == 0,
                     "equals_large_cache_sequential": not cmp["mismatched_requests"],
                     "server_healthy_after": res["server_healthy_after"]}
    return res


def bad_requests(server: Server, max_model_len: int, vocab, reference_prompt, reference_tokens, max_tokens) -> dict:
    """Prompts beyond max_model_len get HTTP 400 (completion, streaming completion, chat); a prompt that fits but
    whose ``max_tokens`` would run past the limit gets vLLM 0.32's usual answer, ``max_tokens`` clamped to the
    remaining context (200, finish_reason ``length``). The server keeps serving (the reference request afterwards)."""
    import numpy as np
    import openai
    from openai import OpenAI

    rng = np.random.default_rng(123)
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=600)
    too_long = rng.integers(vocab[0], vocab[1], max_model_len + 1).tolist()
    nearly = rng.integers(vocab[0], vocab[1], max_model_len - 8).tolist()

    def completion_tokens(r):
        return r.usage.completion_tokens if getattr(r, "usage", None) else None

    cases = {
        "completion_prompt_over_limit": lambda: client.completions.create(
            model=server.model, prompt=too_long, max_tokens=1, temperature=0),
        "streaming_completion_prompt_over_limit": lambda: list(client.completions.create(
            model=server.model, prompt=too_long, max_tokens=1, temperature=0, stream=True)),
        "chat_prompt_over_limit": lambda: client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "token " * (max_model_len + 8)}],
            max_tokens=1, temperature=0),
        "prompt_plus_max_tokens_over_limit": lambda: client.completions.create(
            model=server.model, prompt=nearly, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}),
    }
    out = {}
    for name, call in cases.items():
        try:
            r = call()
            out[name] = {"status": 200, "message": None,
                         "completion_tokens": None if isinstance(r, list) else completion_tokens(r),
                         "finish_reason": None if isinstance(r, list) else r.choices[0].finish_reason}
        except openai.APIStatusError as e:
            out[name] = {"status": e.status_code, "message": str(e)[:240]}
        except Exception as e:
            out[name] = {"status": None, "message": repr(e)[:240]}
    after = asyncio.run(run_sequential(server.base_url, server.model, [reference_prompt], max_tokens))[0][0]
    res = {"requests": out, "server_healthy_after": server.healthy(),
           "reference_request_after_equal": after["tokens"] == reference_tokens}
    clamp = out["prompt_plus_max_tokens_over_limit"]
    res["checks"] = {"prompts_over_limit_get_400": all(v["status"] == 400 for k, v in out.items()
                                                       if k.endswith("prompt_over_limit")),
                     "max_tokens_clamped_to_context": clamp["status"] == 200 and clamp.get("completion_tokens") == 8
                     and clamp.get("finish_reason") == "length",
                     "server_healthy_after": res["server_healthy_after"],
                     "reference_request_after_equal": res["reference_request_after_equal"]}
    return res


BAD_SETTINGS = [
    ({"index_topk_pattern": "FSFS"}, "index_topk_pattern='FSFS'"),
    ({"index_topk_pattern": "SFFFFFFFFFFF"}, "index_topk_pattern='SFFFFFFFFFFF'"),
    ({"index_topk_freq": 0}, "index_topk_freq=0"),
    ({"index_cache_preset": "no-such-preset"}, "index_cache_preset='no-such-preset'"),
    ({"index_cache_preset": "glm5-searched-1of4"}, "index_cache_preset='glm5-searched-1of4'"),
]


def bad_settings(model: str, max_model_len: int, dtype: str, timeout: float, cases=BAD_SETTINGS) -> dict:
    """Each invalid IndexCache setting: ``serve`` exits non-zero, one ``ERROR:`` line naming key and value, and no
    engine process starts (so no weights are loaded)."""
    rows = []
    for overrides, expected in cases:
        cmd = [*CLI, "serve", model, "--port", str(free_port()), "--hf-overrides", json.dumps(overrides),
               "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(64 << 20), "--dtype", dtype]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = None, str(e.stdout or ""), str(e.stderr or "")
        errors = [line for line in stderr.splitlines() if line.startswith("ERROR: ")]
        rows.append({"hf_overrides": overrides, "exit_status": rc, "error_lines": errors,
                     "engine_started": "EngineCore" in stdout + stderr, "seconds": round(time.time() - t0, 1),
                     "ok": rc not in (0, None) and len(errors) == 1 and expected in errors[0]
                     and "EngineCore" not in stdout + stderr})
    return {"cases": rows, "checks": {"all_refused_before_loading": all(r["ok"] for r in rows)}}


def build_non_dsa_model(out: Path, tokenizer_from: str | None = None) -> Path:
    """A 2-layer random-weight ``LlamaForCausalLM`` (no lightning indexer); tokenizer copied from a DSA model."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    src = Path(tokenizer_from) if tokenizer_from else None
    vocab = json.loads((src / "config.json").read_text())["vocab_size"] if src else 512
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2,  # head_dim 64 (vLLM's CPU attention: >= 32)
                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    if src:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).exists():
                shutil.copy(src / name, out / name)
    return out


def non_dsa_model(model_dir: Path, log: Path, startup_timeout: float) -> dict:
    """``--attention-backend indexcache`` (the serve default) on a model without an indexer: vLLM's default CPU
    backend serves it, with exactly one warning."""
    import requests

    with Server(str(model_dir), log, ["--max-model-len", "512", "--kv-cache-memory-bytes", str(32 << 20),
                                      "--dtype", "float32", "--enforce-eager"], startup_timeout) as srv:
        r = requests.post(f"{srv.base_url}/v1/completions", timeout=300,
                          json={"model": srv.model, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0})
        status, n_tokens = r.status_code, (r.json().get("usage") or {}).get("completion_tokens")
    text = log.read_text()
    warnings = [line for line in text.splitlines() if NON_DSA_WARNING in line]
    backend = re.findall(r"Using (\w+) backend", text)
    res = {"status": status, "completion_tokens": n_tokens, "warning_lines": warnings, "backends_logged": backend,
           "startup_s": srv.startup_s}
    res["checks"] = {"serves": status == 200 and n_tokens == 4, "exactly_one_warning": len(warnings) == 1,
                     "no_indexcache_backend": "INDEXCACHE" not in backend}
    return res


def phase_search(root: Path, timeout: float) -> dict:
    """SIGKILL + resume gives the uninterrupted trajectory; corrupt / other-model / other-data states are refused
    with exit 2 and one ``error:`` line, and left unchanged."""
    import numpy as np

    from vllm_indexcache.tools.toy import build_toy_model

    root.mkdir(parents=True, exist_ok=True)
    model = build_toy_model(root / "toy5", num_layers=5, seed=0, tokenizer=False)
    other = build_toy_model(root / "other5", num_layers=5, seed=1, tokenizer=False)
    rng = np.random.default_rng(0)
    data, data2 = root / "calib.u16", root / "calib2.u16"
    rng.integers(3, 512, size=1000).astype(np.uint16).tofile(data)
    rng.integers(3, 512, size=1000).astype(np.uint16).tofile(data2)

    def cmd(m, d, out, *extra):
        return [*CLI, "search", str(m), "--data", str(d), "--retain", "1/8", "--out", str(out), "--seq-len", "80",
                "--num-seqs", "2", "--device", "cpu", "--objective", "lm-loss", "--probe", "none", "--no-progress",
                *extra]

    def state(out: Path) -> Path:
        return Path(str(out) + ".state.json")

    res: dict = {"model": "toy DeepseekV32, 5 layers, random weights", "retain": "1/8",
                 "calibration": "2 x 80 tokens"}
    ref_out = root / "ref" / "search.json"
    ref_out.parent.mkdir(exist_ok=True)
    t0 = time.time()
    subprocess.run(cmd(model, data, ref_out), check=True, capture_output=True, timeout=timeout)
    ref = json.loads(ref_out.read_text())
    res["reference"] = {"final_pattern": ref["final_pattern"], "steps": len(ref["steps"]),
                        "seconds": round(time.time() - t0, 1)}

    kill_out = root / "killed" / "search.json"
    kill_out.parent.mkdir(exist_ok=True)
    proc = subprocess.Popen(cmd(model, data, kill_out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = sigkill_after_first_step(proc, state(kill_out), timeout)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    parse_ok = True
    try:
        json.loads(state(kill_out).read_text())
    except (OSError, ValueError):
        parse_ok = False
    resumed_proc = subprocess.run(cmd(model, data, kill_out, "--resume"), capture_output=True, text=True,
                                  timeout=timeout)
    resumed = json.loads(kill_out.read_text()) if kill_out.exists() else {}
    res["sigkill_resume"] = {"killed_after_steps": killed_at, "exit_signal": -proc.returncode if proc.returncode
                             else None, "state_parseable_after_kill": parse_ok,
                             "resume_exit_status": resumed_proc.returncode,
                             "final_pattern": resumed.get("final_pattern"),
                             "identical_steps": resumed.get("steps") == ref["steps"]}

    refusals = {}
    corrupt_out = root / "corrupt" / "search.json"
    corrupt_out.parent.mkdir(exist_ok=True)
    state(corrupt_out).write_text(state(ref_out).read_text()[:300])
    for kind, (m, d, out) in {"corrupt": (model, data, corrupt_out), "other-model": (other, data, ref_out),
                              "other-data": (model, data2, ref_out)}.items():
        spath = state(out)
        before, mtime = spath.read_bytes(), spath.stat().st_mtime_ns
        p = subprocess.run(cmd(m, d, out, "--resume"), capture_output=True, text=True, timeout=timeout)
        err = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        refusals[kind] = {"exit_status": p.returncode, "error_lines": err,
                          "state_unchanged": spath.read_bytes() == before and spath.stat().st_mtime_ns == mtime}
    res["refused_states"] = refusals
    sk = res["sigkill_resume"]
    res["checks"] = {
        "killed_mid_search": killed_at is not None and sk["exit_signal"] == signal.SIGKILL,
        "resume_identical": sk["resume_exit_status"] == 0 and sk["identical_steps"]
        and sk["final_pattern"] == ref["final_pattern"],
        "bad_states_refused_unchanged": all(r["exit_status"] == 2 and len(r["error_lines"]) == 1
                                            and r["state_unchanged"] for r in refusals.values()),
    }
    return res


# ---------------------------------------------------------------------------------------------------------- main

"""``vllm-indexcache reliability --out DIR``: bounded load, KV-pressure, bad-input and search-fault checks.

Everything runs on loopback (``127.0.0.1``) against servers this command starts with ``vllm-indexcache serve`` and
stops again; nothing is downloaded. Phases (``--phases``, default all, in this order):

``load``
    Server A (large KV cache, IndexCache pattern ``--pattern``, prefix caching off so that no request reuses
    another's KV blocks). ``--requests`` streaming completions of mixed prompt lengths (``--min-prompt`` tokens up
    to ``max_model_len - max_tokens``, geometric spacing, random token ids, greedy, ``ignore_eos``) are sent all at
    once with the ``openai`` async client, together with ``--disconnects`` extra streaming clients that close their
    stream after a few tokens. Then the same ``--requests`` are sent again one at a time. Checks: every request
    completes with ``max_tokens`` tokens, no 5xx (no retries: ``max_retries=0``), the concurrent token ids equal the
    sequential ones request by request, and vLLM counts the disconnected requests as aborted.
``badinput``
    On server A: prompts beyond ``max_model_len`` (completion, streaming completion, chat) must get HTTP 400; a
    prompt that fits but whose ``max_tokens`` runs past the limit gets vLLM's usual clamp (200, ``length``); after
    them the server still answers and a reference request still gives its reference tokens. Then invalid IndexCache settings (``--hf-overrides`` pattern/freq, presets) must make
    ``vllm-indexcache serve`` exit non-zero before any engine starts, with one ``ERROR: key=value`` line; and a
    model without a lightning indexer (a tiny random ``LlamaForCausalLM`` written here) served with
    ``--attention-backend indexcache`` must serve with vLLM's default CPU backend and log exactly one warning.
``pressure``
    Server B, identical but with a KV cache of about ``max_model_len + --small-kv-extra-tokens`` tokens: the same
    requests at once must force preemptions (``vllm:num_preemptions_total`` on ``/metrics``) and still give the
    sequential tokens of server A.
``search``
    ``vllm-indexcache search`` on a 5-layer toy model: a run SIGKILLed after its first committed step and resumed
    ends with the same trajectory and pattern as an uninterrupted run; a corrupt state file and the state of another
    model or of other calibration data are refused (exit 2, one ``error:`` line) and left byte-for-byte unchanged.

Writes ``DIR/reliability.json`` (figures and pass/fail of every check) and the server logs under ``DIR/logs``;
exits 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "vllm_indexcache.cli"]
PHASES = ("load", "badinput", "pressure", "search")
NON_DSA_WARNING = "this model has no lightning indexer"


def default_pattern(model: str) -> str:
    """The model's own IndexCache pattern (its config.json, resolved as the plugin resolves it) when it sets one,
    else every 4th layer F from layer 0 (``uniform_pattern(N, 4, 1)``)."""
    from vllm_indexcache.config import KEYS, resolve_hf_config
    from vllm_indexcache.pattern_rules import uniform_pattern

    config = json.loads((Path(model) / "config.json").read_text())
    if any(config.get(k) is not None for k in KEYS):
        return resolve_hf_config(config)
    return uniform_pattern(config["num_hidden_layers"], 4, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_indexcache.commands.serve import default_model

    parser.add_argument("--out", required=True, help="output directory (reliability.json, logs/)")
    parser.add_argument("--model", default=None, help="DSA model directory (default: the shipped tiny-dsa)")
    parser.add_argument("--pattern", default=None, help="index_topk_pattern (default: the model's own pattern, "
                        "else F every 4th layer)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--requests", type=int, default=64, help="concurrent requests that must complete")
    parser.add_argument("--disconnects", type=int, default=8, help="extra clients that disconnect mid-stream")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens generated per request")
    parser.add_argument("--min-prompt", type=int, default=4, help="shortest prompt (tokens)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20, help="server A's KV cache")
    parser.add_argument("--small-kv-extra-tokens", type=int, default=512,
                        help="server B's KV cache holds about max_model_len + this many tokens")
    parser.add_argument("--request-timeout", type=float, default=1200.0, help="seconds, per request")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds, per server start")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(default_model=default_model)


# ------------------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``vllm-indexcache serve`` subprocess on 127.0.0.1 (own process group, stopped on exit); ``launcher``
    replaces ``vllm-indexcache serve`` (e.g. ``[".venv/bin/vllm", "serve"]``)."""

    def __init__(self, model: str, log: Path, args: list[str], startup_timeout: float = 600.0,
                 launcher: list[str] | None = None):
        self.model, self.log, self.port = model, Path(log), free_port()
        self.cmd = [*(launcher or [*CLI, "serve"]), model, "--port", str(self.port), *args]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        import requests

        self.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(self.log, "w") as fh:
            fh.write("$ " + " ".join(self.cmd) + "\n")
            fh.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        while True:
            try:
                if requests.get(f"{self.base_url}/v1/models", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.time() - t0 > self.startup_timeout:
                self.stop()
                raise RuntimeError(f"server did not start (see {self.log}):\n" + self.log.read_text()[-3000:])
            time.sleep(1)
        self.startup_s = round(time.time() - t0, 1)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.base_url}/health", timeout=10).ok
        except requests.RequestException:
            return False

    def metrics(self) -> dict[str, float]:
        """Sums of the ``vllm:*`` counters on ``/metrics`` that this check reads."""
        import requests

        text = requests.get(f"{self.base_url}/metrics", timeout=30).text
        out = {"num_preemptions": 0.0, "finished": 0.0}
        for line in text.splitlines():
            if line.startswith("vllm:num_preemptions_total"):
                out["num_preemptions"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:request_success_total"):  # finished requests (aborted ones not counted)
                out["finished"] += float(line.rsplit(" ", 1)[1])
        return out

    def aborted_requests(self) -> int:
        """Request ids in vLLM's ``Aborted request(s) …`` log lines (needs ``--enable-log-requests``)."""
        return sum(len(m.split(",")) for m in re.findall(r"Aborted request\(s\) (\S+?)\.?$", self.log.read_text(),
                                                       re.M))

    def kv_cache_tokens(self) -> int | None:
        m = re.search(r"KV cache size: ([\d,]+) tokens", self.log.read_text())
        return int(m.group(1).replace(",", "")) if m else None


def server_args(pattern: str, max_model_len: int, kv_bytes: int, dtype: str) -> list[str]:
    return ["--hf-overrides", json.dumps({"index_topk_pattern": pattern}), "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_bytes), "--dtype", dtype, "--no-enable-prefix-caching",
            "--enforce-eager", "--enable-log-requests"]


# ----------------------------------------------------------------------------------------------------- requests
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
                      num_attention_heads=2, num_key_value_heads=2,  # head_dim 64 (vLLM's CPU attention needs >= 32) max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
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


def sigkill_after_first_step(proc: subprocess.Popen, state_file: Path, timeout: float) -> int | None:
    """SIGKILL a running ``vllm-indexcache search`` as soon as its state file holds a committed step.

    Returns the number of committed steps at the kill, or None if the search ended (or ``timeout`` seconds passed)
    first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            n = len(json.loads(Path(state_file).read_text())["steps"])
        except (OSError, ValueError, KeyError):
            n = 0
        if n >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return n
        time.sleep(0.02)
    return None


def phase_search(root: Path, timeout: float) -> dict:
    """SIGKILL + resume gives the uninterrupted trajectory; corrupt / other-model / other-data states are refused
    with exit 2 and one ``error:`` line, and left unchanged."""
    import numpy as np

    from vllm_indexcache.toy import build_toy_model

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
def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model or args.default_model()).resolve())
    pattern = args.pattern or default_pattern(model)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        print(f"error: unknown phase(s) {sorted(unknown)}; choose from {', '.join(PHASES)}", file=sys.stderr)
        return 2
    mt, mml = args.max_tokens, args.max_model_len
    vocab = vocab_range(model)
    prompts = make_prompts(args.requests, args.min_prompt, mml - mt, vocab, args.seed)
    disc_prompts = make_prompts(args.disconnects, args.min_prompt, mml - mt, vocab, args.seed + 1)
    disc_after = [1 + (i * 3) % 8 for i in range(args.disconnects)]
    report = {"argv": sys.argv,
              "model": model, "pattern": pattern, "dtype": args.dtype, "max_model_len": mml, "phases": phases,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = out / "reliability.json"

    def save():
        path.write_text(json.dumps(report, indent=1) + "\n")

    t_all = time.time()
    reference = None
    try:
        if "load" in phases or "badinput" in phases or "pressure" in phases:
            with Server(model, out / "logs" / "server-large-kv.log",
                        server_args(pattern, mml, args.kv_cache_memory_bytes, args.dtype),
                        args.startup_timeout) as srv:
                report["server_large_kv"] = {"kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                                             "kv_cache_tokens": srv.kv_cache_tokens(), "startup_s": srv.startup_s}
                bytes_per_token = args.kv_cache_memory_bytes / srv.kv_cache_tokens()
                t0 = time.time()
                # disconnecting clients ask for all the context left, so vLLM normally sees them close mid-generation
                load, reference = phase_load(srv, prompts, disc_prompts, disc_after, mt, args.request_timeout,
                                             [mml - len(p) for p in disc_prompts])
                load["seconds"] = round(time.time() - t0, 1)
                report["load"] = load
                save()
                if "badinput" in phases:
                    i = min(range(len(prompts)), key=lambda j: len(prompts[j]))
                    report["bad_requests"] = bad_requests(srv, mml, vocab, prompts[i], reference[i]["tokens"], mt)
                    save()
            if "badinput" in phases:
                report["bad_settings"] = bad_settings(model, mml, args.dtype, args.startup_timeout)
                save()
                nd = build_non_dsa_model(out / "models" / "llama-no-indexer", model)
                report["non_dsa_model"] = non_dsa_model(nd, out / "logs" / "server-non-dsa.log", args.startup_timeout)
                save()
            if "pressure" in phases:
                small = int(bytes_per_token * (mml + args.small_kv_extra_tokens)) + 1
                with Server(model, out / "logs" / "server-small-kv.log", server_args(pattern, mml, small, args.dtype),
                            args.startup_timeout) as srv:
                    t0 = time.time()
                    pressure = phase_pressure(srv, prompts, reference, mt, args.request_timeout)
                    pressure["kv_cache_memory_bytes"] = small
                    pressure["seconds"] = round(time.time() - t0, 1)
                    report["pressure"] = pressure
                save()
        if "search" in phases:
            t0 = time.time()
            report["search_faults"] = phase_search(out / "search", args.startup_timeout)
            report["search_faults"]["seconds"] = round(time.time() - t0, 1)
    except Exception as e:  # report what ran, then fail
        report["fatal_error"] = repr(e)[:2000]
    report["total_seconds"] = round(time.time() - t_all, 1)
    checks = {f"{section}.{name}": ok for section, body in report.items() if isinstance(body, dict)
              for name, ok in (body.get("checks") or {}).items()}
    report["checks"] = checks
    report["all_passed"] = bool(checks) and all(checks.values()) and "fatal_error" not in report
    save()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if "fatal_error" in report:
        print(f"FAIL  {report['fatal_error'][:500]}")
    print(f"{'all passed' if report['all_passed'] else 'FAILED'}; figures in {path}")
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m vllm_indexcache.reliability")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

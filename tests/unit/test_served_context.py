"""The shipped model's default reply length and served context match its card; a user can still ask for more
(issue 36, item 4). The card (examples/models/tiny-dsa/README.md): trained at 2048 tokens, 0 % retrieval at 4K."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from vllm_indexcache.vllm_glue.served_context import beyond_positions, beyond_trained_context

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "models" / "tiny-dsa"


def test_shipped_model_declares_its_trained_context_and_a_default_reply_length():
    config = json.loads((TINY / "config.json").read_text())
    generation = json.loads((TINY / "generation_config.json").read_text())
    assert config["max_seq_len"] == 2048 and config["max_position_embeddings"] == 8192
    assert 0 < generation["max_new_tokens"] <= 512


def test_beyond_trained_context():
    dsa = SimpleNamespace(index_topk=128, max_seq_len=2048, max_position_embeddings=8192)
    assert beyond_trained_context(dsa, None) is None and beyond_trained_context(dsa, -1) is None
    assert beyond_trained_context(dsa, 2048) is None           # within: vLLM's own path
    assert beyond_trained_context(dsa, 8193) is None           # beyond the positions: vLLM refuses
    assert "max_seq_len=2048" in beyond_trained_context(dsa, 4096)
    plain = SimpleNamespace(max_seq_len=2048, max_position_embeddings=8192)
    assert beyond_trained_context(plain, 4096) is None          # not a DSA model: not this plugin's business


def test_beyond_positions_is_one_line(monkeypatch):
    dsa = SimpleNamespace(index_topk=128, max_seq_len=2048, max_position_embeddings=8192)
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    assert beyond_positions(dsa, 8192) is None and beyond_positions(dsa, None) is None
    err = str(beyond_positions(dsa, 9000))
    assert err.startswith("--max-model-len=9000:") and "max_position_embeddings=8192" in err and "\n" not in err
    assert beyond_positions(SimpleNamespace(max_seq_len=2048, max_position_embeddings=8192), 9000) is None
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")      # the user asked vLLM to allow it
    assert beyond_positions(dsa, 9000) is None


def test_vllm_serves_2048_tokens_and_256_new_tokens_by_default_and_more_when_asked():
    code = f"""
import json, vllm_indexcache
vllm_indexcache.register()
from vllm.config import ModelConfig
m = ModelConfig(model={str(TINY)!r})
asked = ModelConfig(model={str(TINY)!r}, max_model_len=4096)
try:
    ModelConfig(model={str(TINY)!r}, max_model_len=9000)
    refused = False
except Exception as e:
    refused = "--max-model-len=9000: beyond the model's max_position_embeddings=8192" in str(e)
print(json.dumps([m.max_model_len, m.get_diff_sampling_param().get("max_tokens"), asked.max_model_len, refused]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2048, 256, 4096, True]

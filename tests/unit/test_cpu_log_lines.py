"""vLLM's CPU line "forcing chunked prefill and prefix caching to be disabled" is false for the INDEXCACHE backend
(the plugin turns both back on): it is replaced by a line saying what the engine does (issue 36, item 5). Builds
the engine configuration only (API-server side); no engine starts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "models" / "tiny-dsa"


def test_engine_config_log_says_what_the_engine_does():
    code = f"""
import json, torch, vllm_indexcache
torch.cpu._is_amx_tile_supported = lambda: False    # a CPU without AMX, where vLLM forces them off
vllm_indexcache.register()
from vllm.engine.arg_utils import EngineArgs
c = EngineArgs(model={str(TINY)!r}, attention_backend="indexcache",
               kv_cache_memory_bytes=1 << 28).create_engine_config()
print("RESULT", json.dumps([c.scheduler_config.enable_chunked_prefill, c.cache_config.enable_prefix_caching]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1]
    assert json.loads(result.split(" ", 1)[1]) == [True, True]
    assert "forcing chunked prefill and prefix caching to be disabled" not in text
    assert ("vLLM's CPU limit for MLA (no chunked prefill, no prefix caching) does not apply to the INDEXCACHE "
                "backend: chunked prefill on, prefix caching on") in text


def test_bench_engine_warms_up_without_tracebacks():
    """``vllm-indexcache bench``'s engine arguments: vLLM's renderer warm-up (run by ``LLM(...)``) must succeed."""
    code = f"""
import vllm_indexcache
vllm_indexcache.register()
from vllm.engine.arg_utils import EngineArgs
from vllm.renderers import ChatParams, renderer_from_config
from vllm_indexcache.tools.bench.measure import bench_engine_kwargs
kwargs = bench_engine_kwargs(512, kv_cache_memory_bytes=1 << 28)
c = EngineArgs(model={str(TINY)!r}, attention_backend="indexcache", **kwargs).create_engine_config()
renderer_from_config(c).warmup(ChatParams())
print("WARMED UP")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "WARMED UP" in out.stdout, text[-3000:]
    assert "Traceback" not in text and "Tokenizer not available" not in text, text[-3000:]

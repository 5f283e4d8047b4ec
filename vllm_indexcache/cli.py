"""The ``vllm-indexcache`` command.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported only when their subcommand runs, so ``vllm-indexcache pattern`` never imports vLLM or torch
training code. ``serve`` and ``pattern`` belong to the serving plugin; the others to the toolkit
(:mod:`vllm_indexcache.tools`), which needs the ``tools`` extra.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("vllm_indexcache.commands.serve", "vllm serve with the INDEXCACHE backend (default: the shipped model)"),
    "pattern": ("vllm_indexcache.commands.pattern", "resolve and validate an IndexCache configuration for a model"),
    "build-toy": ("vllm_indexcache.tools.toy", "write a small random-weight DSA model (for tests and smoke runs): "
                  "DeepSeek-V3.2, GLM-5, or DeepSeek-V4 in transformers' or DeepSeek's layout"),
    "train": ("vllm_indexcache.tools.training.cli", "train a small DSA model: dense, indexer warm-up, sparse stages"),
    "eval": ("vllm_indexcache.tools.training.evaluate", "held-out LM loss and retrieval accuracy of a DSA model"),
    "distill": ("vllm_indexcache.tools.distill.cli",
                "training-aware IndexCache: multi-layer indexer distillation (Eq. 1)"),
    "search": ("vllm_indexcache.tools.search.cli", "greedy IndexCache layer search (Algorithm 1), resumable"),
    "bench": ("vllm_indexcache.tools.bench.cli",
              "end-to-end speed benchmark through vLLM: TTFT, TPOT, indexer share, KV capacity"),
    "analyze": ("vllm_indexcache.tools.analyze", "cross-layer top-k overlap heatmap and per-layer indexer time share"),
    "reliability": ("vllm_indexcache.tools.reliability",
                    "bounded load, KV-pressure, bad-input and search-fault checks"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vllm-indexcache`` console script; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-indexcache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if not COMMANDS[name][0].startswith("vllm_indexcache.tools.") or (e.name or "").startswith("vllm_indexcache"):
            raise
        print(f"vllm-indexcache {name}: needs the toolkit's dependencies ({e.name} is missing): "
              "pip install 'vllm-indexcache[tools]'", file=sys.stderr)
        return 2
    if hasattr(module, "main_argv"):  # commands that hand their arguments to vLLM's own parser
        return int(module.main_argv(argv[1:]) or 0)
    cmd_parser = argparse.ArgumentParser(prog=f"vllm-indexcache {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

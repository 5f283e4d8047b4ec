"""DeepSeek-V4 (``DeepseekV4ForCausalLM``): only the compressed-sparse-attention (CSA) layers own a lightning indexer.

Layer types, per decoder layer (transformers 5.19 ``models/deepseek_v4/configuration_deepseek_v4.py``): sliding-window
only (compress ratio 0), CSA (ratio 4: compressed entries of 4 tokens, a lightning indexer picks ``index_topk`` of
them) and HCA (ratio 128: dense over heavily compressed entries, no indexer). DeepSeek's ``config.json`` (the layout
vLLM 0.32 reads, ``vllm/transformers_utils/configs/deepseek_v4.py``) lists ``compress_ratios``; transformers'
layout lists ``layer_types`` (``"compressed_sparse_attention"`` for CSA). A pattern has one F/S per CSA layer, in
layer order; every CSA layer compresses the same token spans, so the top-k entry ids of an F CSA layer index an S
CSA layer's own compressed cache.

transformers: ``model.layers[i].self_attn.compressor.indexer`` (``DeepseekV4Indexer``, inside
``DeepseekV4CSACompressor``), no cross-layer reuse: the reference overrides the indexer's ``forward``. vLLM 0.32
(``vllm/models/deepseek_v4/attention.py``): ``model.layers[i].attn.indexer``, built where ``compress_ratio == 4``;
vLLM has no reuse key for V4 (the plugin's glue builds none on S layers, ``vllm_glue/cpu/deepseek_v4``).
MTP layers (``num_nextn_predict_layers``; DeepSeek's ``compress_ratios`` may list them after the backbone) are not
part of the pattern.
"""
from __future__ import annotations

from typing import Any

from .base import Family, FamilyError, backbone_layers, config_value

#: DeepSeek's ``compress_ratios`` entry of a CSA layer (vLLM builds an indexer exactly there).
CSA_RATIO = 4
#: transformers' ``layer_types`` entry of a CSA layer.
CSA_LAYER_TYPE = "compressed_sparse_attention"


def csa_layers(config: Any) -> list[int]:
    """Decoder layer ids of the CSA layers of a DeepSeek-V4 config, MTP layers excluded.

    Reads DeepSeek's ``compress_ratios`` (entries ``== 4``) when present, else transformers' ``layer_types``
    (entries ``"compressed_sparse_attention"``); a ``PretrainedConfig`` or a ``config.json`` dict.

    Raises:
        FamilyError: neither key, a list shorter than ``num_hidden_layers``, or a bad layer count (one line).
    """
    n = backbone_layers(config)
    ratios = config_value(config, "compress_ratios")
    if ratios is not None:
        key, values, is_csa = "compress_ratios", list(ratios), (lambda r: r == CSA_RATIO)
    elif (types := config_value(config, "layer_types")) is not None:
        key, values, is_csa = "layer_types", list(types), (lambda t: t == CSA_LAYER_TYPE)
    else:
        raise FamilyError("DeepseekV4ForCausalLM config has neither compress_ratios (DeepSeek's layout) nor "
                          "layer_types (transformers'): cannot tell its CSA layers")
    if len(values) < n:
        raise FamilyError(f"{key} has {len(values)} entries, fewer than num_hidden_layers={n}")
    return [i for i, v in enumerate(values[:n]) if is_csa(v)]


FAMILY = Family(
    architecture="DeepseekV4ForCausalLM",
    name="DeepseekV4",
    model_type="deepseek_v4",
    indexer_layers=csa_layers,
    hf_reuse="override",
    hf_indexer="compressor.indexer",
    vllm_attention="attn",
    vllm_reuse_key=None,
)


# --- transformers' checkpoint layout → DeepSeek's (the one vLLM 0.32 reads) ---------------------------------------
# transformers 5.19 ``DeepseekV4ForCausalLM.save_pretrained`` writes ``layer_types`` / ``mlp_layer_types`` /
# ``compress_rates`` / nested ``rope_parameters`` and ``model.``-prefixed weight names; vLLM 0.32
# (``vllm/transformers_utils/configs/deepseek_v4.py``, ``vllm/models/deepseek_v4/cpu/model.py``) reads DeepSeek's
# ``compress_ratios`` / ``num_hash_layers`` / ``qk_rope_head_dim`` / ``topk_method`` / flat rope fields and names.

#: transformers' layer type → DeepSeek's ``compress_ratios`` entry (transformers ``configuration_deepseek_v4.py``;
#: a config's ``compress_rates`` overrides the CSA/HCA ratios).
LAYER_TYPE_RATIO = {"sliding_attention": 0, CSA_LAYER_TYPE: CSA_RATIO, "heavily_compressed_attention": 128}

#: transformers-only config fields that DeepSeek's layout replaces (vLLM refuses ``mlp_layer_types`` with
#: ``hash_moe`` entries, trips over the nested ``rope_parameters`` and reads none of the others).
TRANSFORMERS_ONLY_KEYS = ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor",
                          "rope_parameters")

#: transformers' defaults where its config omits a field that vLLM needs (``DeepseekV4Config`` class attributes).
TRANSFORMERS_PARTIAL_ROTARY = 64 / 512
TRANSFORMERS_COMPRESS_ROPE_THETA = 160000.0

#: Weight names, transformers 5.19 ``save_pretrained`` → DeepSeek's layout: ``(regex, replacement)`` applied in
#: order with ``re.sub`` (vLLM's ``WeightsMapper.orig_to_new_regex`` applies them the same way). ``attn.norm`` is the
#: main attention's KV norm only (the compressors' ``norm`` keeps its name). DeepSeek's own names match none.
TRANSFORMERS_WEIGHT_RENAMES = (
    (r"^model\.", ""),
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"^(layers\.\d+\.attn)\.norm\.weight$", r"\1.kv_norm.weight"),
)

#: Weight-name suffixes vLLM holds as int32 (``DeepseekV4MoE.gate.tid2eid``, ``hash_indices_dtype``); transformers
#: saves them as int64.
INT32_WEIGHTS = ("tid2eid",)


def deepseek_weight_name(name: str) -> str:
    """DeepSeek's (vLLM's checkpoint) name of a weight that transformers 5.19 ``save_pretrained`` wrote as ``name``;
    DeepSeek's own names come back unchanged (:data:`TRANSFORMERS_WEIGHT_RENAMES`).

    >>> deepseek_weight_name("model.layers.3.attn.norm.weight")
    'layers.3.attn.kv_norm.weight'
    """
    import re

    for pattern, repl in TRANSFORMERS_WEIGHT_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def is_transformers_layout(data: dict) -> bool:
    """Whether a ``config.json`` dict carries transformers' V4 fields (:data:`TRANSFORMERS_ONLY_KEYS` other than
    ``partial_rotary_factor``, which alone says nothing)."""
    return any(data.get(k) is not None for k in ("layer_types", "mlp_layer_types", "compress_rates")) or (
        isinstance(data.get("rope_parameters"), dict) and "main" in data["rope_parameters"])


def _derived(data: dict) -> list[tuple[str, Any, str]]:
    """``[(DeepSeek key, value, source)]`` implied by transformers' fields of ``data`` (module section above)."""
    out: list[tuple[str, Any, str]] = []
    n = data.get("num_hidden_layers")
    if data.get("layer_types") is not None:
        rates = {**{t: r for t, r in LAYER_TYPE_RATIO.items() if r}, **(data.get("compress_rates") or {})}
        rates["sliding_attention"] = 0
        types = list(data["layer_types"])[:n] if isinstance(n, int) else list(data["layer_types"])
        try:
            out.append(("compress_ratios", [rates[t] for t in types], "layer_types"))
        except KeyError as e:
            raise FamilyError(f"layer_types: {e.args[0]!r} has no compress ratio (expected one of "
                              f"{sorted(rates)})") from None
    if data.get("mlp_layer_types") is not None:
        mlp = list(data["mlp_layer_types"])
        n_hash = next((i for i, t in enumerate(mlp) if t != "hash_moe"), len(mlp))
        if "hash_moe" in mlp[n_hash:]:
            raise FamilyError(f"mlp_layer_types: hash_moe layers must come first for DeepSeek's num_hash_layers, "
                              f"got {mlp}")
        out.append(("num_hash_layers", n_hash, "mlp_layer_types"))
        # transformers' score-routed ("moe") layers add e_score_correction_bias before the top-k; vLLM builds and
        # loads that bias only for topk_method == "noaux_tc" (cpu/model.py DeepseekV4MoE)
        out.append(("topk_method", "noaux_tc", "mlp_layer_types"))
    if data.get("head_dim") is not None:
        factor = data.get("partial_rotary_factor")
        if factor is not None:
            out.append(("qk_rope_head_dim", int(data["head_dim"] * factor), "head_dim × partial_rotary_factor"))
        elif data.get("qk_rope_head_dim") is None:
            out.append(("qk_rope_head_dim", int(data["head_dim"] * TRANSFORMERS_PARTIAL_ROTARY),
                        "head_dim × 64/512 (transformers' default partial_rotary_factor)"))
    rope = data.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("main"), dict):
        main, compress = rope["main"], dict(rope.get("compress") or {})
        if main.get("rope_type", "default") != "default":
            raise FamilyError("rope_parameters.main: only the default rope is used on sliding-window layers, got "
                              f"rope_type={main.get('rope_type')!r}")
        if "rope_theta" in main:
            out.append(("rope_theta", main["rope_theta"], "rope_parameters.main"))
        if "rope_theta" in compress:
            out.append(("compress_rope_theta", compress["rope_theta"], "rope_parameters.compress"))
        if compress.get("rope_type", "default") != "default":
            # YaRN is applied to CSA/HCA layers only; DeepSeek's flat rope_scaling carries it
            scaling = {k: v for k, v in compress.items() if k not in ("rope_theta", "partial_rotary_factor")}
            out.append(("rope_scaling", {**scaling, "type": scaling["rope_type"]}, "rope_parameters.compress"))
    if data.get("compress_rope_theta") is None and not any(k == "compress_rope_theta" for k, _, _ in out):
        # vLLM's config has no default for it (models/deepseek_v4/common/rope.py reads it)
        out.append(("compress_rope_theta", TRANSFORMERS_COMPRESS_ROPE_THETA, "transformers' default"))
    return out


def _agrees(key: str, have: Any, want: Any) -> bool:
    if key == "compress_ratios":   # DeepSeek's list may go on with MTP layers' entries
        return list(have)[: len(want)] == want
    if key == "rope_scaling":
        keys = set(want) - {"type", "rope_type"}
        return isinstance(have, dict) and all(have.get(k) == want[k] for k in keys) and (
            have.get("rope_type", have.get("type")) == want["rope_type"])
    return have == want


def deepseek_config_fields(data: dict) -> tuple[dict, list[tuple[str, Any, str]]]:
    """DeepSeek's ``config.json`` fields of a DeepSeek-V4 config in transformers 5.19's layout, and what was filled.

    Derives ``compress_ratios`` (from ``layer_types`` and ``compress_rates``), ``num_hash_layers`` (the leading
    ``hash_moe`` entries of ``mlp_layer_types``), ``topk_method: noaux_tc``, ``qk_rope_head_dim`` (``head_dim ×
    partial_rotary_factor``), ``rope_theta`` / ``compress_rope_theta`` / a flat ``rope_scaling`` (from the nested
    ``rope_parameters``), then drops :data:`TRANSFORMERS_ONLY_KEYS`. A key already present in DeepSeek's form is
    kept when it agrees with transformers' form. A config without transformers' fields comes back unchanged.
    Source: transformers ``models/deepseek_v4/configuration_deepseek_v4.py`` (its ``__post_init__`` does the reverse
    for legacy keys); vLLM ``transformers_utils/configs/deepseek_v4.py`` and ``models/deepseek_v4/``.

    Args:
        data: a ``config.json`` dict (not modified).

    Returns:
        ``(DeepSeek-layout dict, [(key, value, source)] for every key that was absent and is now filled)``.

    Raises:
        FamilyError: one line, when both forms are present and contradict (naming both keys and values); a layer
            type without a compress ratio; ``hash_moe`` layers that are not a prefix of ``mlp_layer_types``; a
            non-default rope on sliding-window layers.
    """
    if not is_transformers_layout(data):
        return dict(data), []
    out = {k: v for k, v in data.items() if k not in TRANSFORMERS_ONLY_KEYS}
    filled = []
    for key, value, source in _derived(data):
        if data.get(key) is None:
            out[key] = value
            filled.append((key, value, source))
        elif not _agrees(key, data[key], value):
            raise FamilyError(f"DeepseekV4 config: {key}={data[key]!r} contradicts {source} (which gives "
                              f"{value!r}); remove one of them")
    return out, filled


def deepseek_config(data: dict) -> dict:
    """:func:`deepseek_config_fields` without the list of filled keys."""
    return deepseek_config_fields(data)[0]

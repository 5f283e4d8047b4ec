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

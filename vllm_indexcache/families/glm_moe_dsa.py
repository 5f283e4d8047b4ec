"""GLM-5 (``GlmMoeDsaForCausalLM``): every backbone layer owns a lightning indexer.

transformers 5.19 ``models/glm_moe_dsa/modeling_glm_moe_dsa.py`` reuses natively: an attention whose ``indexer`` is
``None`` (``indexer_types[i] == "shared"``) takes the ``prev_topk_indices`` handed up by the previous layer; its
indexer rotates interleaved. vLLM 0.32 builds it with the DeepSeek-V2 classes (``deepseek_v2.py``), same keys as V3.2.
"""
from __future__ import annotations

from .base import Family, every_backbone_layer

FAMILY = Family(
    architecture="GlmMoeDsaForCausalLM",
    name="GlmMoeDsa",
    model_type="glm_moe_dsa",
    indexer_layers=every_backbone_layer,
    hf_reuse="native",
    hf_reuse_key="indexer_types",
    # same router as DeepSeek-V3.2 (DeepseekV32TopkRouter); GlmMoeDsaIndexer rotates interleaved.
    implied={"scoring_func": "sigmoid", "topk_method": "noaux_tc", "indexer_rope_interleave": True},
)

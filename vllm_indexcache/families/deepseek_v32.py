"""DeepSeek-V3.2 (``DeepseekV32ForCausalLM``): every backbone layer owns a lightning indexer.

transformers 5.19 ``models/deepseek_v32/modeling_deepseek_v32.py``: ``model.layers[i].self_attn.indexer``
(``DeepseekV32Indexer``), no cross-layer reuse (the reference overrides the indexer's ``forward``); its indexer
rotates NeoX-style. vLLM 0.32 ``model_executor/models/deepseek_v2.py``: ``model.layers[i].self_attn.indexer``,
``None`` on layers ``index_topk_pattern`` (or ``index_topk_freq``/``index_skip_topk_offset``) makes S.
"""
from __future__ import annotations

from .base import Family, every_backbone_layer

FAMILY = Family(
    architecture="DeepseekV32ForCausalLM",
    name="DeepseekV32",
    model_type="deepseek_v32",
    indexer_layers=every_backbone_layer,
    hf_reuse="override",
    # transformers' DeepseekV32TopkRouter: sigmoid scores, e_score_correction_bias always added (vLLM builds the
    # bias only for noaux_tc); DeepseekV32Indexer rotates NeoX-style (vLLM: unless indexer_rope_interleave).
    implied={"scoring_func": "sigmoid", "topk_method": "noaux_tc", "indexer_rope_interleave": False},
    # vllm/config/speculative.py hf_config_override: DeepSeek-V3.2's and GLM-5's drafts (model_type deepseek_mtp).
    mtp_architectures=("DeepseekV32MTPModel", "DeepSeekMTPModel"),
)

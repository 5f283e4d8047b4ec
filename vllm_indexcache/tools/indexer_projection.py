"""The lightning indexer's q, k and head weights from a transformers indexer module: the one projection that the
reference (:func:`vllm_indexcache.tools.reference.indexer_qkw`), the training recipe
(:func:`vllm_indexcache.tools.training.indexer_loss.indexer_scores`) and the distillation
(:func:`vllm_indexcache.tools.distill.loss.indexer_scores`) call.

Maths (DeepSeek-V3.2 report, arXiv 2512.02556, §2.1; transformers 5.19 ``models/deepseek_v32/modeling_deepseek_v32.py``
``DeepseekV32Indexer.forward`` and ``models/glm_moe_dsa/modeling_glm_moe_dsa.py`` ``GlmMoeDsaIndexer.forward``)::

    q[t, h] = RoPE(wq_b(q_resid[t]))[h]             # [H, D], q_resid = q_a_layernorm(q_a_proj(x))
    k[s]    = RoPE(LayerNorm(wk(x[s])))             # [D], one key head shared by all indexer heads
    w[t, h] = weights_proj(x[t])[h] · H^-½ · D^-½   # softmax_scale D^-½ folded into w (ReLU(a·z) = a·ReLU(z), a > 0)
    I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s])

RoPE acts on the *first* ``qk_rope_head_dim`` dims of q and k; its layout comes from the module's class:
``DeepseekV32Indexer`` rotates NeoX-style (half split, transformers' ``apply_rotary_pos_emb``), ``GlmMoeDsaIndexer``
interleaved (``apply_rotary_pos_emb_interleave``, which writes its output de-interleaved: a fixed permutation of
the rotated lanes, dot products unchanged).

Precision: the projections and RoPE run in the module's dtype, as in transformers; q, k and w are returned in
``promote_types(hidden_states.dtype, float32)`` — float32 for bf16/fp16/fp32 inputs (transformers scores in float32),
float64 for float64 inputs (the distillation's gradient checks).

vLLM's ``deepseek_v2.Indexer`` (fused ``wk_weights_proj``, vLLM's rotary module) has its own projection:
:mod:`vllm_indexcache.vllm_glue.indexer_projection`, on the serving path.
"""
from __future__ import annotations

import torch

__all__ = ["indexer_qkw", "rope_layout"]


def rope_layout(indexer) -> str:
    """``"neox"`` for a transformers ``DeepseekV32Indexer``, ``"interleave"`` for a ``GlmMoeDsaIndexer``.

    Raises:
        TypeError: another class.
    """
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as ds
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as glm

    if isinstance(indexer, glm.GlmMoeDsaIndexer):
        return "interleave"
    if isinstance(indexer, ds.DeepseekV32Indexer):
        return "neox"
    raise TypeError(f"{type(indexer).__name__}: expected DeepseekV32Indexer or GlmMoeDsaIndexer")


def indexer_qkw(indexer, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and head weights of a transformers indexer for a batch of sequences (differentiable w.r.t. the module's
    parameters and its inputs; the caller detaches what it wants constant).

    Args:
        indexer: a ``DeepseekV32Indexer`` or ``GlmMoeDsaIndexer`` (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``,
            ``n_heads``, ``head_dim``, ``qk_rope_head_dim``, ``softmax_scale``).
        hidden_states: ``[B, T, hidden_size]`` the attention block's input (after ``input_layernorm``).
        q_resid: ``[B, T, q_lora_rank]`` MLA's ``q_a_layernorm(q_a_proj(hidden_states))``.
        position_embeddings: ``(cos, sin)`` from the model's rotary embedding, ``[B or 1, T, qk_rope_head_dim]``.

    Returns:
        ``(q [B, T, H, D], k [B, T, D], w [B, T, H])``, RoPE applied, ``w`` including ``H^-½ · D^-½``; all three in
        ``promote_types(hidden_states.dtype, float32)``.

    Raises:
        TypeError: an indexer of another class (:func:`rope_layout`).
    """
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as ds
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as glm

    rope = glm.apply_rotary_pos_emb_interleave if rope_layout(indexer) == "interleave" else ds.apply_rotary_pos_emb
    B, T, _ = hidden_states.shape
    H, D, R = indexer.n_heads, indexer.head_dim, indexer.qk_rope_head_dim
    dt = torch.promote_types(hidden_states.dtype, torch.float32)
    cos, sin = position_embeddings
    q = indexer.wq_b(q_resid).view(B, T, H, D)
    k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)                       # [B, T, 1, D]
    q_rot, k_rot = rope(q[..., :R], k[..., :R], cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q[..., R:]], dim=-1).to(dt)
    k = torch.cat([k_rot, k[..., R:]], dim=-1).squeeze(2).to(dt)
    w = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).to(dt)
    return q, k, w * (H ** -0.5) * indexer.softmax_scale

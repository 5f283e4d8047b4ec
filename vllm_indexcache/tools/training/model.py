"""Functional training forward over transformers' ``DeepseekV32ForCausalLM`` modules, in three modes.

The forward reads each module's parameters and reproduces transformers' maths (MLA with interleaved RoPE on the
last ``qk_rope_head_dim`` query/key dims, DSA indexer, RMSNorm pre-norm blocks), so a model trained here is a
plain transformers checkpoint that vLLM and :mod:`vllm_indexcache.tools.reference` load unchanged. It differs only in
*how* attention runs, to be trainable and fast:

* ``dense``  — causal attention over all keys (``scaled_dot_product_attention``, flash on GPU); indexer not run.
* ``warmup`` — main model frozen (no graph), dense attention; per layer the indexer KL against the main attention
  over all visible keys (:func:`~.indexer_loss.indexer_kl`). Only the indexer learns.
* ``sparse`` — attention restricted to the indexer's top-k keys (``index_topk``) in every layer; the indexer sees
  detached inputs and learns only from the KL restricted to the selected keys; the rest of the model learns only
  from the LM loss.

:func:`dsa_forward` returns the LM loss (or None in warm-up) and the mean indexer KL over layers (or None).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .indexer_loss import causal_mask, indexer_kl, indexer_scores, main_attention_target, topk_mask

MODES = ("dense", "warmup", "sparse")


def _rope_main(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' ``apply_rotary_pos_emb_interleave`` for ``[B, H, T, R]`` tensors (cos/sin ``[B, T, R]``)."""
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    return (torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1),
            torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1))


def _qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """MLA projections of ``DeepseekV32Attention``: returns ``q_resid`` ``[B,T,q_lora]``, query/key ``[B,H,T,Dqk]``
    and value ``[B,H,T,Dv]``."""
    b, t, _ = x.shape
    q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
    q = attn.q_b_proj(q_resid).view(b, t, -1, attn.qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    kv_pass, k_rot = torch.split(attn.kv_a_proj_with_mqa(x), [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(kv_pass)).view(b, t, -1, attn.qk_nope_head_dim + attn.v_head_dim)
    k_nope, v = torch.split(kv.transpose(1, 2), [attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
    q_rot, k_rot = _rope_main(q_rot, k_rot.view(b, 1, t, -1), cos, sin)
    query = torch.cat([q_pass, q_rot], dim=-1)
    key = torch.cat([k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
    return q_resid, query, key, v


def _attend(query, key, value, scale, mask: torch.Tensor | None):
    """SDPA; ``mask`` None = causal, else bool ``[B, T, S]`` (True = attend)."""
    if mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.unsqueeze(1), scale=scale)
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


def attention_forward(attn, x: torch.Tensor, cos, sin, mode: str, topk: int):
    """One ``DeepseekV32Attention`` block in ``mode``; returns ``(output [B,T,hidden], kl or None)``."""
    t = x.shape[1]
    causal = causal_mask(t, x.device)
    if mode == "dense":
        _, query, key, value = _qkv(attn, x, cos, sin)
        return attn.o_proj(_attend(query, key, value, attn.scaling, None)), None
    if mode == "warmup":
        with torch.no_grad():
            q_resid, query, key, value = _qkv(attn, x, cos, sin)
            out = attn.o_proj(_attend(query, key, value, attn.scaling, None))
            target = main_attention_target(query, key, attn.scaling, causal)
        scores = indexer_scores(attn.indexer, x.detach(), q_resid.detach(), cos, sin, mask=causal)
        return out, indexer_kl(target, scores, causal)
    if mode == "sparse":
        q_resid, query, key, value = _qkv(attn, x, cos, sin)
        scores = indexer_scores(attn.indexer, x.detach(), q_resid.detach(), cos, sin, mask=causal)
        sel = topk_mask(scores, topk, causal)
        out = attn.o_proj(_attend(query, key, value, attn.scaling, sel))
        target = main_attention_target(query.detach(), key.detach(), attn.scaling, sel)
        return out, indexer_kl(target, scores, sel)
    raise ValueError(f"mode={mode!r}: expected one of {MODES}")


@dataclass
class ForwardOut:
    loss: torch.Tensor | None   #: mean next-token cross-entropy (None in warm-up)
    kl: torch.Tensor | None     #: mean over layers of the indexer KL (None in dense mode)


def dsa_forward(model, input_ids: torch.Tensor, labels: torch.Tensor | None, mode: str,
                topk: int | None = None) -> ForwardOut:
    """Run a ``DeepseekV32ForCausalLM`` on ``input_ids`` ``[B, T]`` in ``mode`` (see module docstring).

    ``labels`` ``[B, T]`` are the next tokens (already shifted); ``topk`` defaults to ``config.index_topk``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    cfg = model.config
    topk = cfg.index_topk if topk is None else topk
    m = model.model
    t = input_ids.shape[1]
    ctx = torch.no_grad() if mode == "warmup" else torch.enable_grad()
    kls = []
    with ctx:
        x = m.embed_tokens(input_ids)
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0)
        cos, sin = m.rotary_emb(x, pos)
    for layer in m.layers[: cfg.num_hidden_layers]:
        with ctx:
            h = layer.input_layernorm(x)
        a, kl = attention_forward(layer.self_attn, h, cos, sin, mode, topk)
        if kl is not None:
            kls.append(kl)
        with ctx:
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    kl = torch.stack(kls).mean() if kls else None
    if mode == "warmup" or labels is None:
        return ForwardOut(None, kl)
    logits = model.lm_head(m.norm(x))
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return ForwardOut(loss, kl)

"""Lightning-indexer scores *with gradient* and the DSA indexer distillation losses.

transformers' ``DeepseekV32Indexer.forward`` runs under ``@torch.no_grad()`` and returns only top-k indices, so
training needs its own score computation. :func:`indexer_scores` re-implements that forward functionally, reading
the module's own parameters (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``), with the same maths
(transformers 5.19 ``models/deepseek_v32/modeling_deepseek_v32.py``; DeepSeek-V3.2 report arXiv 2512.02556)::

    q[t, h] = RoPE(wq_b(q_resid[t]))[h]                 # [H_I, D_I], q_resid = q_a_layernorm(q_a_proj(x))
    k[s]    = RoPE(LayerNorm(wk(x[s])))                 # [D_I], one key head shared by all indexer heads
    w[t, h] = weights_proj(x[t])[h] * H_I^-0.5
    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s] * D_I^-0.5)     (s <= t; -inf elsewhere)

RoPE rotates the *first* ``qk_rope_head_dim`` dims of q and k, non-interleaved (NeoX half split) for DeepSeek-V3.2
(``indexer_rope_interleave: false``) and interleaved for GLM-5 (``true``).

Losses (DeepSeek-V3.2 report §2.1; IndexCache paper arXiv 2603.12201 §3.2):

* dense warm-up — ``KL(p_t || softmax(I_t))`` over all visible keys, ``p_t`` the main attention probabilities of
  query ``t`` summed over heads and L1-normalised (:func:`main_attention_target`);
* sparse stage — the same KL restricted to the top-k selected keys, both distributions renormalised there
  (:func:`indexer_kl` with ``support=`` the selection mask).

The distillation issue's multi-layer loss is ``sum_j 1/(m+1) KL(p^(l+j) || softmax(I^(l)))``: call
:func:`indexer_kl` with each served layer's target, or once with the averaged target (Proposition 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["indexer_scores", "causal_mask", "topk_mask", "main_attention_target", "indexer_kl"]


def _rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation; ``x`` [B, T, ..., R], ``cos``/``sin`` [B, T, R] (``cat(freqs, freqs)`` layout)."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _rope_interleave(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation written de-interleaved, as transformers' ``apply_rotary_pos_emb_interleave``."""
    cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_mask(t: int, device=None, s: int | None = None) -> torch.Tensor:
    """Bool ``[t, s]`` mask, True where key ``j`` is visible to query ``i`` (``j <= i + s - t``)."""
    s = t if s is None else s
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def indexer_scores(indexer, hidden_states: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, *, rope_interleave: bool = False, mask: torch.Tensor | None = None,
                   upcast: bool = False) -> torch.Tensor:
    """Index scores ``I[b, t, s]`` of one layer's indexer, differentiable w.r.t. the indexer's parameters (and its
    inputs, unless the caller detaches them).

    Args:
        indexer: a ``DeepseekV32Indexer`` (or GLM's ``GlmMoeDsaIndexer``): uses ``wq_b``, ``wk``, ``k_norm``,
            ``weights_proj``, ``n_heads``, ``head_dim``, ``qk_rope_head_dim``, ``softmax_scale``.
        hidden_states: ``[B, T, hidden]`` — the attention block's input (after ``input_layernorm``).
        q_resid: ``[B, T, q_lora_rank]`` — ``q_a_layernorm(q_a_proj(hidden_states))``.
        cos, sin: ``[B or 1, T, qk_rope_head_dim]`` from the model's rotary embedding.
        rope_interleave: False for DeepSeek-V3.2 (NeoX), True for GLM-5.
        mask: bool broadcastable to ``[B, T, T]``, True = visible; default causal. Invisible entries are ``-inf``.
        upcast: run the q·k products in ``promote_types(input dtype, float32)`` too (float64 inputs stay float64:
            the distillation's gradient checks) instead of the inputs' dtype.

    Returns:
        ``[B, T, T]`` scores, float32 (``promote_types(input dtype, float32)`` with ``upcast``). Without ``upcast``
        the q·k products run in the inputs' dtype (bf16 under autocast); the ReLU, the head weighting and the sum
        run in float32 as in transformers.
    """
    b, t, _ = hidden_states.shape
    h, d, r = indexer.n_heads, indexer.head_dim, indexer.qk_rope_head_dim
    rope = _rope_interleave if rope_interleave else _rope_neox
    q = indexer.wq_b(q_resid).view(b, t, h, d)
    q = torch.cat([rope(q[..., :r], cos, sin), q[..., r:]], dim=-1)
    k = indexer.k_norm(indexer.wk(hidden_states))  # [B, T, D]
    k = torch.cat([rope(k[..., :r], cos, sin), k[..., r:]], dim=-1)
    dt = torch.promote_types(hidden_states.dtype, torch.float32)
    if upcast:
        q, k = q.to(dt), k.to(dt)
    logits = torch.einsum("bthd,bsd->bths", q, k.to(q.dtype)).to(dt) * indexer.softmax_scale  # [B, T, H, S]
    w = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).to(dt) * h ** -0.5  # [B, T, H]
    scores = torch.einsum("bth,bths->bts", w, F.relu(logits))
    if mask is None:
        mask = causal_mask(t, hidden_states.device)
    return scores.masked_fill(~mask.expand_as(scores), float("-inf"))


def topk_mask(scores: torch.Tensor, k: int, visible: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T, S]``: True at the ``min(k, #visible)`` highest-scoring visible keys of each query (ties broken
    by ``torch.topk``). ``visible`` broadcasts to ``scores``. Same selection as transformers' indexer."""
    k = min(k, scores.shape[-1])
    idx = scores.detach().masked_fill(~visible, float("-inf")).topk(k, dim=-1).indices
    sel = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)
    return sel & visible


@torch.no_grad()
def main_attention_target(query: torch.Tensor, key: torch.Tensor, scale: float, support: torch.Tensor
                          ) -> torch.Tensor:
    """``p[b, t, s]``: the main attention probabilities over ``support``, summed over heads, L1-normalised.

    Args:
        query: ``[B, H, T, Dqk]``; key: ``[B, H, S, Dqk]`` (MLA keys after ``kv_b_proj`` expansion and RoPE).
        scale: the attention's softmax scale.
        support: bool ``[B, T, S]`` or ``[T, S]``, True where the attention may look (causal, or causal ∩ top-k).

    Returns:
        float32 ``[B, T, S]``, zero outside ``support``, rows summing to 1. No gradient.
    """
    logits = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    sup = support if support.dim() == 3 else support.unsqueeze(0)
    probs = logits.masked_fill(~sup.unsqueeze(1), float("-inf")).softmax(-1)
    p = probs.sum(1)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


def indexer_kl(target: torch.Tensor, scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Mean over queries of ``KL(target_t || softmax(scores_t))`` with both restricted and renormalised to
    ``support`` (the visible keys for the warm-up, the selected top-k for the sparse stage).

    Args:
        target: float ``[B, T, S]`` (e.g. :func:`main_attention_target`), treated as a constant.
        scores: float32 ``[B, T, S]`` from :func:`indexer_scores` (gradient flows here).
        support: bool, broadcastable to ``[B, T, S]``.

    Returns:
        0-dim float32 tensor (nats per query).
    """
    support = support.expand_as(scores)
    p = target.detach().masked_fill(~support, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    # float32 log-softmax: under bf16 autocast a bf16 normaliser makes the KL slightly negative
    logq = scores.float().masked_fill(~support, float("-inf")).log_softmax(-1).masked_fill(~support, 0.0)
    logp = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    return (p * (logp - logq)).sum(-1).mean()

"""Lightning-indexer scores *with gradient* and the DSA indexer distillation losses.

transformers' ``DeepseekV32Indexer.forward`` runs under ``@torch.no_grad()`` and returns only top-k indices, so
training needs its own score computation. :func:`indexer_scores` computes that forward functionally from the
module's own parameters, through the shared projection :func:`vllm_indexcache.tools.indexer_projection.indexer_qkw`
(maths and sources there: transformers 5.19 ``models/deepseek_v32/modeling_deepseek_v32.py``; DeepSeek-V3.2 report
arXiv 2512.02556)::

    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])     (s <= t; -inf elsewhere; w includes H^-0.5 * D^-0.5)

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


def causal_mask(t: int, device=None, s: int | None = None) -> torch.Tensor:
    """Bool ``[t, s]`` mask, True where key ``j`` is visible to query ``i`` (``j <= i + s - t``)."""
    s = t if s is None else s
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def indexer_scores(indexer, hidden_states: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Index scores ``I[b, t, s]`` of one layer's indexer, differentiable w.r.t. the indexer's parameters (and its
    inputs, unless the caller detaches them).

    q, k and w come from :func:`vllm_indexcache.tools.indexer_projection.indexer_qkw` (RoPE layout from the
    indexer's class: NeoX for DeepSeek-V3.2, interleaved for GLM-5); the products run in
    ``promote_types(hidden_states.dtype, float32)`` (under autocast, the q·k product in the autocast dtype).

    Args:
        indexer: a ``DeepseekV32Indexer`` (or GLM's ``GlmMoeDsaIndexer``).
        hidden_states: ``[B, T, hidden]`` — the attention block's input (after ``input_layernorm``).
        q_resid: ``[B, T, q_lora_rank]`` — ``q_a_layernorm(q_a_proj(hidden_states))``.
        cos, sin: ``[B or 1, T, qk_rope_head_dim]`` from the model's rotary embedding.
        mask: bool broadcastable to ``[B, T, T]``, True = visible; default causal. Invisible entries are ``-inf``.

    Returns:
        ``[B, T, T]`` scores in ``promote_types(hidden_states.dtype, float32)`` (float64 inputs stay float64).

    Raises:
        TypeError: an indexer of another class.
    """
    from vllm_indexcache.tools.indexer_projection import indexer_qkw

    t = hidden_states.shape[1]
    q, k, w = indexer_qkw(indexer, hidden_states, q_resid, (cos, sin))
    logits = torch.einsum("bthd,bsd->bths", q, k).to(w.dtype)  # [B, T, H, S]
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

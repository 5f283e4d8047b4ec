"""The lightning indexer's unquantised q, k and head weights from vLLM's ``Indexer`` module (shared by the CPU backend
and the CUDA Triton fallback).

DeepSeek-V3.2 report §2.1: ``q = wq_b(q_latent)`` per head, ``k = LayerNorm(wk(x))`` (one shared key head),
``w = weights_proj(x) · H^-½ · D^-½``; RoPE on the first ``qk_rope_head_dim`` dims of q and k. vLLM's
``deepseek_v2.Indexer`` fuses ``wk`` and ``weights_proj`` into ``wk_weights_proj`` and quantises q and k to FP8;
this keeps them in the model dtype. The same projection for transformers' indexer modules (reference, training,
distillation) is :mod:`vllm_indexcache.tools.indexer_projection`; the two stay apart because their modules differ
(fused ``wk_weights_proj`` and vLLM's rotary module here) and the serving path imports nothing from ``tools/``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def indexer_qkw(indexer, hidden_states: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor,
                rope: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(q [T, H, D], k [T, D], weights [T, H] float32)``, RoPE applied, q and k contiguous.

    Args:
        indexer: vLLM's ``deepseek_v2.Indexer`` (``wq_b``, ``wk_weights_proj``, ``k_norm``, ``n_head``,
            ``head_dim``, ``rope_dim``, ``softmax_scale``, ``n_head_scale``).
        hidden_states: ``[T, hidden_size]`` layer input.
        qr: ``[T, q_lora_rank]`` MLA query latent after ``q_a_layernorm``.
        positions: ``[T]`` int64 token positions.
        rope: ``rope(positions, q_pe [T, H, R], k_pe [T, 1, R]) -> (q_pe, k_pe)`` (the indexer's rotary embedding,
            e.g. its ``forward_native``).
    """
    num_heads, head_dim, rope_dim = indexer.n_head, indexer.head_dim, indexer.rope_dim
    q, _ = indexer.wq_b(qr)
    q = q.view(-1, num_heads, head_dim)
    q_pe, q_nope = torch.split(q, [rope_dim, head_dim - rope_dim], dim=-1)
    kw, _ = indexer.wk_weights_proj(hidden_states)
    k = indexer.k_norm(kw[:, :head_dim])
    weights = kw[:, head_dim:].float() * (indexer.softmax_scale * indexer.n_head_scale)
    k_pe, k_nope = torch.split(k, [rope_dim, head_dim - rope_dim], dim=-1)
    q_pe, k_pe = rope(positions, q_pe.contiguous(), k_pe.unsqueeze(1).contiguous())
    q = torch.cat([q_pe.reshape(-1, num_heads, rope_dim), q_nope], dim=-1).contiguous()
    k = torch.cat([k_pe.reshape(-1, rope_dim), k_nope], dim=-1).contiguous()
    return q, k, weights

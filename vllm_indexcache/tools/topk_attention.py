"""Top-k sparse attention of the transformers DSA reference through torch SDPA: the search's fast path.

Transformers 5.19's eager DSA attention (``models/deepseek_v32/modeling_deepseek_v32.py``
``DeepseekV32Attention.forward``, ``models/glm_moe_dsa/modeling_glm_moe_dsa.py`` likewise) scatters the indexer's
top-k into a ``[B, 1, S, T]`` boolean mask, folds it into the additive causal mask (``finfo.min`` at unselected
keys) and runs ``eager_attention_forward``: ``softmax(q·kᵀ·scale + mask) · v`` with every ``[B, H, S, T]``
intermediate materialised (about 1 s per layer for 2,048 tokens on a 2-core CPU, most of a search evaluation).

With any other attention implementation the same forward hands the raw top-k to the attention function as
``indices`` (for FlashMLA) and leaves the mask causal. :data:`NAME` is such an implementation, registered with
transformers' public ``AttentionInterface`` (and ``AttentionMaskInterface``, with transformers' own ``eager_mask``,
so the indexer receives the same additive mask as under eager): it builds the same selection mask — causal-visible
keys among the ``indices`` — and calls ``torch.nn.functional.scaled_dot_product_attention`` with it (fused, no
materialised score tensor), in chunks of query rows that skip the keys no row of the chunk sees. Same maths as
eager; the output differs by float rounding only (the softmax sums in another order; measured ≤ 1.2e-6 absolute on
tiny-dsa, ``tests/unit/test_topk_attention.py``).

Use :func:`vllm_indexcache.tools.reference.set_fast` rather than this module directly.
"""
from __future__ import annotations

import torch

__all__ = ["NAME", "register", "topk_visible_mask", "topk_sdpa_attention"]

#: The attention implementation name (``model.set_attn_implementation(NAME)`` after :func:`register`).
NAME = "indexcache_topk_sdpa"
#: ``[float mask, its boolean visible mask]`` of the last call (the mask object is shared by a forward's layers).
_last_mask: list = [None, None]


def topk_visible_mask(indices: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """Keys each query attends to: visible under ``attention_mask`` and among its top-k ``indices``.

    Args:
        indices: ``[B, S, K]`` integer key positions per query (transformers' indexer output; entries may point at
            future keys, which the mask removes), or None (dense: the mask alone).
        attention_mask: ``[B, 1, S, T]`` boolean (True = visible) or additive float (``0`` visible, ``finfo.min``
            masked, what transformers' ``eager_mask`` builds).

    Returns:
        ``[B, 1, S, T]`` bool, True where the query attends to the key.

    Raises:
        ValueError: a float mask with values other than ``0`` and ``finfo.min`` (an additive bias this boolean path
            would drop).
    """
    if attention_mask.dtype == torch.bool:
        visible = attention_mask
    elif _last_mask[0] is attention_mask:            # every layer of one forward gets the same mask tensor
        visible = _last_mask[1]
    else:
        lowest = torch.finfo(attention_mask.dtype).min
        visible = attention_mask == 0
        if not bool((visible | (attention_mask == lowest)).all()):
            raise ValueError("attention_mask: an additive float mask with values other than 0 and finfo.min; "
                             f"{NAME} supports only visible/masked keys")
        _last_mask[:] = [attention_mask, visible]
    if indices is None:
        return visible
    B, S, _ = indices.shape
    selected = torch.zeros((B, S, visible.shape[-1]), dtype=torch.bool, device=indices.device)
    selected.scatter_(-1, indices.long(), True)
    return visible & selected.unsqueeze(1)


def topk_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        indices: torch.Tensor | None = None, rows: int = 512, **kwargs):
    """Attention over each query's top-k keys (transformers ``AttentionInterface`` signature).

    Args:
        module: the attention module (``num_key_value_groups`` read for grouped keys, ``training``).
        query: ``[B, H, S, D]``; key: ``[B, H_kv, T, D]``; value: ``[B, H_kv, T, Dv]``.
        attention_mask: ``[B, 1, S, T]``, see :func:`topk_visible_mask`; None = causal (with ``T − S`` cached keys).
        scaling: softmax scale (default ``D^-½``).
        dropout: attention dropout probability (0 in eval).
        indices: ``[B, S, K]`` the indexer's top-k key positions, or None (dense).
        rows: query rows per SDPA call; each call gets only the keys up to the last one its rows attend to (half
            the work of one dense call for a causal prefill).

    Returns:
        ``(output [B, S, H, Dv], None)``, like transformers' ``eager_attention_forward`` (no attention weights).
    """
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    S, T = query.shape[2], key.shape[2]
    if attention_mask is None:
        q_pos = torch.arange(T - S, T, device=query.device)
        attention_mask = (torch.arange(T, device=query.device)[None, :] <= q_pos[:, None])[None, None]
        attention_mask = attention_mask.expand(query.shape[0], 1, S, T)
    mask = topk_visible_mask(indices, attention_mask[..., :T])
    p = dropout if getattr(module, "training", False) else 0.0
    out = query.new_empty(query.shape[:-1] + value.shape[-1:])
    for a in range(0, S, rows):
        b = min(S, a + rows)
        rows_mask = mask[:, :, a:b]
        # keys no row of the chunk attends to are dropped (causal: those after the chunk's last query)
        hi = int(rows_mask.any(dim=2).flatten(0, 1).any(dim=0).nonzero().max()) + 1 if rows_mask.any() else T
        out[:, :, a:b] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, :hi], value[:, :, :hi], attn_mask=rows_mask[..., :hi], dropout_p=p,
            scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :data:`NAME` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(NAME, topk_sdpa_attention)
    AttentionMaskInterface.register(NAME, eager_mask)

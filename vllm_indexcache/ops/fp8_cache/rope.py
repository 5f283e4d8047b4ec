"""DeepSeek-V4's GPT-J (interleaved-pair) RoPE on the last dims of a vector, in float32."""
from __future__ import annotations

import torch


def gptj_rope_tail(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` float32 with its last ``R = cos_sin.shape[-1]`` dims rotated in pairs ``(2i, 2i+1)``:
    ``(a, b) → (a cos_i - b sin_i, b cos_i + a sin_i)``; ``cos_sin [..., R]`` = ``[cos | sin]`` halves (vLLM's
    ``RotaryEmbedding.cos_sin_cache`` rows, broadcast against ``x[..., :1]``). Returns a new float32 tensor."""
    out = x.float().clone()
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[..., :half].float(), cos_sin[..., half:].float()
    rope = out[..., out.shape[-1] - 2 * half:]
    a, b = rope[..., 0::2].clone(), rope[..., 1::2].clone()
    rope[..., 0::2] = a * cos - b * sin
    rope[..., 1::2] = b * cos + a * sin
    return out

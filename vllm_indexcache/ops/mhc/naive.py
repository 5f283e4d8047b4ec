"""mHC, one token at a time: the reference of :mod:`.cpu`.

Source: DeepSeek-V4 report §2.2; transformers ``modeling_deepseek_v4.py`` ``DeepseekV4HyperConnection`` /
``DeepseekV4HyperHead``; vLLM ``model_executor/kernels/mhc/torch.py`` (``mhc_pre_torch``, ``mhc_post_torch``).
For a token with ``hc`` residual streams ``x[i]`` (``d`` each): ``m = (flat(x) @ fn^T) / rms(flat(x))``;
``pre = sigmoid(m[:hc] * scale[0] + base[:hc]) + eps``, ``post = 2 * sigmoid(m[hc:2hc] * scale[1] + base[hc:2hc])``,
``comb`` = Sinkhorn-normalised ``softmax(m[2hc:] * scale[2] + base[2hc:])`` (``hc × hc``); the layer input is
``Σ_i pre[i] x[i]``; after the layer, stream ``j`` becomes ``Σ_i comb[i, j] x[i] + post[j] * out``.
"""
from __future__ import annotations

import torch


def _mixes(x: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    flat = x.reshape(-1).double()
    return (fn.double() @ flat) / torch.sqrt((flat * flat).mean() + rms_eps)


def hc_pre_naive(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, sinkhorn_iters: int,
                 rms_eps: float, hc_eps: float):
    """``(layer_input [T, d] x.dtype, post [T, hc] float32, comb [T, hc, hc] float32)`` for ``x [T, hc, d]``
    (float64 inside)."""
    num_tokens, hc, d = x.shape
    ys, posts, combs = [], [], []
    for t in range(num_tokens):
        m = _mixes(x[t], fn, rms_eps)
        b = base.double()
        pre = torch.sigmoid(m[:hc] * scale[0] + b[:hc]) + hc_eps
        post = 2.0 * torch.sigmoid(m[hc:2 * hc] * scale[1] + b[hc:2 * hc])
        comb = torch.softmax((m[2 * hc:] * scale[2] + b[2 * hc:]).view(hc, hc), dim=-1) + hc_eps
        comb = comb / (comb.sum(0, keepdim=True) + hc_eps)
        for _ in range(sinkhorn_iters - 1):
            comb = comb / (comb.sum(1, keepdim=True) + hc_eps)
            comb = comb / (comb.sum(0, keepdim=True) + hc_eps)
        ys.append(sum(pre[i] * x[t, i].double() for i in range(hc)))
        posts.append(post)
        combs.append(comb)
    return (torch.stack(ys).to(x.dtype), torch.stack(posts).float(), torch.stack(combs).float())


def hc_post_naive(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams ``[T, hc, d]`` (``x.dtype``): stream ``j`` = ``Σ_i comb[i, j] x[i] + post[j] * out``."""
    num_tokens, hc, d = x.shape
    res = torch.zeros(num_tokens, hc, d, dtype=torch.float64)
    for t in range(num_tokens):
        for j in range(hc):
            res[t, j] = post[t, j].double() * out[t].double()
            for i in range(hc):
                res[t, j] += comb[t, i, j].double() * x[t, i].double()
    return res.to(x.dtype)


def hc_head_naive(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float,
                  rms_eps: float) -> torch.Tensor:
    """The final collapse of the ``hc`` streams ``[T, hc, d]`` to ``[T, d]``: ``Σ_i (sigmoid(m[i] * scale[0] +
    base[i]) + hc_eps) x[i]`` with ``m`` from ``fn [hc, hc*d]``."""
    num_tokens, hc, d = x.shape
    ys = []
    for t in range(num_tokens):
        m = _mixes(x[t], fn, rms_eps)
        pre = torch.sigmoid(m * scale[0] + base.double()) + hc_eps
        ys.append(sum(pre[i] * x[t, i].double() for i in range(hc)))
    return torch.stack(ys).to(x.dtype)

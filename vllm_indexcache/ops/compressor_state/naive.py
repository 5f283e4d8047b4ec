"""Compressor partial states, one token at a time: the reference of :mod:`.cpu`.

Source: vLLM ``models/deepseek_v4/common/ops/save_partial_states.py`` (``SavePartialStatesKernel``): each token with
a state slot writes ``[kv | score + ape[position % compress_ratio]]`` into the float32 state cache, the two halves
``state_width = state_cache.shape[-1] // 2`` apart; the compressor later pools a window of these states (DeepSeek-V4
report §2.3, CSA/HCA compression).
"""
from __future__ import annotations


def save_partial_states_naive(kv, score, ape, positions, state_cache, slot_mapping) -> None:
    """In place on ``state_cache [blocks, block_size, 2 * width]``; ``kv``/``score`` ``[T, H]``, ``ape [ratio, H]``."""
    block_size, width = state_cache.shape[1], state_cache.shape[-1] // 2
    head = kv.shape[-1]
    for t in range(slot_mapping.shape[0]):
        slot = int(slot_mapping[t])
        if slot < 0:
            continue
        row = state_cache[slot // block_size, slot % block_size]
        row[:head] = kv[t].float()
        row[width:width + head] = score[t].float() + ape[int(positions[t]) % ape.shape[0]].float()

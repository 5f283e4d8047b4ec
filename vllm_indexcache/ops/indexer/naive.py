"""Lightning indexer of DeepSeek Sparse Attention (DSA): readable reference (loops over tokens allowed).

The maths (DeepSeek-V3.2 report, arXiv 2512.02556, §2.1; transformers ``modeling_deepseek_v32.py``
``DeepseekV32Indexer.forward``; vLLM 0.32 ``model_executor/layers/sparse_attn_indexer.py``)::

    I[t, s] = Σ_h  w[t, h] · ReLU(q[t, h] · k[s])        for s ≤ pos[t], else -inf
    topk[t] = the min(topk, pos[t] + 1) keys s with the largest I[t, s]

``q`` and ``k`` arrive already rotated (RoPE on the first ``qk_rope_head_dim`` dims) and ``w`` already contains the
``H^-0.5 · D^-0.5`` scales, so the formula above is all that remains. Production kernels additionally apply a
Hadamard rotation (orthogonal: scores unchanged) and FP8 quantisation; like transformers we compute in float32.

Ordering convention shared with :mod:`vllm_indexcache.ops.indexer.cpu` (the two must agree exactly): a row lists
its selected keys by descending score, ties broken towards the lower key position, then ``-1`` padding.
"""
from __future__ import annotations

import torch

__all__ = ["indexer_scores_naive", "indexer_topk_naive", "check_indexer_inputs"]


def check_indexer_inputs(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor) -> None:
    """Validate the shapes and positions shared by the naive and CPU indexers.

    Raises:
        ValueError: wrong ranks or mismatched sizes, non-integer ``q_positions``, or a position outside ``[0, S)``.
    """
    if q.dim() != 3 or k.dim() != 2 or weights.dim() != 2 or q_positions.dim() != 1:
        raise ValueError(f"expected q [T,H,D], k [S,D], weights [T,H], q_positions [T]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, weights {tuple(weights.shape)}, q_positions {tuple(q_positions.shape)}")
    T, H, D = q.shape
    if k.shape[1] != D:
        raise ValueError(f"head dim mismatch: q has D={D}, k has D={k.shape[1]}")
    if weights.shape != (T, H):
        raise ValueError(f"weights must be [T, H] = [{T}, {H}], got {tuple(weights.shape)}")
    if q_positions.shape[0] != T:
        raise ValueError(f"q_positions must have T={T} entries, got {q_positions.shape[0]}")
    if q_positions.dtype.is_floating_point or q_positions.dtype == torch.bool:
        raise ValueError(f"q_positions must be an integer tensor, got {q_positions.dtype}")
    if T and (int(q_positions.min()) < 0 or int(q_positions.max()) >= k.shape[0]):
        raise ValueError(f"q_positions must lie in [0, S={k.shape[0]}); got range "
                         f"[{int(q_positions.min())}, {int(q_positions.max())}]")


def indexer_scores_naive(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                         q_positions: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer scores ``I[t, s] = Σ_h w[t,h] · ReLU(q[t,h] · k[s])`` with a causal mask.

    Args:
        q: ``[T, H, D]`` indexer queries (any float dtype; RoPE already applied), T query tokens of one request.
        k: ``[S, D]`` the request's indexer keys at positions ``0..S-1`` (RoPE and LayerNorm already applied).
        weights: ``[T, H]`` per-head weights, already including ``H^-0.5 · D^-0.5``.
        q_positions: ``[T]`` integer position of each query in its sequence; key ``s`` is visible iff
            ``s ≤ q_positions[t]``.

    Returns:
        ``[T, S]`` float32 scores (dimensionless logits); invisible entries are ``-inf``.

    Raises:
        ValueError: see :func:`check_indexer_inputs`.
    """
    check_indexer_inputs(q, k, weights, q_positions)
    T, H, _ = q.shape
    S = k.shape[0]
    qf, kf, wf = q.float(), k.float(), weights.float()
    scores = torch.full((T, S), float("-inf"), dtype=torch.float32, device=q.device)
    for t in range(T):
        n = int(q_positions[t]) + 1                      # visible keys 0..pos[t]
        logits = qf[t] @ kf[:n].T                        # [H, n]  q[t,h] · k[s]
        scores[t, :n] = (wf[t, :, None] * torch.relu(logits)).sum(dim=0)
    return scores


def indexer_topk_naive(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor,
                       topk: int) -> torch.Tensor:
    """Top-k key selection of the lightning indexer (reference implementation).

    Args:
        q, k, weights, q_positions: as in :func:`indexer_scores_naive`.
        topk: number of keys to keep per query (``index_topk``, 2048 in DeepSeek-V3.2 and GLM-5), ≥ 1.

    Returns:
        ``[T, topk]`` int32 request-local key positions. Row ``t`` holds the ``min(topk, q_positions[t] + 1)``
        best visible keys by descending score, ties broken towards the lower position, then ``-1`` padding.

    Raises:
        ValueError: ``topk < 1`` or invalid inputs (see :func:`check_indexer_inputs`).
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    scores = indexer_scores_naive(q, k, weights, q_positions)
    T = scores.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    for t in range(T):
        n = int(q_positions[t]) + 1
        row = scores[t, :n].tolist()
        order = sorted(range(n), key=lambda s: (-row[s], s))[:topk]   # best first, lower position wins ties
        out[t, :len(order)] = torch.tensor(order, dtype=torch.int32)
    return out

"""Lightning indexer of DSA (DeepSeek-V3.2 report §2.1): ``I[t,s] = Σ_h w[t,h]·ReLU(q[t,h]·k[s])``, top-k per query.

* :mod:`.naive` — the readable reference (loops over tokens);
* :mod:`.cpu` — vectorised, row-chunked torch on any device: the *oracle*, not the serving path (the transformers
  reference's ``ties="lower"`` selection, the tests of the fast kernels, the Triton benchmark's reference);
* :mod:`.cpu_blockwise` and :mod:`.paged_cpu` — the fused blockwise indexer the CPU backend runs, over a tensor or a
  paged K-cache;
* :mod:`.triton` and :mod:`.paged_triton` — the CUDA fallback's Triton kernels; not imported here (``import triton``
  must not happen on a CPU install): ``from vllm_indexcache.ops.indexer import triton``.
"""
from .cpu import indexer_scores, indexer_topk
from .cpu_blockwise import indexer_topk_blockwise, indexer_topk_segments, paged_key_segments
from .naive import check_indexer_inputs, indexer_scores_naive, indexer_topk_naive
from .paged_cpu import paged_indexer_step_cpu

__all__ = [
    "check_indexer_inputs", "indexer_scores", "indexer_scores_naive", "indexer_topk", "indexer_topk_blockwise",
    "indexer_topk_naive", "indexer_topk_segments", "paged_indexer_step_cpu", "paged_key_segments",
]

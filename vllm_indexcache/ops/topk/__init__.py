"""Row-wise top-k of index scores with per-row valid lengths (the selection step of the lightning indexer).

* :mod:`.naive` — the readable reference and helpers;
* :mod:`.triton` — the CUDA fallback's Triton kernel; not imported here (``import triton`` must not happen on a CPU
  install): ``from vllm_indexcache.ops.topk import triton``.
"""
from .naive import check_topk_inputs, to_ascending, topk_rows_naive, valid_lengths

__all__ = ["check_topk_inputs", "to_ascending", "topk_rows_naive", "valid_lengths"]

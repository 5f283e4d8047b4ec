"""Sparse MLA attention over the top-k selected latent-cache rows (DeepSeek-V3.2 report §2.1, absorbed MLA).

* :mod:`.naive` — the readable reference; :mod:`.cpu` — the vectorised torch path the CPU backend runs;
* :mod:`.triton` — the CUDA fallback's Triton kernel; not imported here (``import triton`` must not happen on a CPU
  install): ``from vllm_indexcache.ops.sparse_mla import triton``.
"""
from .cpu import sparse_mla
from .naive import check_sparse_mla_inputs, sparse_mla_naive

__all__ = ["check_sparse_mla_inputs", "sparse_mla", "sparse_mla_naive"]

"""The INDEXCACHE backend on CUDA vLLM 0.26: the platform hook (native kernels or Triton fallback), the Triton
lightning indexer and sparse MLA."""

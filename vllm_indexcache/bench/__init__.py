"""End-to-end IndexCache benchmark through vLLM (``vllm-indexcache bench``); see :mod:`vllm_indexcache.bench.cli`."""

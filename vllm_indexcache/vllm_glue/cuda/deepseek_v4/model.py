"""``DeepseekV4ForCausalLM`` on CUDA vLLM 0.26: vLLM's NVIDIA V4 model with the S CSA layers of an IndexCache pattern
built without lightning indexer and loading no indexer weights.

vLLM 0.26 (``vllm/models/deepseek_v4/attention.py``) builds a ``DeepseekV4Indexer`` on every ``compress_ratio == 4``
(CSA) layer; each F indexer writes the model's one shared ``topk_indices_buffer`` (``[max_num_batched_tokens,
index_topk]`` int32, ``nvidia/model.py`` ``DeepseekV4Model.__init__``) and every CSA layer's FlashMLA attention reads
it (``nvidia/flashmla.py``: ``_forward_decode`` → ``compute_global_topk_indices_and_lens`` over *this* layer's block
table, ``_forward_prefill`` → ``combine_topk_swa_indices``). A CSA layer with ``indexer is None`` keeps its
compressor and compressed KV cache and runs ``attention_impl``'s compressor-only branch (the one HCA layers take), so
it reads the rows the last F CSA layer wrote in the same step; entry ``i`` is the same 4-token span in every CSA
layer. The construction-time switch, the weight filter and the start-up report are the platform-neutral ones of
:mod:`vllm_indexcache.vllm_glue.cpu.deepseek_v4.indexcache` (same ``attention.py`` names in vLLM 0.26 and 0.32).
The top-k handoff across pipeline stages is wired into the CPU class only (never run on CUDA): here a stage that
starts on an S CSA layer still builds that layer F, with a warning.
"""
from __future__ import annotations

from vllm.models.deepseek_v4 import DeepseekV4ForCausalLM

from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import indexcache
from vllm_indexcache.vllm_glue.cuda.deepseek_v4 import kv_groups


class IndexCacheDeepseekV4ForCausalLM(DeepseekV4ForCausalLM):
    """vLLM's CUDA DeepSeek-V4 with the S CSA layers of ``index_topk_pattern`` built without indexer."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        csa_plan = indexcache.plan(vllm_config, handoff=False)
        if csa_plan is not None and csa_plan.s_layers and (why := kv_groups.problem()) is not None:
            raise ValueError(f"index_topk_pattern={csa_plan.pattern!r}: {why}")
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

"""DSA model classes for vLLM (CPU and CUDA): vLLM's own ``deepseek_v2`` models, built from the resolved F/S pattern.

vLLM source: ``vllm/model_executor/models/deepseek_v2.py`` (``DeepseekV2MLAAttention.__init__`` decides per layer
from ``index_topk_pattern`` whether it builds an ``Indexer`` — F — or gets ``indexer=None`` and reads the shared
``topk_indices_buffer`` — S; S layers therefore hold no indexer weights and no indexer K-cache, and
``DeepseekV2Model.load_weights`` drops their checkpoint indexer weights) and ``vllm/models/deepseek_v32/__init__.py``
(which maps both DSA architectures to these ``deepseek_v2`` classes on CPU).

What this adds, per pipeline stage:

* **PP first layer forced F.** vLLM (0.32 CPU, 0.26 CUDA) decides F/S from the *global* layer id and hands no top-k
  across pipeline stages (``IntermediateTensors`` carries only ``hidden_states``/``residual``), so a stage whose first
  layer is S would read a buffer nothing wrote. The stage's first layer is made F with a warning (its checkpoint must
  hold that layer's indexer weights; otherwise loading fails with vLLM's missing-weight error).
* **Start-up report**: the pattern and the indexer K-cache bytes per token saved against all-F.
* **RoPE through the pure-torch path (CPU only).** Inside the CPU worker (``custom_ops=["all"]``) the attention RoPE
  dispatches to ``RotaryEmbedding.forward_cpu`` → ``ops.rotary_embedding``, which rotated the rope half of MLA's
  ``[T, heads, qk_rope_head_dim]`` query wrongly on the DSA test models (measured: it changed the query at position
  0, where RoPE is the identity, so greedy tokens diverged from transformers). The attention RoPE modules are
  switched to ``forward_native`` (same maths as transformers), on contiguous inputs.
"""
from __future__ import annotations

import types

from vllm.logger import init_logger
from vllm.model_executor.models import deepseek_v2

from vllm_indexcache.config import SOURCE_KEY, summary

logger = init_logger("vllm.indexcache")

ARCHITECTURES = {
    "DeepseekV32ForCausalLM": "IndexCacheDeepseekV32ForCausalLM",
    "GlmMoeDsaForCausalLM": "IndexCacheGlmMoeDsaForCausalLM",
}


def stage_pattern(pattern: str, start_layer: int, end_layer: int) -> str:
    """Return ``pattern`` with the stage's first layer ``start_layer`` forced to F.

    Args:
        pattern: resolved F/S string, one char per backbone DSA layer.
        start_layer, end_layer: the stage's layer range ``[start, end)`` (``vllm.distributed.utils.get_pp_indices``).
    """
    if start_layer < len(pattern) and pattern[start_layer] == "S" and end_layer > start_layer:
        return pattern[:start_layer] + "F" + pattern[start_layer + 1:]
    return pattern


def _prepare(vllm_config):
    """Force the stage's first layer F (called before the layers are built); return ``(pattern, pp_rank, start,
    end, source)`` of this stage (source: where the pattern came from, :func:`vllm_indexcache.config.pattern_source`),
    or ``None`` for a checkpoint without an IndexCache pattern."""
    from vllm.distributed import get_pp_group
    from vllm.distributed.utils import get_pp_indices

    hf_config = vllm_config.model_config.hf_config
    pattern = getattr(hf_config, "index_topk_pattern", None)
    if not pattern:
        return None
    pp = get_pp_group()
    start, end = get_pp_indices(hf_config.num_hidden_layers, pp.rank_in_group, pp.world_size)
    local = stage_pattern(pattern, start, end)
    if local != pattern:
        logger.warning("IndexCache: pipeline stage %d starts on S layer %d, which would read top-k that no layer of "
                       "this stage wrote; layer %d runs its own indexer (F) on this stage.", pp.rank_in_group,
                       start, start)
        hf_config.index_topk_pattern = local
    return local, pp.rank_in_group, start, end, getattr(hf_config, SOURCE_KEY, None)


def indexer_cache_bytes(model) -> tuple[int, int]:
    """``(bytes per token of one F layer's indexer K-cache, number of F layers built)`` of a constructed model.

    Read from the built ``DeepseekV32IndexerCache`` modules (``head_dim`` × dtype size per token): 132 B in CUDA vLLM
    (128 FP8 values + one fp32 scale per 128, ``deepseek_v2.Indexer``), ``index_head_dim`` values of the model dtype
    with the CPU INDEXCACHE backend. S layers build none.
    """
    caches = [m for m in model.modules() if isinstance(m, deepseek_v2.DeepseekV32IndexerCache)]
    if not caches:
        return 0, 0
    return int(caches[0].head_dim) * caches[0].dtype.itemsize, len(caches)


def _report(model, stage) -> None:
    """Log the start-up report: pattern, and indexer K-cache bytes per token against all-F."""
    if stage is None:
        return
    local, rank, start, end, source = stage
    per_layer, n_f = indexer_cache_bytes(model)
    n_layers = end - start
    logger.info("%s (stage %d: layers %d-%d, %d F built); indexer K-cache %d B/token instead of %d B/token all-F "
                "(%d B/token saved)", summary(local, source), rank, start, end - 1, n_f, per_layer * n_f,
                per_layer * n_layers, per_layer * (n_layers - n_f))


def _rope_native(rope) -> None:
    """Make ``rope(positions, q, k)`` use ``forward_native`` on contiguous copies of ``q`` and ``k``."""

    def forward(self, positions, query, key=None):
        return self.forward_native(positions, query.contiguous(), None if key is None else key.contiguous())

    rope.forward = types.MethodType(forward, rope)


def _finish(model, stage) -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        for name, module in model.named_modules():
            if name.endswith("self_attn.rotary_emb"):
                _rope_native(module)
    _report(model, stage)


class IndexCacheDeepseekV32ForCausalLM(deepseek_v2.DeepseekV3ForCausalLM):
    """``DeepseekV32ForCausalLM`` with the resolved IndexCache pattern (see module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        stage = _prepare(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _finish(self, stage)


class IndexCacheGlmMoeDsaForCausalLM(deepseek_v2.GlmMoeDsaForCausalLM):
    """``GlmMoeDsaForCausalLM`` with the resolved IndexCache pattern (see module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        stage = _prepare(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _finish(self, stage)


def register_models() -> None:
    """Point both DSA architectures at the classes above (``ModelRegistry.register_model`` overrides vLLM's)."""
    from vllm import ModelRegistry

    for arch, cls_name in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"{__name__}:{cls_name}")

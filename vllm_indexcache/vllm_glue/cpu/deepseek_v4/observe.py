"""Worker-side helpers the toolkit ships into a DeepSeek-V4 engine (``LLM.apply_model``, or directly in a
single-process engine): the search's run-time CSA pattern switch, the benchmark's indexer timing and the KV bytes
per token of the caches vLLM allocates. Called through :mod:`vllm_indexcache.vllm_glue.hooks`.

vLLM 0.32 (``vllm/models/deepseek_v4/attention.py``): ``DeepseekV4Attention`` of a CSA layer
(``compress_ratio == 4``) holds ``indexer`` (``DeepseekV4Indexer``). Every use of it at run time is guarded by
``self.indexer is not None`` (``_forward_attn_inputs``: the indexer's weights projection and compressor GEMM;
``forward``: the indexer's q projection, RoPE, quantisation and compressor; ``_sparse_indexer_and_attn``: the
scoring and top-k, ``indexer.indexer_op``), and ``cpu/cpu_sparse.py`` handles ``indexer is None`` — the state an S
CSA layer is built in (:mod:`.indexcache`). A CSA layer with its indexer detached therefore reads the shared
``topk_indices_buffer`` as the last F CSA layer of the step left it: the same computation as a layer built S.
"""
from __future__ import annotations

import re
import time

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.attn$")
#: Where a detached indexer is kept on its attention module (outside ``_modules``: not a submodule while S).
_KEPT = "_indexcache_kept_indexer"


def is_deepseek_v4(model) -> bool:
    """Whether ``model`` is a vLLM ``DeepseekV4ForCausalLM`` (any subclass, the plugin's included)."""
    return any(cls.__name__ == "DeepseekV4ForCausalLM" for cls in type(model).__mro__)


def _csa_attentions(model) -> dict[int, object]:
    """``{decoder layer id: DeepseekV4Attention}`` of this worker's CSA layers (``compress_ratio == 4``)."""
    out = {}
    for name, module in model.named_modules():
        m = _LAYER.search(name)
        if m is not None and getattr(module, "compress_ratio", None) == 4 and hasattr(module, "indexer"):
            out[int(m.group(1))] = module
    return out


def apply_csa_pattern(pattern: str, model) -> str:
    """Switch this worker's CSA layers to ``pattern`` (one F/S per CSA layer of the model, in layer order) without
    reloading: an S layer's ``indexer`` is detached (kept aside on the attention module), an F layer's re-attached.

    Returns the applied local pattern read back from the layers (``"."`` for CSA layers not on this worker), as
    :func:`vllm_indexcache.vllm_glue.hooks.apply_pattern` does.

    Raises:
        ValueError: ``pattern`` is not one character per CSA layer of ``model.config``.
        RuntimeError: an F layer built without indexer (the engine was not built all-F), or a stage whose first CSA
            layer would be S (nothing on the stage writes the top-k buffer before it).
    """
    from vllm_indexcache.families.deepseek_v4 import csa_layers

    layers = csa_layers(model.config)
    if len(pattern) != len(layers):
        raise ValueError(f"pattern {pattern!r}: {len(pattern)} entries for {len(layers)} CSA layers {layers}")
    attns = _csa_attentions(model)
    local = ["."] * len(pattern)
    for ordinal, layer in enumerate(layers):
        attn = attns.get(layer)
        if attn is None:
            continue
        kept = attn.__dict__.get(_KEPT)
        if pattern[ordinal] == "S":
            if attn.indexer is not None:
                object.__setattr__(attn, _KEPT, attn.indexer)
                attn.indexer = None
        elif attn.indexer is None:
            if kept is None:
                raise RuntimeError(f"CSA layer {layer} has no indexer in this engine; build it all-F to search")
            attn.indexer = kept
        local[ordinal] = "F" if attn.indexer is not None else "S"
        _count_scoring(attn.indexer if attn.indexer is not None else attn.__dict__.get(_KEPT))
    if next((c for c in local if c != "."), "F") == "S":
        raise RuntimeError("the first CSA layer of a pipeline stage cannot be S")
    return "".join(local)


#: Attribute of a CSA indexer holding the number of its top-k scorings since the last :func:`apply_csa_pattern`.
_CALLS = "_indexcache_scorings"


def _count_scoring(indexer) -> None:
    """Reset (installing on first use) the counter of ``indexer.indexer_op`` calls — the step that scores the
    compressed entries and writes the shared top-k buffer (``SparseAttnIndexer.forward_cpu``)."""
    if indexer is None:
        return
    if _CALLS not in indexer.__dict__:
        op = indexer.indexer_op
        forward = op.forward

        def counted(*args, **kwargs):
            indexer.__dict__[_CALLS] += 1
            return forward(*args, **kwargs)

        op.forward = counted
    indexer.__dict__[_CALLS] = 0


def observed_csa_pattern(model) -> str:
    """What this worker's CSA layers did since :func:`apply_csa_pattern` (one character per CSA layer of the model,
    as :func:`vllm_indexcache.vllm_glue.hooks.observed_pattern`): ``F`` = indexer attached and its top-k scoring
    ran, ``S`` = detached and its scoring never ran, ``?`` = detached but it ran (something else holds it), ``-`` =
    attached and never ran, ``.`` = not on this worker. Layers never switched read ``-`` (attached) or ``S``.
    """
    from vllm_indexcache.families.deepseek_v4 import csa_layers

    attns = _csa_attentions(model)
    out = []
    for layer in csa_layers(model.config):
        attn = attns.get(layer)
        if attn is None:
            out.append(".")
            continue
        attached = attn.indexer is not None
        indexer = attn.indexer if attached else attn.__dict__.get(_KEPT)
        ran = indexer is not None and indexer.__dict__.get(_CALLS, 0) > 0
        out.append(("F" if ran else "-") if attached else ("?" if ran else "S"))
    return "".join(out)


def _step_kind(indexer) -> str:
    """``"prefill"`` when the running step has a prefill request for this indexer's K-cache (its attention
    metadata's ``num_prefills``), else ``"decode"``; a step without metadata (profile run) counts as prefill."""
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata
    if isinstance(meta, dict):
        m = meta.get(indexer.k_cache.prefix)
        if m is not None and getattr(m, "num_prefills", 1) == 0:
            return "decode"
    return "prefill"


def time_indexer(seconds: dict, calls: dict, model) -> int:
    """Time every F CSA layer's lightning indexer of ``model`` from now on: the wall time (s, ``perf_counter``; the
    CPU ops are synchronous) of ``DeepseekV4Indexer.forward`` (q projection, RoPE, quantisation, the indexer's
    compressor and K-cache insert), of ``indexer.indexer_op`` (scores over compressed entries and top-k,
    ``SparseAttnIndexer.forward_cpu``) and of ``indexer.weights_proj`` is added to ``seconds[kind]`` and counted
    in ``calls[kind]``, ``kind`` being ``"prefill"`` or ``"decode"`` (:func:`_step_kind`). Not timed: the indexer
    compressor's score GEMM, which vLLM fuses into the layer's input GEMMs (``_forward_attn_inputs``).

    Wraps the instances' ``forward`` (indexers detached by :func:`apply_csa_pattern` included); returns the number
    of indexers wrapped.
    """
    n = 0
    for attn in _csa_attentions(model).values():
        indexer = attn.indexer if attn.indexer is not None else attn.__dict__.get(_KEPT)
        if indexer is None or getattr(indexer, "_indexcache_timed", False):
            continue
        for module in (indexer, indexer.indexer_op, indexer.weights_proj):
            module.forward = _timed(module.forward, indexer, seconds, calls)
        object.__setattr__(indexer, "_indexcache_timed", True)
        n += 1
    return n


def _timed(forward, indexer, seconds: dict, calls: dict):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            kind = _step_kind(indexer)
            seconds[kind] += time.perf_counter() - t0
            calls[kind] += 1

    return timed


def kv_bytes_per_token(vllm_config) -> dict:
    """Content bytes of the caches vLLM allocates for this engine's attention layers, from their KV-cache specs
    (``get_kv_cache_spec`` of every layer in ``compilation_config.static_forward_context``).

    Per spec, the bytes of one stored entry are ``state_content_bytes`` (V4's ``fp8_ds_mla`` entry: 584 B) or else
    ``num_kv_heads × head_size × dtype size``; an entry covers ``tokens_per_state`` tokens (4 for CSA caches, 128 for
    HCA). Specs with a ``sliding_window`` (the sliding-window KV and the compressors' fp32 states) hold a fixed
    number of entries per request. Block padding (``page_size_padded``) is not counted.

    Returns:
        ``{"per_token": B per context token (all growing caches), "indexer_per_token": its indexer K-cache part,
        "per_request": B per request held by sliding-window specs, "indexer_state_per_request": its indexer
        compressor-state part}``, floats.
    """
    import torch

    out = {"per_token": 0.0, "indexer_per_token": 0.0, "per_request": 0.0, "indexer_state_per_request": 0.0}
    for name, layer in vllm_config.compilation_config.static_forward_context.items():
        get = getattr(layer, "get_kv_cache_spec", None)
        if get is None:
            continue
        spec = get(vllm_config)
        if spec is None:
            continue
        entry = getattr(spec, "state_content_bytes", None)
        if not entry:
            entry = spec.num_kv_heads * spec.head_size * torch.tensor([], dtype=spec.dtype).element_size()
        indexer = ".indexer." in name
        window = getattr(spec, "sliding_window", None)
        tokens_per_entry = getattr(spec, "tokens_per_state", None) or 1
        if window:
            held = entry * window / tokens_per_entry
            out["per_request"] += held
            if indexer:
                out["indexer_state_per_request"] += held
        else:
            per = entry / tokens_per_entry
            out["per_token"] += per
            if indexer:
                out["indexer_per_token"] += per
    return out

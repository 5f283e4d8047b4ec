"""The search's run-time F/S switch on CUDA vLLM 0.26, owned by the plugin (issue 34 item 1).

vLLM 0.26 (CUDA) builds ``DeepseekV32ForCausalLM`` / ``GlmMoeDsaForCausalLM`` from the generic
``model_executor/models/deepseek_v2.py`` (the plugin subclasses it, :mod:`vllm_indexcache.vllm_glue.model`). Each DSA
layer ``model.layers.N.self_attn`` (``DeepseekV2MLAAttention``) holds its lightning indexer as ``.indexer`` (a
``deepseek_v2.Indexer``; ``None`` on a layer built S) and its ``MultiHeadLatentAttentionWrapper`` as ``.mla_attn``,
whose forward calls ``self.indexer(hidden_states, q_c, positions, indexer_rope_emb)`` when
``self.indexer and self.is_sparse and not self.skip_topk`` (``model_executor/layers/mla.py``), then attends over the
rows of the stage's one shared ``topk_indices_buffer`` (``[max_num_batched_tokens, index_topk]`` int32): vLLM's
``FlashMLASparseImpl.forward_mqa`` natively, ``IndexCacheTritonSparseMLAImpl.forward_mqa`` (:mod:`.sparse_mla`) in the
Triton fallback. Whatever the indexer wrote last — vLLM's DeepGEMM op or the fallback's
``indexcache_triton_indexer`` op, both in place — is what the layer reads.

The switch does not rely on vLLM's ``skip_topk`` (a vLLM attribute that other versions lack or move): the first
:func:`apply_pattern_cuda` wraps the ``forward`` of every indexer instance once in a *gate* held on the indexer.
A closed gate returns the buffer untouched — no scores, no top-k, no indexer K-cache write — so the layer
sparse-attends over the top-k of the nearest preceding F layer, as an S layer built from the pattern does. An open
gate runs vLLM's (or the fallback's) forward and counts its calls of real steps (profile/dummy runs, which have no
attention metadata, are not counted): :func:`indexer_calls` reads those counts, so a caller can check after a forward
which layers really ran their indexer.

What :func:`apply_pattern_cuda` reads back per layer is what the layer's forward will do: ``S`` when the wrapper will
not call an indexer (none built, not ``is_sparse``, or vLLM's own ``skip_topk`` set) or the gate is closed; ``F`` when
the call reaches the open gate; ``?`` when it would not reach the gate (the instance's ``forward`` replaced since). The
engine must run eagerly (``enforce_eager=True``, as the search's scorer builds it): under ``torch.compile`` the
Python-level gate would be traced once and later switches ignored.
"""
from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")
_GATE = "_indexcache_gate"
_FIRST_S = ("the first layer of a pipeline stage cannot be S; use --pp-blocks equal to the pipeline-parallel "
            "size")


def _is_real_step() -> bool:
    """Whether the current forward has per-layer attention metadata (a scheduled step, not a profile/dummy run)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return is_forward_context_available() and isinstance(get_forward_context().attn_metadata, dict)


def _gate(indexer) -> dict:
    """Install (once) and return the gate of one indexer module: ``{"skip": bool, "calls": int, "forward": fn}``."""
    state = indexer.__dict__.get(_GATE)
    if state is not None:
        return state
    original = indexer.forward   # bound method of the (possibly adopted) class: vLLM's or the Triton fallback's

    def gated_forward(*args, **kwargs):
        if state["skip"]:
            return indexer.topk_indices_buffer
        if _is_real_step():
            state["calls"] += 1
        return original(*args, **kwargs)

    state = {"skip": False, "calls": 0, "forward": gated_forward}
    object.__setattr__(indexer, _GATE, state)
    object.__setattr__(indexer, "forward", gated_forward)   # nn.Module.__call__ looks up self.forward
    return state


def dsa_layers(model) -> dict[int, object]:
    """``{layer id: self_attn module}`` of the DSA layers of this worker's stage: modules named
    ``…layers.N.self_attn`` that have an ``indexer`` attribute (``None`` on layers built S)."""
    layers = {}
    for name, module in model.named_modules():
        m = _LAYER.search(name)
        if m is not None and hasattr(module, "indexer"):
            layers[int(m.group(1))] = module
    return layers


def _will_index(attn) -> str:
    """What the layer's forward will do: ``F`` (runs its indexer), ``S`` (reuses the buffer), or ``?`` when its
    indexer's ``forward`` is no longer the gate (replaced after the gate was installed: unknown, never reported as
    switched)."""
    indexer = attn.indexer
    if indexer is None:
        return "S"
    wrapper = getattr(attn, "mla_attn", attn)
    if not getattr(wrapper, "is_sparse", True) or getattr(wrapper, "skip_topk", False):
        return "S"
    if getattr(wrapper, "indexer", indexer) is not indexer:
        return "?"
    state = indexer.__dict__.get(_GATE)
    if state is None:
        return "F"
    if indexer.__dict__.get("forward") is not state["forward"]:
        return "?"
    return "S" if state["skip"] else "F"


def apply_pattern_cuda(pattern: str, model) -> str:
    """Worker side of the search's vLLM scorer on CUDA vLLM 0.26: close the gate of every layer ``pattern`` makes S,
    open it on every F layer, and read back what each layer will do.

    Args:
        pattern: one ``F``/``S`` per indexer layer (global layer id = position); layers at or beyond
            ``len(pattern)`` (MTP / NextN) are left alone: they always compute their own top-k.
        model: this worker's model (``LLM.apply_model``).

    Returns:
        the applied local pattern read back from the layers, ``"."`` for layers not on this worker, ``"?"`` where
        the layer's indexer no longer goes through the gate
        (:func:`vllm_indexcache.tools.search.scorers.check_switched` compares it with ``pattern``).

    Raises:
        RuntimeError: a layer built without an indexer made F (engine not built all-F), or the stage's first layer
            would be S.
    """
    local = ["."] * len(pattern)
    layers = sorted((i, attn) for i, attn in dsa_layers(model).items() if i < len(pattern))
    if layers and pattern[layers[0][0]] == "S":   # checked before any gate moves
        raise RuntimeError(_FIRST_S)
    for i, attn in layers:
        skip = pattern[i] == "S"
        if attn.indexer is None:
            if not skip:
                raise RuntimeError(f"layer {i} has no indexer in this engine; build it all-F to search")
        else:
            _gate(attn.indexer)["skip"] = skip
        local[i] = _will_index(attn)
    return "".join(local)


def indexer_calls(num_layers: int, model) -> str:
    """Worker side: per layer ``0 … num_layers − 1``, whether its indexer ran in a real step since the last call
    (``F``: at least once, ``S``: never, ``.``: not a DSA layer of this worker), then reset the counts.

    Only gated indexers count (:func:`apply_pattern_cuda` installs the gates); a layer built without an indexer
    reads ``S``. Compare with the pattern after a forward to prove the switch changed what ran."""
    out = ["."] * num_layers
    for i, attn in dsa_layers(model).items():
        if i >= num_layers:
            continue
        state = None if attn.indexer is None else attn.indexer.__dict__.get(_GATE)
        out[i] = "F" if state is not None and state["calls"] > 0 else "S"
        if state is not None:
            state["calls"] = 0
    return "".join(out)

"""Transformers reference of a DSA model with IndexCache index reuse: the oracle for engine tests, search, distillation.

IndexCache (arXiv 2603.12201): each DSA layer is ``F`` (runs its lightning indexer) or ``S`` (reuses the top-k of
the nearest preceding F layer, in the same forward pass). This module loads a DeepSeek-V3.2, GLM-5 or DeepSeek-V4
checkpoint with transformers (eager attention, no edits to transformers' files) and applies a pattern:

* ``GlmMoeDsaForCausalLM`` (transformers ``models/glm_moe_dsa/modeling_glm_moe_dsa.py``) natively supports reuse:
  an attention whose ``indexer`` is ``None`` takes ``prev_topk_indices`` handed up by the previous layer. We build
  every indexer that the checkpoint has weights for and switch patterns by attaching/detaching the modules.
* ``DeepseekV32ForCausalLM`` (``models/deepseek_v32/modeling_deepseek_v32.py``) has no reuse: we override each
  layer's ``DeepseekV32Indexer.forward`` on the instance. F layers run the original forward and publish its top-k;
  S layers skip the indexer and return the published top-k. A forward pre-hook on the decoder stack clears the
  published top-k at the start of every forward. Parameters and state-dict keys are untouched. (GLM indexers get
  the same override, used only for ``ties="lower"``.)
* ``DeepseekV4ForCausalLM`` (``models/deepseek_v4/modeling_deepseek_v4.py``): only the CSA layers own an indexer
  (``self_attn.compressor.indexer``, ``DeepseekV4Indexer``; the pattern has one F/S per CSA layer, the family's
  ``indexer_layers``), no reuse in transformers. The same override: F CSA layers run
  ``DeepseekV4Indexer.forward(hidden_states, q_residual, position_ids, past_key_values, layer_idx)`` and publish its
  ``[B, S, min(index_topk, entries)]`` compressed-entry ids (-1 for future entries); S CSA layers return the published
  ids, which index their own compressed KV (every CSA layer compresses the same 4-token spans), and skip their
  indexer's compressor. Only transformers' tie rule (``ties="transformers"``).

Transformers behaviour worth knowing (5.19):

* The indexer runs under ``@torch.no_grad()`` and returns ``topk(min(index_topk, S_keys))`` indices of
  ``scores + mask``; the eager mask is additive float with ``finfo.min`` at invisible keys. A query with fewer
  visible keys than ``index_topk`` therefore still gets ``index_topk`` indices: all its visible keys first, then
  arbitrary *future* keys (score ``finfo.min``), which the causal mask removes again. :func:`record_topk` reports
  those padding entries as ``-1``.
* When the whole sequence has ≤ ``index_topk`` tokens every key is selected and the layer is exactly dense.
* Exact score ties are common, not rare: ``I[t,s] = 0`` exactly whenever ``q[t,h]·k[s] < 0`` for every head (ReLU),
  probability ``2^-H`` per key — 1/16 with the toy's 4 indexer heads, and with random-sign head weights 0 sits
  near the top-k boundary. ``torch.topk`` on CPU breaks such ties in no specified order (neither lower nor higher
  index first), so transformers' selection is not reproducible by another implementation. ``ties="lower"``
  replaces the F layers' selection by :func:`vllm_indexcache.ops.indexer.cpu.indexer_topk` (ties → lower position,
  the rule of this package's backend), computed from the same q/k/weights (:func:`indexer_qkw`). On the 4-layer toy
  models about one row in eight has an exact tie at the boundary (prompt log-probs then differ by up to ~0.1 nat
  between the two rules), and with transformers' rule even cached ``generate`` and recomputed greedy decoding can
  disagree (the tie order depends on the tensor shape); with ``ties="lower"`` they agree.
* Indexer RoPE acts on the *first* ``qk_rope_head_dim`` dims of q/k (main MLA: the *last*); DeepSeek-V3.2 rotates
  NeoX-style (half split), GLM interleaved — and transformers' interleaved rotation writes its output
  de-interleaved (even lanes, then odd lanes), so its rotated vectors are a fixed permutation of vLLM's (likewise
  the main MLA's ``q_pe``/``k_pe``, interleaved in both architectures). Dot products, hence scores, are unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

__all__ = [
    "load_reference", "set_pattern", "get_pattern", "default_pattern", "set_ties", "TIES",
    "prompt_logprobs", "greedy_generate", "record_topk", "indexer_qkw", "set_fast", "get_fast",
]

_ARCH_DEEPSEEK = "DeepseekV32ForCausalLM"
_ARCH_GLM = "GlmMoeDsaForCausalLM"
_ARCH_V4 = "DeepseekV4ForCausalLM"
_ARCHS = (_ARCH_DEEPSEEK, _ARCH_GLM, _ARCH_V4)
_STATE = "_indexcache_state"
#: Tie rules for the F layers' top-k: transformers' own ``torch.topk`` (order among equal scores unspecified), or
#: this package's rule (descending score, ties towards the lower key position).
TIES = ("transformers", "lower")


@dataclass
class _ReuseState:
    """Per-model IndexCache state (kept in the model's ``__dict__``, not registered as a submodule)."""

    arch: str
    pattern: str
    #: GLM: the indexer module of each layer, or None where the checkpoint has no indexer weights.
    indexers: list = field(default_factory=list)
    #: DeepSeek: the top-k published by the last F layer of the running forward.
    last_topk: torch.Tensor | None = None
    ties: str = "transformers"
    #: the search's fast path (:func:`set_fast`): top-k attention through SDPA, causal row-chunked top-k.
    fast: bool = False
    hooks: list = field(default_factory=list)


def _arch(model) -> str:
    from transformers import DeepseekV4ForCausalLM, DeepseekV32ForCausalLM, GlmMoeDsaForCausalLM

    if isinstance(model, GlmMoeDsaForCausalLM):
        return _ARCH_GLM
    if isinstance(model, DeepseekV32ForCausalLM):
        return _ARCH_DEEPSEEK
    if isinstance(model, DeepseekV4ForCausalLM):
        return _ARCH_V4
    raise TypeError(f"{type(model).__name__}: expected one of {', '.join(_ARCHS)}")


def _indexer(layer, arch: str):
    """The indexer module of a decoder layer (the family's ``hf_attention``.``hf_indexer`` path), or None."""
    from operator import attrgetter

    from vllm_indexcache.families import family_for

    family = family_for(arch)
    try:
        return attrgetter(f"{family.hf_attention}.{family.hf_indexer}")(layer)
    except AttributeError:
        return None


def _layers(model):
    """The decoder layers that own a lightning indexer, in pattern order (the family's ``indexer_layers``)."""
    from vllm_indexcache.families import family_for

    layers = model.model.layers
    return [layers[i] for i in family_for(_arch(model)).indexer_layers(model.config)]


def _check(pattern: str, num_layers: int) -> str:
    from vllm_indexcache.pattern import parse_pattern

    return parse_pattern(pattern, num_layers, key="pattern")


def _lower_ties_topk(indexer, hidden_states, q_resid, position_embeddings, position_ids, past_key_values,
                     fast: bool = False):
    """F-layer top-k with this package's tie rule, in transformers' format ``[1, S, min(index_topk, S_keys)]``.

    Assumes one causal sequence without padding (what this module feeds the model); padding rows of queries with
    fewer visible keys than the width get the last key position, a future key that the causal mask removes.
    ``fast``: :func:`~vllm_indexcache.tools.indexer_topk_causal.indexer_topk_causal` (same output) instead of the
    oracle :func:`vllm_indexcache.ops.indexer.indexer_topk`.
    """
    if fast:
        from vllm_indexcache.tools.indexer_topk_causal import indexer_topk_causal as indexer_topk
    else:
        from vllm_indexcache.ops.indexer import indexer_topk

    if hidden_states.shape[0] != 1:
        raise NotImplementedError(f"ties='lower' supports batch size 1, got {hidden_states.shape[0]}")
    q, k, w = indexer_qkw(indexer, hidden_states, q_resid, position_embeddings)
    if past_key_values is not None:
        k = past_key_values.update_indexer(k[None], indexer.layer_idx)[0]
    S_keys = k.shape[0]
    if position_ids is None:
        position_ids = torch.arange(S_keys - q.shape[0], S_keys, device=q.device)[None]
    topk = indexer_topk(q, k, w, position_ids[0].long(), indexer.index_topk)[:, : min(indexer.index_topk, S_keys)]
    return torch.where(topk < 0, S_keys - 1, topk).to(torch.int32)[None]


def _indexer_forward(indexer, state: _ReuseState, layer_idx: int):
    """Instance-level ``forward`` for a ``DeepseekV32Indexer`` / ``GlmMoeDsaIndexer``.

    F: transformers' forward (``ties="transformers"``) or :func:`_lower_ties_topk`, published in the state.
    S (DeepSeek only; GLM S layers have no indexer attached): the top-k published by the last F layer.
    """
    original = type(indexer).forward
    if state.arch == _ARCH_V4:
        return _v4_indexer_forward(indexer, original, state, layer_idx)

    def forward(hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                past_key_values=None):
        if state.pattern[layer_idx] == "S":
            if state.last_topk is None:
                raise RuntimeError(f"layer {layer_idx} is S but no F layer ran before it in this forward")
            return state.last_topk
        if state.ties == "lower":
            topk = _lower_ties_topk(indexer, hidden_states, q_resid, position_embeddings, position_ids,
                                    past_key_values, fast=state.fast)
        else:
            topk = original(indexer, hidden_states, q_resid, position_embeddings, attention_mask, position_ids,
                            past_key_values=past_key_values)
        state.last_topk = topk
        return topk

    return forward


def _v4_indexer_forward(indexer, original, state: _ReuseState, layer_idx: int):
    """Instance-level ``forward`` for a ``DeepseekV4Indexer`` (transformers 5.19 signature ``(hidden_states,
    q_residual, position_ids, past_key_values, layer_idx)``, returns ``[B, S, min(index_topk, entries)]``
    compressed-entry ids, -1 for entries after the query).

    F: transformers' forward, published in the state. S: the ids the last F CSA layer published (entry ``i`` is the
    same 4-token span in every CSA layer); the S layer's own indexer, compressor included, does not run.
    """

    def forward(hidden_states, q_residual, position_ids, past_key_values, layer_idx_arg):
        if state.pattern[layer_idx] == "S":
            if state.last_topk is None:
                raise RuntimeError(f"CSA layer {layer_idx} is S but no F CSA layer ran before it in this forward")
            return state.last_topk
        topk = original(indexer, hidden_states, q_residual, position_ids, past_key_values, layer_idx_arg)
        state.last_topk = topk
        return topk

    return forward


def _install(model) -> _ReuseState:
    """Attach the IndexCache state and the indexer ``forward`` overrides once; return the state."""
    state = model.__dict__.get(_STATE)
    if state is not None:
        return state
    arch = _arch(model)
    layers = _layers(model)
    indexers = [_indexer(layer, arch) for layer in layers]
    if arch == _ARCH_GLM:
        state = _ReuseState(arch, "".join("F" if m is not None else "S" for m in indexers), indexers=indexers)
    else:
        state = _ReuseState(arch, "F" * len(layers))
    for i, module in enumerate(indexers):
        if module is not None:
            module.forward = _indexer_forward(module, state, i)

    def reset(module, args):
        state.last_topk = None

    state.hooks.append(model.model.register_forward_pre_hook(reset))
    object.__setattr__(model, _STATE, state)
    return state


def set_ties(model, ties: str) -> None:
    """Choose the F layers' tie rule, one of :data:`TIES` (see the module docstring).

    Raises:
        ValueError: unknown rule.
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: expected one of {TIES}")
    state = _install(model)
    if state.arch == _ARCH_V4 and ties != "transformers":
        raise ValueError(f"ties={ties!r}: {_ARCH_V4} supports only ties='transformers'")
    state.ties = ties


def set_fast(model, fast: bool) -> None:
    """Switch the search's fast path on or off (default off: transformers' eager attention, the oracle's top-k).

    On: attention over each query's top-k through torch SDPA (:mod:`vllm_indexcache.tools.topk_attention`, the
    same selection mask as eager, fused; outputs equal to eager up to float rounding), and with ``ties="lower"``
    the F layers' top-k from :func:`vllm_indexcache.tools.indexer_topk_causal.indexer_topk_causal` (the same
    indices as the oracle). DeepSeek-V3.2 and GLM-5 only.

    Raises:
        ValueError: ``fast`` on a DeepSeek-V4 model (its attention and indexer have other signatures).
    """
    state = _install(model)
    if fast and state.arch == _ARCH_V4:
        raise ValueError(f"fast=True: {_ARCH_V4} has no fast path; use fast=False")
    if fast:
        from vllm_indexcache.tools import topk_attention

        topk_attention.register()
        model.set_attn_implementation(topk_attention.NAME)
    elif state.fast:
        model.set_attn_implementation("eager")
    state.fast = bool(fast)


def get_fast(model) -> bool:
    """Whether :func:`set_fast` switched the fast path on."""
    return _install(model).fast


def default_pattern(model) -> str:
    """The checkpoint's own pattern: ``index_topk_pattern`` from its config when set (e.g. a checkpoint written by
    ``vllm-indexcache distill``, which drops S-layer indexers); for GLM-5.2-style checkpoints that ship indexers only
    on F layers, the layers that have them; otherwise all ``F``."""
    state = _install(model)
    configured = getattr(model.config, "index_topk_pattern", None)
    if isinstance(configured, str) and len(configured) == len(_layers(model)):
        return configured
    if state.arch == _ARCH_GLM:
        return "".join("F" if m is not None else "S" for m in state.indexers)
    return "F" * len(_layers(model))


def get_pattern(model) -> str:
    """The pattern currently applied to ``model``."""
    return _install(model).pattern


def set_pattern(model, pattern: str | None) -> None:
    """Switch ``model`` to ``pattern`` in place, without reloading (cheap: no tensor is touched).

    Args:
        model: a ``DeepseekV32ForCausalLM``, ``GlmMoeDsaForCausalLM`` or ``DeepseekV4ForCausalLM`` (from
            :func:`load_reference` or not).
        pattern: one ``F``/``S`` per indexer layer of the model's family, or None for :func:`default_pattern`.

    Raises:
        ValueError: invalid pattern (:func:`vllm_indexcache.pattern.parse_pattern`), or an ``F`` on a GLM layer
            whose indexer weights are not in the checkpoint.
        TypeError: unsupported model class.

    Note (GLM): an S layer's indexer is detached from the module tree (held aside and re-attached, moved to the
    attention's device, when the layer becomes F again), so ``model.to(...)``/``state_dict()`` only see the
    indexers of the current F layers. ``config.indexer_types`` is kept in sync with the pattern.
    """
    state = _install(model)
    layers = _layers(model)
    pattern = default_pattern(model) if pattern is None else _check(pattern, len(layers))
    if state.arch == _ARCH_GLM:
        missing = [i for i, c in enumerate(pattern) if c == "F" and state.indexers[i] is None]
        if missing:
            raise ValueError(f"pattern={pattern!r}: layers {missing} are F but the checkpoint has no indexer weights "
                             "for them")
        for i, (layer, c) in enumerate(zip(layers, pattern)):
            attn = layer.self_attn
            if c == "F":
                module = state.indexers[i]
                if attn.indexer is not module:
                    attn.indexer = module.to(attn.q_a_proj.weight.device)
            else:
                attn.indexer = None
            attn.skip_topk = c == "S"
        model.config.indexer_types = ["full" if c == "F" else "shared" for c in pattern]
    state.pattern = pattern


def load_reference(model_dir, pattern: str | None = None, dtype: torch.dtype = torch.float32, *,
                   ties: str = "transformers"):
    """Load a DSA checkpoint with transformers (eager attention, eval mode) and apply an IndexCache pattern.

    Args:
        model_dir: Hugging Face model directory (``DeepseekV32ForCausalLM``, ``GlmMoeDsaForCausalLM`` or
            ``DeepseekV4ForCausalLM`` in transformers' layout).
        pattern: ``F``/``S`` per indexer layer of the family; None = all ``F`` (see :func:`default_pattern` for GLM
            checkpoints without indexer weights on some layers).
        dtype: parameter dtype (``indexer.weights_proj`` stays float32, as transformers keeps it).
        ties: tie rule of the F layers' top-k, one of :data:`TIES`. The default reproduces unpatched transformers
            bit for bit; ``"lower"`` matches this package's backend (use it as the engine's oracle); DeepSeek-V4
            takes ``"transformers"`` only.

    Returns:
        The model; switch patterns later with :func:`set_pattern`.

    Raises:
        ValueError: invalid pattern (its length is checked against the family's indexer layers) or unknown
            ``ties``.
        TypeError: unsupported architecture.
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: expected one of {TIES}")
    model_cls = model_class(model_dir)
    config = model_cls.config_class.from_pretrained(model_dir)
    if pattern is not None:
        from vllm_indexcache.families import family_for

        _check(pattern, family_for(model_cls.__name__).num_indexer_layers(config))
    kwargs = dict(dtype=dtype, attn_implementation="eager")
    if getattr(config, "model_type", None) == "glm_moe_dsa":
        # Build an indexer on every layer; those without weights in the checkpoint are dropped below.
        config.indexer_types = ["full"] * config.num_hidden_layers
        model, info = model_cls.from_pretrained(model_dir, config=config, output_loading_info=True,
                                                           **kwargs)
        missing = {int(m.group(1)) for key in info.get("missing_keys", ())
                   if (m := re.search(r"layers\.(\d+)\.self_attn\.indexer\.", key))}
        for i in sorted(missing):
            model.model.layers[i].self_attn.indexer = None
    else:
        model = model_cls.from_pretrained(model_dir, config=config, **kwargs)
    model.eval()
    set_ties(model, ties)
    set_pattern(model, pattern)
    return model


def model_class(model_dir):
    """transformers class named by ``config.json``'s ``architectures`` (explicit, because importing vLLM re-maps
    transformers' ``AutoConfig`` for ``deepseek_v32`` to its own config class).

    Raises:
        TypeError: the architecture is not a DSA model transformers ships.
    """
    import json
    from pathlib import Path

    import transformers

    arch = (json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or [None])[0]
    if arch not in _ARCHS:
        raise TypeError(f"architectures={arch!r}: expected one of {', '.join(_ARCHS)}")
    return getattr(transformers, arch)


def _input_ids(model, token_ids) -> torch.Tensor:
    ids = list(token_ids)
    if not ids:
        raise ValueError("token_ids is empty")
    return torch.tensor([ids], dtype=torch.long, device=model.device)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[0]


def prompt_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities of a prompt under the model (one full forward, no KV cache).

    Args:
        model: from :func:`load_reference`.
        token_ids: the prompt, ``len ≥ 1``.

    Returns:
        ``[len - 1]`` float32: entry ``i`` is ``log p(token_ids[i+1] | token_ids[:i+1])`` (natural log).

    Raises:
        ValueError: empty ``token_ids``.
    """
    ids = _input_ids(model, token_ids)
    logp = torch.log_softmax(_logits(model, ids)[:-1].float(), dim=-1)
    return logp.gather(1, ids[0, 1:, None]).squeeze(1).cpu()


def greedy_generate(model, token_ids: list[int], max_new_tokens: int, *,
                    stop_token_ids: Iterable[int] | None = None) -> list[int]:
    """Greedy decoding by full recomputation (no KV cache, so S layers never depend on cache contents).

    Args:
        model: from :func:`load_reference`.
        token_ids: the prompt, ``len ≥ 1``.
        max_new_tokens: number of tokens to generate (≥ 0).
        stop_token_ids: stop after emitting one of these (it is included); default None = never stop early
            (like vLLM with ``ignore_eos=True``).

    Returns:
        The generated token ids only (without the prompt). Ties in the argmax go to the lower token id.

    Raises:
        ValueError: empty prompt or negative ``max_new_tokens``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stops = set(stop_token_ids or ())
    seq = list(token_ids)
    _input_ids(model, seq)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(torch.argmax(_logits(model, _input_ids(model, seq))[-1].float()))
        new.append(nxt)
        seq.append(nxt)
        if nxt in stops:
            break
    return new


def record_topk(model, token_ids: list[int]) -> dict[int, torch.Tensor]:
    """Top-k key positions each layer actually attended to, for one prompt (one forward, no KV cache).

    Args:
        model: from :func:`load_reference` (or any model :func:`set_pattern` accepts).
        token_ids: the prompt, ``len = S ≥ 1``.

    Returns:
        ``{layer_idx: [S, index_topk] int32}`` for every DSA layer: F layers their own top-k, S layers the one they
        reused. Rows are in descending score order (among equal scores: unspecified with ``ties="transformers"``,
        lower position first with ``ties="lower"``). Entries
        that are not visible keys — transformers' padding for queries with fewer than ``index_topk`` visible keys,
        and the columns beyond ``S`` when ``S < index_topk`` — are ``-1``. DeepSeek-V4: keyed by CSA-layer ordinal,
        entries are compressed-entry ids (entry ``e`` covers tokens ``4e .. 4e+3``; -1 where transformers marks an
        entry after the query or the row has fewer entries than ``index_topk``).
    """
    state = _install(model)
    ids = _input_ids(model, token_ids)
    recorded: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(_layers(model)):
        if state.arch == _ARCH_GLM:
            def hook(module, args, output, i=i):
                recorded[i] = output[2]
            handles.append(layer.self_attn.register_forward_hook(hook))
        else:
            def hook(module, args, output, i=i):
                recorded[i] = output
            handles.append(_indexer(layer, state.arch).register_forward_hook(hook))
    try:
        _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    S = ids.shape[1]
    topk = model.config.index_topk
    query_pos = torch.arange(S, device=ids.device)[:, None]
    out = {}
    for i in sorted(recorded):
        idx = recorded[i][0].to(torch.int32)                                  # [S, min(topk, S)]
        idx = torch.where(idx.long() <= query_pos, idx, torch.full_like(idx, -1))
        full = torch.full((S, topk), -1, dtype=torch.int32, device=idx.device)
        full[:, : idx.shape[1]] = idx
        out[i] = full.cpu()
    return out


@torch.no_grad()
def indexer_qkw(indexer, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]):
    """The inputs of :mod:`vllm_indexcache.ops.indexer` from a transformers indexer module, for one sequence:
    :func:`vllm_indexcache.tools.indexer_projection.indexer_qkw` (maths, RoPE layout by class, sources) without the
    batch dimension.

    Args:
        indexer: a ``DeepseekV32Indexer`` or ``GlmMoeDsaIndexer``.
        hidden_states: ``[1, S, hidden_size]`` the layer's normalised input.
        q_resid: ``[1, S, q_lora_rank]`` MLA's ``q_a_layernorm(q_a_proj(x))``.
        position_embeddings: ``(cos, sin)`` from the model's rotary embedding, ``[1, S, qk_rope_head_dim]``.

    Returns:
        ``(q [S, H, D], k [S, D], weights [S, H])`` in ``promote_types(input dtype, float32)``, weights including
        ``H^-0.5 · D^-0.5``.

    Raises:
        TypeError: unsupported indexer class.
    """
    from vllm_indexcache.tools.indexer_projection import indexer_qkw as projection

    q, k, w = projection(indexer, hidden_states, q_resid, position_embeddings)
    return q[0], k[0], w[0]

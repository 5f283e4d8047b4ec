"""Multi-layer indexer distillation (IndexCache, arXiv 2603.12201 §3.2, Eq. 1) for transformers DSA models.

With an IndexCache pattern, an F layer ``l`` runs its lightning indexer and the S layers ``l+1 .. l+m`` that follow
it (up to the next F layer) reuse its top-k. The paper trains layer ``l``'s indexer against the attention of every
layer it serves::

    L_multi(l) = Σ_{j=0..m} 1/(m+1) Σ_t KL( p_t^(l+j) || q_t^(l) )                                        (Eq. 1)

* ``q_t^(l) = softmax(I_t^(l))`` — layer ``l``'s index scores of query ``t`` over its support;
* ``p_t^(j)`` — layer ``j``'s main attention probabilities of query ``t``, summed over heads and L1-normalised,
  treated as a constant (detached);
* support — *dense* variant: every visible (causal) key; *sparse* variant: the top-k keys layer ``l`` selected
  (which its S layers attend to as well), with ``p`` and ``q`` both renormalised there.

Proposition 1 of the paper: since ``Σ_j H(p^(l+j))`` does not depend on the indexer, ``∇ L_multi = ∇ KL(p̄ || q)``
with ``p̄ = 1/(m+1) Σ_j p^(l+j)``. This module computes Eq. 1 literally (one KL per served layer), so that the
proposition is a test, not an assumption. ``cross_layer=False`` keeps only the ``j = 0`` term: the per-layer
DeepSeek-V3.2 warm-up loss, the paper's ablation "without the cross-layer term".

The model-level entry point is :class:`MultiLayerIndexerDistiller`: forward hooks on each layer's attention module
(``DeepseekV32Attention`` / ``GlmMoeDsaAttention``, eager attention) read the attention probabilities that the
module returns; a forward pre-hook on each F layer's indexer reads its inputs (``hidden_states``, ``q_resid``,
``(cos, sin)``, the mask) and a forward hook its top-k. After the model's forward, :meth:`~MultiLayerIndexerDistiller.
loss` recomputes layer ``l``'s index scores *with gradient* from those detached inputs. Gradient therefore reaches
only the parameters of F-layer indexers (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``): never the rest of the
model, never an S layer's indexer. The distiller keeps its captures on the instance (no module-level state) and
removes its hooks on ``close()`` / context exit.

Score maths (transformers 5.19 ``models/deepseek_v32/modeling_deepseek_v32.py`` ``DeepseekV32Indexer.forward``,
GLM ``models/glm_moe_dsa``; DeepSeek-V3.2 report arXiv 2512.02556)::

    q[t, h] = RoPE(wq_b(q_resid[t]))[h]        k[s] = RoPE(LayerNorm(wk(x[s])))        (RoPE on the first dims)
    I[t, s] = Σ_h weights_proj(x[t])[h] · H^-0.5 · ReLU(q[t, h] · k[s] · D^-0.5)

Computed by :func:`vllm_indexcache.tools.training.indexer_loss.indexer_scores` on the shared projection
:func:`vllm_indexcache.tools.indexer_projection.indexer_qkw`, in ``promote_types(input dtype, float32)``: float32 as in
transformers, float64 for float64 inputs (the gradient tests need that).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "served_layers", "attention_target", "visible_from_mask", "support_from_topk", "indexer_scores",
    "indexer_log_probs", "kl_rows", "multi_layer_indexer_loss", "MultiLayerIndexerDistiller", "DistillLoss",
]

VARIANTS = ("dense", "sparse")


def served_layers(pattern: str) -> dict[int, list[int]]:
    """``{l: [l, l+1, ..., l+m]}`` for each F layer ``l`` of ``pattern``: the layer itself and the S layers up to the
    next F layer, which reuse its top-k.

    Raises:
        ValueError: ``pattern`` empty, not only ``F``/``S``, or starting with ``S``.
    """
    if not pattern or set(pattern) - {"F", "S"} or pattern[0] != "F":
        raise ValueError(f"pattern={pattern!r}: must be a string of 'F'/'S' starting with 'F'")
    out: dict[int, list[int]] = {}
    current = 0
    for i, c in enumerate(pattern):
        if c == "F":
            current = i
            out[i] = [i]
        else:
            out[current].append(i)
    return out


def visible_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool visibility (True = the key may be attended) from a transformers attention mask.

    Args:
        mask: bool (True = visible) or additive float (0 visible, ``finfo.min`` / ``-inf`` masked), any shape.
    """
    if mask.dtype == torch.bool:
        return mask
    return torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min / 2)


def support_from_topk(topk: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T, S]``: the visible keys among the top-k indices ``topk`` ``[B, T, k]`` (int).

    transformers pads the top-k of queries with fewer than ``k`` visible keys with arbitrary invisible positions;
    the ``& visible`` drops those, as the attention's causal mask does.
    """
    sel = torch.zeros(visible.shape, dtype=torch.bool, device=visible.device)
    sel.scatter_(-1, topk.long().clamp(0, visible.shape[-1] - 1), True)
    return sel & visible


def attention_target(attn_weights: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """``p[b, t, s]`` — main attention probabilities summed over heads and L1-normalised, detached.

    Args:
        attn_weights: ``[B, H, T, S]`` softmax probabilities (what an eager DSA attention module returns as its
            second output), any float dtype.
        visible: optional bool broadcastable to ``[B, T, S]``; entries outside it are set to exactly 0 first.

    Returns:
        ``[B, T, S]`` in ``attn_weights``' dtype (at least float32), rows summing to 1, no gradient.
    """
    w = attn_weights.detach()
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    p = w.sum(1)
    if visible is not None:
        p = p.masked_fill(~visible.expand_as(p), 0.0)
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def indexer_scores(indexer, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   visible: torch.Tensor | None = None) -> torch.Tensor:
    """Index scores ``I[b, t, s]`` of one transformers indexer, differentiable w.r.t. its parameters: the training
    recipe's :func:`vllm_indexcache.tools.training.indexer_loss.indexer_scores` (q, k, w from
    :func:`vllm_indexcache.tools.indexer_projection.indexer_qkw`: RoPE layout from the indexer's class, DeepSeek-V3.2
    NeoX, GLM-5 interleaved; every product in ``promote_types(input dtype, float32)``).

    Args:
        indexer: ``DeepseekV32Indexer`` or ``GlmMoeDsaIndexer``.
        hidden_states: ``[B, T, hidden]`` the attention's (normalised) input (detached keeps the gradient inside
            the indexer).
        q_resid: ``[B, T, q_lora_rank]`` MLA's ``q_a_layernorm(q_a_proj(x))`` (detached likewise).
        position_embeddings: ``(cos, sin)`` from the model's rotary embedding, ``[B or 1, T, qk_rope_head_dim]``.
        visible: bool broadcastable to ``[B, T, T]`` (True = visible key); default causal; invisible → ``-inf``.

    Returns:
        ``[B, T, T]`` in ``promote_types(input dtype, float32)``.

    Raises:
        TypeError: another indexer class.
    """
    from vllm_indexcache.tools.training.indexer_loss import indexer_scores as scores

    cos, sin = position_embeddings
    return scores(indexer, hidden_states, q_resid, cos, sin, mask=visible)


def indexer_log_probs(scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``log q[b, t, s]`` — log-softmax of ``scores`` over ``support`` (bool, broadcastable), ``-inf`` outside it,
    so that ``q = exp(log q)`` puts exactly zero probability on masked (future / unselected) keys."""
    support = support.expand_as(scores)
    return scores.masked_fill(~support, float("-inf")).log_softmax(-1)


def kl_rows(target: torch.Tensor, scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``KL(p_t || q_t)`` per query: ``[B, T]``.

    ``p`` = ``target`` (detached) zeroed outside ``support`` and renormalised; ``q`` = softmax of ``scores`` over
    ``support``. ``0 · log 0 = 0``; a row with no support contributes 0.
    """
    support = support.expand_as(scores)
    p = target.detach().to(scores.dtype).masked_fill(~support, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    logq = indexer_log_probs(scores, support).masked_fill(~support, 0.0)
    pos = p > 0
    logp = torch.where(pos, p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p))
    return torch.where(pos, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def multi_layer_indexer_loss(scores: torch.Tensor, targets: list[torch.Tensor] | tuple[torch.Tensor, ...],
                             support: torch.Tensor, *, cross_layer: bool = True, reduction: str = "mean",
                             query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1 for one F layer ``l``: ``Σ_{j=0..m} 1/(m+1) Σ_t KL(p_t^(l+j) || softmax(I_t^(l)))``.

    Args:
        scores: ``[B, T, S]`` float, layer ``l``'s index scores (:func:`indexer_scores`; gradient flows here).
        targets: ``m + 1`` tensors ``[B, T, S]`` — ``p^(l), p^(l+1), ..., p^(l+m)`` (:func:`attention_target`),
            the F layer's own first. Detached here.
        support: bool broadcastable to ``[B, T, S]``: visible keys (dense variant) or layer ``l``'s selected top-k ∩
            visible (sparse variant). ``p`` and ``q`` are renormalised on it.
        cross_layer: False = only ``targets[0]`` (the single-layer loss, the paper's ablation).
        reduction: ``"sum"`` — Eq. 1 as written, summed over queries ``t`` and batch rows; ``"mean"`` — divided by
            the number of queries counted (``B·T``, or ``query_mask.sum()``), nats per query.
        query_mask: optional bool ``[B, T]``: queries to count (e.g. not padding).

    Returns:
        0-dim tensor in ``scores``' dtype.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}: expected 'sum' or 'mean'")
    if not targets:
        raise ValueError("targets is empty: pass at least the F layer's own attention target")
    used = list(targets) if cross_layer else [targets[0]]
    total = scores.new_zeros(())
    for p in used:
        rows = kl_rows(p, scores, support)
        if query_mask is not None:
            rows = rows * query_mask.to(rows.dtype)
        total = total + rows.sum() / len(used)
    if reduction == "mean":
        n = query_mask.sum() if query_mask is not None else scores.shape[0] * scores.shape[1]
        total = total / max(int(n), 1)
    return total


@dataclass
class DistillLoss:
    """Result of :meth:`MultiLayerIndexerDistiller.loss`."""

    total: torch.Tensor                                     #: mean over F layers of Eq. 1 (with gradient)
    per_layer: dict[int, float] = field(default_factory=dict)  #: F layer id -> its Eq. 1 value (float)


class MultiLayerIndexerDistiller:
    """Collects, through module hooks, what Eq. 1 needs during a forward of a transformers DSA model, then computes
    the loss of every F layer.

    Usage::

        with MultiLayerIndexerDistiller(model, pattern, variant="dense") as dist:
            with torch.no_grad():          # warm-up: main model frozen
                model(input_ids=ids, use_cache=False)
            out = dist.loss()              # out.total has gradient into F-layer indexers only
        out.total.backward()

    The model must run eager attention (``attn_implementation="eager"``: the attention module then returns its
    probabilities) and, for patterns with S layers, must reuse top-k as IndexCache does — load it with
    :func:`vllm_indexcache.tools.reference.load_reference` or call :func:`~vllm_indexcache.tools.reference.set_pattern`
    (the
    distiller does not change the model's pattern: it reads it from there unless ``pattern`` is given).

    Args:
        model: ``DeepseekV32ForCausalLM`` or ``GlmMoeDsaForCausalLM``.
        pattern: F/S per DSA layer; default the pattern installed on ``model`` by
          :mod:`vllm_indexcache.tools.reference`,
            else ``config.index_topk_pattern``, else all F.
        variant: ``"dense"`` (KL over all visible keys) or ``"sparse"`` (over layer ``l``'s selected top-k).
        cross_layer: False = the ablation without the cross-layer term (each F indexer sees only its own layer).
        reduction: see :func:`multi_layer_indexer_loss`.

    Captures are kept for one forward: each forward of the decoder stack clears them (pre-hook), and
    :meth:`loss` releases them.
    """

    def __init__(self, model, pattern: str | None = None, *, variant: str = "dense", cross_layer: bool = True,
                 reduction: str = "mean"):
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            raise ValueError(f"attn_implementation={model.config._attn_implementation!r}: the distiller reads the "
                             "attention probabilities that only eager attention returns; load with "
                             "attn_implementation='eager'")
        self.model = model
        from vllm_indexcache.families import family_for

        # the decoder layers that own an indexer, in pattern order (pattern character i -> self.layers[i])
        self.layers = [model.model.layers[i] for i in family_for(type(model).__name__).indexer_layers(model.config)]
        if pattern is None:
            state = model.__dict__.get("_indexcache_state")
            pattern = (state.pattern if state is not None
                       else getattr(model.config, "index_topk_pattern", None) or "F" * len(self.layers))
        if len(pattern) != len(self.layers):
            raise ValueError(f"pattern={pattern!r}: {len(pattern)} characters for {len(self.layers)} indexer layers")
        self.pattern = pattern
        self.served = served_layers(pattern)
        self.variant, self.cross_layer, self.reduction = variant, cross_layer, reduction
        self._targets: dict[int, torch.Tensor] = {}
        self._inputs: dict[int, tuple] = {}
        self._topk: dict[int, torch.Tensor] = {}
        self._handles: list = []

    # -- hooks ---------------------------------------------------------------------------------------------------
    def attach(self) -> MultiLayerIndexerDistiller:
        if self._handles:
            return self
        self._handles.append(self.model.model.register_forward_pre_hook(lambda m, a: self.clear()))
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            self._handles.append(attn.register_forward_hook(self._attn_hook(i)))
            if self.pattern[i] == "F":
                if attn.indexer is None:
                    raise ValueError(f"layer {i} is F in pattern {self.pattern!r} but has no indexer module")
                self._handles.append(attn.indexer.register_forward_pre_hook(self._indexer_pre_hook(i)))
                self._handles.append(attn.indexer.register_forward_hook(self._indexer_hook(i)))
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> MultiLayerIndexerDistiller:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    def clear(self) -> None:
        self._targets.clear()
        self._inputs.clear()
        self._topk.clear()

    def _attn_hook(self, i: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(f"layer {i}: the attention returned no probabilities (eager attention needed)")
            self._targets[i] = attention_target(weights)
        return hook

    def _indexer_pre_hook(self, i: int):
        def hook(module, args):
            hidden_states, q_resid, (cos, sin), mask = args[:4]
            self._inputs[i] = (hidden_states.detach(), q_resid.detach(), (cos.detach(), sin.detach()),
                               visible_from_mask(mask.detach()))
        return hook

    def _indexer_hook(self, i: int):
        def hook(module, args, output):
            self._topk[i] = output.detach()
        return hook

    # -- loss ----------------------------------------------------------------------------------------------------
    def layer_loss(self, l: int) -> torch.Tensor:
        """Eq. 1 for F layer ``l`` from the last forward's captures (gradient into layer ``l``'s indexer only)."""
        if l not in self._inputs:
            raise RuntimeError(f"F layer {l}: nothing captured; run the model's forward inside the distiller")
        hidden_states, q_resid, pos_emb, visible = self._inputs[l]
        indexer = self.layers[l].self_attn.indexer
        scores = indexer_scores(indexer, hidden_states, q_resid, pos_emb, visible)
        visible = visible.expand_as(scores)
        support = visible if self.variant == "dense" else support_from_topk(self._topk[l], visible)
        targets = [self._targets[j] for j in self.served[l]]
        return multi_layer_indexer_loss(scores, targets, support, cross_layer=self.cross_layer,
                                        reduction=self.reduction)

    def loss(self, release: bool = True) -> DistillLoss:
        """Mean over F layers of Eq. 1 (each F layer's term reaches only its own indexer) and the per-layer values.

        ``release`` drops the captures afterwards (they hold ``[B, T, S]`` per layer)."""
        losses = {l: self.layer_loss(l) for l in self.served}
        total = torch.stack(list(losses.values())).mean()
        out = DistillLoss(total, {l: float(v.detach()) for l, v in losses.items()})
        if release:
            self.clear()
        return out

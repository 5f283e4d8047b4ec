"""Layer-input cache of the transformers scorer: a flip at layer j re-runs layers ≥ j only.

In one forward of a DSA model under pattern ``p``, layer ``i`` depends on the pattern only through ``p[:i+1]`` (an S
layer reuses the top-k of the nearest preceding F layer). So two patterns that agree on layers ``< j`` give the same
output for every layer ``< j``, bit for bit. The greedy search (:mod:`.algorithm`) scores candidates ``P`` with one
layer ``j`` flipped: with the outputs of every layer under ``P`` kept (per calibration sequence), a candidate only
needs layers ``j..N-1`` (plus embeddings, mask and LM head, which are cheap).

Mechanics: each decoder layer's ``forward`` is overridden on the instance (parameters and state-dict keys are
untouched). Within :meth:`LayerInputCache.logits`, a layer below the first layer that differs from the base returns
its kept output instead of computing it (DeepSeek-V3.2 and V4: also restores the top-k the last F layer published,
which :mod:`vllm_indexcache.tools.reference` keeps in its reuse state; GLM-5: the kept output is the layer's
``(hidden_states, topk_indices)`` pair, the top-k the model loop hands to the next layer); the layers from there on
run and their outputs are recorded. Outside :meth:`logits` the layers run unchanged.

DeepSeek-V4: the pattern has one F/S per CSA layer, so a flip at CSA ordinal ``j`` replays the decoder layers below
CSA layer ``j`` (its decoder layer id, the family's ``indexer_layers``), sliding-window and HCA layers included; a
decoder layer's output is its mHC hidden state ``[B, S, hc_mult, hidden_size]``, kept as it is.

The base follows the search: :meth:`set_base` names the pattern of the step under way; its outputs come from the
recordings of the lowest-loss pattern scored since the previous base (the winner of a one-flip step, whose layers
below its flip are the old base's), else from one full recording forward per sequence.

Memory: the base and the best recording, each ``num_layers × Σ len(seq) × hidden_size`` values in the model dtype
(plus the published top-k, ``Σ len(seq) × index_topk`` int per F layer).
"""
from __future__ import annotations

import functools

import torch


def first_difference(a: str, b: str) -> int:
    """The first layer where patterns ``a`` and ``b`` differ (``len(a)`` when they are equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


class LayerInputCache:
    """Keeps every decoder layer's output under the base pattern, per sequence key, and replays them.

    Args:
        model: a ``DeepseekV32ForCausalLM``, ``GlmMoeDsaForCausalLM`` or ``DeepseekV4ForCausalLM`` prepared by
            :mod:`vllm_indexcache.tools.reference` (its reuse state installed).
        forward: ``(pattern, input_ids [1, S] long) → logits [S, vocab]``; sets the pattern and runs the model.
    """

    def __init__(self, model, forward):
        from vllm_indexcache.tools import reference

        self.state = reference._install(model)
        # the reference's override reuse (V3.2, V4) publishes the last F layer's top-k in its state
        self.deepseek = self.state.arch in (reference._ARCH_DEEPSEEK, reference._ARCH_V4)
        from vllm_indexcache.families import family_for

        #: decoder layer id of each pattern entry (indexer layer), and len(pattern) → num_layers
        self.layer_of = list(family_for(self.state.arch).indexer_layers(model.config))
        self.forward = forward
        self.num_layers = model.config.num_hidden_layers
        self.layer_of.append(self.num_layers)
        self.base: str | None = None          # pattern whose outputs base_outs holds
        self.want: str | None = None          # pattern named by set_base, materialized on the next logits()
        self.base_outs: dict = {}             # key -> [per layer (output, published top-k)]
        self.best = None                      # (loss, start, pattern, {key: (start, record)})
        self.pending: dict = {}               # key -> (start, record) of the pattern being scored
        self._ctx = None
        self.layers_run = 0                   # decoder-layer forwards actually computed (for tests and reports)
        for i, layer in enumerate(model.model.layers[: self.num_layers]):
            layer.forward = self._wrap(layer, i)

    def _wrap(self, layer, i: int):
        original = functools.partial(type(layer).forward, layer)

        def forward(*args, **kwargs):
            ctx = self._ctx
            if ctx is None:
                return original(*args, **kwargs)
            start, replay, record = ctx
            if i < start:
                out, topk = replay[i]
                if self.deepseek:
                    self.state.last_topk = topk
                return out
            out = original(*args, **kwargs)
            self.layers_run += 1
            record[i] = (out, self.state.last_topk if self.deepseek else None)
            return out

        return forward

    def _run(self, pattern: str, x: torch.Tensor, start: int, replay: list | None) -> tuple[torch.Tensor, dict]:
        record: dict = {}
        self._ctx = (start, replay, record)
        try:
            logits = self.forward(pattern, x)
        finally:
            self._ctx = None
        return logits, record

    def set_base(self, pattern: str) -> None:
        """Name the pattern whose one-flip neighbours come next (materialized lazily, per sequence)."""
        self.want = pattern

    def _switch_base(self) -> None:
        want, best = self.want, self.best
        outs: dict = {}
        if best is not None and best[2] == want:
            for key, (start, record) in best[3].items():
                old = self.base_outs.get(key)
                if start == 0 or (old is not None and self.base is not None):
                    outs[key] = [old[i] if i < start else record[i] for i in range(self.num_layers)]
        self.base, self.base_outs, self.best = want, outs, None

    def logits(self, pattern: str, key, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[S, vocab]`` of sequence ``x`` (``[1, S]``) under ``pattern``, from the base's kept layer outputs
        below the first layer where ``pattern`` differs from the base. ``key`` names the sequence (its index in the
        scorer's calibration set); call :meth:`finish` once every sequence of the pattern is done."""
        if self.want is not None and self.want != self.base:
            self._switch_base()
        if self.base is not None and key not in self.base_outs:
            _, record = self._run(self.base, x, 0, None)
            self.base_outs[key] = [record[i] for i in range(self.num_layers)]
        if self.base is None:
            start, replay = 0, None
        else:
            start, replay = self.layer_of[first_difference(pattern, self.base)], self.base_outs[key]
        logits, record = self._run(pattern, x, start, replay)
        self.pending[key] = (start, record)
        return logits

    def finish(self, pattern: str, loss: float) -> None:
        """The scorer's loss of ``pattern``: keep its recordings when it is the lowest (loss, first changed layer)
        since the base was set (the pattern the search will most likely commit)."""
        pending, self.pending = self.pending, {}
        if not pending:
            return
        start = min(s for s, _ in pending.values())
        if self.best is None or (loss, start) < (self.best[0], self.best[1]):
            self.best = (loss, start, pattern, pending)

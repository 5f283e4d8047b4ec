"""The plugin's run-time F/S switch: a pattern changed inside a built engine, without reloading weights.

The search (``vllm-indexcache search --engine vllm``) builds one engine with every indexer layer F and scores each
candidate pattern by switching layers to S. The switch lives here, in the plugin's own model classes
(:meth:`vllm_indexcache.vllm_glue.model.IndexCacheModel.indexcache_switch` installs it on every stage, on first use:
served models never carry it), not in a vLLM attribute: vLLM
0.32's ``MultiHeadLatentAttentionWrapper.skip_topk`` is absent from other versions (CUDA vLLM 0.26,
``docs/vllm-names/vllm-0.26.0.txt``), where setting it would switch nothing.

Mechanics: every indexer module of the stage (found by the family's vLLM paths, ``family.vllm_layers`` /
``vllm_attention`` / ``vllm_indexer``, for the family's indexer layers ``family.indexer_layers(config)``) gets a
*gate* as its instance ``forward``. An F layer's gate calls the indexer's own forward; an S layer's gate returns at
once, so the shared ``topk_indices_buffer`` keeps the top-k the preceding F layer wrote and the layer's sparse MLA
reads those: the S semantics of a layer built S (``indexer=None``), on any caller of the indexer module. The gate
returns the buffer in both cases (what ``Indexer.forward`` returns in vLLM; callers discard it).

Two read-backs, per worker, for the search to check on every worker (:func:`vllm_indexcache.vllm_glue.hooks.
apply_pattern`, :func:`~vllm_indexcache.vllm_glue.hooks.observed_pattern`):

* :meth:`PatternSwitch.apply` returns what each layer of the stage will do (its gate's state, ``F`` where the gate
  is not the module's ``forward`` any more);
* :meth:`PatternSwitch.observed` returns what each layer did since: ``F`` = its indexer ran and never skipped,
  ``S`` = it skipped and never ran (or was built without an indexer), ``?`` = both, ``-`` = never called.

Needs eager execution (``enforce_eager=True``, as the search's engine has): a captured CUDA graph or compiled
region would keep the gate state it was traced with. Source of the S semantics: vLLM 0.32
``model_executor/layers/mla.py`` (``MultiHeadLatentAttentionWrapper.forward`` skips the indexer call under
``skip_topk``) and IndexCache (arXiv 2603.12201) §3.
"""
from __future__ import annotations

import functools

#: Read-back characters: not on this worker, called neither way, ran and skipped in the same window.
ABSENT, UNCALLED, MIXED = ".", "-", "?"


class SwitchError(RuntimeError):
    """A pattern this stage cannot take at run time (one line)."""


def _resolve(obj, path: str):
    return functools.reduce(lambda o, name: getattr(o, name, None) if o is not None else None, path.split("."), obj)


class _Gate:
    """The instance ``forward`` of one indexer module: runs it (F) or returns at once (S), and counts both."""

    def __init__(self, module):
        self.module = module
        self.original = module.forward
        self.skip = False
        self.runs = 0
        self.skips = 0

    def __call__(self, *args, **kwargs):
        if self.skip:
            self.skips += 1
            return getattr(self.module, "topk_indices_buffer", None)
        self.runs += 1
        return self.original(*args, **kwargs)

    @property
    def in_place(self) -> bool:
        """Whether the module still calls this gate (no one replaced its ``forward`` since)."""
        return self.module.__dict__.get("forward") is self


class PatternSwitch:
    """The run-time F/S switch of one pipeline stage (module docstring).

    Args:
        model: the stage's built model (the plugin's ``IndexCache<Arch>`` class).
        family: its :class:`vllm_indexcache.families.Family`.
        config: the HF config (``vllm_config.model_config.hf_config``).
        start, end: the stage's decoder-layer range ``[start, end)``.
        receives: whether the stage reads top-k handed over by the previous stage (``StagePlan.receives``); if
            not, its first indexer layer cannot be switched to S.
    """

    def __init__(self, model, family, config, start: int, end: int, receives: bool = False):
        self.layers = list(family.indexer_layers(config))
        self.receives = receives
        stack = _resolve(model, family.vllm_layers)
        self.gates: dict[int, _Gate | None] = {}          # pattern position -> gate (None: built without indexer)
        for pos, layer_id in enumerate(self.layers):
            if not start <= layer_id < end:
                continue
            attention = _resolve(stack[layer_id], family.vllm_attention)
            indexer = _resolve(attention, family.vllm_indexer) if attention is not None else None
            if indexer is None:
                self.gates[pos] = None
                continue
            gate = _Gate(indexer)
            indexer.forward = gate
            self.gates[pos] = gate

    def apply(self, pattern: str) -> str:
        """Switch this stage's indexer layers to ``pattern`` (one F/S per indexer layer of the family) and return
        the read-back: per position ``F``/``S`` (what the layer will do) on this stage, ``.`` elsewhere. Resets
        the :meth:`observed` counts.

        Raises:
            SwitchError: wrong length; an F asked of a layer built without an indexer; the stage's first indexer
                layer made S while the stage receives no handed-over top-k.
        """
        if len(pattern) != len(self.layers) or set(pattern) - {"F", "S"}:
            raise SwitchError(f"pattern {pattern!r}: expected {len(self.layers)} F/S characters")
        out = [ABSENT] * len(pattern)
        first = min(self.gates, default=None)
        if first is not None and pattern[first] == "S" and not self.receives:
            raise SwitchError(f"pattern {pattern}: layer {self.layers[first]} is the first indexer layer of its "
                              "pipeline stage and cannot be S (no top-k handoff into this stage); use --pp-blocks "
                              "equal to the pipeline-parallel size")
        for pos, gate in self.gates.items():
            if gate is None:
                if pattern[pos] == "F":
                    raise SwitchError(f"layer {self.layers[pos]} has no indexer in this engine; build it all-F "
                                      "to search")
                out[pos] = "S"
                continue
            gate.skip = pattern[pos] == "S"
            gate.runs = gate.skips = 0
            out[pos] = ("S" if gate.skip else "F") if gate.in_place else "F"
        return "".join(out)

    def observed(self) -> str:
        """What each layer of the stage did since the last :meth:`apply` (see module docstring)."""
        out = [ABSENT] * len(self.layers)
        for pos, gate in self.gates.items():
            if gate is None:
                out[pos] = "S"
            elif gate.runs and gate.skips:
                out[pos] = MIXED
            else:
                out[pos] = "F" if gate.runs else "S" if gate.skips else UNCALLED
        return "".join(out)


def install(model, family, config, start: int, end: int, receives: bool = False) -> PatternSwitch:
    """Install the switch on ``model`` (attribute ``_indexcache_switch``) and return it; see :class:`PatternSwitch`."""
    switch = PatternSwitch(model, family, config, start, end, receives)
    object.__setattr__(model, "_indexcache_switch", switch)
    return switch

"""Algorithm 1 of the IndexCache paper (arXiv 2603.12201, §3.1.2): greedy layer search, over any scorer.

Start with every DSA layer F (runs its lightning indexer). Layer 0 is never flipped. At each step, for every
remaining candidate F layer, score the current pattern with that one layer flipped to S (reusing the preceding F
layer's top-k), on the same fixed calibration set; commit the flip with the lowest loss. Repeat until the target
number of F layers is reached. The committed flips form one nested trajectory: the F set at a lower retention is a
subset of the F set at every higher retention.

Pipeline-parallel variant (``pp_blocks = P > 1``): the layers are cut into P blocks exactly as vLLM's
``get_pp_indices`` cuts them into pipeline stages (:func:`pp_blocks`); the first layer of every block stays F (a
stage cannot read top-k from another stage). A step scores every candidate of every block against the same current
pattern, then commits the best flip *of each block* at once (one flip per block per step, about P× fewer sequential
steps). When fewer flips than blocks remain to reach the target, the block winners with the lowest losses are
committed. The committed pattern of a multi-flip step is scored once more (its loss is not any candidate's loss).

Determinism: ties between equal losses go to the lower layer id; a resumed search replays nothing and continues
from the stored pattern, so it ends on the same pattern as an uninterrupted one when the scorer is deterministic.

Methods (``method=``, the CLI's ``--method``):

* ``"full"`` — Algorithm 1 as written: every candidate of every step is scored, ``N(N−1)/2`` evaluations for the
  whole trajectory of N layers.
* ``"lazy"`` — lazy greedy (Minoux 1978, "Accelerated greedy algorithms for maximizing submodular set functions",
  here for minimising a loss). A candidate's *increase* at a step is ``δ_i(P) = loss(P + i) − loss(P)``, P the
  step's current pattern. Assumption (*non-shrinking increases*, i.e. the loss is supermodular in the set of S
  layers): committing more S layers never makes a later flip cheaper, ``δ_i(P') ≥ δ_i(P)`` for every ``P' ⊇ P``.
  Under it a candidate's increase measured at an earlier step is a lower bound on its increase now. A step re-scores
  a block's candidates in increasing order of (earlier increase, layer id) and stops as soon as the best fresh
  (increase, layer) is ≤ the next candidate's (earlier increase, layer): no unscored candidate can then beat it, and
  the step commits exactly what ``"full"`` commits. The first step (nothing measured yet) scores every candidate.
  **The assumption is a heuristic, not a theorem**: a flip can make another one cheaper (the reused top-k may suit a
  layer better than the top-k it reused before). The method checks it on every candidate it re-scores: a fresh
  increase below that candidate's earlier one is an observed failure, and the step then falls back to scoring all
  its remaining candidates (that step is exact). A failure on a candidate that is never re-scored cannot be seen;
  there the two methods may differ (``tests/unit/test_search_fast.py`` builds such a case, and on the shipped
  tiny-dsa with the LM loss they differ from step 5 on: ``docs/search.md``). Each step records the layers it skipped
  and the observed failures (:class:`Step`). Hence ``"full"`` is the default.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

#: Retention levels reported along the trajectory (those ≥ the requested retention are recorded).
LEVELS = tuple(Fraction(1, 2 ** i) for i in range(1, 8))
#: Search methods (see the module docstring): Algorithm 1 as written (the CLI's default), or lazy greedy with a
#: checked heuristic bound.
METHODS = ("full", "lazy")
#: Relative size of float rounding in a loss difference: a fresh increase below its earlier one by less than this
#: (× max(1, |loss|)) is rounding, not an observed failure of the lazy bound.
_ROUNDING = 1e-9


def parse_retention(text: str) -> Fraction:
    """``"1/4"`` / ``"0.25"`` → ``Fraction(1, 4)``; must lie in (0, 1].

    Raises:
        ValueError: unparsable or out of range (one-line message naming ``--retain``).
    """
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--retain={text!r}: expected a fraction such as 1/4 or 0.25") from None
    if not 0 < value <= 1:
        raise ValueError(f"--retain={text!r}: must lie in (0, 1]")
    return value


def target_f_count(num_layers: int, retention: Fraction, pp_blocks: int = 1) -> int:
    """F layers kept at ``retention``: ``ceil(num_layers · retention)``, at least 1 and at least ``pp_blocks`` (each
    block's first layer stays F). E.g. 12 layers: 1/2 → 6, 1/4 → 3, 1/8 → 2; 61 layers 1/4 → 16."""
    return max(1, pp_blocks, math.ceil(num_layers * retention))


def pp_blocks(num_layers: int, num_blocks: int) -> list[tuple[int, int]]:
    """Layer ranges ``[start, end)`` of ``num_blocks`` pipeline blocks, by vLLM 0.32's rule
    (``vllm/distributed/utils.py`` ``get_pp_indices``, including the ``VLLM_PP_LAYER_PARTITION`` override): equal
    parts, the remainder spread over the blocks before the last one.

    Raises:
        ValueError: ``num_blocks`` < 1 or > ``num_layers``, or a bad ``VLLM_PP_LAYER_PARTITION``.
    """
    if not 1 <= num_blocks <= num_layers:
        raise ValueError(f"--pp-blocks={num_blocks}: must be between 1 and the {num_layers} DSA layers")
    env = os.environ.get("VLLM_PP_LAYER_PARTITION")
    if env and num_blocks > 1:
        parts = [int(x) for x in env.split(",")]
        if len(parts) != num_blocks or sum(parts) != num_layers:
            raise ValueError(f"VLLM_PP_LAYER_PARTITION={env!r}: does not split {num_layers} layers into "
                             f"{num_blocks} blocks")
    else:
        parts = [num_layers // num_blocks] * num_blocks
        for i in range(2, num_layers % num_blocks + 2):
            parts[-i] += 1
    out, start = [], 0
    for p in parts:
        out.append((start, start + p))
        start += p
    return out


def flip(pattern: str, layers) -> str:
    """``pattern`` with ``layers`` set to S."""
    chars = list(pattern)
    for i in layers:
        chars[i] = "S"
    return "".join(chars)


def candidates(pattern: str, blocks: list[tuple[int, int]]) -> list[list[int]]:
    """Per block: the F layers that may still be flipped (every F layer except the block's first layer)."""
    return [[i for i in range(s + 1, e) if pattern[i] == "F"] for s, e in blocks]


def flips_in_step(pattern: str, blocks: list[tuple[int, int]], target_f: int) -> int:
    """Number of flips the next step commits: one per block that has candidates, capped by what the target needs."""
    return min(sum(1 for c in candidates(pattern, blocks) if c), pattern.count("F") - target_f)


def total_evaluations(num_layers: int, target_f: int, blocks: list[tuple[int, int]]) -> int:
    """Scorer calls from the all-F start to ``target_f`` F layers, excluding the all-F baseline.

    Without blocks this is Σ over steps of the remaining candidates (``N(N−1)/2`` for the full trajectory of N
    layers; 47 → 1,081). With blocks, each multi-flip step also scores its committed pattern once; the count is
    exact when every step flips a full set of blocks and an upper bound otherwise (partial last step: assumes the
    largest blocks flip).
    """
    counts = [e - s - 1 for s, e in blocks]
    n_f = num_layers
    total = 0
    while n_f > target_f:
        active = [i for i, c in enumerate(counts) if c > 0]
        if not active:
            break
        total += sum(counts[i] for i in active)
        k = min(len(active), n_f - target_f)
        if len(blocks) > 1 and k > 1:
            total += 1
        for i in sorted(active, key=lambda i: -counts[i])[:k]:
            counts[i] -= 1
        n_f -= k
    return total


@dataclass
class Step:
    """One committed step: the layers flipped, the resulting pattern and its loss, every scored candidate's loss,
    and (``method="lazy"``) the candidates left unscored and those whose fresh score fell below their earlier one
    (observed failures of the lazy bound)."""

    step: int
    flipped: list[int]
    pattern: str
    loss: float
    candidates: dict[int, float] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    bound_failures: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"step": self.step, "flipped": self.flipped, "pattern": self.pattern, "num_f": self.pattern.count("F"),
               "loss": self.loss, "candidates": {str(k): v for k, v in sorted(self.candidates.items())}}
        if self.skipped or self.bound_failures:
            out.update(skipped=sorted(self.skipped), bound_failures=sorted(self.bound_failures))
        return out

    @classmethod
    def from_json(cls, d: dict) -> Step:
        return cls(int(d["step"]), [int(x) for x in d["flipped"]], str(d["pattern"]), float(d["loss"]),
                   {int(k): float(v) for k, v in d["candidates"].items()},
                   [int(x) for x in d.get("skipped", [])], [int(x) for x in d.get("bound_failures", [])])


def last_increases(steps: list[Step], baseline_loss: float) -> dict[int, float]:
    """Each layer's most recent candidate increase over ``steps``: its score minus the loss of the pattern it was a
    flip of (the all-F ``baseline_loss`` for step 1, the previous step's loss after) — the lazy method's bounds."""
    out: dict[int, float] = {}
    base = baseline_loss
    for s in steps:
        out.update({i: v - base for i, v in s.candidates.items()})
        base = s.loss
    return out


def _score_block(pattern: str, cands: list[int], score, on_eval, losses: dict[int, float], stale: dict[int, float],
                 base_loss: float | None, skipped: list[int], failures: list[int]) -> tuple[float, int]:
    """Score one block's candidates (all, or lazily against the earlier increases ``stale`` when ``base_loss``, the
    loss of ``pattern``, is given); return its winner ``(loss, layer)``."""
    def fresh(layer):
        losses[layer] = float(score(flip(pattern, [layer])))
        if on_eval is not None:
            on_eval()
        return losses[layer]

    if base_loss is None or any(c not in stale for c in cands):
        return min((fresh(layer), layer) for layer in cands)        # lowest loss, then lowest layer id
    order = sorted(cands, key=lambda c: (stale[c], c))
    best = None                                                     # (increase, layer) of the best fresh score
    for n, layer in enumerate(order):
        if best is not None and best <= (stale[layer], layer):
            skipped.extend(order[n:])
            break
        increase = fresh(layer) - base_loss
        best = min(best, (increase, layer)) if best is not None else (increase, layer)
        if increase < stale[layer] - _ROUNDING * max(1.0, abs(base_loss)):   # the bound fails: score the rest
            failures.append(layer)
            for c in order[n + 1:]:
                best = min(best, (fresh(c) - base_loss, c))
            break
    return losses[best[1]], best[1]


def search_step(pattern: str, step_no: int, blocks: list[tuple[int, int]], target_f: int,
                score: Callable[[str], float], on_eval: Callable[[], None] | None = None, *,
                method: str = "full", stale: dict[int, float] | None = None,
                base_loss: float | None = None) -> Step:
    """Score the candidate flips of ``pattern`` and return the committed step (Algorithm 1, one iteration).

    Args:
        method: ``"full"`` scores every candidate; ``"lazy"`` re-scores in order of ``stale`` and stops when no
            unscored candidate can win under the non-shrinking-increases assumption (module docstring).
        stale: each layer's increase measured at an earlier step (:func:`last_increases`), for ``"lazy"``.
        base_loss: the loss of ``pattern`` (``"lazy"`` compares increases over it; None scores everything).

    If ``score`` has a ``set_base(pattern)`` method (a scorer that caches the current pattern's layer inputs), it is
    called once before the candidates are scored.

    Raises:
        ValueError: nothing left to flip (``pattern`` already at ``target_f`` or only block heads are F), or an
            unknown ``method``.
    """
    if method not in METHODS:
        raise ValueError(f"--method={method!r}: expected one of {', '.join(METHODS)}")
    k = flips_in_step(pattern, blocks, target_f)
    if k <= 0:
        raise ValueError(f"pattern {pattern} has no flip left towards {target_f} F layers")
    set_base = getattr(score, "set_base", None)
    if set_base is not None:
        set_base(pattern)
    losses: dict[int, float] = {}
    winners: list[tuple[float, int]] = []
    skipped: list[int] = []
    failures: list[int] = []
    for cands in candidates(pattern, blocks):
        if not cands:
            continue
        winners.append(_score_block(pattern, cands, score, on_eval, losses, stale or {},
                                    base_loss if method == "lazy" else None, skipped, failures))
    chosen = sorted(layer for _, layer in sorted(winners)[:k])
    new = flip(pattern, chosen)
    if len(chosen) == 1:
        loss = losses[chosen[0]]
    else:
        loss = float(score(new))
        if on_eval is not None:
            on_eval()
    return Step(step_no, chosen, new, loss, losses, skipped, failures)


def greedy_search(num_layers: int, target_f: int, score: Callable[[str], float], *, num_blocks: int = 1,
                  steps: list[Step] | None = None, on_step: Callable[[Step], None] | None = None,
                  on_eval: Callable[[], None] | None = None, method: str = "full",
                  baseline_loss: float | None = None) -> list[Step]:
    """Run (or continue) Algorithm 1 until ``target_f`` F layers remain; return every committed step.

    Args:
        num_layers: DSA layers of the model.
        target_f: F layers to keep (see :func:`target_f_count`).
        score: pattern → loss (lower is better); must be deterministic for resumes to be exact.
        num_blocks: pipeline blocks (``--pp-blocks``); 1 = the plain algorithm.
        steps: steps already committed (from a saved state); the search continues from the last one.
        on_step: called after every committed step (the CLI writes the state there).
        on_eval: called after every scorer call (progress bar).
        method: ``"full"`` (Algorithm 1 as written) or ``"lazy"`` (module docstring).
        baseline_loss: the all-F loss (``"lazy"`` needs it; scored here, one extra call, when not given).
    """
    blocks = pp_blocks(num_layers, num_blocks)
    steps = list(steps or [])
    pattern = steps[-1].pattern if steps else "F" * num_layers
    if method == "lazy" and baseline_loss is None and pattern.count("F") > target_f:
        baseline_loss = float(score("F" * num_layers))
        if on_eval is not None:
            on_eval()
    while pattern.count("F") > target_f and flips_in_step(pattern, blocks, target_f) > 0:
        base_loss = steps[-1].loss if steps else baseline_loss
        step = search_step(pattern, len(steps) + 1, blocks, target_f, score, on_eval, method=method,
                           stale=last_increases(steps, baseline_loss) if method == "lazy" else None,
                           base_loss=base_loss)
        steps.append(step)
        pattern = step.pattern
        if on_step is not None:
            on_step(step)
    return steps


def retention_levels(num_layers: int, steps: list[Step], baseline_loss: float, retention: Fraction,
                     num_blocks: int = 1) -> dict[str, dict]:
    """The pattern at every standard retention level (1/2, 1/4, …) down to ``retention`` that the trajectory
    reached: the first committed pattern with at most ``target_f_count(level)`` F layers."""
    out = {}
    for level in [Fraction(1)] + [lv for lv in LEVELS if lv >= retention] + (
            [retention] if retention not in LEVELS and retention != 1 else []):
        need = target_f_count(num_layers, level, num_blocks)
        if level == 1:
            out["1"] = {"pattern": "F" * num_layers, "num_f": num_layers, "step": 0, "loss": baseline_loss}
            continue
        for s in steps:
            if s.pattern.count("F") <= need:
                out[str(level)] = {"pattern": s.pattern, "num_f": s.pattern.count("F"), "step": s.step,
                                   "loss": s.loss, "target_f": need}
                break
    return out

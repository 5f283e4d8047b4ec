"""Search objectives that see long-range dependencies, and the retrieval probe of the search's gate.

Every objective except ``kl`` is a *weighted next-token NLL*: a set of token sequences, each with a weight per
predicted position, scored as ``Σ_s Σ_i w[s][i] · (−log p(x[s][i+1] | x[s][:i+1]))`` under the pattern (nats).
The weights are built once, at the start of the search, from the calibration windows alone:

* ``lm-loss`` — the paper's objective (§3.1.2): every calibration position, weight ``1/N``; the mean NLL.
* ``long-lm`` — label-free, from the user's own text (the idea of LongPPL, Fang et al. 2024, arXiv 2410.23771):
  the mean NLL plus ``long_weight`` × the mean NLL over the *key tokens*, the positions whose all-F prediction
  gains most from distant context. The gain is ``log p_allF − log p_local``, where ``p_local`` sees only the last
  ``local_window + 1``..``2·local_window`` tokens (windows of ``2·local_window + 1`` tokens at stride
  ``local_window``, all-F; default window: the model's ``index_topk``, inside which attention is dense anyway). Key
  tokens: the top ``key_fraction`` of calibration positions by gain, among those gaining more than ``long_margin``
  nats. (LongPPL's fixed threshold of 2 nats selects 1 of 4,094 calibration tokens on tiny-dsa, hence the fraction.)
  Cost per evaluation: the calibration tokens (as ``lm-loss``); once at start: one all-F pass over the calibration
  and one over ~2× its tokens in local windows.
* ``retrieval`` — synthetic retrieval from the user's text: ``retrieval_docs`` needle documents
  (:mod:`vllm_indexcache.tools.data.retrieval`) of the calibration window length, cut from the calibration windows,
  built with the model's own tokenizer, keys from :data:`~vllm_indexcache.tools.data.retrieval.CALIB_ADJECTIVES` ×
  ``CALIB_NOUNS`` (disjoint from the evaluation vocabulary), values and depths from ``retrieval_seed``; every
  needle is asked. Score: the mean NLL + ``retrieval_weight`` × the mean NLL of the answer tokens. Cost per
  evaluation: calibration tokens + ``retrieval_docs × seq_len`` tokens.

:func:`probe_documents` builds the gate's probe the same way from another seed (one question per document, asked
at a random depth), and :func:`probe_accuracy` counts a question correct when every answer token is the argmax
(teacher-forced = greedy decoding of the answer), as ``vllm-indexcache eval`` does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

OBJECTIVES = ("lm-loss", "kl", "long-lm", "retrieval")
#: Objectives built as weighted NLL over :class:`Targets` (``kl`` compares whole distributions instead).
WEIGHTED = ("lm-loss", "long-lm", "retrieval")


class ObjectiveError(ValueError):
    """A one-line problem with an objective's options or with what it can build from the calibration data."""


@dataclass(frozen=True)
class ObjectiveOptions:
    """Knobs of the objectives (only those of the chosen objective enter the search state's identity).

    Attributes:
        long_margin: nats; the least context gain of a ``long-lm`` key token.
        key_fraction: the share of calibration positions ``long-lm`` takes as key tokens (those of largest gain).
        local_window: tokens of context the short-context pass of ``long-lm`` keeps (at least; at most twice);
            None = the model's ``index_topk``.
        long_weight: weight of the key-token mean NLL against the all-token mean NLL.
        retrieval_docs: needle documents of ``retrieval``.
        retrieval_needles: needles per document (every one is asked).
        retrieval_weight: weight of the answer-token mean NLL against the calibration mean NLL.
        retrieval_seed: seed of keys, values, depths and haystack windows.
    """

    long_margin: float = 0.1
    key_fraction: float = 0.02
    local_window: int | None = None
    long_weight: float = 1.0
    retrieval_docs: int = 16
    retrieval_needles: int = 4
    retrieval_weight: float = 1.0
    retrieval_seed: int = 1

    def for_objective(self, objective: str) -> dict:
        """The options ``objective`` reads (recorded in the state; a resume with other values is refused)."""
        d = asdict(self)
        prefix = {"long-lm": ("long_", "local_", "key_"), "retrieval": ("retrieval_",)}.get(objective, ())
        return {k: v for k, v in d.items() if k.startswith(prefix)} if prefix else {}

    def check(self, objective: str) -> None:
        """Raises :class:`ObjectiveError` naming the first bad option of ``objective``."""
        if objective not in OBJECTIVES:
            raise ObjectiveError(f"--objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
        bad = {"long-lm": [("--long-margin", self.long_margin >= 0),
                           ("--key-fraction", 0 < self.key_fraction <= 1),
                           ("--local-window", self.local_window is None or self.local_window >= 1),
                           ("--long-weight", self.long_weight >= 0)],
               "retrieval": [("--retrieval-docs", self.retrieval_docs >= 1),
                             ("--retrieval-needles", self.retrieval_needles >= 1),
                             ("--retrieval-weight", self.retrieval_weight >= 0)]}.get(objective, [])
        for name, ok in bad:
            if not ok:
                value = getattr(self, name[2:].replace("-", "_"))
                raise ObjectiveError(f"{name}={value!r}: out of range (see vllm-indexcache search --help)")


@dataclass
class Targets:
    """Sequences and per-position weights of a weighted-NLL objective.

    Attributes:
        seqs: token-id lists.
        weights: per sequence, float64 ``[len − 1]``; entry ``i`` weights the prediction of token ``i + 1``.
        parts: per component (``"lm"``, ``"long"``, ``"answer"``), the number of positions it averages over.
    """

    seqs: list[list[int]]
    weights: list[np.ndarray]
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Tokens one evaluation runs through the model (its cost)."""
        return int(sum(len(s) for s in self.seqs))

    def add(self, seqs, masks, part: str, weight: float) -> None:
        """Add ``weight`` × the mean NLL over the positions of ``masks`` (bool ``[len − 1]`` per sequence)."""
        count = int(sum(int(m.sum()) for m in masks))
        if count == 0:
            raise ObjectiveError(f"objective part {part!r}: no position selected in the calibration data")
        self.parts[part] = count
        for s, m in zip(seqs, masks):
            w = m.astype(np.float64) * (weight / count)
            key = next((i for i, t in enumerate(self.seqs) if t is s), None)
            if key is None:
                self.seqs.append(s)
                self.weights.append(w)
            else:
                self.weights[key] = self.weights[key] + w


def weighted_nll(targets: Targets, logprobs: list[np.ndarray]) -> float:
    """``Σ w · (−log p)`` of ``targets`` given each sequence's ``[len − 1]`` token log-probs (float64)."""
    return float(-sum(float(np.dot(w, lp)) for w, lp in zip(targets.weights, logprobs)))


def local_logprobs(seq: list[int], window: int, logprobs_fn) -> np.ndarray:
    """Token log-probs of ``seq`` (``[len − 1]``) when each token sees only ``window + 1``..``2·window`` tokens of
    context (its full context for the first ``window + 1`` tokens). ``logprobs_fn(list_of_seqs)`` → log-probs of
    each."""
    n = len(seq)
    out = np.empty(n - 1, dtype=np.float64)
    head = seq[:min(window + 1, n)]
    starts = list(range(window, n - 1, window))
    # block k predicts tokens k+1 .. k+window from the piece starting at token k-window
    pieces = [seq[k - window:min(k + window + 1, n)] for k in starts]
    lps = logprobs_fn([head] + pieces)
    out[:len(head) - 1] = lps[0]
    for k, lp in zip(starts, lps[1:]):
        m = min(k + window, n - 1) - k
        out[k:k + m] = lp[window:window + m]
    return out


def key_token_masks(long_lp, local_lp, margin: float, fraction: float) -> list[np.ndarray]:
    """Key tokens: the top ``fraction`` of positions by context gain ``log p_long − log p_local`` (float64 arrays
    per sequence; ties at the cut included), among those gaining more than ``margin`` nats."""
    gains = [a - b for a, b in zip(long_lp, local_lp)]
    cut = float(np.quantile(np.concatenate(gains), 1 - fraction))
    return [(g >= cut) & (g > margin) for g in gains]


class TextEncoder:
    """``encode(text) → .ids/.offsets`` (no special tokens) for :class:`~vllm_indexcache.tools.data.retrieval.
    RetrievalBuilder`, over a transformers tokenizer."""

    class _Enc:
        def __init__(self, ids, offsets):
            self.ids, self.offsets = ids, offsets

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def encode(self, text: str):
        out = self.tok(text, add_special_tokens=False, return_offsets_mapping=self.tok.is_fast)
        return self._Enc(list(out["input_ids"]), [tuple(o) for o in out.get("offset_mapping", [])] or None)


def model_encoder(model_dir) -> TextEncoder:
    from transformers import AutoTokenizer

    return TextEncoder(AutoTokenizer.from_pretrained(str(model_dir)))


def _haystack(seqs) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])


def retrieval_documents(seqs, encoder, *, docs: int, needles: int, seed: int, length: int | None = None,
                        questions: int | None = None):
    """Needle documents cut from the calibration windows ``seqs`` (calibration key vocabulary).

    Returns a list of :class:`~vllm_indexcache.tools.data.retrieval.RetrievalDoc` of ``length`` tokens (default: the
    longest calibration window); ``questions`` per document (default every needle).

    Raises:
        ObjectiveError: windows too short for the needles.
    """
    from vllm_indexcache.tools.data.retrieval import RetrievalBuilder

    builder = RetrievalBuilder(encoder, vocabulary="calibration")
    length = length or max(len(s) for s in seqs)
    rng = np.random.default_rng([seed, length])
    hay = _haystack(seqs)
    try:
        return [builder.make_document(rng, hay, length, needles, needles if questions is None else questions)
                for _ in range(docs)]
    except ValueError as e:
        raise ObjectiveError(f"retrieval documents: {e} (raise --seq-len or lower --retrieval-needles)") from None


def build_targets(objective: str, seqs, options: ObjectiveOptions, logprobs_fn, encoder_fn,
                  index_topk: int | None = None) -> Targets:
    """The weighted-NLL targets of ``objective`` over the calibration windows ``seqs``.

    Args:
        objective: one of :data:`WEIGHTED`.
        seqs: calibration token-id lists.
        options: :class:`ObjectiveOptions`.
        logprobs_fn: ``list_of_seqs → list of float64 [len − 1]`` token log-probs, all layers F.
        encoder_fn: ``() → TextEncoder`` of the model (``retrieval`` only).
        index_topk: the model's top-k (``long-lm``'s default window).

    Raises:
        ObjectiveError: bad options, or no key token / answer token could be built.
    """
    options.check(objective)
    t = Targets([], [])
    t.add(seqs, [np.ones(len(s) - 1, dtype=bool) for s in seqs], "lm", 1.0)
    if objective == "long-lm":
        window = options.local_window or index_topk
        if not window:
            raise ObjectiveError("--local-window: not given and the model has no index_topk")
        long_lp = logprobs_fn(seqs)
        local_lp = [local_logprobs(s, window, logprobs_fn) for s in seqs]
        masks = key_token_masks(long_lp, local_lp, options.long_margin, options.key_fraction)
        if options.long_weight > 0:
            try:
                t.add(seqs, masks, "long", options.long_weight)
            except ObjectiveError:
                raise ObjectiveError(f"--objective long-lm: no calibration token gains more than "
                                     f"--long-margin={options.long_margin} nats from context beyond "
                                     f"--local-window={window}; use longer windows") from None
    elif objective == "retrieval":
        docs = retrieval_documents(seqs, encoder_fn(), docs=options.retrieval_docs, needles=options.retrieval_needles,
                                   seed=options.retrieval_seed)
        ids = [d.ids.tolist() for d in docs]
        masks = []
        for d in docs:
            m = np.zeros(len(d.ids) - 1, dtype=bool)
            for pos in d.answer_pos:
                m[np.asarray(pos) - 1] = True
            masks.append(m)
        if options.retrieval_weight > 0:
            t.add(ids, masks, "answer", options.retrieval_weight)
    return t


#: Needles per probe document (one of them asked), as in ``vllm-indexcache eval``.
PROBE_NEEDLES = 4


def probe_documents(seqs, encoder, *, docs: int = 20, needles: int = PROBE_NEEDLES, seed: int = 7,
                    length: int | None = None):
    """The gate's probe: ``docs`` documents, one question each (see :func:`retrieval_documents`)."""
    return retrieval_documents(seqs, encoder, docs=docs, needles=needles, seed=seed, length=length, questions=1)


def probe_accuracy(docs, top1_fn) -> float:
    """Fraction of probe questions whose every answer token is the argmax.

    ``top1_fn(list_of_seqs)`` → per sequence bool ``[len − 1]``: entry ``i`` is whether token ``i + 1`` is the
    model's argmax there.
    """
    flags = top1_fn([d.ids.tolist() for d in docs])
    correct = sum(bool(f[np.asarray(d.answer_pos[0]) - 1].all()) for d, f in zip(docs, flags))
    return correct / len(docs)

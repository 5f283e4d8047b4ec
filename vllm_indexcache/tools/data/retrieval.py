"""Synthetic long-range retrieval documents ("needles in a haystack") over real text, in token space.

A document is a window of real text with ``n`` needles inserted at chosen depths, each
``"\\nThe secret number of the <adjective> <noun> is <6 digits>.\\n"``, followed by one or more questions
``"\\nQuestion: what is the secret number of the <key>?\\nAnswer: The secret number of the <key> is <digits>.\\n"``.
The tokenizer splits digits one per token, so the answer is six digit tokens that can only be predicted by attending
back to the needle, up to a whole context away.

*Depth* is the fraction of the haystack that precedes the needle: 0 = first token (farthest from the question),
1 = just before the question. :func:`make_document` is deterministic given its ``numpy.random.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ADJECTIVES = ("amber azure bitter brave bright calm clever copper crimson curious dusty eager early emerald faint "
              "fierce gentle golden green grey hidden hollow humble icy ivory jolly kind lively lonely lucky "
              "marble merry misty noble olive pale patient proud purple quiet rapid rusty scarlet silent silver "
              "slow steady swift tall tender velvet violet wild wise").split()
NOUNS = ("anchor badger beacon bell bridge candle castle cedar comet compass crane dagger dolphin dragon eagle "
         "falcon feather fiddle garden glacier harbor hammer heron island jackal kettle lantern lion maple meadow "
         "mirror needle oak otter owl panther pebble pepper quill raven river saddle salmon spider sparrow temple "
         "thistle tiger tower violin walrus willow wolf").split()
#: A second key vocabulary, disjoint from the evaluation one, for needles built from calibration text (the search's
#: ``retrieval`` objective and probe), so that calibration never sees an evaluation key.
CALIB_ADJECTIVES = ("ancient blue bold broken cold crooked dark distant dry empty famous flat fresh frozen giant "
                    "glass great hairy happy heavy high honest iron large late little long lost loud mad narrow "
                    "new old orange pink plain poor red rich round royal sad sharp short sick small soft strange "
                    "strong sweet thin warm white wooden yellow young").split()
CALIB_NOUNS = ("apple arrow basket beetle bottle button camel carpet cart chair cherry clock cloud coin cow crown "
               "desk donkey door drum fox frog goat goose horse hut jar key king ladder lamp leaf lemon monkey moon "
               "mouse nail nest onion orchard parrot pig pipe queen rabbit ring rope sheep ship shoe star stone "
               "sword table tent").split()
VALUE_DIGITS = 6


def needle_text(key: str, value: str) -> str:
    return f"\nThe secret number of the {key} is {value}.\n"


def question_text(key: str, value: str) -> str:
    return f"\nQuestion: what is the secret number of the {key}?\nAnswer: The secret number of the {key} is {value}.\n"


@dataclass
class RetrievalDoc:
    """One document: ``ids`` (int64, exactly the requested length); for each question, ``answer_pos`` holds the
    positions in ``ids`` of its answer's digit tokens (predicted from the logits one position earlier)."""
    ids: np.ndarray
    answer_pos: list[np.ndarray] = field(default_factory=list)
    target_depth: float | None = None


class RetrievalBuilder:
    """Builds retrieval documents with a ``tokenizers.Tokenizer`` (or anything with ``encode(str).ids``)."""

    def __init__(self, tokenizer, vocabulary: str = "evaluation"):
        """``tokenizer``: anything whose ``encode(text)`` has ``.ids`` (and ``.offsets`` when digits are not one
        token each); ``vocabulary``: ``"evaluation"`` (:data:`ADJECTIVES` × :data:`NOUNS`) or ``"calibration"``
        (:data:`CALIB_ADJECTIVES` × :data:`CALIB_NOUNS`, disjoint from it).

        Raises:
            ValueError: unknown vocabulary.
        """
        if vocabulary not in ("evaluation", "calibration"):
            raise ValueError(f"vocabulary={vocabulary!r}: expected 'evaluation' or 'calibration'")
        self.tok = tokenizer
        self.adjectives, self.nouns = ((ADJECTIVES, NOUNS) if vocabulary == "evaluation"
                                       else (CALIB_ADJECTIVES, CALIB_NOUNS))
        self.digit_ids = {self.tok.encode(str(d)).ids[0] for d in range(10)}

    def _enc(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

    def make_document(self, rng: np.random.Generator, haystack: np.ndarray, length: int, n_needles: int,
                      n_questions: int = 1, target_depth: float | None = None) -> RetrievalDoc:
        """Return a document of exactly ``length`` tokens.

        Args:
            rng: source of randomness (keys, values, haystack window, depths).
            haystack: uint16/int token ids of real text to cut the window from.
            length: total tokens.
            n_needles: needles inserted (distinct keys).
            n_questions: questions at the end (about distinct needles, ``<= n_needles``).
            target_depth: if given, the first question asks about a needle placed at this depth; the other needles
                go to uniformly random depths.
        """
        adjs, nouns = self.adjectives, self.nouns
        pairs = rng.choice(len(adjs) * len(nouns), size=n_needles, replace=False)
        keys = [f"{adjs[p // len(nouns)]} {nouns[p % len(nouns)]}" for p in pairs]
        values = ["".join(str(d) for d in rng.integers(0, 10, VALUE_DIGITS)) for _ in keys]
        needles = [self._enc(needle_text(k, v)) for k, v in zip(keys, values)]
        asked = list(range(n_questions))  # needle 0 is the target when target_depth is given
        if target_depth is None:
            asked = list(rng.permutation(n_needles)[:n_questions])
        questions = [self._enc(question_text(keys[i], values[i])) for i in asked]
        answers = [self._answer_positions(q, question_text(keys[i], values[i]), values[i])
                   for q, i in zip(questions, asked)]
        hay_len = length - sum(map(len, needles)) - sum(map(len, questions))
        if hay_len < 0:
            raise ValueError(f"length={length} too short for {n_needles} needles")
        start = int(rng.integers(0, len(haystack) - hay_len))
        hay = np.asarray(haystack[start:start + hay_len], dtype=np.int64)
        depths = rng.random(n_needles)
        if target_depth is not None:
            depths[0] = target_depth
        cuts = np.minimum((depths * hay_len).astype(np.int64), hay_len)
        order = np.argsort(cuts, kind="stable")
        parts, prev = [], 0
        for i in order:
            parts += [hay[prev:cuts[i]], needles[i]]
            prev = cuts[i]
        parts.append(hay[prev:])
        body = np.concatenate(parts)
        doc = RetrievalDoc(ids=np.concatenate([body] + questions), target_depth=target_depth)
        pos = len(body)
        for q, answer in zip(questions, answers):
            doc.answer_pos.append(pos + answer)
            pos += len(q)
        assert len(doc.ids) == length
        return doc


    def _answer_positions(self, q_ids: np.ndarray, text: str, value: str) -> np.ndarray:
        """Positions in the question's tokens of the answer value (its last occurrence in ``text``): its last six digit
        tokens when the tokenizer encodes the value one token per digit (the shipped tokenizer), else the tokens
        whose character offsets overlap the value."""
        value_ids = self.tok.encode(value).ids
        if len(value_ids) == VALUE_DIGITS and set(value_ids) <= self.digit_ids:
            return np.nonzero(np.isin(q_ids, list(self.digit_ids)))[0][-VALUE_DIGITS:]
        offsets = self.tok.encode(text).offsets
        start = text.rindex(value)
        end = start + len(value)
        return np.asarray([i for i, (a, b) in enumerate(offsets) if a < end and b > start], dtype=np.int64)


class TrainBatches:
    """Deterministic training batches: batch ``step`` depends only on ``(seed, step)``, so the data position of a
    resumed run is just its step.

    Each row is ``context + 1`` tokens (inputs and shifted targets): with probability ``retrieval_fraction`` a
    retrieval document (1..``max_needles`` needles, 1..``max_questions`` questions), otherwise a random window of
    the training text.

    With ``pack_lengths`` (e.g. ``[256, 512, 1024, 2048]``), a retrieval row is instead packed with retrieval
    sub-documents whose lengths are drawn from that list (until the row is full; the last one takes the rest),
    separated by the EOS id, each asking about *every* one of its needles: many more answer tokens per row, and
    short-range examples to learn the copy from before it has to work a whole context away.
    """

    def __init__(self, tokens: np.ndarray, tokenizer, context: int, batch_size: int, seed: int = 0,
                 retrieval_fraction: float = 0.25, max_needles: int = 8, max_questions: int = 4,
                 pack_lengths: list[int] | None = None, eos_id: int = 2):
        self.tokens, self.context, self.batch_size, self.seed = tokens, context, batch_size, seed
        self.retrieval_fraction, self.max_needles, self.max_questions = retrieval_fraction, max_needles, max_questions
        self.pack_lengths, self.eos_id = (sorted(pack_lengths) if pack_lengths else None), eos_id
        self.builder = RetrievalBuilder(tokenizer) if retrieval_fraction > 0 else None

    def _packed(self, rng: np.random.Generator, n: int) -> np.ndarray:
        parts, left = [], n
        while left > 0:
            length = int(rng.choice(self.pack_lengths))
            if left - length - 1 < self.pack_lengths[0]:
                length = left  # the last sub-document takes what is left
            else:
                length = min(length, left - 1)
            k = int(rng.integers(1, self.max_needles + 1))
            while k > 1 and length < 60 * k + 64:  # keep room for haystack between needles and questions
                k -= 1
            parts.append(self.builder.make_document(rng, self.tokens, length, k, k).ids)
            left -= length
            if left > 0:
                parts.append(np.array([self.eos_id], dtype=np.int64))
                left -= 1
        return np.concatenate(parts)

    def get(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        n = self.context + 1
        rows = np.empty((self.batch_size, n), dtype=np.int64)
        for b in range(self.batch_size):
            if self.builder is not None and rng.random() < self.retrieval_fraction:
                if self.pack_lengths:
                    rows[b] = self._packed(rng, n)
                    continue
                k = int(rng.integers(1, self.max_needles + 1))
                q = int(rng.integers(1, min(k, self.max_questions) + 1))
                rows[b] = self.builder.make_document(rng, self.tokens, n, k, q).ids
            else:
                s = int(rng.integers(0, len(self.tokens) - n))
                rows[b] = self.tokens[s:s + n]
        return rows

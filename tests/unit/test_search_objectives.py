"""Search objectives that see long-range dependencies (lm-loss, long-lm, retrieval) and the retrieval gate.

Constructed cases with a known answer:

* a synthetic engine in which exactly one layer's indexer carries every long-range copy (a token that repeats a
  bigram seen more than ``COPY_DISTANCE`` tokens earlier is predicted well only while that layer is F), while every
  other flip costs a little on every token: LM loss must rank the copy layer's flip *cheapest*, ``long-lm`` and
  ``retrieval`` must rank it *worst*;
* the shipped model, where retrieval is known to hang on layer 10's own indexer (docs/search.md): the retrieval
  objective ranks flipping layer 10 worst in the first step, and the gate warns on a pattern with layer 10 S.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from vllm_indexcache.tools.search import objectives as obj
from vllm_indexcache.tools.search.cli import run_gate, search, state_path
from vllm_indexcache.tools.search.objectives import ObjectiveError, ObjectiveOptions
from vllm_indexcache.tools.search.scorers import HFScorer, _WeightedScorer
from vllm_indexcache.tools.search.state import StateError
from vllm_indexcache.tools.toy import build_toy_model

NUM_LAYERS, COPY_LAYER, COPY_DISTANCE, WINDOW = 5, 3, 64, 32
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "models" / "tiny-dsa"


class CopyEngine(_WeightedScorer):
    """Synthetic engine: token ``i + 1`` is a *long copy* when the bigram ``(x[i], x[i+1])`` occurred with its
    second token more than ``COPY_DISTANCE`` positions earlier. Long copies get log p −0.05 while layer
    ``COPY_LAYER`` is F and −6 when it is S; every other token gets −3 minus 0.3 per other S layer."""

    engine = "fake"

    def __init__(self, model_dir, seqs, objective, options=None):
        self.model_dir, self.objective, self.seqs = model_dir, objective, seqs
        self.num_layers, self.index_topk = NUM_LAYERS, WINDOW
        self._build_targets(seqs, options or ObjectiveOptions(local_window=WINDOW))

    def logprobs(self, pattern, seqs):
        other_s = sum(1 for i, c in enumerate(pattern) if c == "S" and i != COPY_LAYER)
        out = []
        for s in seqs:
            s = list(s)
            last = {}
            lp, top1 = np.full(len(s) - 1, -3.0 - 0.3 * other_s), np.zeros(len(s) - 1, dtype=bool)
            for i in range(len(s) - 1):
                seen = last.get((s[i], s[i + 1]))
                if seen is not None and i + 1 - seen > COPY_DISTANCE:
                    ok = pattern[COPY_LAYER] == "F"
                    lp[i], top1[i] = (-0.05, True) if ok else (-6.0, False)
                last.setdefault((s[i], s[i + 1]), i + 1)
            out.append((lp, top1))
        return out

    def __call__(self, pattern):
        return self._weighted(pattern)

    def close(self):
        pass


@pytest.fixture(scope="module")
def copy_case(tmp_path_factory):
    """A toy model directory (for its byte-level tokenizer) and calibration windows of random tokens in which no
    bigram repeats except three planted long copies (8-token spans repeated 150 tokens later)."""
    root = tmp_path_factory.mktemp("objectives")
    model = build_toy_model(root / "toy", num_layers=NUM_LAYERS, seed=0, tokenizer=True)
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(2):
        copy_of = {start + 150 + k: start + k for start in (40, 200, 380) for k in range(8)}
        s, seen = [], set()
        for i in range(600):
            if i in copy_of:
                tok = s[copy_of[i]]
            else:
                tok = int(rng.integers(300, 512))
                while i and (s[-1], tok) in seen:
                    tok = int(rng.integers(300, 512))
            if i:
                seen.add((s[-1], tok))
            s.append(tok)
        seqs.append(s)
    return {"root": root, "model": model, "seqs": seqs}


def candidate_losses(scorer) -> dict[int, float]:
    return {i: scorer("".join("S" if j == i else "F" for j in range(NUM_LAYERS))) for i in range(1, NUM_LAYERS)}


def test_lm_loss_ranks_the_copy_layer_cheapest(copy_case):
    losses = candidate_losses(CopyEngine(copy_case["model"], copy_case["seqs"], "lm-loss"))
    assert min(losses, key=losses.get) == COPY_LAYER


def test_long_lm_finds_the_planted_copies_and_ranks_the_copy_layer_worst(copy_case):
    scorer = CopyEngine(copy_case["model"], copy_case["seqs"], "long-lm",
                        ObjectiveOptions(local_window=WINDOW, key_fraction=0.02))
    # key tokens = the planted long copies (7 predictable tokens per span, 3 spans, 2 windows) and nothing else
    assert scorer.targets.parts["long"] == 2 * 3 * 7
    losses = candidate_losses(scorer)
    assert max(losses, key=losses.get) == COPY_LAYER


def test_retrieval_objective_ranks_the_copy_layer_worst(copy_case):
    scorer = CopyEngine(copy_case["model"], copy_case["seqs"], "retrieval",
                        ObjectiveOptions(retrieval_docs=4, retrieval_needles=2))
    # every needle asked; the answer is the tokens of its six digits (the toy's byte-level BPE merges some)
    assert 4 * 2 * 3 <= scorer.targets.parts["answer"] <= 4 * 2 * 6
    losses = candidate_losses(scorer)
    assert max(losses, key=losses.get) == COPY_LAYER
    assert scorer.tokens_per_evaluation == 2 * 600 + 4 * 600


def test_local_logprobs_see_only_the_window(copy_case):
    """``p_local`` of a long copy is the S-like value: its bigram lies farther back than the local pieces reach."""
    engine = CopyEngine(copy_case["model"], copy_case["seqs"], "lm-loss")
    seq = copy_case["seqs"][0]
    full = engine.logprobs("F" * NUM_LAYERS, [seq])[0][0]
    local = obj.local_logprobs(seq, WINDOW, lambda ss: [lp for lp, _ in engine.logprobs("F" * NUM_LAYERS, ss)])
    copies = full > -1
    assert copies.sum() == 3 * 7 and np.all(local[copies] == -3.0) and np.all(local[~copies] == full[~copies])


def test_calibration_needles_are_disjoint_from_evaluation_needles(copy_case):
    from vllm_indexcache.tools.data import retrieval as r

    assert not set(r.ADJECTIVES) & set(r.CALIB_ADJECTIVES) and not set(r.NOUNS) & set(r.CALIB_NOUNS)
    docs = obj.retrieval_documents(copy_case["seqs"], obj.model_encoder(copy_case["model"]), docs=2, needles=2,
                                   seed=1)
    enc = obj.model_encoder(copy_case["model"])
    text = enc.tok.decode(docs[0].ids.tolist())
    assert any(f" {a} " in text for a in r.CALIB_ADJECTIVES)
    assert not any(f"the {a} " in text for a in r.ADJECTIVES)
    for d in docs:      # the answer positions hold exactly the six digits of the value (offsets path: BPE merges)
        for pos in d.answer_pos:
            answer = enc.tok.decode(d.ids[np.asarray(pos)].tolist()).strip()
            assert len(answer) == 6 and answer.isdigit()


def test_bad_objective_options_are_one_line_errors():
    with pytest.raises(ObjectiveError, match=r"^--key-fraction=0\.0: out of range"):
        ObjectiveOptions(key_fraction=0.0).check("long-lm")
    with pytest.raises(ObjectiveError, match=r"^--retrieval-docs=0: out of range"):
        ObjectiveOptions(retrieval_docs=0).check("retrieval")
    with pytest.raises(ObjectiveError, match=r"^--objective='nope'"):
        ObjectiveOptions().check("nope")


def test_gate_warns_on_a_pattern_that_breaks_retrieval(copy_case, capsys):
    engine = CopyEngine(copy_case["model"], copy_case["seqs"], "lm-loss")
    broken = "".join("S" if i == COPY_LAYER else "F" for i in range(NUM_LAYERS))
    kept = "FSFFS"
    gate = run_gate(engine, copy_case["seqs"], {"1": {"pattern": "F" * NUM_LAYERS},
                                                "1/2": {"pattern": kept}, "1/4": {"pattern": broken}},
                    docs=6, margin=0.05, echo=lambda _m: None)
    err = capsys.readouterr().err.strip().splitlines()
    assert gate["all_f"] == 1.0 and gate["levels"]["1/2"]["accuracy"] == 1.0 and gate["levels"]["1/4"]["accuracy"] == 0
    assert gate["levels"]["1/2"]["ok"] and not gate["levels"]["1/4"]["ok"]
    assert len(err) == 1 and err[0].startswith("warning: retention 1/4 pattern " + broken + " loses retrieval")


@pytest.mark.parametrize("objective", ["long-lm", "retrieval"])
def test_search_resumes_identically_with_the_new_objectives(copy_case, objective):
    """Killed after two committed steps and resumed, a search ends exactly as an uninterrupted one."""
    data = copy_case["root"] / "calib.json"
    data.write_text(json.dumps(copy_case["seqs"]))
    opts = ObjectiveOptions(local_window=WINDOW, retrieval_docs=2, retrieval_needles=2)

    def factory(seqs):
        return CopyEngine(copy_case["model"], seqs, objective, opts)

    kw = dict(retain="1/4", objective=objective, options=opts, seq_len=600, num_seqs=2, scorer_factory=factory,
              probe="none", progress=False)
    full = search(copy_case["model"], data, copy_case["root"] / objective / "full.json", **kw)
    out = copy_case["root"] / objective / "killed.json"
    done = []

    def kill(step):
        done.append(step)
        if len(done) == 2:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        search(copy_case["model"], data, out, on_step=kill, **kw)
    assert len(json.loads(state_path(out).read_text())["steps"]) == 2
    resumed = search(copy_case["model"], data, out, resume=True, **kw)
    assert resumed["steps"] == full["steps"] and resumed["levels"] == full["levels"]
    assert full["objective_options"] == opts.for_objective(objective)
    # other objective options: refused, state left as it was
    before = state_path(out).read_bytes()
    with pytest.raises(StateError, match="objective_options"):
        search(copy_case["model"], data, out, resume=True, **dict(kw, options=ObjectiveOptions(
            local_window=WINDOW + 1, retrieval_docs=3, retrieval_needles=2)))
    assert state_path(out).read_bytes() == before


# ---------------------------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def tiny_windows():
    """Two 512-token windows of this repository's README in the shipped model's tokenizer (the corpus is not in
    the repository)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    ids = tok((REPO / "README.md").read_text() * 3, add_special_tokens=False)["input_ids"]
    return [ids[i * 512:(i + 1) * 512] for i in range(2)]


@pytest.fixture(scope="module")
def tiny_model():
    from vllm_indexcache.tools.reference import load_reference

    return load_reference(str(TINY), ties="lower")


def test_retrieval_objective_ranks_flipping_layer_10_of_the_shipped_model_worst(tiny_windows, tiny_model):
    scorer = HFScorer(TINY, tiny_windows, "retrieval", model=tiny_model,
                      options=ObjectiveOptions(retrieval_docs=2))
    losses = {i: scorer("".join("S" if j == i else "F" for j in range(12))) for i in (2, 9, 10, 11)}
    assert max(losses, key=losses.get) == 10
    lm = HFScorer(TINY, tiny_windows, "lm-loss", model=tiny_model)
    lm_losses = {i: lm("".join("S" if j == i else "F" for j in range(12))) for i in (2, 9, 10, 11)}
    assert max(lm_losses, key=lm_losses.get) != 10           # what the paper's objective misses


def test_gate_warns_on_the_lm_loss_searched_pattern_of_the_shipped_model(tiny_windows, tiny_model, capsys):
    scorer = HFScorer(TINY, tiny_windows, "lm-loss", model=tiny_model)
    gate = run_gate(scorer, tiny_windows, {"1/4": {"pattern": "FSFSSSSSSFSS"}, "1/4*": {"pattern": "FSFSSSSSSSFS"}},
                    docs=10, margin=0.2, echo=lambda _m: None)
    err = capsys.readouterr().err.strip().splitlines()
    assert gate["all_f"] >= 0.5
    assert not gate["levels"]["1/4"]["ok"] and gate["levels"]["1/4*"]["ok"]
    assert len(err) == 1 and "FSFSSSSSSFSS loses retrieval" in err[0]

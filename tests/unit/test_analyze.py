"""``analyze``: cross-layer top-k overlap matrix (against a set-based hand computation) and indexer time share."""
import json

import numpy as np
import pytest
import torch

from vllm_indexcache.tools.analyze import analyze, overlap_matrix, timing_title
from vllm_indexcache.tools.toy import build_toy_model

K = 32  # toy index_topk


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from vllm_indexcache.tools.reference import load_reference

    root = tmp_path_factory.mktemp("analyze")
    model_dir = build_toy_model(root / "toy4", num_layers=4, seed=0, tokenizer=False)
    data = root / "calib.u16"
    np.random.default_rng(1).integers(3, 512, size=500).astype(np.uint16).tofile(data)
    model = load_reference(str(model_dir), ties="lower")
    return {"root": root, "model_dir": model_dir, "data": data, "model": model}


def hand_overlap(recs, i, j, k):
    total, n = 0.0, 0
    for rec in recs:
        for t in range(k, rec[i].shape[0]):
            a, b = set(rec[i][t].tolist()), set(rec[j][t].tolist())
            assert len(a) == len(b) == k and -1 not in a
            total += len(a & b) / k
            n += 1
    return total / n, n


def test_overlap_matrix_matches_sets_from_record_topk(toy):
    from vllm_indexcache.tools.reference import record_topk, set_pattern

    set_pattern(toy["model"], "FFFF")
    seqs = [np.fromfile(toy["data"], dtype=np.uint16)[s:s + n].astype(int).tolist() for s, n in ((0, 70), (100, 50))]
    recs = [record_topk(toy["model"], s) for s in seqs]
    O, queries = overlap_matrix(recs, K)
    assert queries == (70 - K) + (50 - K)
    assert O.shape == (4, 4)
    assert torch.equal(torch.diagonal(O), torch.ones(4, dtype=torch.float64))
    assert torch.equal(O, O.T)
    for i in range(4):
        for j in range(4):
            want, n = hand_overlap(recs, i, j, K)
            assert n == queries
            assert O[i, j].item() == pytest.approx(want, abs=1e-12)
    off = O[~torch.eye(4, dtype=torch.bool)]
    assert off.min() > 0.0 and off.max() < 1.0   # random layers share some keys, not all


def test_overlap_needs_sparse_queries():
    rec = {0: torch.arange(4, dtype=torch.int32).repeat(4, 1), 1: torch.arange(4, dtype=torch.int32).repeat(4, 1)}
    with pytest.raises(ValueError, match="longer than index_topk=8"):
        overlap_matrix([rec], 8)


def test_overlap_on_a_constructed_case():
    # 6 tokens, k = 2: query rows t = 2..5 count (rows 0, 1 see <= k keys and are ignored)
    a = torch.full((6, 2), -1, dtype=torch.int32)
    b = a.clone()
    a[2], b[2] = torch.tensor([0, 2]), torch.tensor([0, 2])     # 2 shared of 2
    a[3], b[3] = torch.tensor([3, 1]), torch.tensor([1, 3])     # 2 shared (order does not matter)
    a[4], b[4] = torch.tensor([0, 1]), torch.tensor([1, 2])     # 1 shared of 2
    a[5], b[5] = torch.tensor([3, 4]), torch.tensor([4, 3])     # 2 shared of 2
    O, q = overlap_matrix([{0: a, 1: b}], 2)
    assert q == 4 and O.tolist() == [[1.0, 0.875], [0.875, 1.0]]   # (1 + 1 + 0.5 + 1) / 4


def test_analyze_writes_json_png_and_timing(toy):
    out = toy["root"] / "out"
    res = analyze(toy["model_dir"], toy["data"], out, seq_len=60, num_seqs=2, repeats=1, model=toy["model"])
    on_disk = json.loads((out / "overlap.json").read_text())
    assert on_disk["queries"] == 2 * (60 - K) and on_disk["num_layers"] == 4 and on_disk["index_topk"] == K
    O = torch.tensor(on_disk["overlap"])
    assert torch.allclose(torch.diagonal(O), torch.ones(4, dtype=O.dtype)) and torch.equal(O, O.T)
    assert on_disk["adjacent"] == [on_disk["overlap"][i][i + 1] for i in range(3)]
    t = res["timing"]
    assert len(t["share"]) == 4 and all(0.0 < s < 1.0 for s in t["share"])
    assert all(ix < ly for ix, ly in zip(t["indexer_ms"], t["layer_ms"]))
    assert 0.0 < t["indexer_share_of_forward"] < 1.0
    # --seq-len 60 --num-seqs 2: the title names both sequences and calls 120 the sum (issue 36, item 6)
    assert t["tokens"] == 120 and t["sequence_tokens"] == [60, 60]
    assert timing_title(t).startswith("prefill of 2 sequences × 60 tokens (120 tokens in all) on cpu; indexers = ")
    for name in ("overlap.png", "indexer_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timing_title_says_what_the_token_count_is():
    t = {"tokens": 4096, "device": "cpu", "indexer_share_of_forward": 0.123}
    assert timing_title(t).startswith("prefill of 4096 tokens in all on cpu")          # older overlap.json
    t["sequence_tokens"] = [2048, 2048]
    assert timing_title(t) == ("prefill of 2 sequences × 2048 tokens (4096 tokens in all) on cpu; indexers = 12.3 % "
                               "of the forward")
    assert "1 sequence × 4096 tokens" in timing_title(dict(t, sequence_tokens=[4096]))
    assert "3 sequences of 100–2048 tokens (4096 tokens in all)" in timing_title(dict(t, sequence_tokens=[100, 1948,
                                                                                                           2048]))

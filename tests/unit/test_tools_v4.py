"""The toolkit on DeepSeek-V4 (transformers side, no vLLM engine): ``pattern`` on V4 configs, ``analyze``'s top-k
overlap over CSA layers' compressed entries and indexer share, and the greedy search's hf engine with its
layer-input cache over V4's mHC decoder layers. The vLLM engine's side: ``tests/engine/test_search_v4.py`` and
``vllm-indexcache bench toy-v4`` (docs/benchmarks.md)."""
import json

import numpy as np
import pytest
import torch

from vllm_indexcache.cli import main as cli_main
from vllm_indexcache.tools.analyze import analyze, overlap_matrix, v4_visible_entries
from vllm_indexcache.tools.toy_v4 import build_toy_v4, deepseek_config, toy_v4_config

#: The toy: CSA layers 1, 3, 4 (ordinals 0, 1, 2), an HCA layer between them; index_topk 16 (transformers does not
#: assert vLLM's 512), so the indexer selects from (t + 1) // 4 > 16, i.e. t >= 67, and 200-token windows suffice.
RATIOS = (0, 4, 128, 4, 4)
K = 16
SEQ = 200


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools-v4")
    model_dir = build_toy_v4(root / "hf", compress_ratios=RATIOS, num_hash_layers=1, seed=0, index_topk=K)
    data = root / "calib.u16"
    np.random.default_rng(0).integers(3, 512, size=1000).astype(np.uint16).tofile(data)
    return {"root": root, "model_dir": model_dir, "data": data}


# ------------------------------------------------------------------------------------------------------- pattern
def test_pattern_command_names_csa_decoder_layers(tmp_path, capsys):
    """``vllm-indexcache pattern`` on a V4 config in both layouts: specs resolve over the CSA ordinals and the F/S
    decoder layer ids are printed (default toy: CSA layers 1, 2, 4, 5, 7)."""
    hf_dir, ds_dir = tmp_path / "hf", tmp_path / "ds"
    cfg = toy_v4_config()
    cfg.save_pretrained(hf_dir)
    ds_dir.mkdir()
    (ds_dir / "config.json").write_text(json.dumps(deepseek_config(cfg.to_dict())))
    for d in (hf_dir, ds_dir):
        assert cli_main(["pattern", str(d), "--pattern", "1/4"]) == 0
        out = capsys.readouterr().out
        assert "FSSSF" in out and "F indexer-layer ordinals (positions in the pattern): 0 4" in out
        assert "DeepseekV4 indexer layers (decoder layer ids): 1 2 4 5 7; F: 1 7; S: 2 4 5" in out
        assert cli_main(["pattern", str(d), "--freq", "2", "--offset", "1"]) == 0
        assert "F: 1 4 7; S: 2 5" in capsys.readouterr().out
    assert cli_main(["pattern", str(ds_dir), "--pattern", "FSFSFSFS"]) == 2
    assert "length 8 != 5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- analyze
def test_v4_overlap_of_a_case_computed_by_hand():
    """k = 2, 16 tokens: queries t = 11..15 have (t + 1) // 4 = 3, 3, 3, 3, 4 > 2 complete entries; earlier rows
    (with -1 entries) are not averaged. Layer a picks {0, 1} everywhere, layer b {0, 2} in four rows (overlap 1/2)
    and {1, 0} at t = 15 (overlap 1): O[a, b] = (4 · 0.5 + 1) / 5 = 0.6."""
    S = 16
    a = torch.full((S, 2), -1, dtype=torch.int32)
    b = a.clone()
    a[11:] = torch.tensor([0, 1], dtype=torch.int32)
    b[11:15] = torch.tensor([0, 2], dtype=torch.int32)
    b[15] = torch.tensor([1, 0], dtype=torch.int32)
    assert v4_visible_entries(S)[11:].tolist() == [3, 3, 3, 3, 4]
    O, queries = overlap_matrix([{0: a, 1: b}], 2, visible=v4_visible_entries)
    assert queries == 5
    assert O.flatten().tolist() == pytest.approx([1.0, 0.6, 0.6, 1.0], abs=1e-12)


def test_v4_analyze_on_toy(toy):
    """``analyze`` on the V4 toy: a CSA layer against itself 100 %, the matrix symmetric and equal to a set-based
    count over the recorded compressed-entry ids, queries t >= 67 only; indexer shares of the CSA layers measured."""
    from vllm_indexcache.tools.reference import load_reference, record_topk
    from vllm_indexcache.tools.search.state import load_calibration

    res = analyze(toy["model_dir"], toy["data"], toy["root"] / "an", seq_len=SEQ, num_seqs=2, repeats=1,
                  progress=False)
    assert res["layers"] == [1, 3, 4] and res["num_layers"] == 3 and res["index_topk"] == K
    assert res["queries"] == 2 * (SEQ - 67)
    O = torch.tensor(res["overlap"])
    assert torch.diagonal(O).tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(O, O.T)
    assert 0.0 < O[0, 1] < 1.0 and 0.0 < O[1, 2] < 1.0

    model = load_reference(str(toy["model_dir"]))
    seqs = load_calibration(toy["data"], toy["model_dir"], seq_len=SEQ, num_seqs=2, start=0)
    recs = [record_topk(model, s) for s in seqs]
    total, n = 0.0, 0
    for rec in recs:
        for t in range(67, SEQ):
            x, y = set(rec[0][t].tolist()), set(rec[2][t].tolist())
            assert len(x) == len(y) == K and -1 not in x and max(x) < (t + 1) // 4
            total += len(x & y) / K
            n += 1
    assert res["overlap"][0][2] == pytest.approx(total / n, abs=1e-12)
    assert all(0.0 < s < 1.0 for s in res["timing"]["share"]) and len(res["timing"]["share"]) == 3
    assert (toy["root"] / "an" / "overlap.png").is_file() and (toy["root"] / "an" / "indexer_time.png").is_file()


# -------------------------------------------------------------------------------------------------------- search
def test_v4_hf_search_layer_cache_is_exact(toy):
    """The hf engine's search on V4 with the layer-input cache (a flip at CSA ordinal j replays the decoder layers
    below CSA layer j, mHC states [1, S, hc, H]) scores every candidate exactly as full forwards do, runs fewer
    decoder layers, flips CSA ordinals only (never the first), and the candidates differ (reuse changes the loss)."""
    from vllm_indexcache.tools.reference import load_reference
    from vllm_indexcache.tools.search.algorithm import greedy_search
    from vllm_indexcache.tools.search.scorers import HFScorer
    from vllm_indexcache.tools.search.state import load_calibration

    seqs = load_calibration(toy["data"], toy["model_dir"], seq_len=SEQ, num_seqs=2, start=0)
    model = load_reference(str(toy["model_dir"]))
    runs = {}
    for cached in (True, False):
        scorer = HFScorer(toy["model_dir"], seqs, "lm-loss", model=model, layer_cache=cached)
        assert scorer.num_layers == 3 and scorer.index_topk == 4 * K
        steps = greedy_search(3, 1, scorer)
        runs[cached] = (steps, scorer)
    (cached_steps, scorer), (plain_steps, _) = runs[True], runs[False]
    assert [s.pattern for s in cached_steps] == [s.pattern for s in plain_steps]
    for a, b in zip(cached_steps, plain_steps):
        assert a.candidates == b.candidates
    assert all(s.pattern[0] == "F" for s in cached_steps) and cached_steps[-1].pattern.count("F") == 1
    first = list(cached_steps[0].candidates.values())
    assert max(first) - min(first) > 1e-6
    assert 0 < scorer.cache.layers_run < 5 * 2 * 3   # full forwards: 5 layers x 2 windows x 3 evaluations


# --------------------------------------------------------------------------------------------------------- bench
def test_v4_kv_bytes_from_cache_specs():
    """The memory table's bytes from the KV-cache specs vLLM 0.32 gives a V4 CSA layer, an HCA layer and their
    sliding-window / compressor-state caches (values as printed by a toy engine): CSA KV 584 B per 4-token entry
    = 146 B/token, indexer K 132 B per entry = 33 B/token, HCA 584 B per 128 tokens = 4.5625 B/token; per request:
    128 sliding-window tokens × 584 B, compressor states 8 tokens × 2048 fp32 (main) and × 512 fp32 (indexer)."""
    from types import SimpleNamespace as NS

    from vllm_indexcache.vllm_glue.cpu.deepseek_v4.observe import kv_bytes_per_token

    def spec(head_size, dtype, tokens_per_state, content=None, window=None):
        return NS(num_kv_heads=1, head_size=head_size, dtype=dtype, tokens_per_state=tokens_per_state,
                  state_content_bytes=content, sliding_window=window)

    layers = {
        "model.layers.1.attn": spec(512, torch.uint8, 4, content=584),
        "model.layers.1.attn.indexer.k_cache": spec(132, torch.uint8, 4),
        "model.layers.1.attn.swa_cache": spec(512, torch.uint8, 1, content=584, window=128),
        "model.layers.1.attn.compressor.state_cache": spec(2048, torch.float32, 1, window=8),
        "model.layers.1.attn.indexer.compressor.state_cache": spec(512, torch.float32, 1, window=8),
        "model.layers.2.attn": spec(512, torch.uint8, 128, content=584),
    }
    cfg = NS(compilation_config=NS(static_forward_context={
        name: NS(get_kv_cache_spec=lambda vc, s=s: s) for name, s in layers.items()} | {"model.layers.1.ffn": NS()}))
    out = kv_bytes_per_token(cfg)
    assert out["per_token"] == 146 + 33 + 584 / 128 and out["indexer_per_token"] == 33
    assert out["per_request"] == 128 * 584 + 8 * 2048 * 4 + 8 * 512 * 4
    assert out["indexer_state_per_request"] == 8 * 512 * 4


def test_v4_memory_table_uses_vllm_capacity():
    """The V4 memory table of ``bench``: bytes per token against all-F, vLLM's group-aware capacity (``size_tokens``,
    else num_blocks × block_size for runs before it was recorded) and the budget per token of that capacity."""
    from vllm_indexcache.tools.bench.report import kv_bytes_md

    def pattern(p, per_token, size):
        cap = {"num_blocks": 100, "block_size": 4, "tokens": 400}
        if size is not None:
            cap["size_tokens"] = size
        return {"pattern": p, "kv_capacity": cap,
                "kv_bytes": {"per_token": per_token, "indexer_per_token": 33.0 * p.count("F"),
                             "per_request": 1000.0, "indexer_state_per_request": 100.0}}

    results = {"engine_kwargs": {"kv_cache_memory_bytes": 1 << 20},
               "patterns": {"all-F": pattern("FF", 200.0, 1024), "1/2": pattern("FS", 167.0, 2048)}}
    rows = [r for r in kv_bytes_md(results, {"all-F": {}, "1/2": {}}) if r.startswith("| all-F") or
            r.startswith("| 1/2")]
    assert rows[0] == "| all-F | 2/2 | 200.00 | 66.00 | 1.000 | 1000 | 100 | 1024 | 1.000 | 1024 |"
    assert rows[1] == "| 1/2 | 1/2 | 167.00 | 33.00 | 0.835 | 1000 | 100 | 2048 | 2.000 | 512 |"
    del results["patterns"]["1/2"]["kv_capacity"]["size_tokens"]
    old = [r for r in kv_bytes_md(results, {"all-F": {}, "1/2": {}}) if r.startswith("| 1/2")]
    assert old == ["| 1/2 | 1/2 | 167.00 | 33.00 | 0.835 | 1000 | 100 | 400 | 0.391 | 2621 |"]

"""``vllm-indexcache bench``: the Amdahl bound and the analysis (no engine is started)."""
from __future__ import annotations

import pytest

from vllm_indexcache.tools.bench.report import amdahl, analyse, plot, summary_md


def test_amdahl():
    assert amdahl(0.0, 0.25) == 1.0
    assert amdahl(1.0, 0.25) == pytest.approx(4.0)
    assert amdahl(0.8, 0.25) == pytest.approx(1 / (0.2 + 0.2))


def _stat(v):
    return {"median": v, "min": v, "max": v, "n": 1, "samples": [v]}


def test_analyse_speedup_and_bound():
    def res(pattern, ttft, tpot, share, cap):
        return {"pattern": pattern, "kv_capacity": {"tokens": cap},
                "contexts": {"4096": {"batch1": {"ttft": _stat(ttft), "tpot": _stat(tpot),
                                                 "share_prefill": _stat(share), "share_decode": _stat(share)}}}}

    results = {"patterns": {"all-F": res("FFFF", 10.0, 0.1, 0.8, 1000), "1/4": res("FSSS", 4.0, 0.05, 0.5, 1500)}}
    a = analyse(results, 8)
    r = a["1/4"]["contexts"]["4096"]
    assert r["ttft_speedup"] == pytest.approx(2.5)
    assert r["bound_prefill"] == pytest.approx(2.5)      # s = 0.8 (all-F), f = 1/4
    assert r["ttft_speedup_over_bound"] == pytest.approx(1.0)
    assert a["1/4"]["kv_gain"] == pytest.approx(1.5)


def test_batch_1_report_has_no_duplicated_columns_and_draws_the_bound(tmp_path):
    def res(pattern, ttft, tpot, share):
        b1 = {"ttft": _stat(ttft), "tpot": _stat(tpot), "share_prefill": _stat(share), "share_decode": _stat(share),
              "decode_tok_s": _stat(1 / tpot), "indexer_prefill_s": _stat(share * ttft)}
        return {"pattern": pattern, "kv_capacity": {"tokens": 1000}, "contexts": {"4096": {"batch1": b1}},
                "bytes_per_token": {"latent": 100, "indexer_reclaimed": 10, "indexer_not_reclaimed": 40}}

    results = {"patterns": {"all-F": res("FFFF", 10.0, 0.1, 0.8), "1/4": res("FSSS", 4.0, 0.05, 0.5)}}
    a = analyse(results, 1)
    md = summary_md(results, a, 1)
    for line in md.splitlines():
        if line.startswith("| pattern |"):
            cols = [c.strip() for c in line.strip("|").split("|")]
            named = [c for c in cols if c != "bound"]        # each speedup column is followed by its bound
            assert len(named) == len(set(named)), line
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    made = []
    real = plt.subplots
    plt.subplots = lambda *args, **kw: made.append(args) or real(*args, **kw)
    try:
        plot(results, a, tmp_path / "p.png", 1)
    finally:
        plt.subplots = real
    assert made == [(1, 2)]                       # TTFT and batch-1 TPOT panels, no repeated batch-1 panel


def test_bench_model_has_the_tokenizer_its_engines_load(tmp_path):
    """``bench toy:N`` engines load the tokenizer (no ``skip_tokenizer_init``), so the toy it builds carries one, and
    an older build without one is not reused."""
    from transformers import AutoTokenizer

    from vllm_indexcache.tools.bench.measure import bench_engine_kwargs, build_bench_model

    assert "skip_tokenizer_init" not in bench_engine_kwargs(1024)
    out = tmp_path / "toy"
    (out).mkdir()
    (out / "config.json").write_text('{"num_hidden_layers": 2, "max_position_embeddings": 4096, "index_topk": 128}')
    model = build_bench_model(out, 2, 1024)
    tok = AutoTokenizer.from_pretrained(str(model))
    assert tok.decode(tok("The sea, 123456.")["input_ids"]) == "The sea, 123456."
    assert build_bench_model(out, 2, 1024) == model and (model / "tokenizer.json").is_file()

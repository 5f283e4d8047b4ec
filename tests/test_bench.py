"""``vllm-indexcache bench``: pattern resolution, the Amdahl bound and the analysis (no engine is started)."""
from __future__ import annotations

import pytest

from vllm_indexcache.bench.cli import amdahl, analyse, resolve_pattern


def test_resolve_pattern():
    assert resolve_pattern("all-F", 8) == "FFFFFFFF"
    assert resolve_pattern("1/2", 8) == "FSFSFSFS"
    assert resolve_pattern("1/4", 8) == "FSSSFSSS"
    assert resolve_pattern("1/8", 8) == "FSSSSSSS"
    assert resolve_pattern("1/4", 6) == "FSSSFS"          # ceil(n/k) F layers
    assert resolve_pattern("FSFS", 4) == "FSFS"
    assert resolve_pattern("tiny-dsa-searched-1of4", 12) == "FSFSSSSSSFSS"
    with pytest.raises(ValueError):
        resolve_pattern("FSF", 4)


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

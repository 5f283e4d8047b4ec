"""Observers of the CPU INDEXCACHE indexer (``vllm_glue/cpu/indexer.py``): called once per indexer call of a real
step with the layer, the selections just written and the call's wall time, never for a profile/dummy run, and gone
once removed; the bench's timing and the tests' top-k capture (``vllm_glue/hooks.py``) are such observers.

vLLM (hence Triton) is imported inside the tests, not at collection: tests/unit/test_ops_triton*.py set
TRITON_INTERPRET before Triton's first import."""
from types import SimpleNamespace

import pytest
import torch

from vllm_indexcache.ops.indexer import indexer_topk_naive
from vllm_indexcache.vllm_glue import hooks

H, D, BS, TOPK, PREFIX = 2, 8, 4, 3, "model.layers.3.self_attn.indexer.k_cache"


@pytest.fixture
def ix():
    import vllm_indexcache.vllm_glue.cpu.indexer as module

    return module


def _step(ix, monkeypatch, ctx: int, ql: int, real: bool = True):
    """One request with ``ctx`` cached keys and ``ql`` new query tokens through ``run_lightning_indexer``; returns
    the top-k buffer and the naive top-k of its rows."""
    torch.manual_seed(ctx * 10 + ql)
    n = ctx + ql
    cache = torch.zeros(4, BS, D)
    keys = torch.randn(n, D)
    cache.view(-1, D)[:ctx] = keys[:ctx]
    q, w = torch.randn(ql, H, D), torch.randn(ql, H)
    positions = torch.arange(ctx, n)
    meta = SimpleNamespace(slot_mapping=positions.clone(), block_table=torch.arange(4, dtype=torch.int32)[None],
                           query_start_loc_host=[0, ql], seq_lens_host=[n], positions=positions, block_size=BS,
                           num_actual_tokens=ql, num_reqs=1)
    monkeypatch.setattr(ix, "get_forward_context",
                        lambda: SimpleNamespace(attn_metadata={PREFIX: meta} if real else None))
    buf = torch.full((8, TOPK), 7, dtype=torch.int32)
    ix.run_lightning_indexer(q, keys[ctx:], w, SimpleNamespace(prefix=PREFIX, kv_cache=cache), buf, TOPK)
    return buf, indexer_topk_naive(q, keys, w, positions, TOPK)


def test_observer_sees_layer_selections_and_time(ix, monkeypatch):
    calls = []
    with ix.observing(lambda c: calls.append((c, c.topk.clone()))):
        buf, want = _step(ix, monkeypatch, 0, 5)
        _step(ix, monkeypatch, 0, 5, real=False)            # profile / dummy run: not observed
        _step(ix, monkeypatch, 5, 1)
    _step(ix, monkeypatch, 6, 1)                             # observer removed
    assert len(calls) == 2
    (pre, pre_topk), (dec, _) = calls
    assert torch.equal(buf[:5], want) and torch.equal(pre_topk, want)
    assert pre.layer == 3 and not pre.decode and pre.topk.shape == (5, TOPK) and pre.seconds > 0
    assert pre.positions.tolist() == [0, 1, 2, 3, 4] and list(pre.query_start_loc) == [0, 5]
    assert dec.layer == 3 and dec.decode and dec.positions.tolist() == [5]


def test_bench_timing_and_topk_capture_are_observers(ix, monkeypatch):
    monkeypatch.setattr(ix, "_OBSERVERS", [])            # the capture's observer stays for the process otherwise
    seconds, counts = {"prefill": 0.0, "decode": 0.0}, {"prefill": 0, "decode": 0}
    remove = hooks.time_lightning_indexer(seconds, counts)
    monkeypatch.setattr("vllm.distributed.get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(hooks, "_CAPTURE", None)
    try:
        assert hooks.capture_topk(None, inputs=True) == 0
        _, want = _step(ix, monkeypatch, 0, 4)
        _step(ix, monkeypatch, 4, 1)
        _step(ix, monkeypatch, 0, 4, real=False)
    finally:
        remove()
    assert counts == {"prefill": 1, "decode": 1} and seconds["prefill"] > 0 and seconds["decode"] > 0
    rank, records = hooks.captured_topk(None)
    assert rank == 0 and [r["layer"] for r in records] == [3, 3]
    assert records[0]["topk"] == want.tolist() and records[0]["query_start_loc"] == [0, 4]
    assert records[1]["positions"] == [4] and len(records[0]["q"]) == 4 and len(records[0]["weights"][0]) == H
    assert hooks.captured_topk(None) == (0, [])


def test_remove_is_idempotent(ix):
    fn = lambda c: None  # noqa: E731
    remove = ix.add_observer(fn)
    remove()
    remove()
    assert fn not in ix._OBSERVERS
    with pytest.raises(RuntimeError), ix.observing(fn):
        raise RuntimeError
    assert fn not in ix._OBSERVERS

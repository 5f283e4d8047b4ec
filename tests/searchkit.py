"""Shared by tests/unit/test_search.py and tests/engine/test_search_vllm.py: the 5-layer toy models, calibration
files, the HF scorer factory, the search arguments (Algorithm 1 as written unless ``method="lazy"``) and the reference
(uninterrupted) search."""
import argparse

import numpy as np
import pytest

from vllm_indexcache.tools.search.cli import options_from_args, run
from vllm_indexcache.tools.search.scorers import HFScorer
from vllm_indexcache.tools.toy import build_toy_model

SEQ_LEN, NUM_SEQS = 80, 2


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model5 = build_toy_model(root / "toy5", num_layers=5, seed=0, tokenizer=False)
    other5 = build_toy_model(root / "other5", num_layers=5, seed=1, tokenizer=False)
    rng = np.random.default_rng(0)
    data = root / "calib.u16"
    rng.integers(3, 512, size=1000).astype(np.uint16).tofile(data)
    data2 = root / "calib2.u16"
    rng.integers(3, 512, size=1000).astype(np.uint16).tofile(data2)
    return {"root": root, "model": model5, "other": other5, "data": data, "data2": data2}


_MODELS: dict = {}


def kill_after(n: int):
    """``on_step`` hook that raises after ``n`` committed (and saved) steps: a search killed mid-way."""
    done = []

    def hook(step):
        done.append(step)
        if len(done) >= n:
            raise RuntimeError(f"simulated kill after {len(done)} steps")
    return hook


def cached_factory(args, seqs):
    """HF scorer that reuses one loaded model per directory (the model is switched in place, never mutated)."""
    from vllm_indexcache.tools.reference import load_reference

    key = str(args.model)
    if key not in _MODELS:
        _MODELS[key] = load_reference(key, ties="lower")
    return HFScorer(args.model, seqs, args.objective, model=_MODELS[key], options=options_from_args(args))


def make_args(model, data, out, **kw):
    ns = dict(model=str(model), data=str(data), retain="1/8", out=str(out), engine="hf", objective="lm-loss",
              pp_blocks=1, resume=False, seq_len=SEQ_LEN, num_seqs=NUM_SEQS, start=0, device="cpu",
              dtype="float32", tensor_parallel_size=1, pipeline_parallel_size=1, kv_cache_memory_bytes=None,
              no_progress=True, method="full")
    ns.update(kw)
    return argparse.Namespace(**ns)


@pytest.fixture(scope="module")
def full_run(toy):
    out = toy["root"] / "full" / "search.json"
    return run(make_args(toy["model"], toy["data"], out), scorer_factory=cached_factory)



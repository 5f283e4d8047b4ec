#!/usr/bin/env python3
"""Where one sequence of a search evaluation spends its time: the default objective's scorer (``cli.make_scorer``,
hf engine, no layer cache) on the first scored sequence (a 2048-token calibration window), all layers F, old
(``fast=False``: transformers' eager attention, the oracle's top-k) and new (the default fast path).

Prints, per scorer, the wall seconds of the sequence, the seconds inside each module kind (forward hooks: the
attention block with its indexer, the indexer alone, the MLP, the LM head) and torch.profiler's top operators.

    OMP_NUM_THREADS=1 python scripts/profile_search_eval.py examples/models/tiny-dsa --data calib.txt
"""
import argparse
import collections
import time

import torch

from vllm_indexcache.tools.search.cli import DEFAULT_OBJECTIVE, make_scorer
from vllm_indexcache.tools.search.objectives import ObjectiveOptions
from vllm_indexcache.tools.search.state import calibration_file, load_calibration


def module_seconds(model) -> dict:
    """Install forward hooks that add each module kind's wall seconds into the returned dict."""
    acc: dict = collections.defaultdict(float)
    start: dict = {}

    def add(name, module):
        module.register_forward_pre_hook(lambda *a: start.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda *a: acc.__setitem__(name, acc[name] + time.perf_counter() - start[name]))

    for layer in model.model.layers:
        add("attention (with indexer)", layer.self_attn)
        add("indexer", layer.self_attn.indexer)
        add("mlp", layer.mlp)
    add("lm_head", model.lm_head)
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--rows", type=int, default=12, help="operators listed")
    a = p.parse_args()
    seqs = load_calibration(calibration_file(a.data), a.model, seq_len=2048, num_seqs=1)
    for name, fast in (("old", False), ("new", True)):
        sc = make_scorer(a.model, seqs, engine="hf", objective=DEFAULT_OBJECTIVE, options=ObjectiveOptions())
        sc.cache, sc.fast = None, fast
        one = [sc.targets.seqs[0]]
        layers = "F" * sc.num_layers
        sc.logprobs(layers, one)                                   # warm-up
        acc = module_seconds(sc.model)
        t = time.perf_counter()
        sc.logprobs(layers, one)
        wall = time.perf_counter() - t
        print(f"{name}: one {len(one[0])}-token sequence, all F: {wall:.2f} s (torch threads "
              f"{torch.get_num_threads()}); in modules: " + ", ".join(f"{k} {v:.2f} s" for k, v in acc.items()),
              flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sc.logprobs(layers, one)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows), flush=True)


if __name__ == "__main__":
    main()

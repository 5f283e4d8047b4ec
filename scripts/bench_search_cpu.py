#!/usr/bin/env python3
"""Evaluations and wall time of the search, old against new, in one run on this machine: ``old`` = Algorithm 1 as
written (``--method full``) with plain full forwards; ``new`` = the default (``--method full`` with the hf scorer's
layer-input cache); ``lazy`` = ``--method lazy`` with the cache (a heuristic: compare its patterns).
Prints, per variant, the evaluations done against Algorithm 1's count, decoder-layer forwards run, search wall time,
the pattern at every retention level, and whether every level's pattern matches the old search's.

    python scripts/bench_search_cpu.py examples/models/tiny-dsa --data data/tiny-dsa --retain 1/4
    python scripts/bench_search_cpu.py examples/models/tiny-dsa --data notes.txt --objective lm-loss \\
        --seq-len 512 --num-seqs 2 --retain 1/8

Defaults are the search command's (``retrieval``, 8 windows of 2048 tokens): hours for the old search on a 2-core
CPU. ``--budget-s`` stops a variant after the step that passes it (its steps so far are reported, marked
``"stopped"``); both variants share one loaded model (hf engine, float32, CPU, torch's default threads). No probe.
"""
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from vllm_indexcache.tools.search.cli import DEFAULT_OBJECTIVE, search
from vllm_indexcache.tools.search.objectives import OBJECTIVES, ObjectiveOptions
from vllm_indexcache.tools.search.scorers import HFScorer

VARIANTS = {"old": ("full", False), "new": ("full", True), "lazy": ("lazy", True)}


class _Stop(Exception):
    pass


def bench(model_dir, data, *, retain, objective, seq_len, num_seqs, variants, budget_s, loaded=None) -> dict:
    """Run each variant of :data:`VARIANTS` once; return ``{"variants": {name: {...}}, ...}`` (see module doc)."""
    from vllm_indexcache.tools.reference import load_reference

    model = loaded if loaded is not None else load_reference(str(model_dir), ties="lower")
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "model": str(model_dir), "objective": objective,
           "seq_len": seq_len, "num_seqs": num_seqs, "retain": retain, "variants": {}}
    for name in variants:
        method, cache = VARIANTS[name]
        scorers = []

        def factory(seqs, cache=cache, scorers=scorers):
            scorers.append(HFScorer(model_dir, seqs, objective, model=model, options=ObjectiveOptions(),
                                    layer_cache=cache))
            return scorers[-1]

        t0 = time.time()
        steps = []

        def on_step(step, t0=t0, steps=steps, name=name):
            steps.append(step)
            print(f"  {name}: step {step.step} {step.pattern} loss {step.loss:.6f} "
                  f"({len(step.candidates)} scored, {len(step.skipped)} skipped) at {time.time() - t0:.0f} s",
                  flush=True)
            if budget_s and time.time() - t0 > budget_s:
                raise _Stop

        with tempfile.TemporaryDirectory() as tmp:
            try:
                res = search(model_dir, data, Path(tmp) / "s.json", retain=retain, objective=objective,
                             seq_len=seq_len, num_seqs=num_seqs, scorer_factory=factory, probe="none",
                             progress=False, on_step=on_step, method=method)
                entry = {"evaluations": res["evaluations"], "algorithm1_evaluations": res["algorithm1_evaluations"],
                         "levels": {k: v["pattern"] for k, v in res["levels"].items()},
                         "steps": [s["pattern"] for s in res["steps"]],
                         "bound_failures": sum(len(s.get("bound_failures", [])) for s in res["steps"])}
            except _Stop:
                entry = {"stopped": True, "steps": [s.pattern for s in steps],
                         "evaluations": 1 + sum(len(s.candidates) for s in steps)}
        entry["search_wall_s"] = round(time.time() - t0, 1)
        cache_obj = scorers[-1].cache if scorers else None
        entry["layer_forwards"] = cache_obj.layers_run if cache_obj is not None else None
        out["variants"][name] = entry
        print(name, json.dumps(entry), flush=True)
    if "old" in out["variants"]:
        ref = out["variants"]["old"]
        for entry in out["variants"].values():
            n = min(len(ref["steps"]), len(entry["steps"]))
            entry["same_steps_as_old"] = ref["steps"][:n] == entry["steps"][:n]
            if "levels" in ref and "levels" in entry:
                entry["same_levels_as_old"] = ref["levels"] == entry["levels"]
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True, help="calibration data (as vllm-indexcache search --data)")
    p.add_argument("--retain", default="1/4", help="target retention")
    p.add_argument("--objective", default=DEFAULT_OBJECTIVE, choices=OBJECTIVES, help="search objective")
    p.add_argument("--seq-len", type=int, default=2048, help="calibration window length")
    p.add_argument("--num-seqs", type=int, default=8, help="calibration windows")
    p.add_argument("--variants", default="old,new,lazy", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=0, help="stop a variant after the step past this (0: never)")
    a = p.parse_args()
    result = bench(a.model, a.data, retain=a.retain, objective=a.objective, seq_len=a.seq_len,
                   num_seqs=a.num_seqs, variants=a.variants.split(","), budget_s=a.budget_s)
    print(json.dumps(result, indent=1))

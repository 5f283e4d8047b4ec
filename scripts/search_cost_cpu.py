#!/usr/bin/env python3
"""CPU cost of each search objective on the shipped model: set-up and one evaluation, measured; a whole search
projected from them (Algorithm 1 on 12 layers: 1 baseline + 66 candidate evaluations down to 1/8).

    python scripts/search_cost_cpu.py examples/models/tiny-dsa --data data/tiny-dsa [--seq-len 2048 --num-seqs 8]

Same calibration as ``python -m vllm_indexcache.tools.search.table2`` (8 windows of 2048 tokens of train.u16), hf
engine,
float32, torch's default threads. Prints one JSON object.
"""
import argparse
import json
import os
import platform
import time

import torch

from vllm_indexcache.tools.search import algorithm as alg
from vllm_indexcache.tools.search.scorers import HFScorer
from vllm_indexcache.tools.search.state import load_calibration

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=8)
    p.add_argument("--objectives", default="lm-loss,long-lm,retrieval")
    a = p.parse_args()
    seqs = load_calibration(a.data, a.model, seq_len=a.seq_len, num_seqs=a.num_seqs)
    from vllm_indexcache.tools.reference import load_reference

    model = load_reference(a.model, ties="lower")
    from vllm_indexcache.families import family_for

    n = family_for(type(model).__name__).num_indexer_layers(model.config)
    evals = 1 + alg.total_evaluations(n, alg.target_f_count(n, alg.parse_retention("1/8")), alg.pp_blocks(n, 1))
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "evaluations_per_search": evals, "objectives": {}}
    for o in a.objectives.split(","):
        t0 = time.time()
        scorer = HFScorer(a.model, seqs, o, model=model)
        setup = time.time() - t0
        t1 = time.time()
        scorer("F" + "S" + "F" * (n - 2))
        one = time.time() - t1
        out["objectives"][o] = {"setup_s": round(setup, 1), "evaluation_s": round(one, 1),
                                "tokens_per_evaluation": scorer.tokens_per_evaluation,
                                "projected_search_s": round(setup + evals * one)}
        print(o, out["objectives"][o], flush=True)
    print(json.dumps(out, indent=1))

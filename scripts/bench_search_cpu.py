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

``--target`` (issue #34's CPU target) instead runs the *default* search, exactly what ``vllm-indexcache search MODEL
--data DATA --out OUT`` runs (retrieval objective, 8 × 2048 tokens, to 1/4, ``--method full``, hf engine with the
layer-input cache, retrieval gate; the scorer is ``cli.make_scorer``'s, timed per evaluation), in full, then times
the old way (plain forwards, no cache, transformers' eager attention and the oracle's top-k: ``HFScorer(...,
fast=False)``) in the same process on a fixed sample: Algorithm 1's first ``--old-sample`` evaluations (all-F, then
step 1's candidates), whose losses must equal the new ones up to float rounding (the cache is exact; the fast
path's SDPA attention rounds differently, ``same_patterns_max_loss_diff``). The old
search is extrapolated as the sample's mean seconds per evaluation × Algorithm 1's count; old patterns hold fewer
F layers later on and skip more indexers, so this overstates it somewhat. ``--budget-s`` stops the new search once
its evaluations pass that many seconds and extrapolates it the same way (its step-1 candidates re-run every depth
of layers once each). Prints evaluations vs Algorithm 1's count, seconds per evaluation, totals, ≤ 15 min or not,
and the load average.

    python scripts/bench_search_cpu.py examples/models/tiny-dsa --data data/tiny-dsa --target

``--paired`` times one all-F evaluation of the default objective by the old and the new scorer, interleaved
sequence by sequence (the same load for both on a shared machine), and prints old/new and both losses.
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


class _Timed:
    """Mixin over the search's scorer: keeps ``(pattern, seconds, loss, decoder-layer forwards)`` of every
    evaluation and prints it; raises :class:`_Stop` once the evaluations so far pass ``budget_s`` (0: never)."""

    budget_s = 0.0

    def __call__(self, pattern):
        before = self.cache.layers_run if self.cache is not None else None
        t = time.time()
        loss = super().__call__(pattern)
        dt = time.time() - t
        layers = (self.cache.layers_run - before) // len(self.targets.seqs) if before is not None else None
        self.times.append((pattern, dt, loss, layers))
        print(f"  {self.label}: evaluation {len(self.times)} {pattern}: {dt:.1f} s, loss {loss:.6f}"
              + (f", {layers} layers run per sequence" if layers is not None else ""), flush=True)
        if self.budget_s and sum(x[1] for x in self.times) > self.budget_s:
            raise _Stop
        return loss


def _timed(scorer, budget_s: float, label: str):
    scorer.__class__ = type("Timed" + type(scorer).__name__, (_Timed, type(scorer)), {})
    scorer.times, scorer.budget_s, scorer.label = [], budget_s, label
    return scorer


def trajectory_layers(trajectory: dict, num_layers: int, target_f: int) -> list[int]:
    """Decoder layers each of Algorithm 1's evaluations re-runs with the layer-input cache, along the committed
    ``trajectory`` (a search JSON): all of them for all-F, then ``num_layers − j`` for a candidate flipping ``j``."""
    out, f = [num_layers], num_layers
    for step in trajectory["steps"]:
        if f <= target_f:
            break
        out += [num_layers - int(j) for j in step["candidates"]]
        f -= len(step["flipped"])
    return out


def target(model_dir, data, *, limit_s: float = 15 * 60, budget_s: float = 0, old_sample: int = 1,
           trajectory=None) -> dict:
    """Old plain-forward scorer timed on Algorithm 1's first ``old_sample`` evaluations, then the default search of
    ``model_dir`` on ``data`` (new; in full unless ``budget_s``), see module doc. Returns the numbers it prints."""
    import numpy as np

    from vllm_indexcache.tools.search import algorithm as alg
    from vllm_indexcache.tools.search.cli import make_scorer
    from vllm_indexcache.tools.search.state import calibration_file, load_calibration, model_identity

    out = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "model": str(model_dir),
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    layers = int(model_identity(model_dir)["num_layers"])
    target_f = alg.target_f_count(layers, alg.parse_retention("1/4"), 1)
    n1 = alg.total_evaluations(layers, target_f, alg.pp_blocks(layers, 1)) + 1

    # old: Algorithm 1's first evaluations (all-F, then step 1's candidates in layer order), plain forwards
    seqs = load_calibration(calibration_file(data), model_dir, seq_len=2048, num_seqs=8)
    old_scorer = _timed(make_scorer(model_dir, seqs, engine="hf", objective=DEFAULT_OBJECTIVE,
                                    options=ObjectiveOptions()), 0, "old")
    old_scorer.cache = None                       # the old scorer: no layer-input cache,
    old_scorer.fast = False                       # transformers' eager attention and the oracle's top-k
    for j in range(old_sample):
        old_scorer("F" * layers if j == 0 else "F" * j + "S" + "F" * (layers - j - 1))
    per_old = sum(x[1] for x in old_scorer.times) / old_sample
    old = {"sampled_evaluations": old_sample, "s_per_evaluation": round(per_old, 2),
           "total_s_extrapolated": round(per_old * n1, 1)}
    out["old"] = old
    print(f"old (plain forwards): timed Algorithm 1's first {old_sample} evaluation(s), {per_old:.1f} s each; "
          f"x {n1} = {old['total_s_extrapolated']:.0f} s = {old['total_s_extrapolated'] / 60:.0f} min (gate not "
          f"counted)", flush=True)
    old_times = old_scorer.times
    del old_scorer

    scorers = []

    def factory(seqs):   # exactly the default search's scorer (cli.make_scorer, hf engine), timed
        scorers.append(_timed(make_scorer(model_dir, seqs, engine="hf", objective=DEFAULT_OBJECTIVE,
                                          options=ObjectiveOptions()), budget_s, "new"))
        return scorers[-1]

    res = None
    with tempfile.TemporaryDirectory() as tmp:
        last = {}
        t0 = time.time()
        try:
            res = search(model_dir, data, Path(tmp) / "s.json", progress=False, scorer_factory=factory,
                         on_step=lambda step: last.update(t=time.time()))
        except _Stop:
            pass
        total = time.time() - t0
    times = scorers[-1].times
    eval_s = sum(x[1] for x in times)
    new = {"evaluations": len(times), "algorithm1_evaluations": n1, "stopped_after_budget": res is None,
           "evaluation_s": round(eval_s, 1), "s_per_evaluation": round(eval_s / len(times), 2),
           "wall_s": round(total, 1)}
    diffs = [abs(o[2] - n[2]) for o, n in zip(old_times, times) if o[0] == n[0]]
    old["same_patterns_max_loss_diff"] = max(diffs) if diffs else None   # the cache is exact: ~0
    if res is not None:
        new.update(gate_s=round(total - (last.get("t", t0 + total) - t0), 1),
                   levels={k: v["pattern"] for k, v in res["levels"].items()})
        verdict = "within" if total <= limit_s else "NOT within"
        print(f"new: {len(times)} evaluations (Algorithm 1: {n1}), {eval_s / len(times):.1f} s each, total "
              f"{total:.0f} s = {total / 60:.1f} min with the gate: {verdict} {limit_s / 60:.0f} min; old "
              f"extrapolated {old['total_s_extrapolated'] / eval_s:.1f}x the new evaluations' seconds")
    else:
        # seconds = h + c * layers re-run, least squares over the evaluations done; summed along the trajectory
        xs = np.array([x[3] for x in times], dtype=float)
        ys = np.array([x[1] for x in times])
        if trajectory is not None and len(set(xs)) >= 2:
            c, h = np.polyfit(xs, ys, 1)
            runs = trajectory_layers(json.loads(Path(trajectory).read_text()), layers, target_f)
            est = float(sum(h + c * r for r in runs))
            new.update(fit_s_per_layer=round(c, 2), fit_s_fixed=round(h, 2), trajectory=str(trajectory),
                       trajectory_layer_forwards=sum(runs), total_s_projected=round(est, 1))
            print(f"new: stopped after the {budget_s:.0f} s budget at {len(times)} of {n1} evaluations; fit "
                  f"{h:.1f} s + {c:.1f} s per layer re-run, summed over the {len(runs)} evaluations of {trajectory} "
                  f"({sum(runs)} layer forwards vs old's {len(runs) * layers}): {est:.0f} s = {est / 60:.0f} min "
                  f"(gate not counted): {'within' if est <= limit_s else 'NOT within'} {limit_s / 60:.0f} min; "
                  f"old/new {old['total_s_extrapolated'] / est:.1f}x", flush=True)
        else:
            print(f"new: stopped after the {budget_s:.0f} s budget at {len(times)} evaluations: too few to project",
                  flush=True)
    out["new"] = new
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average (1/5/15 min) at start {out['loadavg_start']}, at end {out['loadavg_end']}; "
          f"{out['cores']} cores, torch threads {out['torch_threads']}", flush=True)
    return out


def paired(model_dir, data) -> dict:
    """One all-F evaluation of the default objective by the old scorer (``fast=False``: eager attention, the
    oracle's top-k) and by the new one (the default fast path), interleaved sequence by sequence so that both see
    the same machine load: per scorer the seconds summed over the scored sequences, the loss (the sum of the
    sequences' weighted NLLs), and old/new. No layer cache (all-F runs every layer either way)."""
    from vllm_indexcache.tools.search.cli import make_scorer
    from vllm_indexcache.tools.search.objectives import Targets
    from vllm_indexcache.tools.search.state import calibration_file, load_calibration, model_identity

    layers = int(model_identity(model_dir)["num_layers"])
    seqs = load_calibration(calibration_file(data), model_dir, seq_len=2048, num_seqs=8)
    scorers = {}
    for name, fast in (("old", False), ("new", True)):
        scorers[name] = make_scorer(model_dir, seqs, engine="hf", objective=DEFAULT_OBJECTIVE,
                                    options=ObjectiveOptions())
        scorers[name].cache, scorers[name].fast = None, fast
    targets = scorers["old"].targets
    out = {"loadavg_start": [round(x, 2) for x in os.getloadavg()], "torch_threads": torch.get_num_threads(),
           "sequences": len(targets.seqs)}
    secs, loss = {"old": 0.0, "new": 0.0}, {"old": 0.0, "new": 0.0}
    for i, (seq, w) in enumerate(zip(targets.seqs, targets.weights)):
        for name, sc in scorers.items():
            sc.targets = Targets([seq], [w])
            t = time.time()
            loss[name] += sc("F" * layers)
            secs[name] += time.time() - t
        print(f"  sequence {i + 1}/{len(targets.seqs)} ({int((w != 0).sum())} weighted positions): old "
              f"{secs['old']:.1f} s, new {secs['new']:.1f} s so far", flush=True)
    out.update({f"{k}_s": round(v, 1) for k, v in secs.items()})
    out.update({f"{k}_loss": v for k, v in loss.items()})
    out["old_over_new"] = round(secs["old"] / secs["new"], 2)
    out["loss_rel_diff"] = abs(loss["new"] - loss["old"]) / abs(loss["old"])
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"all-F evaluation, interleaved: old {secs['old']:.1f} s, new {secs['new']:.1f} s, old/new "
          f"{out['old_over_new']}x; loss old {loss['old']:.6f} new {loss['new']:.6f} (relative difference "
          f"{out['loss_rel_diff']:.1e}); load average {out['loadavg_start']} -> {out['loadavg_end']}, torch threads "
          f"{out['torch_threads']}", flush=True)
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
    p.add_argument("--target", action="store_true",
                   help="issue #34's target: the default search (in full unless --budget-s), old timed on a sample "
                        "(--data, --budget-s and --old-sample only)")
    p.add_argument("--old-sample", type=int, default=1, help="--target: old evaluations timed")
    p.add_argument("--trajectory", default=None,
                   help="--target with --budget-s: a search JSON whose committed steps the projection follows")
    p.add_argument("--paired", action="store_true",
                   help="one all-F evaluation of the default objective, old and new scorer interleaved per sequence "
                        "(--data only)")
    a = p.parse_args()
    if a.paired:
        print(json.dumps(paired(a.model, a.data), indent=1))
        raise SystemExit(0)
    if a.target:
        print(json.dumps(target(a.model, a.data, budget_s=a.budget_s, old_sample=a.old_sample,
                                trajectory=a.trajectory), indent=1))
        raise SystemExit(0)
    result = bench(a.model, a.data, retain=a.retain, objective=a.objective, seq_len=a.seq_len,
                   num_seqs=a.num_seqs, variants=a.variants.split(","), budget_s=a.budget_s)
    print(json.dumps(result, indent=1))

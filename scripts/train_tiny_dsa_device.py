#!/usr/bin/env python3
"""Train examples/models/tiny-dsa on an accelerator within time budgets, in two calls of at most 10 minutes.

    python scripts/train_tiny_dsa_device.py --phase dense  --budget dense=420 --out $OUT
    python scripts/train_tiny_dsa_device.py --phase sparse --budget warmup=50 --budget sparse=200 --out $OUT
    # or everything in one call (how tiny-dsa v2 was made; train.yaml, then named train-v2.yaml, is sized for it):
    python scripts/train_tiny_dsa_device.py --config examples/models/tiny-dsa/train.yaml --phase all \
        --budget dense=200 --budget warmup=25 --budget sparse=110 --eval-examples 20 --out $OUT

Before each stage it measures throughput over a few steps (a scratch run, thrown away), sets the stage's ``steps``
so the stage fits its budget (seconds), and records the result in ``<run_dir>/config.json``. Phase ``sparse``
also evaluates the dense and the sparse model (``vllm_indexcache.tools.training.evaluate``). Results go to ``--out``:
the safetensors shards of the stage's export, and ``meta.tar.gz`` with config, logs, done.json, evaluations.
"""
import argparse
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vllm_indexcache.tools.training.config import load_config  # noqa: E402
from vllm_indexcache.tools.training.trainer import run_stage, train  # noqa: E402


def calibrate(cfg, index, budget_s, bench_steps=12):
    """Steps of stage ``index`` that fit ``budget_s`` seconds, measured on a scratch copy of the run."""
    st = cfg.stages[index]
    bench = cfg.model_copy(deep=True)
    bench.run_dir = str(Path(cfg.run_dir + "-bench"))
    shutil.rmtree(bench.run_dir, ignore_errors=True)
    Path(bench.run_dir).mkdir(parents=True)
    if index > 0:
        prev = cfg.stages[index - 1].name
        (Path(bench.run_dir) / prev).mkdir()
        os.symlink(Path(cfg.run_dir, prev, "final.pt").resolve(), Path(bench.run_dir, prev, "final.pt"))
    bench.stages[index].log_every = 1
    bench.stages[index].steps = 10 ** 6
    run_stage(bench, index, stop_after=bench_steps, progress=False)
    recs = [json.loads(x) for x in open(Path(bench.run_dir, st.name, "log.jsonl"))]
    tps = sorted(r["tok_per_s"] for r in recs[3:])[len(recs[3:]) // 2]
    shutil.rmtree(bench.run_dir, ignore_errors=True)
    steps = max(20, int(budget_s * tps / (st.batch_size * cfg.data.context)) // 10 * 10)
    print(f"calibrate {st.name}: {tps:.0f} tok/s -> {steps} steps in {budget_s}s", flush=True)
    return steps


def ship(out, run_dir, stage, extra=()):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exp = Path(run_dir, stage, "export")
    for f in sorted(exp.glob("*.safetensors")):
        shutil.copy(f, out / f.name)
    with tarfile.open(out / "meta.tar.gz", "w:gz") as tf:
        for f in sorted(exp.iterdir()):
            if not f.name.endswith(".safetensors"):
                tf.add(f, arcname=f"{stage}/export/{f.name}")
        for name in ("log.jsonl", "done.json"):
            if Path(run_dir, stage, name).exists():
                tf.add(Path(run_dir, stage, name), arcname=f"{stage}/{name}")
        tf.add(Path(run_dir, "config.json"), arcname="config.json")
        for f in extra:
            tf.add(f, arcname=Path(f).name)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="examples/models/tiny-dsa/train.yaml")
    p.add_argument("--phase", choices=["dense", "sparse", "all"], required=True)
    p.add_argument("--budget", action="append", default=[], help="STAGE=SECONDS")
    p.add_argument("--carried-dense", default=".device/tinydsa/dense-export",
                   help="dense export to start from when the run dir is gone (fresh machine)")
    p.add_argument("--eval-pattern", action="append", default=[])
    p.add_argument("--eval-examples", type=int, default=40)
    p.add_argument("--eval-contexts", default="1024,2048,4096")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = p.parse_args()
    t0 = time.time()
    cfg = load_config(a.config)
    budgets = dict(b.split("=") for b in a.budget)
    names = [s.name for s in cfg.stages]
    used = Path(cfg.run_dir, "steps.json")
    steps = json.loads(used.read_text()) if used.exists() else {}
    for s in cfg.stages:
        if s.name in steps:
            s.steps = steps[s.name]
    print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", flush=True)
    todo = {"dense": ["dense"], "sparse": ["warmup", "sparse"], "all": ["dense", "warmup", "sparse"]}[a.phase]
    if a.phase == "sparse" and not Path(cfg.run_dir, "dense", "final.pt").exists():
        from transformers import AutoModelForCausalLM
        d = Path(cfg.run_dir, "dense")
        d.mkdir(parents=True, exist_ok=True)
        src = AutoModelForCausalLM.from_pretrained(a.carried_dense, dtype=torch.float32)
        torch.save(src.state_dict(), d / "final.pt")
        shutil.copytree(a.carried_dense, d / "export", dirs_exist_ok=True)
        print("dense stage restored from", a.carried_dense, flush=True)
    for name in todo:
        i = names.index(name)
        if name in budgets and not Path(cfg.run_dir, name, "done.json").exists() and name not in steps:
            steps[name] = calibrate(cfg, i, float(budgets[name]))
            cfg.stages[i].steps = steps[name]
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            used.write_text(json.dumps(steps))
        r = train(cfg, [name], progress=True)
        if r[-1]["status"] != "done":
            return 3
    print(f"training done at {time.time() - t0:.0f}s", flush=True)
    extra = []
    if a.phase != "dense":
        from vllm_indexcache.tools.training.evaluate import evaluate
        runs = [("dense", "dense", True, None), ("sparse", "sparse", False, None)]
        if a.phase == "sparse":
            runs.append(("dense_topk", "dense", False, None))
        runs += [(f"sparse_{pat}", "sparse", False, pat) for pat in a.eval_pattern]
        for tag, stage, dense, pat in runs:
            res = evaluate(Path(cfg.run_dir, stage, "export"), cfg.data.dir, dense=dense, pattern=pat,
                           examples=a.eval_examples, batch_size=8,
                           contexts=[int(c) for c in a.eval_contexts.split(",")])
            f = Path(cfg.run_dir, f"eval_{tag}.json")
            f.write_text(json.dumps(res, indent=1) + "\n")
            extra.append(f)
            print(tag, json.dumps({"lm": {c: v["loss"] for c, v in res["lm"].items()},
                                   "retrieval": {c: v["mean"] for c, v in res["retrieval"].items()},
                                   "wall_s": res["wall_s"]}), flush=True)
    ship(a.out, cfg.run_dir, todo[-1], extra)
    if a.phase != "dense":
        with tarfile.open(Path(a.out) / "logs.tar.gz", "w:gz") as tf:
            for name in dict.fromkeys(todo[:-1] + ["dense"]):
                for fn in ("log.jsonl", "done.json"):
                    if Path(cfg.run_dir, name, fn).exists():
                        tf.add(Path(cfg.run_dir, name, fn), arcname=f"{name}/{fn}")
    print(f"phase {a.phase} done at {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``search --engine vllm`` under tensor and pipeline parallelism on CPU: the plugin's run-time switch
(:mod:`vllm_indexcache.vllm_glue.switch`) is applied and checked on every worker at every evaluation, and the TP 2 /
PP 2 search returns the TP 1 search's trajectory and losses.

Each search runs in a child process (``python tests/engine/test_search_parallel.py ...``: vLLM's workers are spawned,
and importing vLLM re-maps transformers' AutoConfig), through the CLI's own path (``cli.run`` with the CLI's
scorer, ``make_scorer``), with a spy on the scorer that keeps what every worker read back after each switch
(``hooks.apply_pattern``) and what its layers did in each evaluation (``hooks.observed_pattern``). One engine at a
time, small KV cache. The toy (5 layers, 2 × 80 calibration tokens) is ``tests/searchkit.py``'s.

Tolerance: TP splits MLA heads and the MLP over two ranks and all-reduces the partial sums, so logits differ from
TP 1 by float32 rounding (the indexer is replicated: its top-k is the same on both ranks, ``test_tp_topk.py``); every
candidate loss must agree within :data:`LOSS_TOL` = 1e-4 nats (a changed top-k selection moves the loss by
~1e-3 or more: ``test_search_vllm.FLIP_TOL``), and the committed flips must be identical. PP splits the layers
without changing any arithmetic: losses within 1e-6.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from searchkit import make_args

LOSS_TOL = {"tp": 1e-4, "pp": 1e-6}
RETAIN = "2/5"            # 5 layers to 2 F: 3 steps, 4 + 3 + 2 candidates (pp-blocks 2: 2 steps)


def _child(model, data, out, tp: int, pp: int, pp_blocks: int) -> None:
    """Run the search in this process and write ``{"result", "applied", "observed"}`` to ``out``."""
    from vllm_indexcache.tools.search import cli
    from vllm_indexcache.vllm_glue import hooks

    applied, observed = [], []

    def factory(args, seqs):
        scorer = cli.make_scorer(args.model, seqs, engine="vllm", objective=args.objective,
                                 options=cli.options_from_args(args), tensor_parallel_size=tp,
                                 pipeline_parallel_size=pp, kv_cache_memory_bytes=128 << 20)
        set_pattern, generate = scorer.set_pattern, scorer._generate

        def spy_set(pattern):
            res = set_pattern(pattern)
            applied.append([pattern, res])
            return res

        def spy_generate(prompts):
            outs = generate(prompts)          # checks observed_pattern itself; kept here for the test to see
            observed.append([scorer.pattern, scorer.llm.apply_model(hooks.observed_pattern)])
            return outs

        scorer.set_pattern, scorer._generate = spy_set, spy_generate
        return scorer

    args = make_args(model, data, Path(out).with_suffix(".search.json"), engine="vllm", retain=RETAIN,
                     pp_blocks=pp_blocks, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    result = cli.run(args, scorer_factory=factory)
    Path(out).write_text(json.dumps({"result": result, "applied": applied, "observed": observed}))


def _search(toy, name: str, tp: int = 1, pp: int = 1, pp_blocks: int = 1) -> dict:
    out = toy["root"] / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get(
        "PYTHONPATH", "")]))
    if tp * pp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"   # one core per worker (vLLM binds per NUMA node otherwise)
    cmd = [sys.executable, __file__, str(toy["model"]), str(toy["data"]), str(out), str(tp), str(pp), str(pp_blocks)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check_every_worker(run: dict, workers: int, pp: int) -> None:
    """Every evaluation: each worker read back its share of the pattern and its layers ran it (TP ranks of a stage
    alike, stages disjoint and covering every layer)."""
    assert run["applied"] and run["observed"]
    evaluated = {p for p, _ in run["applied"]}
    assert {p for p, _ in run["observed"]} == evaluated
    for pattern, per_worker in run["applied"] + run["observed"]:
        assert len(per_worker) == workers
        for i, c in enumerate(pattern):
            got = [w[i] for w in per_worker]
            assert got.count(c) == workers // pp and set(got) <= {c, "."}, (pattern, per_worker)
    # one switch per evaluation, each pattern once (the search memoizes): every evaluation was checked
    assert len(run["applied"]) == len(evaluated) == run["result"]["evaluations"]


def _same_search(a: dict, b: dict, tol: float) -> float:
    """Same flips, patterns and evaluation count; every loss within ``tol``. Returns the largest loss difference."""
    assert [s["flipped"] for s in a["steps"]] == [s["flipped"] for s in b["steps"]]
    assert [s["pattern"] for s in a["steps"]] == [s["pattern"] for s in b["steps"]]
    assert a["baseline_loss"] == pytest.approx(b["baseline_loss"], abs=tol)
    for x, y in zip(a["steps"], b["steps"]):
        assert x["candidates"].keys() == y["candidates"].keys()
        for k in x["candidates"]:
            assert x["candidates"][k] == pytest.approx(y["candidates"][k], abs=tol), (k, x, y)
        assert x["loss"] == pytest.approx(y["loss"], abs=tol)
    assert a["evaluations"] == b["evaluations"]
    diff = max([abs(a["baseline_loss"] - b["baseline_loss"])] + [abs(x["candidates"][k] - y["candidates"][k])
                                                                 for x, y in zip(a["steps"], b["steps"])
                                                                 for k in x["candidates"]])
    print(f"largest loss difference over {a['evaluations']} evaluations: {diff:.3g}")
    return diff


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU workers need two cores")
def test_tensor_parallel_2_search_equals_tp1_and_checks_both_ranks(toy):
    one = _search(toy, "tp1")
    two = _search(toy, "tp2", tp=2)
    _check_every_worker(one, 1, 1)
    _check_every_worker(two, 2, 1)
    _same_search(two["result"], one["result"], LOSS_TOL["tp"])
    assert len(two["result"]["steps"]) == 3


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU workers need two cores")
def test_pipeline_parallel_2_search_equals_tp1_and_checks_both_stages(toy):
    """With ``--pp-blocks 2`` (each stage's first layer stays F: the engine is built all-F, so no top-k handoff
    into a stage is set up, and the switch refuses an S there)."""
    one = _search(toy, "pp1", pp_blocks=2)
    two = _search(toy, "pp2", pp=2, pp_blocks=2)
    _check_every_worker(two, 2, 2)
    _same_search(two["result"], one["result"], LOSS_TOL["pp"])
    assert two["result"]["blocks"] == [[0, 3], [3, 5]]
    assert all(s["pattern"][0] == s["pattern"][3] == "F" for s in two["result"]["steps"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))
    m, d, o, tp_, pp_, blocks = sys.argv[1:7]
    _child(m, d, o, int(tp_), int(pp_), int(blocks))

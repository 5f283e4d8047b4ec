"""Greedy IndexCache layer search (Algorithm 1): trajectory, pp-blocks, resumable state, CLI outputs.

Toy models are random-weight DeepseekV32 models (index_topk 32) scored with the transformers reference; calibration
windows are longer than index_topk so the pattern changes the loss.
"""
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from searchkit import NUM_SEQS, SEQ_LEN, cached_factory, kill_after, make_args

from vllm_indexcache.tools.search import algorithm as alg
from vllm_indexcache.tools.search.cli import main as search_main
from vllm_indexcache.tools.search.cli import run, state_path
from vllm_indexcache.tools.search.state import calibration_identity, load_calibration
from vllm_indexcache.tools.toy import build_toy_model


# ---------------------------------------------------------------------------------------------- pure algorithm
def test_pp_blocks_follow_vllm_partition():
    assert alg.pp_blocks(12, 1) == [(0, 12)]
    assert alg.pp_blocks(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    # 12 = 5 blocks of 2, remainder 2 given to the blocks before the last (vLLM get_pp_indices)
    assert alg.pp_blocks(12, 5) == [(0, 2), (2, 4), (4, 7), (7, 10), (10, 12)]
    assert alg.pp_blocks(61, 4) == [(0, 15), (15, 30), (30, 46), (46, 61)]
    with pytest.raises(ValueError, match="--pp-blocks=0"):
        alg.pp_blocks(4, 0)


def test_target_counts():
    assert [alg.target_f_count(12, alg.parse_retention(r)) for r in ("1/2", "1/4", "1/8")] == [6, 3, 2]
    assert alg.target_f_count(61, alg.parse_retention("0.25")) == 16
    assert alg.target_f_count(12, alg.parse_retention("1/8"), pp_blocks=4) == 4
    with pytest.raises(ValueError, match="--retain"):
        alg.parse_retention("3/2")


def test_greedy_on_a_known_cost_picks_cheapest_flips_and_counts_evaluations():
    # additive cost of S layers: the greedy order is the cost order, ties -> lower layer id
    cost = [100.0, 5.0, 1.0, 3.0, 1.0, 2.0, 4.0]
    calls = []

    def score(p):
        calls.append(p)
        return sum(c for c, ch in zip(cost, p) if ch == "S")

    steps = alg.greedy_search(7, 1, score)
    assert [s.flipped for s in steps] == [[2], [4], [5], [3], [6], [1]]
    assert len(calls) == 7 * 6 // 2 == alg.total_evaluations(7, 1, alg.pp_blocks(7, 1))
    assert [s.loss for s in steps] == [1.0, 2.0, 4.0, 7.0, 11.0, 16.0]


def test_pp_blocks_one_flip_per_block_and_block_heads_stay_f():
    cost = [9.0, 1.0, 2.0, 9.0, 3.0, 1.0, 9.0, 0.5, 0.1]
    calls = []

    def score(p):
        calls.append(p)
        return sum(c for c, ch in zip(cost, p) if ch == "S")

    blocks = alg.pp_blocks(9, 3)
    assert blocks == [(0, 3), (3, 6), (6, 9)]
    steps = alg.greedy_search(9, 4, score, num_blocks=3)
    assert [s.flipped for s in steps] == [[1, 5, 8], [2, 7]]   # step 2, 2 flips left: 0.5 (7), 2.0 (2) beat 3.0 (4)
    for s in steps:
        assert all(s.pattern[b] == "F" for b, _ in blocks)
        assert len(s.flipped) <= 3 and len({next(k for k, (b, e) in enumerate(blocks) if b <= x < e)
                                             for x in s.flipped}) == len(s.flipped)
    assert steps[-1].pattern == "FSSFFSFSS" and steps[-1].pattern.count("F") == 4
    # one flip per block per step: 2 sequential steps instead of 5; the committed pattern is scored once per step
    assert steps[0].loss == 1.0 + 1.0 + 0.1 and steps[1].loss == steps[0].loss + 2.0 + 0.5
    assert len(calls) == (2 + 2 + 2 + 1) + (1 + 1 + 1 + 1)
    assert alg.total_evaluations(9, 4, blocks) >= len(calls)


# ---------------------------------------------------------------------------------------------- real scorer
def test_trajectory_is_nested_and_layer0_never_flipped(full_run, toy):
    steps = full_run["steps"]
    assert [s["num_f"] for s in steps] == [4, 3, 2, 1]
    prev = set(range(5))
    for s in steps:
        f = {i for i, c in enumerate(s["pattern"]) if c == "F"}
        assert f < prev and len(prev - f) == 1 and 0 in f
        assert "0" not in s["candidates"]
        # committed flip = candidate with the lowest loss (ties to the lower layer)
        best = min((v, int(k)) for k, v in s["candidates"].items())
        assert s["flipped"] == [best[1]] and s["loss"] == best[0]
        prev = f
    assert full_run["final_pattern"] == "FSSSS"
    lv = full_run["levels"]
    assert set(lv) == {"1", "1/2", "1/4", "1/8"}
    assert [lv[k]["num_f"] for k in ("1/2", "1/4", "1/8")] == [3, 2, 1]
    fsets = [{i for i, c in enumerate(lv[k]["pattern"]) if c == "F"} for k in ("1", "1/2", "1/4", "1/8")]
    assert fsets[0] > fsets[1] > fsets[2] >= fsets[3]
    assert full_run["evaluations"] == 1 + 4 * 5 // 2


def test_losses_equal_a_hand_computation_from_the_reference(full_run, toy):
    from vllm_indexcache.tools.reference import load_reference, prompt_logprobs, set_pattern

    seqs = load_calibration(toy["data"], seq_len=SEQ_LEN, num_seqs=NUM_SEQS)
    assert len(seqs) == NUM_SEQS and all(len(s) == SEQ_LEN for s in seqs)
    assert full_run["calibration"] == calibration_identity(seqs, toy["data"])
    assert full_run["calibration"]["tokens"] == SEQ_LEN * NUM_SEQS
    model = load_reference(str(toy["model"]), ties="lower")

    def nll(pattern):
        set_pattern(model, pattern)
        lp = torch.cat([prompt_logprobs(model, s) for s in seqs]).double()
        return float(-lp.mean())

    assert full_run["baseline_loss"] == pytest.approx(nll("FFFFF"), abs=1e-6)
    first = full_run["steps"][0]
    for layer, loss in first["candidates"].items():
        assert loss == pytest.approx(nll(alg.flip("FFFFF", [int(layer)])), abs=1e-6)
    last = full_run["steps"][-1]
    assert last["loss"] == pytest.approx(nll(last["pattern"]), abs=1e-6)
    # the pattern matters on this model: candidates of step 1 are not all equal
    assert max(first["candidates"].values()) - min(first["candidates"].values()) > 1e-4


def test_outputs_json_and_png(full_run, toy):
    out = toy["root"] / "full" / "search.json"
    on_disk = json.loads(out.read_text())
    assert on_disk["final_pattern"] == full_run["final_pattern"]
    assert on_disk["model"]["num_layers"] == 5 and len(on_disk["model"]["sha256"]) == 64
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_resume_after_simulated_kill_gives_identical_result(full_run, toy):
    out = toy["root"] / "killed" / "search.json"
    with pytest.raises(RuntimeError, match="simulated kill after 2 steps"):
        run(make_args(toy["model"], toy["data"], out), scorer_factory=cached_factory, on_step=kill_after(2))
    saved = json.loads(state_path(out).read_text())
    assert [s["pattern"] for s in saved["steps"]] == [s["pattern"] for s in full_run["steps"][:2]]
    assert not out.exists()
    resumed = run(make_args(toy["model"], toy["data"], out, resume=True), scorer_factory=cached_factory)
    assert resumed["steps"] == full_run["steps"]               # patterns, losses, every candidate's loss
    assert resumed["levels"] == full_run["levels"]
    assert resumed["evaluations"] == full_run["evaluations"]


def test_resume_after_sigkill_of_a_real_process(full_run, toy):
    out = toy["root"] / "sigkill" / "search.json"
    out.parent.mkdir()
    spath = state_path(out)
    cmd = [sys.executable, "-m", "vllm_indexcache.cli", "search", str(toy["model"]), "--data", str(toy["data"]),
           "--retain", "1/8", "--out", str(out), "--seq-len", str(SEQ_LEN), "--num-seqs", str(NUM_SEQS),
           "--device", "cpu", "--objective", "lm-loss", "--probe", "none", "--no-progress"]
    from vllm_indexcache.tools.testing.server import sigkill_after_first_step

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = sigkill_after_first_step(proc, spath, timeout=600)
    assert killed_at is not None and 1 <= killed_at < 4, "the search finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    state = json.loads(spath.read_text())                      # atomic writes: parseable after SIGKILL
    # The killed search ran in another process, whose CPU kernels may use another thread count and so sum in
    # another order: its losses agree to float32 rounding, not bit for bit (the in-process kill test above checks
    # bit-for-bit equality). Flips and patterns must be identical.
    _assert_same_steps(state["steps"], full_run["steps"][:len(state["steps"])])
    resumed = run(make_args(toy["model"], toy["data"], out, resume=True), scorer_factory=cached_factory)
    _assert_same_steps(resumed["steps"], full_run["steps"])
    assert resumed["levels"].keys() == full_run["levels"].keys()
    for level, got in resumed["levels"].items():
        want = full_run["levels"][level]
        assert (got["pattern"], got["num_f"], got["step"]) == (want["pattern"], want["num_f"], want["step"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_resume_after_sigkill_with_the_retrieval_objective(tmp_path):
    """The same with ``--objective retrieval`` (needle documents built from the calibration windows with the model's
    tokenizer): the SIGKILLed and resumed search ends as the uninterrupted one."""
    model = build_toy_model(tmp_path / "toy5t", num_layers=5, seed=0, tokenizer=True)
    data = tmp_path / "calib.u16"
    np.random.default_rng(2).integers(3, 512, size=1000).astype(np.uint16).tofile(data)
    opts = dict(objective="retrieval", seq_len=300, retain="2/5", retrieval_docs=2, retrieval_needles=1)
    full = run(make_args(model, data, tmp_path / "full" / "search.json", **opts), scorer_factory=cached_factory)
    assert full["objective_parts"]["answer"] >= 2 * 3 and len(full["steps"]) == 3
    out = tmp_path / "killed" / "search.json"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "vllm_indexcache.cli", "search", str(model), "--data", str(data), "--retain", "2/5",
           "--out", str(out), "--seq-len", "300", "--num-seqs", str(NUM_SEQS), "--device", "cpu", "--objective",
           "retrieval", "--retrieval-docs", "2", "--retrieval-needles", "1", "--probe", "none", "--no-progress"]
    from vllm_indexcache.tools.testing.server import sigkill_after_first_step

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = sigkill_after_first_step(proc, state_path(out), timeout=600)
    assert killed_at is not None and 1 <= killed_at < 3 and proc.returncode == -signal.SIGKILL
    state = json.loads(state_path(out).read_text())
    _assert_same_steps(state["steps"], full["steps"][:len(state["steps"])])
    resumed = run(make_args(model, data, out, resume=True, **opts), scorer_factory=cached_factory)
    _assert_same_steps(resumed["steps"], full["steps"])
    assert {k: v["pattern"] for k, v in resumed["levels"].items()} == {k: v["pattern"] for k, v in
                                                                       full["levels"].items()}


def _assert_same_steps(got, want, rel=1e-6):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert {k: a[k] for k in ("step", "flipped", "pattern", "num_f")} == \
            {k: b[k] for k in ("step", "flipped", "pattern", "num_f")}
        assert a["loss"] == pytest.approx(b["loss"], rel=rel)
        assert a["candidates"].keys() == b["candidates"].keys()
        assert all(a["candidates"][c] == pytest.approx(b["candidates"][c], rel=rel) for c in a["candidates"])


@pytest.mark.parametrize("kind", ["other-model", "other-data", "other-objective", "corrupt", "no-resume-flag"])
def test_mismatched_or_corrupt_state_is_refused_and_left_unchanged(full_run, toy, kind, capsys):
    out = toy["root"] / "full" / "search.json"
    spath = state_path(out)
    if kind == "corrupt":
        out = toy["root"] / "corrupt" / "search.json"
        out.parent.mkdir(exist_ok=True)
        spath = state_path(out)
        spath.write_text(state_path(toy["root"] / "full" / "search.json").read_text()[:300])
    before = spath.read_bytes()
    mtime = spath.stat().st_mtime_ns
    kw = {"resume": kind != "no-resume-flag"}
    model, data = toy["model"], toy["data"]
    if kind == "other-model":
        model = toy["other"]
    elif kind == "other-data":
        data = toy["data2"]
    elif kind == "other-objective":
        kw["objective"] = "kl"
    rc = search_main(make_args(model, data, out, **kw))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    expect = {"other-model": "model_sha256", "other-data": "calibration_sha256", "other-objective": "objective",
              "corrupt": "corrupt or unreadable", "no-resume-flag": "pass --resume"}[kind]
    assert expect in err
    assert spath.read_bytes() == before and spath.stat().st_mtime_ns == mtime


def test_pp_blocks_search_on_toy_keeps_block_heads_f(toy):
    out = toy["root"] / "pp" / "search.json"
    res = run(make_args(toy["model"], toy["data"], out, pp_blocks=2, retain="1/4"), scorer_factory=cached_factory)
    assert res["blocks"] == [(0, 3), (3, 5)] or res["blocks"] == [[0, 3], [3, 5]]
    assert res["target_f"] == 2
    for s in res["steps"]:
        assert s["pattern"][0] == "F" and s["pattern"][3] == "F"
        assert len(s["flipped"]) == len({0 if x < 3 else 1 for x in s["flipped"]})
    assert res["final_pattern"] == "FSSFS"
    assert res["steps"][0]["flipped"] == sorted(res["steps"][0]["flipped"]) and len(res["steps"][0]["flipped"]) == 2
    # a multi-flip step's loss is the committed pattern's own loss, not a candidate's
    assert res["steps"][0]["loss"] not in res["steps"][0]["candidates"].values()


def test_kl_objective_is_zero_at_all_f_and_positive_after_flips(toy):
    out = toy["root"] / "kl" / "search.json"
    res = run(make_args(toy["model"], toy["data"], out, objective="kl", retain="1/2"), scorer_factory=cached_factory)
    assert abs(res["baseline_loss"]) < 1e-6
    assert all(s["loss"] > 1e-5 for s in res["steps"])
    assert res["target_f"] == 3 and res["final_pattern"].count("F") == 3


# ---------------------------------------------------------------------------------------------- tiny-dsa presets
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "models" / "tiny-dsa"
TABLE2 = REPO / "docs" / "tiny-dsa-table2" / "objectives"
TINY_SEARCH = TABLE2 / "retrieval" / "search.json"


def test_tiny_presets_match_the_model_and_are_nested():
    from vllm_indexcache.families import family_for
    from vllm_indexcache.pattern import load_preset

    config = json.loads((TINY / "config.json").read_text())
    presets = {r: load_preset(f"tiny-dsa-searched-1of{r}") for r in (2, 4, 8)}
    n = family_for(config).num_indexer_layers(config)   # a preset's num_layers: the family's indexer layers
    for r, p in presets.items():
        assert (p.architecture, p.num_layers) == (config["architectures"][0], n) \
            == ("DeepseekV32ForCausalLM", 12)
        assert p.retention == f"1/{r}" and len(p.f_layers) == alg.target_f_count(12, alg.parse_retention(p.retention))
        assert p.f_layers[0] == 0
    assert set(presets[8].f_layers) < set(presets[4].f_layers) < set(presets[2].f_layers)
    # tiny-dsa v2, retrieval objective, train-split calibration (docs/search.md)
    assert presets[2].f_layers == [0, 2, 5, 9, 10, 11]
    assert presets[4].f_layers == [0, 2, 10] and presets[8].f_layers == [0, 10]
    # the model ships the searched 1/4 pattern as its default
    assert config["index_topk_pattern"] == presets[4].pattern


def test_tiny_presets_come_from_the_recorded_search_of_the_shipped_model():
    from vllm_indexcache.pattern import load_preset
    from vllm_indexcache.tools.search.state import model_identity

    search = json.loads(TINY_SEARCH.read_text())
    assert search["model"]["sha256"] == model_identity(TINY)["sha256"], (
        "examples/models/tiny-dsa changed since the search: re-run the table2 command in docs/search.md")
    assert search["objective"] == "retrieval"
    for r in (2, 4, 8):
        assert load_preset(f"tiny-dsa-searched-1of{r}").pattern == search["levels"][f"1/{r}"]["pattern"]
    assert search["evaluations"] == 1 + sum(range(2, 12))   # baseline + 11 + 10 + ... + 2 candidates (down to 2 F)
    table = json.loads((TABLE2 / "table2.json").read_text())
    assert table["model"]["sha256"] == search["model"]["sha256"]
    rows = {(row["method"], row["retention"]): row for row in table["rows"]}
    loss = {k: row["lm"]["2048"]["loss"] for k, row in rows.items()}
    retr = {k: row["retrieval"]["2048"]["mean"] for k, row in rows.items()}
    assert all(row["retrieval"]["2048"]["n"] >= 100 for row in table["rows"])
    # the targets, as recorded: searched 1/4 keeps >= 90 % retrieval within 1 % loss of all-F; searched
    # beats uniform on retrieval at 1/2 and 1/4 without losing more than 0.5 % loss to it
    assert retr[("searched (retrieval)", "1/4")] >= 0.9
    assert loss[("searched (retrieval)", "1/4")] <= 1.01 * loss[("original", "1")]
    for r in ("1/2", "1/4"):
        assert retr[("searched (retrieval)", r)] >= retr[("uniform", r)]
        assert loss[("searched (retrieval)", r)] <= 1.005 * loss[("uniform", r)]


def test_written_files_keep_the_users_umask(tmp_path):
    import os

    from vllm_indexcache.tools.search.state import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        write_atomic(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644      # mkstemp alone would give 0600
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}

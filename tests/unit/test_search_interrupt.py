"""Interruptions and feedback of ``vllm-indexcache search``: Ctrl-C inside a step, the resume command, the progress
bar after a resume, ``--help`` defaults, the evaluation-count estimate, the plot's labels."""
import argparse
import json
import shlex

import pytest
from searchkit import cached_factory, make_args

from vllm_indexcache.tools.search import cli
from vllm_indexcache.tools.search.cli import run, state_path
from vllm_indexcache.tools.search.objectives import OBJECTIVES


def _interrupting(after: int, calls: list):
    """Scorer factory whose scorer raises KeyboardInterrupt (a Ctrl-C) on its call number ``after + 1``."""
    def factory(args, seqs):
        scorer = cached_factory(args, seqs)
        inner = type(scorer).__call__

        class Interrupting(type(scorer)):
            def __call__(self, pattern):
                if len(calls) >= after:
                    raise KeyboardInterrupt
                calls.append(pattern)
                return inner(self, pattern)

        scorer.__class__ = Interrupting
        return scorer
    return factory


def _counting(calls: list):
    def factory(args, seqs):
        scorer = cached_factory(args, seqs)
        inner = type(scorer).__call__

        class Counting(type(scorer)):
            def __call__(self, pattern):
                calls.append(pattern)
                return inner(self, pattern)

        scorer.__class__ = Counting
        return scorer
    return factory


@pytest.mark.parametrize("method", ["full", "lazy"])
def test_ctrl_c_mid_step_keeps_finished_evaluations_and_resume_matches(full_run, toy, tmp_path, method):
    ref = full_run if method == "full" else run(make_args(toy["model"], toy["data"], tmp_path / "ref" / "s.json",
                                                          method=method), scorer_factory=cached_factory)
    # 5 layers: all-F, then step 1 scores 4 candidates: Ctrl-C after its second
    out = tmp_path / "killed" / "s.json"
    first = []
    with pytest.raises(KeyboardInterrupt):
        run(make_args(toy["model"], toy["data"], out, method=method), scorer_factory=_interrupting(3, first))
    state = json.loads(state_path(out).read_text())
    assert len(first) == 3 and state["evaluations"] == 3 and state["steps"] == []
    assert state["pending"]["base"] == "FFFFF"
    assert list(state["pending"]["scores"]) == first[1:] == ["FSFFF", "FFSFF"]   # the finished ones of step 1
    assert state["pending"]["scores"]["FSFFF"] == ref["steps"][0]["candidates"]["1"]
    second = []
    resumed = run(make_args(toy["model"], toy["data"], out, method=method, resume=True),
                  scorer_factory=_counting(second))
    assert not set(first) & set(second)                                   # taken from the state, not recomputed
    assert len(first) + len(second) == ref["evaluations"] == resumed["evaluations"]
    assert resumed["steps"] == ref["steps"]                               # patterns, losses, every candidate's score
    assert resumed["levels"] == ref["levels"]


def test_ctrl_c_prints_one_line_with_the_resume_command_and_exits_130(toy, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.json"
    argv = ["vllm-indexcache", "search", str(toy["model"]), "--data", str(toy["data"]), "--out", str(out),
            "--objective", "lm-loss", "--retain", "1/8"]
    monkeypatch.setattr("sys.argv", argv)
    args = make_args(toy["model"], toy["data"], out)
    real_run = cli.run
    monkeypatch.setattr(cli, "run", lambda a: real_run(a, scorer_factory=_interrupting(3, [])))
    capsys.readouterr()
    assert cli.main(args) == 130
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    # the estimate, the time of one evaluation, then one line for the interruption (no traceback)
    assert len(err) == 3 and err[0].startswith("search: 5 DSA layers to 1 F") and "Traceback" not in "".join(err)
    want = shlex.join(argv + ["--resume"])
    assert err[2] == f"interrupted: finished evaluations are saved in {state_path(out)}; continue with: {want}"
    assert json.loads(state_path(out).read_text())["evaluations"] == 3


def test_ctrl_c_before_anything_is_saved_says_so(toy, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.json"
    monkeypatch.setattr("sys.argv", ["vllm-indexcache", "search", "M", "--out", str(out)])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(make_args(toy["model"], toy["data"], out)) == 130
    assert capsys.readouterr().err == ("interrupted before the first evaluation finished (nothing saved); start again "
                                       f"with: vllm-indexcache search M --out {out} --resume\n")


def test_resume_command_keeps_the_typed_words_and_adds_resume_once():
    args = argparse.Namespace(model="m", data="d", out="o.json", retain="1/4", objective="lm-loss")
    assert cli.resume_command(args, ["/x/cli.py", "search", "m dir", "--out", "o.json"]) == \
        "vllm-indexcache search 'm dir' --out o.json --resume"
    assert cli.resume_command(args, ["vllm-indexcache", "search", "m", "--resume"]).count("--resume") == 1
    assert cli.resume_command(args, ["pytest"]) == \
        "vllm-indexcache search m --data d --out o.json --retain 1/4 --objective lm-loss --resume"


def test_progress_bar_of_a_resume_starts_where_the_state_is(full_run, toy, tmp_path, monkeypatch):
    import tqdm

    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, disable=True)
            self.kw = kw
            self.updates = 0
            bars.append(self)

        def update(self, n=1):
            self.updates += n
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    out = tmp_path / "s.json"
    with pytest.raises(KeyboardInterrupt):
        run(make_args(toy["model"], toy["data"], out, no_progress=False), scorer_factory=_interrupting(6, []))
    done = json.loads(state_path(out).read_text())["evaluations"]
    run(make_args(toy["model"], toy["data"], out, resume=True, no_progress=False), scorer_factory=cached_factory)
    bar = bars[-1]
    assert bar.kw["initial"] == done == 6                   # counts from where it is; tqdm's rate is over n - initial
    assert bar.updates == full_run["evaluations"] - done    # one update per new evaluation only
    assert bar.total == full_run["evaluations"]             # the lazy steps' skipped candidates left the total


def test_the_estimate_names_algorithm_1s_count_and_the_time(toy, tmp_path):
    notes = []
    result = cli.search(toy["model"], toy["data"], tmp_path / "s.json", retain="1/8", objective="lm-loss",
                        seq_len=80, num_seqs=2, probe="none", progress=False, note=notes.append,
                        scorer_factory=lambda seqs: cached_factory(make_args(toy["model"], toy["data"], "x"), seqs))
    assert notes[0] == ("search: 5 DSA layers to 1 F (1/8), method full: Algorithm 1 needs 11 evaluations "
                        "(all-F included)")
    assert notes[1].startswith("search: one evaluation takes ") and notes[1].endswith(" for the 10 evaluations left")
    assert result["algorithm1_evaluations"] == 11 == result["evaluations"]


def test_help_shows_every_default():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    fmt = parser._get_formatter()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help" and a.default is not argparse.SUPPRESS]
    assert len(flags) > 20
    for action in flags:
        assert fmt._expand_help(action).endswith(f"(default: {action.default})"), action.option_strings[0]
    text = " ".join(parser.format_help().split())
    assert "(default: full)" in text and "(default: 1/4)" in text and "(default: retrieval)" in text


def test_plot_names_its_quantity_and_uses_integer_steps(full_run, monkeypatch):
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    cli.plot(full_run, "/dev/null")
    ax = figs[0].axes[0]
    assert ax.get_ylabel() == "LM loss on the calibration set (mean NLL, nats; lower is better)"
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert set(cli.OBJECTIVE_UNITS) == set(OBJECTIVES) and all("nats" in v for v in cli.OBJECTIVE_UNITS.values())

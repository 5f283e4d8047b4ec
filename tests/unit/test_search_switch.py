"""A pattern switch that does not switch is an error: ``VLLMScorer`` checks what every worker's
``hooks.apply_pattern`` read back from its layers (no vLLM engine is started here: ``LLM.apply_model`` is replaced by
a fake that runs ``apply_pattern`` on stand-in worker models)."""
import functools

import pytest
import torch

from vllm_indexcache.tools.search import cli
from vllm_indexcache.tools.search.scorers import PatternSwitchError, VLLMScorer, check_switched
from vllm_indexcache.vllm_glue import hooks


class _Attention(torch.nn.Module):
    """Stand-in for vLLM 0.32's ``MultiHeadLatentAttentionWrapper``: ``skip_topk``, ``indexer``, ``is_sparse``."""

    def __init__(self):
        super().__init__()
        self.indexer = torch.nn.Identity()
        self.skip_topk = False
        self.is_sparse = True


class _Worker(torch.nn.Module):
    def __init__(self, layers: range, num_layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(num_layers))
        for i in layers:
            self.layers[i].self_attn = _Attention()


class _LLM:
    def __init__(self, workers):
        self.workers = workers

    def apply_model(self, fn):
        return [fn(w) for w in self.workers]


def _scorer(workers, pp=1):
    scorer = VLLMScorer.__new__(VLLMScorer)
    scorer.llm, scorer.pipeline_parallel_size, scorer.pattern = _LLM(workers), pp, None
    return scorer


def test_switch_applies_on_every_worker_of_every_stage():
    workers = [_Worker(range(0, 3), 5), _Worker(range(0, 3), 5), _Worker(range(3, 5), 5), _Worker(range(3, 5), 5)]
    scorer = _scorer(workers, pp=2)                      # TP 2 × PP 2
    assert scorer.set_pattern("FSFFS") == ["FSF..", "FSF..", "...FS", "...FS"]
    assert [w.layers[1].self_attn.skip_topk for w in workers[:2]] == [True, True]
    assert scorer.pattern == "FSFFS"


def test_a_noop_switch_stops_with_one_line_naming_the_layers(monkeypatch):
    workers = [_Worker(range(0, 5), 5)]
    scorer = _scorer(workers)
    # a vLLM whose attention ignores the switch: the attribute is set but the layer keeps computing its own top-k
    monkeypatch.setattr(_Attention, "skip_topk", property(lambda self: False, lambda self, v: None), raising=False)
    with pytest.raises(PatternSwitchError) as e:
        scorer.set_pattern("FSFSS")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("pattern FSFSS: layers [1, 3, 4] were not switched on every vLLM worker")
    assert scorer.pattern is None


def test_a_vllm_without_the_switch_attribute_is_an_error_too(monkeypatch):
    # vLLM 0.26: no skip_topk on the attention, apply_pattern finds no layer and returns "....."
    monkeypatch.setattr(hooks, "apply_pattern", lambda pattern, model: "." * len(pattern))
    scorer = _scorer([_Worker(range(0, 4), 4)])
    with pytest.raises(PatternSwitchError, match=r"layers \[0, 1, 2, 3\] were not switched"):
        scorer.set_pattern("FFSF")


def test_one_tensor_parallel_rank_left_behind_is_caught():
    with pytest.raises(PatternSwitchError, match=r"layers \[2\]"):
        check_switched("FFSF", ["FFSF", "FFFF"])                   # TP 2: rank 1 kept layer 2 F
    with pytest.raises(PatternSwitchError, match=r"layers \[3\]"):
        check_switched("FFSS", ["FF..", "..S."], pipeline_parallel_size=2)   # no stage holds layer 3
    check_switched("FFSF", ["FFSF", "FFSF"])
    check_switched("FFSS", ["FF..", "..SS"], pipeline_parallel_size=2)


def test_the_cli_prints_the_switch_error_as_one_line(monkeypatch, capsys, tmp_path):
    def fail(args):
        raise PatternSwitchError("pattern FSFF: layers [1] were not switched on every vLLM worker (applied: ....)")

    monkeypatch.setattr(cli, "run", fail)
    assert cli.main(functools.partial(object)) == 2
    err = capsys.readouterr().err
    assert err == "error: pattern FSFF: layers [1] were not switched on every vLLM worker (applied: ....)\n"

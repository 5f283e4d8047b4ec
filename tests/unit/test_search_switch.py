"""A pattern switch that does not switch is an error: ``VLLMScorer`` checks, on every worker, what the plugin's
run-time switch (:mod:`vllm_indexcache.vllm_glue.switch`, reached through ``hooks.apply_pattern``) read back from its
layers, and what the layers did in the evaluation (``hooks.observed_pattern``). No vLLM engine is started here:
``LLM.apply_model`` / ``generate`` are replaced by fakes over stand-in worker models laid out as vLLM's
DeepSeek-V2 classes (``model.layers[i].self_attn.indexer``), each worker holding its TP/PP share."""
import functools

import pytest
import torch

from vllm_indexcache.families import family_for
from vllm_indexcache.tools.search import cli
from vllm_indexcache.tools.search.scorers import PatternSwitchError, VLLMScorer, check_switched
from vllm_indexcache.vllm_glue import hooks, switch

CONFIG = {"architectures": ["DeepseekV32ForCausalLM"], "num_hidden_layers": 5}
FAMILY = family_for(CONFIG)


class _Indexer(torch.nn.Module):
    """Stand-in for vLLM's ``Indexer``: writes its layer id into the shared top-k buffer."""

    def __init__(self, layer_id: int, buffer: torch.Tensor):
        super().__init__()
        self.layer_id, self.topk_indices_buffer = layer_id, buffer

    def forward(self, hidden_states):
        self.topk_indices_buffer.fill_(self.layer_id)
        return self.topk_indices_buffer


class _Attention(torch.nn.Module):
    """Stand-in for ``DeepseekV2MLAAttention``: calls its indexer (if built), then reads the buffer."""

    def __init__(self, indexer):
        super().__init__()
        self.indexer = indexer

    def forward(self, hidden_states, buffer):
        if self.indexer is not None:
            self.indexer(hidden_states)
        return int(buffer[0])


class _Worker(torch.nn.Module):
    """One TP rank of one PP stage holding ``layers`` of the model (others are placeholders, as vLLM's
    ``PPMissingLayer``); ``built_s``: layers built without an indexer."""

    def __init__(self, layers: range, built_s=(), receives=False):
        super().__init__()
        self.buffer = torch.zeros(1, dtype=torch.int32)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(CONFIG["num_hidden_layers"]))
        for i in layers:
            self.model.layers[i].self_attn = _Attention(None if i in built_s else _Indexer(i, self.buffer))
        self.read = {}
        switch.install(self, FAMILY, CONFIG, layers.start, layers.stop, receives)
        self.stage = layers

    def forward(self):
        """Run the stage's layers; record which layer's top-k each layer attended over."""
        for i in self.stage:
            self.read[i] = self.model.layers[i].self_attn(None, self.buffer)


class _LLM:
    def __init__(self, workers):
        self.workers = workers

    def apply_model(self, fn):
        return [fn(w) for w in self.workers]

    def generate(self, prompts, params, use_tqdm=False):
        for w in self.workers:
            w()
        return []


def _scorer(workers, pp=1):
    scorer = VLLMScorer.__new__(VLLMScorer)
    scorer.llm, scorer.pipeline_parallel_size, scorer.pattern, scorer.params = _LLM(workers), pp, None, None
    return scorer


def test_switch_applies_on_every_worker_of_every_stage():
    workers = [_Worker(range(0, 3)), _Worker(range(0, 3)), _Worker(range(3, 5)), _Worker(range(3, 5))]
    scorer = _scorer(workers, pp=2)                      # TP 2 × PP 2
    assert scorer.set_pattern("FSFFS") == ["FSF..", "FSF..", "...FS", "...FS"]
    assert scorer.pattern == "FSFFS"
    scorer.logprobs("FSFFS", [])                         # one evaluation: the fake forward, then the check
    # an S layer attends over the top-k of the nearest preceding F layer of its stage
    assert [w.read for w in workers] == [{0: 0, 1: 0, 2: 2}] * 2 + [{3: 3, 4: 3}] * 2
    assert scorer.llm.apply_model(hooks.observed_pattern) == ["FSF..", "FSF..", "...FS", "...FS"]
    scorer.set_pattern("FFFFF")                          # switched back: every layer runs its own indexer again
    scorer.logprobs("FFFFF", [])
    assert [w.read for w in workers] == [{0: 0, 1: 1, 2: 2}] * 2 + [{3: 3, 4: 4}] * 2


def test_a_stage_cannot_start_on_s_without_handoff():
    workers = [_Worker(range(0, 3)), _Worker(range(3, 5))]
    with pytest.raises(switch.SwitchError, match="layer 3 is the first indexer layer of its pipeline stage"):
        _scorer(workers, pp=2).set_pattern("FFFSF")
    assert _Worker(range(3, 5), receives=True)._indexcache_switch.apply("FFFSF") == "...SF"


def test_a_layer_built_s_cannot_be_switched_to_f():
    w = _Worker(range(0, 5), built_s={2})
    assert w._indexcache_switch.apply("FFSFF") == "FFSFF"
    with pytest.raises(switch.SwitchError, match="layer 2 has no indexer in this engine; build it all-F"):
        w._indexcache_switch.apply("FFFFF")


def test_a_noop_switch_stops_with_one_line_naming_the_layers():
    workers = [_Worker(range(0, 5))]
    scorer = _scorer(workers)
    # something replaced the gate of layers 1 and 3 (the layer runs its own indexer whatever the switch says)
    for i in (1, 3):
        indexer = workers[0].model.layers[i].self_attn.indexer
        indexer.forward = functools.partial(_Indexer.forward, indexer)
    with pytest.raises(PatternSwitchError) as e:
        scorer.set_pattern("FSFSS")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("pattern FSFSS: layers [1, 3] were not switched on every vLLM worker")
    assert scorer.pattern is None


def test_a_layer_that_ignores_the_switch_in_the_forward_is_caught():
    # the read-back said S, then the gate was bypassed before the forward: the layer ran its own indexer
    workers = [_Worker(range(0, 5)), _Worker(range(0, 5))]
    scorer = _scorer(workers)
    scorer.set_pattern("FSFSS")
    indexer = workers[1].model.layers[1].self_attn.indexer
    indexer.forward = workers[1]._indexcache_switch.gates[1].original
    with pytest.raises(PatternSwitchError) as e:
        scorer.logprobs("FSFSS", [])
    assert workers[1].read[1] == 1                      # it did attend over its own top-k
    assert str(e.value).startswith("pattern FSFSS: layers [1] did not run as switched on every vLLM worker "
                                   "(observed: 'FSFSS', 'F-FSS')")


def test_a_model_without_the_plugin_switch_is_an_error_too():
    # a model class that is not the plugin's (no switch installed): every layer is reported unswitched
    scorer = _scorer([torch.nn.Module()])
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

"""The plugin-owned F/S switch of CUDA vLLM 0.26 (``vllm_glue/cuda/switch.py``) on stand-in layers that mirror vLLM
0.26's ``deepseek_v2`` layout: ``layers.N.self_attn`` holds ``indexer`` and ``mla_attn``, whose forward calls the
indexer when ``indexer and is_sparse and not skip_topk`` (``model_executor/layers/mla.py``) and then attends over the
shared top-k buffer. An S layer must not run its indexer and must read the preceding F layer's top-k; what the
switch reads back must be what the forward does."""
import pytest
import torch

from vllm_indexcache.tools.search.scorers import PatternSwitchError, check_switched
from vllm_indexcache.vllm_glue.cuda import switch


class _Indexer(torch.nn.Module):
    """Writes its layer id into the shared buffer rows of the step's tokens (as vLLM's op writes top-k in place)."""

    def __init__(self, layer: int, buf: torch.Tensor):
        super().__init__()
        self.layer, self.topk_indices_buffer, self.ran = layer, buf, 0

    def forward(self, hidden_states, qr, positions, rotary_emb):
        self.ran += 1
        self.topk_indices_buffer[: hidden_states.shape[0]] = self.layer
        return self.topk_indices_buffer


class _Wrapper(torch.nn.Module):
    """``MultiHeadLatentAttentionWrapper.forward``'s indexer condition; returns the buffer rows it attends over."""

    def __init__(self, indexer, buf):
        super().__init__()
        self.indexer, self.buf, self.is_sparse, self.skip_topk = indexer, buf, True, False

    def forward(self, h):
        if self.indexer and self.is_sparse and not self.skip_topk:
            self.indexer(h, None, None, None)
        return self.buf[: h.shape[0], 0].clone()


class _SelfAttn(torch.nn.Module):
    def __init__(self, indexer, buf):
        super().__init__()
        self.indexer = indexer
        self.mla_attn = _Wrapper(indexer, buf)


def _model(num_layers: int, built: str | None = None):
    """``model.layers.N.self_attn`` over one shared ``[8, 4]`` int32 buffer; ``built``: F/S per layer (S: none)."""
    buf = torch.full((8, 4), -1, dtype=torch.int32)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    built = built or "F" * num_layers
    layers = []
    for i in range(num_layers):
        layer = torch.nn.Module()
        layer.self_attn = _SelfAttn(_Indexer(i, buf) if built[i] == "F" else None, buf)
        layers.append(layer)
    model.model.layers = torch.nn.ModuleList(layers)
    return model


def _run(model, tokens: int = 3) -> list[int]:
    """One forward over every layer: the layer id each layer's attention read from the buffer."""
    h = torch.zeros(tokens, 2)
    return [int(layer.self_attn.mla_attn(h)[0]) for layer in model.model.layers]


@pytest.fixture(autouse=True)
def _real_step(monkeypatch):
    monkeypatch.setattr(switch, "_is_real_step", lambda: True)   # as inside a scheduled vLLM step


def test_s_layers_skip_their_indexer_and_read_the_preceding_f_layers_topk():
    model = _model(5)
    assert switch.apply_pattern_cuda("FSSFS", model) == "FSSFS"
    assert _run(model) == [0, 0, 0, 3, 3]
    ran = [layer.self_attn.indexer.ran for layer in model.model.layers]
    assert ran == [1, 0, 0, 1, 0]
    assert switch.indexer_calls(5, model) == "FSSFS"
    assert switch.indexer_calls(5, model) == "SSSSS"           # counts reset by the read


def test_switch_back_and_forth_without_rebuilding():
    model = _model(4)
    for pattern, seen in (("FSFS", [0, 0, 2, 2]), ("FFFF", [0, 1, 2, 3]), ("FFSS", [0, 1, 1, 1])):
        assert switch.apply_pattern_cuda(pattern, model) == pattern
        assert _run(model) == seen
        assert switch.indexer_calls(4, model) == pattern
    gates = [layer.self_attn.indexer.__dict__["_indexcache_gate"] for layer in model.model.layers]
    assert all(g is layer.self_attn.indexer.__dict__["_indexcache_gate"] for g, layer in
               zip(gates, model.model.layers))                  # installed once, reused


def test_readback_is_what_the_forward_does():
    model = _model(4)
    model.model.layers[2].self_attn.mla_attn.skip_topk = True   # vLLM's own flag wins: the layer will not index
    applied = switch.apply_pattern_cuda("FFFF", model)
    assert applied == "FFSF"
    with pytest.raises(PatternSwitchError, match=r"layers \[2\]"):
        check_switched("FFFF", [applied])
    # a gate bypassed after installation (someone replaced the instance's forward): unknown, never "switched"
    model.model.layers[2].self_attn.mla_attn.skip_topk = False
    idx = model.model.layers[3].self_attn.indexer
    idx.forward = type(idx).forward.__get__(idx)
    applied = switch.apply_pattern_cuda("FFFS", model)
    assert applied == "FFF?"
    with pytest.raises(PatternSwitchError, match=r"layers \[3\]"):
        check_switched("FFFS", [applied])
    assert _run(model) == [0, 1, 2, 3]                          # indeed layer 3 still ran its indexer


def test_layers_built_s_and_stage_boundaries():
    model = _model(4, built="FSFS")
    assert switch.apply_pattern_cuda("FSFS", model) == "FSFS"
    with pytest.raises(RuntimeError, match="layer 1 has no indexer"):
        switch.apply_pattern_cuda("FFFS", model)
    with pytest.raises(RuntimeError, match="first layer of a pipeline stage"):
        switch.apply_pattern_cuda("SFFF", _model(4))
    # a later pipeline stage: layers 2-3 only
    stage = _model(4)
    del stage.model.layers[0].self_attn, stage.model.layers[1].self_attn
    assert switch.apply_pattern_cuda("FSFS", stage) == "..FS"
    with pytest.raises(RuntimeError, match="first layer of a pipeline stage"):
        switch.apply_pattern_cuda("FFSF", stage)
    assert switch.apply_pattern_cuda("FFFSF", _model(4)) == "FFFS."   # layers beyond the model: not on this worker


def test_profile_runs_are_not_counted(monkeypatch):
    model = _model(2)
    switch.apply_pattern_cuda("FF", model)
    monkeypatch.setattr(switch, "_is_real_step", lambda: False)
    _run(model)
    assert switch.indexer_calls(2, model) == "SS"


def test_hooks_apply_pattern_uses_the_gate_on_cuda(monkeypatch):
    from vllm.platforms import current_platform

    from vllm_indexcache.vllm_glue import hooks

    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    model = _model(4)
    assert hooks.apply_pattern("FSFS", model) == "FSFS"
    assert model.model.layers[1].self_attn.mla_attn.skip_topk is False   # vLLM's flag untouched: the gate switched
    assert _run(model) == [0, 0, 2, 2]

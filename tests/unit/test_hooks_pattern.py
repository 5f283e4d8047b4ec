"""hooks.apply_pattern switches layers through the plugin's own switch, whatever vLLM's attention offers: vLLM 0.32's
MLA wrapper (``skip_topk``, ``is_sparse``), 0.33's NVIDIA ``DeepseekV32Attention`` (``skip_topk``, ``indexer``) and
CUDA vLLM 0.26's (no ``skip_topk``) are all switched by gating the indexer module; vLLM's own attribute is left
alone. A GLM-5 layout takes the same path (same vLLM classes)."""
import pytest
import torch

from vllm_indexcache.families import family_for
from vllm_indexcache.vllm_glue import switch
from vllm_indexcache.vllm_glue.hooks import apply_pattern, observed_pattern


class _Indexer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class _Attn(torch.nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        self.indexer = _Indexer()
        for k, v in attrs.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.indexer(x)


def _model(arch, *attns):
    m = torch.nn.Module()
    m.model = torch.nn.Module()
    m.model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in attns)
    for layer, a in zip(m.model.layers, attns):
        layer.self_attn = a
    config = {"architectures": [arch], "num_hidden_layers": len(attns)}
    switch.install(m, family_for(config), config, 0, len(attns))
    return m


@pytest.mark.parametrize("arch", ["DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"])
def test_pattern_reaches_every_vllm_attention_layout(arch):
    wrapper = _Attn(is_sparse=True, skip_topk=False)       # vLLM 0.32 MultiHeadLatentAttentionWrapper
    nvidia = _Attn(skip_topk=False)                        # vLLM 0.33 DeepseekV32Attention
    v026 = _Attn()                                         # CUDA vLLM 0.26: no skip_topk at all
    model = _model(arch, wrapper, nvidia, v026)
    assert apply_pattern("FSS", model) == "FSS"
    assert (wrapper.skip_topk, nvidia.skip_topk, hasattr(v026, "skip_topk")) == (False, False, False)
    for a in (wrapper, nvidia, v026):
        a(torch.zeros(1))
    assert [a.indexer.calls for a in (wrapper, nvidia, v026)] == [1, 0, 0]
    assert observed_pattern(model) == "FSS"
    assert apply_pattern("FFF", model) == "FFF" and observed_pattern(model) == "---"


def test_a_model_without_the_switch_reads_back_nothing():
    assert apply_pattern("FS", torch.nn.Module()) == "" and observed_pattern(torch.nn.Module()) == ""


class _V4Indexer(torch.nn.Module):
    """``DeepseekV4Indexer`` as far as the switch sees it: ``indexer_op`` scores and writes the top-k buffer."""

    def __init__(self):
        super().__init__()
        self.indexer_op = torch.nn.Linear(2, 2)


class _V4Attn(torch.nn.Module):
    """vLLM 0.32's ``DeepseekV4Attention`` as far as the switch sees it: ``compress_ratio`` and ``indexer``."""

    def __init__(self, ratio):
        super().__init__()
        self.compress_ratio = ratio
        self.indexer = _V4Indexer() if ratio == 4 else None


class DeepseekV4ForCausalLM(torch.nn.Module):   # the class name is what the hook keys on
    def __init__(self, ratios):
        super().__init__()
        self.config = {"architectures": ["DeepseekV4ForCausalLM"], "num_hidden_layers": len(ratios),
                       "compress_ratios": list(ratios)}
        self.layers = torch.nn.ModuleList(torch.nn.Module() for _ in ratios)
        for layer, r in zip(self.layers, ratios):
            layer.attn = _V4Attn(r)


def test_v4_pattern_detaches_and_restores_csa_indexers():
    """DeepSeek-V4: one F/S per CSA layer (layers 1, 2, 4 of ratios 0, 4, 4, 128, 4); S detaches the layer's
    indexer (no longer a submodule), F puts the same module back; sliding-window and HCA layers are untouched."""
    import pytest

    model = DeepseekV4ForCausalLM((0, 4, 4, 128, 4))
    attn = [layer.attn for layer in model.layers]
    indexers = {i: attn[i].indexer for i in (1, 2, 4)}
    assert apply_pattern("FSS", model) == "FSS"
    assert observed_pattern(model) == "-SS"                  # F layer 1 has not scored yet
    attn[1].indexer.indexer_op(torch.zeros(2))
    assert observed_pattern(model) == "FSS"
    indexers[2].indexer_op(torch.zeros(2))                   # a detached indexer that still runs: caught
    assert observed_pattern(model) == "F?S"
    assert attn[1].indexer is indexers[1] and attn[2].indexer is None and attn[4].indexer is None
    assert not any(".indexer." in n for n, _ in model.named_parameters() if n.startswith(("layers.2", "layers.4")))
    assert apply_pattern("FFS", model) == "FFS"
    assert attn[2].indexer is indexers[2] and attn[4].indexer is None
    assert apply_pattern("FFF", model) == "FFF" and attn[4].indexer is indexers[4]
    assert attn[0].indexer is None and attn[3].indexer is None
    with pytest.raises(RuntimeError, match="first CSA layer"):
        apply_pattern("SFF", model)
    with pytest.raises(ValueError, match="3 CSA layers"):
        apply_pattern("FSFS", model)
    built_s = DeepseekV4ForCausalLM((0, 4, 4, 128, 4))
    built_s.layers[2].attn.indexer = None                    # built S: nothing to put back
    with pytest.raises(RuntimeError, match="CSA layer 2 has no indexer"):
        apply_pattern("FFF", built_s)

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

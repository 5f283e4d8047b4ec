"""hooks.apply_pattern finds the DSA layers of vLLM 0.32's MLA wrapper (``is_sparse``) and of 0.33's NVIDIA
``DeepseekV32Attention`` (``skip_topk`` and ``indexer`` only), and leaves dense layers alone."""
import torch

from vllm_indexcache.vllm_glue.hooks import apply_pattern


class _Attn(torch.nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        self.skip_topk = False
        self.indexer = None
        for k, v in attrs.items():
            setattr(self, k, v)


class _Layer(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.self_attn = attn


def _model(*attns):
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList(_Layer(a) for a in attns)
    return m


def test_pattern_reaches_layers_with_or_without_is_sparse():
    wrapper = _Attn(is_sparse=True, indexer=torch.nn.Identity())        # vLLM 0.32 MultiHeadLatentAttentionWrapper
    nvidia = _Attn(indexer=torch.nn.Identity())                          # vLLM 0.33 DeepseekV32Attention
    dense = _Attn(is_sparse=False, indexer=torch.nn.Identity())
    model = _model(wrapper, nvidia, dense)
    assert apply_pattern("FSS", model) == "FS."
    assert (wrapper.skip_topk, nvidia.skip_topk, dense.skip_topk) == (False, True, False)

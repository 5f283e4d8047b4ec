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


class _V4Attn(torch.nn.Module):
    """vLLM 0.32's ``DeepseekV4Attention`` as far as the switch sees it: ``compress_ratio`` and ``indexer``."""

    def __init__(self, ratio):
        super().__init__()
        self.compress_ratio = ratio
        self.indexer = torch.nn.Linear(2, 2) if ratio == 4 else None


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

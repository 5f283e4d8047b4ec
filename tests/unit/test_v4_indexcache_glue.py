"""The DeepSeek-V4 IndexCache glue's pure parts (``vllm_glue/cpu/deepseek_v4/indexcache.py``): which indexers are
not built and which checkpoint tensors are not loaded. Engine behaviour: tests/engine/test_v4_cpu.py."""
import pytest
import torch

from vllm_indexcache.vllm_glue.cpu.deepseek_v4.indexcache import CsaPlan, no_indexer_on, skip_indexer_weights

CSA = [1, 2, 4, 5, 7]


def test_plan_names_the_s_csa_layers():
    plan = CsaPlan("FSFSF", CSA, "--hf-overrides", 0, 8)
    assert plan.s_layers == {2, 5}
    assert CsaPlan("FFFFF", CSA, None, 0, 8).s_layers == frozenset()


def test_no_indexer_on_s_layers_only_while_building(monkeypatch):
    import vllm.models.deepseek_v4.attention as attention

    built = []

    def fake_indexer(vllm_config, *, prefix, **kwargs):
        built.append(prefix)
        return prefix

    monkeypatch.setattr(attention, "DeepseekV4Indexer", fake_indexer)
    with no_indexer_on(frozenset({2, 5})):
        got = {i: attention.DeepseekV4Indexer(None, prefix=f"model.layers.{i}.attn.indexer", config=None)
               for i in CSA}
        assert attention.DeepseekV4Indexer(None, prefix="model.layers.25.attn.indexer") is not None   # not layer 2/5
    assert got == {1: "model.layers.1.attn.indexer", 2: None, 4: "model.layers.4.attn.indexer", 5: None,
                   7: "model.layers.7.attn.indexer"}
    assert attention.DeepseekV4Indexer is fake_indexer            # restored
    with pytest.raises(RuntimeError), no_indexer_on(frozenset({2})):
        raise RuntimeError("a failed build restores it too")
    assert attention.DeepseekV4Indexer is fake_indexer


def test_skip_indexer_weights_of_s_layers_only():
    t = torch.zeros(1)
    names = ["layers.2.attn.indexer.wq_b.weight", "layers.2.attn.indexer.compressor.wkv.weight",
             "layers.2.attn.compressor.wkv.weight", "layers.2.attn.wq_a.weight", "layers.1.attn.indexer.wq_b.weight",
             "layers.5.attn.indexer.weights_proj.weight", "layers.25.attn.indexer.wq_b.weight"]
    plan = CsaPlan("FSFSF", CSA, None, 0, 30)
    kept = [n for n, _ in skip_indexer_weights(((n, t) for n in names), plan)]
    assert kept == ["layers.2.attn.compressor.wkv.weight", "layers.2.attn.wq_a.weight",
                    "layers.1.attn.indexer.wq_b.weight", "layers.25.attn.indexer.wq_b.weight"]
    assert plan.skipped_weights == 3
    assert [n for n, _ in skip_indexer_weights(((n, t) for n in names), None)] == names

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


# --- pipeline stages: the top-k handoff (engine: tests/engine/test_v4_pp.py) ---------------------------------------
def _plan_on_stage(monkeypatch, pattern, rank, world, handoff=True, env=None):
    """:func:`plan` for the 8-layer toy's CSA layout (CSA at 1, 2, 4, 5, 7) as pipeline stage ``rank`` of ``world``."""
    import types

    import vllm.distributed

    from vllm_indexcache.vllm_glue.cpu.deepseek_v4.indexcache import plan

    if env is not None:
        monkeypatch.setenv("VLLM_INDEXCACHE_PP_HANDOFF", env)
    monkeypatch.setattr(vllm.distributed, "get_pp_group",
                        lambda: types.SimpleNamespace(rank_in_group=rank, world_size=world))
    hf = types.SimpleNamespace(architectures=["DeepseekV4ForCausalLM"], compress_ratios=[0, 4, 4, 128, 4, 4, 128, 4],
                               num_hidden_layers=8,
                               index_topk_pattern=pattern)
    return plan(types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=hf)), handoff=handoff)


def test_plan_hands_top_k_to_a_stage_starting_on_s(monkeypatch):
    """PP 2 splits the 8 layers 0-3 / 4-7: stage 1's first CSA layer is 4 (pattern position 2)."""
    first, second = (_plan_on_stage(monkeypatch, "FSSFS", r, 2) for r in range(2))
    assert (first.pattern, first.sends, first.receives, first.rank) == ("FSSFS", True, False, 0)
    assert (second.pattern, second.sends, second.receives, second.rank) == ("FSSFS", False, True, 1)
    assert second.s_layers == {2, 4, 7}                          # layer 4 stays S: no indexer built there
    assert _plan_on_stage(monkeypatch, "FSFSS", 1, 2).receives is False   # stage 1 starts on F layer 4


def test_plan_without_handoff_builds_the_stage_start_f(monkeypatch):
    """``handoff=False`` (CUDA's class) or ``VLLM_INDEXCACHE_PP_HANDOFF=0``: layer 4 runs its own indexer there."""
    for kw in ({"handoff": False}, {"env": "0"}):
        second = _plan_on_stage(monkeypatch, "FSSFS", 1, 2, **kw)
        assert (second.pattern, second.receives, second.sends) == ("FSFFS", False, False)
        assert second.s_layers == {2, 7}


class _FakeV4:
    """What :func:`install_handoff` / :func:`handoff_forward` read of vLLM's ``DeepseekV4ForCausalLM``."""

    def __init__(self, rows=8, topk=3):
        import types

        self.model = types.SimpleNamespace(topk_indices_buffer=torch.full((rows, topk), 7, dtype=torch.int32))

    def make_empty_intermediate_tensors(self, batch_size, dtype, device):
        from vllm.sequence import IntermediateTensors

        return IntermediateTensors({"hidden_states": torch.zeros(batch_size, 2, 4, dtype=dtype, device=device)})


def test_handoff_receive_and_send(monkeypatch):
    from vllm.sequence import IntermediateTensors

    from vllm_indexcache.vllm_glue.cpu.deepseek_v4.indexcache import handoff_forward, install_handoff
    from vllm_indexcache.vllm_glue.model import HANDOFF_KEY

    receiver, sender = _FakeV4(), _FakeV4()
    recv_plan, send_plan = (_plan_on_stage(monkeypatch, "FSSFS", r, 2) for r in (1, 0))
    install_handoff(receiver, recv_plan)
    install_handoff(sender, send_plan)
    empty = receiver.make_empty_intermediate_tensors(batch_size=5, dtype=torch.bfloat16, device="cpu")
    assert empty[HANDOFF_KEY].shape == (5, 3) and empty[HANDOFF_KEY].dtype == torch.int32
    assert empty["hidden_states"].shape == (5, 2, 4)
    assert HANDOFF_KEY not in sender.make_empty_intermediate_tensors(5, torch.bfloat16, "cpu").tensors

    seen = {}

    def vllm_forward(input_ids, positions, intermediate_tensors, inputs_embeds):
        seen["keys"] = sorted(intermediate_tensors.tensors) if intermediate_tensors is not None else None
        seen["buf"] = receiver.model.topk_indices_buffer.clone()
        return IntermediateTensors({"hidden_states": torch.ones(positions.shape[-1], 2, 4)})

    handed = torch.arange(12, dtype=torch.int32).view(4, 3)
    it = IntermediateTensors({"hidden_states": torch.zeros(4, 2, 4), HANDOFF_KEY: handed})
    handoff_forward(vllm_forward, receiver, recv_plan, None, torch.arange(4), it, None)
    assert seen["keys"] == ["hidden_states"]                       # vLLM's model never sees the handoff key
    assert torch.equal(seen["buf"][:4], handed) and (seen["buf"][4:] == 7).all()

    sender.model.topk_indices_buffer[:4] = handed + 100
    out = handoff_forward(vllm_forward, sender, send_plan, None, torch.arange(4), None, None)
    assert torch.equal(out[HANDOFF_KEY], handed + 100)             # rows [0, T) of the sender's buffer
    out = handoff_forward(vllm_forward, sender, None, None, torch.arange(4), None, None)
    assert HANDOFF_KEY not in out.tensors                           # no pattern: vLLM's forward unchanged

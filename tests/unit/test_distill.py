"""Multi-layer indexer distillation (issue 5): Eq. 1, Proposition 1, gradient isolation, masking, training smoke."""
from __future__ import annotations

import json

import pytest
import torch

from vllm_indexcache.tools.distill.loss import (
    MultiLayerIndexerDistiller,
    attention_target,
    indexer_log_probs,
    indexer_scores,
    kl_rows,
    multi_layer_indexer_loss,
    served_layers,
)

PATTERN = "FSSF"  # layer 0 serves layers 0, 1, 2; layer 3 serves itself


def _toy(dtype=torch.float64, seed=0, pattern=PATTERN, index_topk=8, arch="DeepseekV32ForCausalLM"):
    from transformers import AutoModelForCausalLM

    from vllm_indexcache.tools.reference import set_pattern
    from vllm_indexcache.tools.toy import toy_config

    cfg = toy_config(arch, num_layers=len(pattern), first_k_dense_replace=len(pattern),
                     index_topk=index_topk, initializer_range=0.08)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").to(dtype)
    model.eval()
    set_pattern(model, pattern)
    return model


def _ids(t=20, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, t), generator=g)


def _indexer_params(model, layer):
    return list(model.model.layers[layer].self_attn.indexer.parameters())


def test_served_layers():
    assert served_layers("FSSFS") == {0: [0, 1, 2], 3: [3, 4]}
    assert served_layers("FFF") == {0: [0], 1: [1], 2: [2]}
    with pytest.raises(ValueError):
        served_layers("SF")


@pytest.mark.parametrize("arch", ["DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"])
@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_proposition_1_gradient_float64(variant, arch):
    """∇ Eq. 1 == ∇ KL(p̄ || q), p̄ the mean of the served layers' (renormalised) p, to 1e-6 in float64."""
    model = _toy(arch=arch)
    ids = _ids()
    with MultiLayerIndexerDistiller(model, variant=variant, reduction="sum") as dist:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        assert set(dist._targets) == {0, 1, 2, 3}
        loss = dist.layer_loss(0)
        params = _indexer_params(model, 0)
        g_multi = torch.autograd.grad(loss, params)

        # independent: KL(p̄ || q) with p̄ the average of the served layers' renormalised targets
        hs, qr, pe, visible = dist._inputs[0]
        scores = indexer_scores(model.model.layers[0].self_attn.indexer, hs, qr, pe, visible)
        if variant == "dense":
            support = visible.expand_as(scores)
        else:
            support = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, dist._topk[0].long(), True)
            support &= visible.expand_as(scores)
        ps = []
        for j in (0, 1, 2):
            p = dist._targets[j].masked_fill(~support, 0)
            ps.append(p / p.sum(-1, keepdim=True))
        pbar = sum(ps) / 3
        logq = torch.log_softmax(scores.masked_fill(~support, float("-inf")), -1)
        kl = torch.where(pbar > 0, pbar * (pbar.clamp_min(1e-300).log() - logq.masked_fill(~support, 0)), 0).sum()
        g_bar = torch.autograd.grad(kl, params)

    assert loss.dtype == torch.float64
    assert all(torch.isfinite(g).all() for g in g_multi)
    assert max(float(g.abs().max()) for g in g_multi) > 1e-4  # a real, non-zero gradient
    for a, b in zip(g_multi, g_bar):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the loss values differ by a constant: Σ_t [H(p̄_t) - mean_j H(p_t^(j))] >= 0 (concavity of entropy)
    assert float(loss.detach()) >= float(kl.detach()) - 1e-9
    # and the cross-layer term matters: the single-layer gradient is different
    dist2 = MultiLayerIndexerDistiller(model, variant=variant, reduction="sum", cross_layer=False)
    with dist2:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        g_single = torch.autograd.grad(dist2.layer_loss(0), params)
    assert max(float((a - b).abs().max()) for a, b in zip(g_single, g_multi)) > 1e-6


@pytest.mark.parametrize("arch", ["DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"])
@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_gradient_only_into_f_layer_indexers(variant, arch):
    """Forward *with* grad enabled (as in the sparse stage): the indexer loss reaches F-layer indexers only."""
    model = _toy(dtype=torch.float32, arch=arch)
    model.train()
    with MultiLayerIndexerDistiller(model, variant=variant) as dist:
        model(input_ids=_ids(), use_cache=False)
        out = dist.loss()
    out.total.backward()
    assert set(out.per_layer) == {0, 3}
    for name, p in model.named_parameters():
        in_f_indexer = any(name.startswith(f"model.layers.{l}.self_attn.indexer.") for l in (0, 3))
        if in_f_indexer:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, f"{name} received gradient from the indexer loss"
    assert any(float(p.grad.abs().max()) > 0 for p in _indexer_params(model, 0))


def test_masked_future_keys_carry_no_probability():
    model = _toy()
    ids = _ids(t=16)
    with MultiLayerIndexerDistiller(model, variant="dense") as dist:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        hs, qr, pe, visible = dist._inputs[0]
        t = ids.shape[1]
        future = ~torch.ones(t, t, dtype=torch.bool).tril()
        assert torch.equal(visible.expand(2, t, t)[0], ~future)
        for j, p in dist._targets.items():
            assert float(p[:, future].abs().max()) == 0.0, f"target of layer {j} has mass on future keys"
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
        scores = indexer_scores(model.model.layers[0].self_attn.indexer, hs, qr, pe, visible)
        q = indexer_log_probs(scores, visible).exp()
        assert float(q.detach()[:, future].max()) == 0.0
        torch.testing.assert_close(q.sum(-1), torch.ones_like(q.sum(-1)))
        # whatever a score or a target holds at a future key, the loss and its gradient ignore it
        raw = scores.detach().clone().requires_grad_(True)
        noisy_scores = torch.where(future, torch.randn_like(raw) * 100, raw)
        target = dist._targets[1]
        noisy_target = torch.where(future, torch.rand_like(target), target)
        a = kl_rows(target, raw, visible)
        b = kl_rows(noisy_target, noisy_scores, visible)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        (ga,) = torch.autograd.grad(a.sum(), raw)
        assert float(ga[:, future].abs().max()) == 0.0
        # sparse variant: nothing outside the selected top-k either
        sel = torch.zeros_like(visible.expand_as(scores)).scatter_(-1, dist._topk[0].long(), True) & visible
        qs = indexer_log_probs(scores, sel).exp()
        assert float(qs.detach()[~sel].max()) == 0.0


def test_attention_target_and_loss_reductions():
    torch.manual_seed(0)
    w = torch.rand(2, 3, 5, 5, dtype=torch.float64).tril()
    w = w / w.sum(-1, keepdim=True)
    p = attention_target(w)
    torch.testing.assert_close(p, w.sum(1) / 3)
    scores = torch.randn(2, 5, 5, dtype=torch.float64)
    vis = torch.ones(5, 5, dtype=torch.bool).tril()
    s = multi_layer_indexer_loss(scores, [p, p], vis, reduction="sum")
    m = multi_layer_indexer_loss(scores, [p, p], vis, reduction="mean")
    torch.testing.assert_close(s / 10, m)
    torch.testing.assert_close(s, kl_rows(p, scores, vis).sum())
    assert float(multi_layer_indexer_loss(p.clamp_min(1e-300).log(), [p], vis)) < 1e-9  # q = p: zero loss


def test_loss_falls_on_toy_model():
    """A few Adam steps on the F-layer indexers of a random toy model lower Eq. 1 (dense warm-up)."""
    model = _toy(dtype=torch.float32, seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    params = _indexer_params(model, 0) + _indexer_params(model, 3)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    ids = _ids(t=32, seed=5)
    losses = []
    with MultiLayerIndexerDistiller(model, variant="dense") as dist:
        for _ in range(15):
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            out = dist.loss()
            opt.zero_grad()
            out.total.backward()
            opt.step()
            losses.append(float(out.total))
    assert losses[-1] < 0.7 * losses[0], losses


def test_distill_cli_writes_servable_checkpoint(tmp_path):
    """End to end on a toy model: warm-up + sparse stages, checkpoint without S-layer indexer weights, pattern in
    the config, and the reloaded checkpoint reproduces the trained model."""
    from safetensors import safe_open

    from vllm_indexcache.cli import main
    from vllm_indexcache.tools.distill.export import load_distilled
    from vllm_indexcache.tools.toy import build_toy_model

    src = build_toy_model(tmp_path / "toy", num_layers=4, first_k_dense_replace=4, index_topk=8)
    out = tmp_path / "out"
    rc = main(["distill", str(src), "--pattern", PATTERN, "--data", "random", "--out", str(out), "--context", "32",
               "--batch-size", "2", "--warmup-steps", "3", "--sparse-steps", "2", "--threads", "1"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["index_topk_pattern"] == PATTERN
    assert cfg["architectures"] == ["DeepseekV32ForCausalLM"] and cfg["indexer_rope_interleave"] is False
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    for layer in (1, 2):
        assert not any(k.startswith(f"model.layers.{layer}.self_attn.indexer.") for k in keys)
    for layer in (0, 3):
        assert any(k.startswith(f"model.layers.{layer}.self_attn.indexer.") for k in keys)
    report = json.loads((out / "distill.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["warmup", "sparse"]
    model = load_distilled(out)
    from vllm_indexcache.tools.reference import get_pattern
    assert get_pattern(model) == PATTERN
    ids = _ids(t=24, seed=9)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()


def test_export_roundtrip_reproduces_model(tmp_path):
    """distill() + export_checkpoint() in float32: the reloaded checkpoint (S-layer indexers absent) gives the same
    logits as the trained model in memory."""
    from vllm_indexcache.tools.distill.export import export_checkpoint, load_distilled
    from vllm_indexcache.tools.distill.trainer import distill, make_batches
    from vllm_indexcache.tools.reference import load_reference
    from vllm_indexcache.tools.toy import build_toy_model

    src = build_toy_model(tmp_path / "toy", num_layers=4, first_k_dense_replace=4, index_topk=8, tokenizer=False)
    model = load_reference(str(src), pattern=PATTERN)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reports = distill(model, PATTERN, make_batches("random", 512, 32, 2), warmup_steps=3, sparse_steps=2,
                      progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".layers.0.self_attn.indexer." in k for k in changed)
    assert not any(f".layers.{i}.self_attn.indexer." in k for k in changed for i in (1, 2))  # S indexers untouched
    assert any(".indexer." not in k for k in changed)  # sparse stage trained the main model (LM loss)
    assert reports[0]["variant"] == "dense" and reports[1]["variant"] == "sparse"
    export_checkpoint(model, PATTERN, src, tmp_path / "out", torch.float32)
    again = load_distilled(tmp_path / "out")
    ids = _ids(t=24, seed=11)
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False).logits
        b = again(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

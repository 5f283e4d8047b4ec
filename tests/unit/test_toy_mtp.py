"""``build_toy_model(mtp_layers=N)`` / ``build-toy --mtp-layers N``: MTP tensors named as vLLM's MTP loader reads
them (``deepseek_mtp.py``), backbone unchanged, transformers still loads the backbone."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from safetensors import safe_open

from vllm_indexcache.tools.toy import build_toy_model

L = 3


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_mtp_toy_layout_matches_vllm_mtp_loader(tmp_path):
    from vllm.model_executor.models.deepseek_mtp import DeepSeekMTP
    from vllm.model_executor.models.utils import get_spec_layer_idx_from_weight_name

    from vllm_indexcache.tools.reference import load_reference, prompt_logprobs

    mtp = build_toy_model(tmp_path / "mtp", num_layers=L, seed=5, tokenizer=False, index_topk=8, mtp_layers=1)
    plain = build_toy_model(tmp_path / "plain", num_layers=L, seed=5, tokenizer=False, index_topk=8)
    cfg = json.loads((mtp / "config.json").read_text())
    assert cfg["num_hidden_layers"] == L and cfg["num_nextn_predict_layers"] == 1

    backbone, added = _tensors(mtp / "model.safetensors"), _tensors(mtp / "mtp.safetensors")
    want = _tensors(plain / "model.safetensors")
    assert backbone.keys() == want.keys() and all(torch.equal(backbone[k], want[k]) for k in want)
    index = json.loads((mtp / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(backbone) | set(added)

    spec_cfg = SimpleNamespace(num_hidden_layers=L, num_nextn_predict_layers=1)
    assert all(get_spec_layer_idx_from_weight_name(spec_cfg, n) == L for n in added)
    assert not any(get_spec_layer_idx_from_weight_name(spec_cfg, n) is not None for n in backbone)
    rewritten = {DeepSeekMTP._rewrite_spec_layer_name(None, L, n) for n in added}
    own = {f"model.layers.{L}.{m}.weight" for m in ("enorm", "hnorm", "eh_proj", "shared_head.norm",
                                                     "shared_head.head")}
    block = {n.removeprefix(f"model.layers.{L}.mtp_block.") for n in rewritten
             if n.startswith(f"model.layers.{L}.mtp_block.")}
    last = {n.removeprefix(f"model.layers.{L - 1}.") for n in backbone if n.startswith(f"model.layers.{L - 1}.")}
    assert rewritten - {f"model.layers.{L}.mtp_block.{b}" for b in block} == own | {"model.embed_tokens.weight"}
    assert block == last and any("indexer.wk.weight" in b for b in block), "the MTP block must carry an indexer"

    # transformers loads the backbone and ignores the MTP tensors
    prompt = list(range(3, 40))
    got = prompt_logprobs(load_reference(str(mtp), ties="lower"), prompt)
    assert torch.equal(got, prompt_logprobs(load_reference(str(plain), ties="lower"), prompt))

    # make_mtp_echo: the MTP block adds nothing and keeps only the next-token embedding; backbone outputs scaled
    from vllm_indexcache.tools.toy import make_mtp_echo

    make_mtp_echo(mtp, backbone_scale=0.5)
    echo, scaled = _tensors(mtp / "mtp.safetensors"), _tensors(mtp / "model.safetensors")
    eh = echo[f"model.layers.{L}.eh_proj.weight"]
    hidden = eh.shape[0]
    assert torch.equal(eh[:, :hidden], torch.eye(hidden)) and not eh[:, hidden:].any()
    assert all(not t.any() for n, t in echo.items() if n.endswith(("o_proj.weight", "down_proj.weight")))
    assert torch.equal(echo[f"model.layers.{L}.self_attn.indexer.wk.weight"],
                       added[f"model.layers.{L}.self_attn.indexer.wk.weight"]), "the MTP indexer is kept"
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(scaled[name], backbone[name] * 0.5)

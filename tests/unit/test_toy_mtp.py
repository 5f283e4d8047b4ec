"""``build_toy_model(mtp_layers=N)`` / ``build-toy --mtp-layers N``: MTP tensors named as vLLM's MTP loader reads
them (``deepseek_mtp.py``), backbone unchanged, transformers still loads the backbone."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from safetensors import safe_open

from vllm_indexcache.toy import build_toy_model

L = 3


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_mtp_toy_layout_matches_vllm_mtp_loader(tmp_path):
    from vllm.model_executor.models.deepseek_mtp import DeepSeekMTP
    from vllm.model_executor.models.utils import get_spec_layer_idx_from_weight_name

    from vllm_indexcache.reference import load_reference, prompt_logprobs

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

"""CPU tests of the DSA training recipe (vllm_indexcache.tools.training) on a toy config: each stage's loss falls,
resume from a checkpoint reproduces the uninterrupted run, and the functional training forward equals
transformers' DeepseekV32 forward."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_indexcache.tools.data.corpus import build_from_documents
from vllm_indexcache.tools.training.config import TrainConfig
from vllm_indexcache.tools.training.trainer import run_stage, train

PKG = Path(__file__).resolve().parents[2] / "vllm_indexcache"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    texts = [p.read_text() for p in sorted(PKG.rglob("*.py"))]
    docs = [(f"d{i}", "train", t) for i, t in enumerate(texts[:6])] + [("h", "heldout", texts[-1])]
    out = tmp_path_factory.mktemp("data")
    build_from_documents(docs, out, vocab_size=512)
    return out


def toy_cfg(run_dir: Path, data_dir: Path, steps=(12, 12, 12)) -> TrainConfig:
    return TrainConfig.model_validate({
        "run_dir": str(run_dir), "device": "cpu", "autocast_dtype": "float32", "export_dtype": "float32",
        "model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 2, "q_lora_rank": 32,
                  "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32,
                  "intermediate_size": 128, "index_n_heads": 2, "index_topk": 16},
        "data": {"dir": str(data_dir), "context": 128, "retrieval_fraction": 0.25, "max_needles": 1,
                 "max_questions": 1},
        "stages": [
            {"name": "dense", "kind": "dense", "steps": steps[0], "batch_size": 4, "lr": 3e-3, "log_every": 1},
            {"name": "warmup", "kind": "warmup", "steps": steps[1], "batch_size": 4, "lr": 1e-2, "log_every": 1},
            {"name": "sparse", "kind": "sparse", "steps": steps[2], "batch_size": 4, "lr": 3e-3, "log_every": 1},
        ]})


def _log(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / stage / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("run")
    results = train(toy_cfg(run, data_dir), progress=False)
    assert [r["status"] for r in results] == ["done"] * 3
    return run


@pytest.mark.parametrize("stage,key", [("dense", "loss"), ("warmup", "kl"), ("sparse", "loss")])
def test_stage_loss_falls(trained, stage, key):
    vals = [r[key] for r in _log(trained, stage)]
    assert len(vals) == 12
    assert np.mean(vals[-3:]) < np.mean(vals[:3]), vals


def test_stage_outputs(trained):
    from transformers import AutoModelForCausalLM

    exp = trained / "sparse" / "export"
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["indexer_rope_interleave"] is False and cfg["index_head_dim"] == 128
    assert (exp / "tokenizer.json").exists() and (exp / "chat_template.jinja").exists()
    done = json.loads((trained / "warmup" / "done.json").read_text())
    assert done["steps"] == 12 and done["final_kl"] is not None
    # warm-up trains only the indexers
    dense = torch.load(trained / "dense" / "final.pt")
    warm = torch.load(trained / "warmup" / "final.pt")
    for k in dense:
        assert torch.equal(dense[k], warm[k]) != (".indexer." in k), k
    AutoModelForCausalLM.from_pretrained(str(exp))


def test_resume_is_identical(tmp_path, data_dir):
    full = tmp_path / "full"
    cfg = toy_cfg(full, data_dir, steps=(6, 6, 6))
    run_stage(cfg, 0, progress=False)
    split = tmp_path / "split"
    cfg2 = toy_cfg(split, data_dir, steps=(6, 6, 6))
    r = run_stage(cfg2, 0, stop_after=3, progress=False)
    assert r["status"] == "interrupted" and (split / "dense" / "ckpt.pt").exists()
    r = run_stage(cfg2, 0, progress=False)
    assert r["status"] == "done"
    a = [x["loss"] for x in _log(full, "dense")]
    b = [x["loss"] for x in _log(split, "dense")]
    assert len(a) == len(b) == 6
    assert np.allclose(a, b, rtol=0, atol=1e-6), (a, b)
    sa = torch.load(full / "dense" / "final.pt")
    sb = torch.load(split / "dense" / "final.pt")
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_functional_forward_matches_transformers():
    from transformers import AutoModelForCausalLM

    from vllm_indexcache.tools.toy import toy_config
    from vllm_indexcache.tools.training.model import dsa_forward

    cfg = toy_config(num_layers=2, first_k_dense_replace=2, index_topk=8, qk_nope_head_dim=32,
                     qk_rope_head_dim=16, v_head_dim=48)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "indexer" in n and p.dim() == 2:
                p.normal_(0, 0.2)  # spread the index scores so that top-k has no near-ties
    ids = torch.randint(3, 512, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        labels = ref.argmax(-1)
        ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, 512), labels.reshape(-1))
        out = dsa_forward(model, ids, labels, "sparse")
    assert torch.allclose(out.loss, ref_loss, atol=1e-5)
    assert out.kl is not None and out.kl >= 0


def test_train_batches_deterministic_and_packed(data_dir):
    from tokenizers import Tokenizer

    from vllm_indexcache.tools.data.corpus import load_tokens
    from vllm_indexcache.tools.data.retrieval import TrainBatches

    tok = Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json"))
    tokens = load_tokens(data_dir, "train")
    tb = TrainBatches(tokens, tok, 512, 4, seed=1, retrieval_fraction=1.0, max_needles=2,
                      pack_lengths=[128, 256, 512])
    a, b = tb.get(7), tb.get(7)
    assert a.shape == (4, 513) and np.array_equal(a, b) and not np.array_equal(a, tb.get(8))
    assert (a == 2).any()  # sub-documents separated by EOS

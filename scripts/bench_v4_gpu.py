#!/usr/bin/env python3
"""DeepSeek-V4 with IndexCache inside CUDA vLLM 0.26 on one GPU (issue 35, item 3), time-budgeted for one device call.

First (in a child process, seconds): a **preflight** of what vLLM 0.26's V4 path needs on this GPU — SM 9.x/10.x
(``models/deepseek_v4/sparse_mla.py``), FlashMLA sparse, DeepGEMM with ``fp8_einsum`` (``nvidia/ops/o_proj.py``),
TileLang (mHC: ``model_executor/kernels/mhc/tilelang_kernels.py``), the CUTLASS DSL (head-512 compressor:
``compressor.py`` → ``nvidia/ops/sparse_attn_compress_cutedsl.py``) and V4's fused cache-insert op in ``vllm._C``.
Any miss is printed as ``V4 CANNOT RUN: <reason>`` and the script exits 3 (``--force`` goes on to vLLM's own error).
Then the toy: DeepSeek-V4-Flash attention geometry (hidden 4096, 64 heads × 512 with 64 RoPE, q_lora 1024, 8 output
groups of rank 1024, lightning indexer 64 × 128 picking 512 compressed entries, 128-token window, 4 mHC streams),
``--layers`` layers in transformers' default V4 layout (HCA, HCA, then HCA/CSA alternating: 18 layers → 8 CSA layers),
64 routed experts of width 128 (6 per token, 3 hash-routed layers), vocabulary 16384, FP8 128×128 block weights,
written in DeepSeek's layout by ``vllm_indexcache.tools.toy_v4_deepseek`` on the GPU (no transformers model).

Every configuration is one engine in its own process (``kv_cache_dtype="fp8"``, V4's ``fp8_ds_mla`` cache; CUDA
graphs on unless ``--eager``; ``disable_log_stats=False`` for engine timestamps):

* ``plugin-1`` — ``attention_backend="indexcache"``, every CSA layer F: the timing baseline;
* ``none`` — vLLM alone (``VLLM_PLUGINS=none``); greedy tokens and the KV spec only (it is not timed);
* ``plugin-1/4``, ``plugin-1/2`` — every 4th / 2nd CSA layer F (``every:K``), the others S (no indexer);
* ``plugin-1+split`` (diagnostic, any plugin configuration + ``+split``) — the KV-cache groups an S pattern gets
  (``VLLM_INDEXCACHE_V4_SPLIT_GROUPS=always``: the compressor-state group split by page size, 6 groups instead of
  5) on all-F, to time the extra group apart from the S layers.

Checks: greedy tokens of ``none`` and ``plugin-1`` for ``--check-lens`` prompts (printed: identical or the first
mismatch). Timing: TTFT (engine: first token − scheduled) and TPOT at batch 1 for ``--contexts`` (medians of
``--repeats``), decode under load (``--concurrent`` requests of ``--concurrent-contexts`` tokens, then
``--load-steps`` timed engine steps in which every request decodes one token; median step). KV: from the engine's
own ``KVCacheConfig`` (worker's ``model_runner.kv_cache_config`` via ``LLM.collective_rpc``): per kind of cache
(compressed KV, indexer K, compressor states, sliding window) layers and page bytes, the packed pool's bytes per
block, and the KV capacity in tokens. Everything stops cleanly before ``--budget-s`` (default 500 s, from the start
of the script): a configuration or measurement that would not finish is skipped and said so; results are written
after every measurement to ``--out``/``bench_v4.json`` and ``bench_v4.md`` (one JSON per configuration too).

    PYTHONPATH=/root/site python3 scripts/bench_v4_gpu.py --out $OUT           # all of it, ≈ 8 min budget
    python3 scripts/bench_v4_gpu.py --out $OUT --preflight-only                # the preflight alone (≈ 20 s)
    python3 scripts/bench_v4_gpu.py --out $OUT --contexts 8192,32768 --configs plugin-1,plugin-1/4   # scaled down
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import site
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = "bench_v4.json"
LOG_DIR = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/bench-v4-logs"))   # not under --out: 8 files come back at most
PROF_DIR = Path("/tmp/bench-v4-prof")   # vLLM's profiler traces (large; only their table is copied to --out)


def add_site_dirs() -> None:
    """Read ``.pth`` files of the ``PYTHONPATH`` directories (Python reads them only in site directories): the CUTLASS
    DSL puts its ``dsl_packages`` on ``sys.path`` from one."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and Path(entry).is_dir():
            site.addsitedir(entry)


# ---------------------------------------------------------------------------------------------------------- preflight
def preflight() -> tuple[list[str], list[str]]:
    """``(problems, facts)``: why vLLM 0.26's DeepSeek-V4 cannot run here (empty when nothing is known to stop it) and
    what was found. Runs in a child process (it creates a CUDA context)."""
    problems, facts = [], []
    import torch

    if not torch.cuda.is_available():
        return ["no CUDA device visible to torch"], facts
    cap = torch.cuda.get_device_capability()
    facts.append(f"GPU {torch.cuda.get_device_name()} (SM {cap[0]}.{cap[1]}), torch {torch.__version__}, "
                 f"CUDA {torch.version.cuda}")
    if cap[0] not in (9, 10):
        problems.append(f"SM {cap[0]}.{cap[1]}: vLLM 0.26's V4 FlashMLA sparse backend takes SM 9.x/10.x "
                        "(models/deepseek_v4/sparse_mla.py supports_compute_capability; SM 12 uses FlashInfer)")
    import vllm

    facts.append(f"vLLM {vllm.__version__} from {Path(vllm.__file__).parent}")
    from vllm.utils.import_utils import has_cutedsl, has_tilelang

    if not has_tilelang():
        problems.append("tilelang is not importable: vLLM 0.26 runs V4's mHC hyper-connections only through TileLang "
                        "(model_executor/kernels/mhc/tilelang_kernels.py raises 'ImportError: tilelang is required "
                        "for mhc' at the first forward); vllm 0.26.0 pins tilelang==0.1.9, which the device vLLM pack "
                        "leaves out (scripts/pack_v4_device_extras.py packs it)")
    else:
        try:
            import tilelang

            nvcc = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
            facts.append(f"tilelang {getattr(tilelang, '__version__', '?')}; nvcc/CUDA_HOME for its JIT: "
                         f"{nvcc or 'NONE FOUND (tilelang/env.py _find_cuda_home: its kernels compile with nvcc)'}")
        except Exception as e:   # noqa: BLE001 — any import failure is the reason
            problems.append(f"tilelang fails to import: {type(e).__name__}: {e}")
    if not has_cutedsl():
        problems.append("cutlass (CUTLASS DSL) is not importable: on CUDA V4's head-512 KV compressor is a CuTe DSL "
                        "kernel only (models/deepseek_v4/compressor.py imports nvidia/ops/"
                        "sparse_attn_compress_cutedsl.py, which imports cutlass, at the first real forward); vllm "
                        "0.26.0 pins nvidia-cutlass-dsl[cu13]==4.6.0, which the device vLLM pack leaves out "
                        "(scripts/pack_v4_device_extras.py packs it)")
    else:
        try:
            import vllm.models.deepseek_v4.nvidia.ops.sparse_attn_compress_cutedsl  # noqa: F401

            facts.append("CUTLASS DSL compressor kernel imports")
        except Exception as e:   # noqa: BLE001
            problems.append(f"the CuTe DSL compressor (nvidia/ops/sparse_attn_compress_cutedsl.py) fails to import: "
                            f"{type(e).__name__}: {e}")
    try:
        from vllm.v1.attention.ops.flashmla import is_flashmla_sparse_supported

        ok, reason = is_flashmla_sparse_supported()
        if not ok:
            problems.append(f"FlashMLA sparse unavailable: {reason}")
    except Exception as e:   # noqa: BLE001
        problems.append(f"FlashMLA check failed: {type(e).__name__}: {e}")
    try:
        from vllm.utils import deep_gemm

        if not deep_gemm.is_deep_gemm_supported():
            problems.append("DeepGEMM unsupported or missing: V4's output projection is DeepGEMM fp8_einsum "
                            "(models/deepseek_v4/nvidia/ops/o_proj.py)")
        else:
            deep_gemm._lazy_init()
            if getattr(deep_gemm, "_fp8_einsum_impl", None) is None:
                problems.append("this DeepGEMM has no fp8_einsum (V4's output projection, nvidia/ops/o_proj.py)")
            else:
                facts.append("DeepGEMM fp8_einsum present")
    except Exception as e:   # noqa: BLE001
        problems.append(f"DeepGEMM check failed: {type(e).__name__}: {e}")
    try:
        import vllm._custom_ops  # noqa: F401 — loads vllm._C

        if not hasattr(torch.ops._C, "fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert"):
            problems.append("vllm._C lacks fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert (V4's FP8 KV insert, "
                            "models/deepseek_v4/attention.py)")
    except Exception as e:   # noqa: BLE001
        problems.append(f"vllm._C failed to load: {type(e).__name__}: {e}")
    return problems, facts


def prepare(a) -> int:
    """Child: preflight, then (unless it found a problem and ``--force`` is off) build the toy. Exit 3 = cannot run."""
    problems, facts = preflight()
    for f in facts:
        print(f"preflight: {f}", flush=True)
    for p in problems:
        print(f"V4 CANNOT RUN: {p}", flush=True)
    Path(a.json).write_text(json.dumps({"problems": problems, "facts": facts}, indent=1) + "\n")
    if problems and not a.force:
        return 3
    if not problems:
        print("preflight: nothing known stops vLLM 0.26's V4 here", flush=True)
    if a.preflight_only:
        return 0
    build_toy(a.model, a.layers, a.max_model_len, a.toy_device, json.loads(a.toy_overrides))
    return 0


def build_toy(path: Path, layers: int, max_model_len: int, device: str = "cuda", overrides: dict | None = None
              ) -> None:
    """The toy checkpoint at ``path`` (kept if ``config.json`` is there): :func:`deepseek_v4_config` of
    ``flash_layout(layers)`` with RoPE positions for ``max_model_len`` and ``overrides``, written on ``device``."""
    from vllm_indexcache.tools.toy_v4_deepseek import build_toy_v4_deepseek, deepseek_v4_config, flash_layout

    if (path / "config.json").is_file():
        print(f"toy: reusing {path}", flush=True)
        return
    t = time.time()
    config = deepseek_v4_config(flash_layout(layers), max_position_embeddings=max_model_len + 4096,
                                **(overrides or {}))
    build_toy_v4_deepseek(path, config, seed=0, device=device)
    size = (path / "model.safetensors").stat().st_size
    print(f"toy: built {path} ({layers} layers, compress_ratios {config['compress_ratios']}, {size / 2**30:.2f} GiB) "
          f"in {time.time() - t:.0f}s", flush=True)


# ------------------------------------------------------------------------------------------------------------- worker
def kv_report(worker) -> dict:
    """Run inside vLLM's worker (``LLM.collective_rpc``): the engine's ``KVCacheConfig`` summarised per cache kind
    (layer name → kind), with the packed pool's bytes per block (per page size, the most layers of one group)."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    runner = getattr(worker, "model_runner", None) or getattr(getattr(worker, "worker", None), "model_runner", None)
    cfg = runner.kv_cache_config
    kinds, slots = {}, {}
    for group in cfg.kv_cache_groups:
        spec, used = group.kv_cache_spec, {}
        for name in group.layer_names:
            s = spec.kv_cache_specs[name] if isinstance(spec, UniformTypeKVCacheSpecs) else spec
            kind = ("indexer_k" if name.endswith("indexer.k_cache") else
                    "indexer_compressor_state" if ".indexer.compressor." in name else
                    "compressor_state" if name.endswith("compressor.state_cache") else
                    "swa" if name.endswith("swa_cache") else "compressed_kv")
            k = kinds.setdefault(kind, {"layers": 0, "page_bytes": 0, "block_size": int(s.block_size)})
            k["layers"] += 1
            k["page_bytes"] += int(s.page_size_bytes)
            used[s.page_size_bytes] = used.get(s.page_size_bytes, 0) + 1
        for ps, n in used.items():
            slots[ps] = max(slots.get(ps, 0), n)
    return {"num_blocks": int(cfg.num_blocks), "groups": len(cfg.kv_cache_groups),
            "pool_bytes_per_block": int(sum(ps * n for ps, n in slots.items())), "kinds": kinds}


class Deadline:
    def __init__(self, at: float):
        self.at = at

    def left(self) -> float:
        return self.at - time.time()

    def allows(self, estimate: float, what: str) -> bool:
        if self.left() > estimate * 1.2 + 10:
            return True
        print(f"budget: skipped {what} ({self.left():.0f}s left, ~{estimate:.0f}s needed)", flush=True)
        return False


def worker(a) -> int:
    """One engine, one configuration; writes ``a.json`` after every measurement."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # collective_rpc(kv_report) pickles a function
    from vllm import LLM, SamplingParams

    from vllm_indexcache.tools.bench.measure import _stats, _tpot, kv_capacity

    dl = Deadline(a.deadline)
    res = {"config": a.name, "pattern": a.pattern, "plugin": a.plugin, "cuda_graphs": not a.eager, "contexts": {},
           "tokens": {}, "skipped": []}
    save = lambda: Path(a.json).write_text(json.dumps(res, indent=1) + "\n")  # noqa: E731
    kwargs = dict(model=str(a.model), skip_tokenizer_init=True, disable_log_stats=False, enforce_eager=a.eager,
                  max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_util, seed=0, kv_cache_dtype="fp8",
                  max_num_seqs=max(16, a.concurrent))
    if a.kv_cache_gib:   # fixed KV cache: no memory profiling (another process may share the GPU); capacity at it
        kwargs["kv_cache_memory_bytes"] = int(a.kv_cache_gib * 2**30)
    if not a.eager and a.capture_sizes:
        # fewer CUDA graphs than vLLM's default 12 sizes: each size is captured after JIT-compiling V4's kernels
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": a.capture_sizes}
    if a.pattern:
        kwargs["hf_overrides"] = {"index_topk_pattern": a.pattern}
    prof_dir = PROF_DIR / Path(a.json).stem
    if a.profile_steps:   # the torch profiler is only started around the profiled decode steps (after all timing)
        shutil.rmtree(prof_dir, ignore_errors=True)
        kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(prof_dir),
                                     "torch_profiler_with_stack": False}
    if a.plugin:
        import vllm_indexcache

        vllm_indexcache.register()   # the entry point does this too where the plugin is installed
        kwargs["attention_backend"] = "indexcache"
    t0 = time.time()
    llm = LLM(**kwargs)
    res["startup_s"] = time.time() - t0
    res["kv_capacity"] = kv_capacity(llm)
    print(f"[{a.name}] engine up in {res['startup_s']:.0f}s, KV capacity {res['kv_capacity']['tokens']:,} tokens",
          flush=True)
    try:
        res["kv"] = llm.collective_rpc(kv_report)[0]
        print(f"[{a.name}] KV: {json.dumps(res['kv'])}", flush=True)
    except Exception as e:   # noqa: BLE001 — the KV report is secondary; timing goes on
        res["kv_error"] = f"{type(e).__name__}: {e}"
        print(f"[{a.name}] KV report failed: {res['kv_error']}", flush=True)
    save()
    rng = random.Random(0)
    vocab = llm.llm_engine.vllm_config.model_config.hf_config.vocab_size
    rand = lambda n, r=rng: [r.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    # the token-check prompts come from their own generator: every configuration (timed or not, whatever its
    # warm-ups) checks the same prompts
    check_rng = random.Random(1234)
    sp = SamplingParams(max_tokens=a.decode_tokens, min_tokens=a.decode_tokens, ignore_eos=True, temperature=0.0)
    sp_check = SamplingParams(max_tokens=a.decode_tokens, min_tokens=a.decode_tokens, ignore_eos=True,
                              temperature=0.0, logprobs=2)   # the top-2 gap tells a near-tie from a real difference
    llm.generate([{"prompt_token_ids": rand(256)}], sp, use_tqdm=False)   # warm-up
    if a.contexts and dl.allows(15.0 * a.contexts[0] / 32768, "warm-up at the first context"):
        # kernels JIT-compiled on first use (DeepGEMM with VLLM_DEEP_GEMM_WARMUP=skip) compile here, not in a timing
        llm.generate([{"prompt_token_ids": rand(a.contexts[0])}], sp, use_tqdm=False)
    for n in a.check_lens:
        if not dl.allows(10, f"check prompt {n}"):
            res["skipped"].append(f"check {n}")
            break
        out = llm.generate([{"prompt_token_ids": rand(n, check_rng)}], sp_check, use_tqdm=False)[0]
        res["tokens"][str(n)] = list(out.outputs[0].token_ids)
        res.setdefault("top2_gaps", {})[str(n)] = [_top2_gap(step) for step in out.outputs[0].logprobs or []]
    save()
    for ctx in a.contexts:
        ttft, tpot, cost = [], [], 15.0 * ctx / 32768
        for r in range(a.repeats):
            if not dl.allows(cost, f"{ctx}-token request {r + 1}/{a.repeats}"):
                res["skipped"].append(f"{ctx} repeat {r + 1}")
                break
            t = time.time()
            out = llm.generate([{"prompt_token_ids": rand(ctx)}], sp, use_tqdm=False)[0]
            cost = time.time() - t
            m = out.metrics
            ttft.append(m.first_token_ts - m.scheduled_ts)
            tpot.append(_tpot(out))
            res["contexts"][str(ctx)] = {"ttft": _stats(ttft), "tpot": _stats(tpot)}
            save()
        if ttft:
            print(f"[{a.name}] {ctx}: TTFT {statistics.median(ttft):.3f}s TPOT {statistics.median(tpot) * 1e3:.2f}ms "
                  f"(n={len(ttft)})", flush=True)
    for ctx in a.concurrent_contexts:
        est = 20.0 * a.concurrent * ctx / 131072 + 10
        if not dl.allows(est, f"decode under load {a.concurrent}x{ctx}"):
            res["skipped"].append(f"load {a.concurrent}x{ctx}")
            continue
        steps = decode_under_load(llm, [rand(ctx) for _ in range(a.concurrent)], a.load_steps, "load")
        res["contexts"].setdefault(str(ctx), {})[f"concurrent{a.concurrent}"] = {"decode_step": _stats(steps)}
        save()
        print(f"[{a.name}] {a.concurrent}x{ctx}: decode {statistics.median(steps) * 1e3:.3f} ms/step "
              f"(median of {len(steps)} steps)", flush=True)
    if a.profile_steps and a.concurrent_contexts:   # profiled at the first load context, after all timing
        ctx = a.concurrent_contexts[0]
        if dl.allows(20.0 * a.concurrent * ctx / 131072 + 30, f"profiled decode {a.concurrent}x{ctx}"):
            decode_under_load(llm, [rand(ctx) for _ in range(a.concurrent)], a.profile_steps, "prof", profile=True)
            res["profile"] = profile_summary(prof_dir, Path(a.json).with_suffix(".profile.txt"), a.profile_steps)
            res["profile"].update(context=ctx, concurrent=a.concurrent)
            save()
            print(f"[{a.name}] profile {a.concurrent}x{ctx}: {json.dumps(res['profile'])}", flush=True)
        else:
            res["skipped"].append(f"profile {a.concurrent}x{ctx}")
    res["done"] = True
    save()
    return 0


#: kernels (substrings of the profiler's names) that only V4's lightning indexer runs, in vLLM 0.26 on SM90 at this
#: script's toy geometry: DeepGEMM's (paged) MQA logits, the top-512 over them, the head-128 indexer compressor's
#: fused compress + insert (``deepseek_v4/common/ops/fused_compress_quant_cache.py``) and the indexer's query
#: up-projection, an FP8 GEMM q_lora 1024 → 64 heads × 128 (its template names N=8192, K=1024)
INDEXER_KERNELS = ("mqa_logits", "cooperative_topk", "_fused_kv_compress_norm_rope_insert_indexer",
                   "fp8_gemm_kernel_swapAB<8192u, 1024u")


def profile_summary(prof_dir: Path, table_out: Path, steps: int) -> dict:
    """vLLM's profiler table (``profiler_out_0.txt`` in vLLM 0.26: torch's ``key_averages`` by self CUDA time) found
    in ``prof_dir`` (waiting up to 60 s for the engine process to write it), copied to ``table_out`` and summarised
    (:func:`summarize_profile`)."""
    table = None
    for _ in range(60):   # the engine process writes it on stop: profiler_out_0.txt (0.26), *rank0.profiler_out.txt
        table = next(iter(sorted(prof_dir.glob("*profiler_out*.txt"))), None)
        if table is not None and "Self CPU time total" in table.read_text():
            break
        time.sleep(1)
    if table is None:
        return {"error": f"no profiler table in {prof_dir}"}
    text = table.read_text()
    table_out.write_text(text)
    return summarize_profile(text, steps)


def summarize_profile(text: str, steps: int) -> dict:
    """A profiler table's totals per profiled step in ms (``self_cpu_ms``, ``self_cuda_ms``), the 12 kernels with the
    most self CUDA time (name → ms per step), and the lightning indexer's kernels (:data:`INDEXER_KERNELS`):
    ``indexer_ms_per_step`` and ``indexer_share`` of the self CUDA time."""
    import re

    unit = {"s": 1e3, "ms": 1.0, "us": 1e-3}

    def ms(v: str) -> float:
        m = re.fullmatch(r"([0-9.]+)(s|ms|us)", v.strip())
        return float(m.group(1)) * unit[m.group(2)] if m else float("nan")

    totals = {}   # ms over all profiled steps
    for kind in ("CPU", "CUDA"):
        m = re.search(rf"Self {kind} time total:\s*(\S+)", text)
        totals[kind] = ms(m.group(1)) if m else None
    out: dict = {"steps": steps, "top_kernels_ms_per_step": {},
                 **{f"self_{kind.lower()}_ms": t / steps if t is not None else None for kind, t in totals.items()}}
    total_cuda = totals["CUDA"] or float("inf")
    lines = text.splitlines()
    header = next((ln for ln in lines if "Self CUDA" in ln and "Name" in ln), None)
    if header:   # columns are separated by two or more spaces (names are cut to fit, never contain two spaces)
        cols = re.split(r"\s{2,}", header.strip())
        icuda = cols.index("Self CUDA")
        indexer = 0.0
        for ln in lines[lines.index(header) + 2:]:
            if ln.startswith("---"):
                break
            parts = re.split(r"\s{2,}", ln.strip())
            if len(parts) != len(cols) or ms(parts[icuda]) > total_cuda:
                continue   # more than all kernels together: a range annotation (execute_context_...)
            cuda = ms(parts[icuda])
            if any(k in parts[0] for k in INDEXER_KERNELS):
                indexer += cuda
            if len(out["top_kernels_ms_per_step"]) < 12:
                out["top_kernels_ms_per_step"][parts[0][:80]] = round(cuda / steps, 4)
        out["indexer_ms_per_step"] = round(indexer / steps, 4)
        out["indexer_share"] = round(indexer / total_cuda, 4) if totals["CUDA"] else None
    return out


def decode_under_load(llm, prompts: list[list[int]], steps: int, tag: str, profile: bool = False) -> list[float]:
    """Seconds of each engine step in which every request of ``prompts`` decodes one token: the V3.2 benchmark's
    :func:`bench_vllm_gpu.decode_step_times` (prefill all together, count a step only once every request has its
    first tokens and only if it advanced every request, abort all afterwards)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_vllm_gpu import decode_step_times

    return decode_step_times(llm, prompts, steps, tag, profile=profile)


# ------------------------------------------------------------------------------------------------------------- parent
#: Default order: the all-F baseline first (the first engine on a fresh machine also pays the kernels' JIT), vLLM
#: alone next (untimed: only the token check), then the patterns, the stronger first.
CONFIGS = ("plugin-1", "none", "plugin-1/4", "plugin-1/2")


def config_spec(name: str, num_csa: int) -> dict:
    """``none`` | ``plugin-1`` | ``plugin-<spec>`` (``1/2`` = ``every:2``, any pattern spec), optionally ``+split``
    → pattern, plugin and split flags. ``plugin-1`` passes the all-F pattern explicitly (the plugin's plan and
    report run)."""
    from vllm_indexcache.pattern import resolve_spec

    if name == "none":
        return {"pattern": None, "plugin": False, "split": False}
    base, plus, extra = name.partition("+")
    if plus and extra != "split":
        raise SystemExit(f"--configs: bad entry {name!r} (the one suffix is +split)")
    kind, _, spec = base.partition("-")
    if kind != "plugin" or not spec:
        raise SystemExit(f"--configs: bad entry {name!r} (expected none, plugin-1, plugin-1/2, plugin-FSFS..., ...)")
    try:
        pattern = resolve_spec("all-F" if spec == "1" else spec, num_csa, key="--configs")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return {"pattern": pattern, "plugin": True, "split": bool(plus)}


def run_child(cmd: list[str], env: dict, log: Path, timeout: float) -> int:
    """Run ``cmd`` in its own process group, output to ``log``; past ``timeout`` s the whole group (the engine's
    processes too) is killed. Returns the exit code (-9 when killed)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            print(f"budget: killed {log.stem} after {timeout:.0f}s", flush=True)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return -9


def show_log(log: Path, name: str, failed: bool) -> None:
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        if ("IndexCache" in line or "KV cache" in line or line.startswith(f"[{name}]") or line.startswith("budget:")
                or "V4 CANNOT RUN" in line or line.startswith(("preflight:", "toy:"))):
            print("   ", line[-240:], flush=True)
    if failed:
        causes = [ln for ln in lines[:-30] if "Error" in ln or "error:" in ln][-15:]
        print("\n".join(causes + ["..."] + lines[-30:]), flush=True)
        print(f"full log: {log}", flush=True)


def _top2_gap(step: dict) -> float | None:
    """Best minus second-best log-prob of one generated step (``logprobs=2``; nats), None without two entries."""
    lps = sorted((lp.logprob for lp in step.values()), reverse=True)
    return round(lps[0] - lps[1], 6) if len(lps) >= 2 else None


def token_check(results: dict) -> dict | None:
    """Greedy tokens of ``none`` against ``plugin-1``: identical per prompt length, first mismatch."""
    a, b = results.get("none"), results.get("plugin-1")
    if not a or not b:
        return None
    keys = sorted(set(a["tokens"]) & set(b["tokens"]), key=int)
    check = {"prompts": len(keys), "identical": all(a["tokens"][k] == b["tokens"][k] for k in keys) and bool(keys),
             "first_mismatch": None}
    for k in keys:
        x, y = a["tokens"][k], b["tokens"][k]
        if x != y:
            i = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            gaps = a.get("top2_gaps", {}).get(k) or []
            check["first_mismatch"] = {"prompt_len": int(k), "index": i, "none": x[i:i + 4], "plugin-1": y[i:i + 4],
                                       "none_top2_gap": gaps[i] if i < len(gaps) else None}
            break
    return check


def _per_token(kinds: dict, kind: str) -> str:
    """Bytes per token of context of one cache kind, all its layers (page bytes / tokens per block)."""
    k = kinds.get(kind)
    return f"{k['page_bytes'] / k['block_size']:g}" if k else "0"


def render(results: dict, meta: dict) -> str:
    """Markdown: one row per configuration (KV from the engine's spec, timings with speed-ups against plugin-1),
    then the token check, skips and failures."""
    kt = lambda c: f"{int(c) // 1024}K"  # noqa: E731
    base = results.get("plugin-1")
    ctxs = sorted({c for r in results.values() for c, v in r["contexts"].items() if "ttft" in v}, key=int)
    loads = sorted({(c, k) for r in results.values() for c, v in r["contexts"].items() for k in v
                    if k.startswith("concurrent")}, key=lambda x: int(x[0]))
    head = (["config", "pattern", "KV tokens", "indexer-K layers", "indexer K B/token", "compressed KV B/token",
             "pool B/block"] + [f"TTFT {kt(c)} (s)" for c in ctxs] + [f"TPOT {kt(c)} (ms)" for c in ctxs]
            + [f"decode {k[10:]}×{kt(c)} (ms/step)" for c, k in loads])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        kv = r.get("kv") or {}
        kinds = kv.get("kinds", {})
        cells = [name, f"`{r['pattern'] or '(none)'}`", f"{r.get('kv_capacity', {}).get('tokens', 0):,}",
                 str(kinds.get("indexer_k", {}).get("layers", 0)), _per_token(kinds, "indexer_k"),
                 _per_token(kinds, "compressed_kv"),
                 f"{kv.get('pool_bytes_per_block', 0):,}"]
        for metric, scale in (("ttft", 1), ("tpot", 1e3)):
            for c in ctxs:
                st = r["contexts"].get(c, {}).get(metric)
                b = (base or {}).get("contexts", {}).get(c, {}).get(metric)
                sp = f" ({b['median'] / st['median']:.2f}×)" if st and b and r is not base else ""
                cells.append(f"{st['median'] * scale:.3f} [{st['min'] * scale:.3f}–{st['max'] * scale:.3f}] "
                             f"n={st['n']}{sp}" if st else "–")
        for c, k in loads:
            st = r["contexts"].get(c, {}).get(k, {}).get("decode_step")
            b = (base or {}).get("contexts", {}).get(c, {}).get(k, {}).get("decode_step")
            sp = f" ({b['median'] / st['median']:.2f}×)" if st and b and r is not base else ""
            cells.append(f"{st['median'] * 1e3:.3f}{sp}" if st else "–")
        rows.append("| " + " | ".join(cells) + " |")
    check = meta.get("token_check")
    lines = ["\n".join(rows), "",
             f"greedy tokens, vLLM alone vs plugin all-F: {json.dumps(check) if check else 'not compared'}",
             "speed-ups (×) against plugin-1 (all F); KV B/token = page bytes / block size summed over layers",
             *(f"profile {n} ({r['profile'].get('concurrent')}×{r['profile'].get('context')}, per decode step): self "
               f"CUDA {r['profile'].get('self_cuda_ms') or 0:.3f} ms, "
               f"self CPU {r['profile'].get('self_cpu_ms') or 0:.3f} ms"
               for n, r in results.items() if r.get("profile")),
             f"skipped: {json.dumps({n: r.get('skipped') for n, r in results.items() if r.get('skipped')})}",
             f"failed: {meta.get('failed') or []}; device: {meta.get('device')}"]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict, meta: dict) -> None:
    meta["token_check"] = token_check(results)
    (out / RESULTS).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out / "bench_v4.md").write_text(render(results, meta))


def main() -> int:
    t_start = time.time()
    add_site_dirs()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--model", type=Path, default=Path("/root/bench-v4-model"))
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--configs", type=lambda s: [x for x in s.split(",") if x], default=list(CONFIGS))
    p.add_argument("--contexts", type=ints, default=[32768, 131072])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrent", type=int, default=16)
    p.add_argument("--concurrent-contexts", type=ints, default=[16384])
    p.add_argument("--load-steps", type=int, default=16)
    p.add_argument("--check-lens", type=ints, default=[3000, 9000])
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the timings, profile this many decode-under-load steps (torch profiler through "
                        "vLLM; table <config>.profile.txt, per-step totals in the JSON); 0: no profile")
    p.add_argument("--profile-table", help="only summarise this profiler table (<config>.profile.txt of a run, "
                   "--profile-steps: the steps it covers) and print the JSON; no GPU")
    p.add_argument("--max-model-len", type=int, default=131072 + 256)
    p.add_argument("--gpu-util", type=float, default=0.85)
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: CUDA graphs on)")
    p.add_argument("--kv-cache-gib", type=float, help="fixed KV cache per engine (kv_cache_memory_bytes) instead of "
                   "vLLM's profile at --gpu-util: set it when another process shares the GPU")
    p.add_argument("--capture-sizes", type=ints, default=[1, 2, 4, 8, 16],
                   help="CUDA-graph batch sizes captured ('' = vLLM's default list)")
    p.add_argument("--deep-gemm-warmup", default="skip", choices=["skip", "relax", "full"],
                   help="VLLM_DEEP_GEMM_WARMUP for the engines (skip: kernels compile in the untimed warm-up)")
    p.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget from the script's start")
    p.add_argument("--force", action="store_true", help="run the engines even when the preflight finds a problem")
    p.add_argument("--preflight-only", action="store_true")
    p.add_argument("--toy-device", default="cuda", help="where the toy's weights are drawn (cpu: local dry runs)")
    p.add_argument("--toy-overrides", default="{}", help="JSON of config fields replacing the toy's (dry runs)")
    # children
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--name")
    p.add_argument("--json")
    p.add_argument("--pattern")
    p.add_argument("--plugin", action="store_true")
    p.add_argument("--deadline", type=float)
    a = p.parse_args()
    if a.profile_table:   # re-read a table written by an earlier run (e.g. one kept under docs/benchmarks/)
        print(json.dumps(summarize_profile(Path(a.profile_table).read_text(), a.profile_steps or 1), indent=1))
        return 0
    if a.prepare:
        return prepare(a)
    if a.worker:
        return worker(a)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = t_start + a.budget_s
    from vllm_indexcache.families.deepseek_v4 import csa_layers
    from vllm_indexcache.tools.toy_v4_deepseek import deepseek_v4_config, flash_layout
    from vllm_indexcache.vllm_glue.cuda.deepseek_v4.kv_groups import SPLIT_ENV

    num_csa = len(csa_layers(deepseek_v4_config(flash_layout(a.layers))))
    specs = {name: config_spec(name, num_csa) for name in a.configs}   # bad entries stop here, before any GPU work
    meta = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "failed": [],
            "csa_layers": num_csa}
    print(f"bench_v4_gpu: {a.layers} layers ({num_csa} CSA), configs {a.configs}, contexts {a.contexts}, "
          f"repeats {a.repeats}, load {a.concurrent}x{a.concurrent_contexts}, budget {a.budget_s:.0f}s", flush=True)
    for name, s in specs.items():
        print(f"  {name}: pattern {s['pattern'] or '(vLLM alone)'}", flush=True)

    prep_json = out / "preflight.json"
    cmd = [sys.executable, __file__, "--prepare", "--json", str(prep_json), "--model", str(a.model),
           "--layers", str(a.layers), "--max-model-len", str(a.max_model_len), "--toy-device", a.toy_device,
           "--toy-overrides", a.toy_overrides,
           *(["--force"] if a.force else []), *(["--preflight-only"] if a.preflight_only else [])]
    log = LOG_DIR / "prepare.log"
    rc = run_child(cmd, dict(os.environ), log, min(300.0, deadline - time.time()))
    show_log(log, "prepare", rc not in (0, 3))
    prep = json.loads(prep_json.read_text()) if prep_json.is_file() else {}
    meta["device"] = (prep.get("facts") or ["?"])[0]
    meta["preflight"] = prep
    if rc == 3 or a.preflight_only or rc != 0:
        meta["failed"] = ["preflight" if rc == 3 else "prepare"] if rc else []
        write_results(out, {}, meta)
        print(f"bench_v4_gpu: {'V4 cannot run here (see V4 CANNOT RUN above)' if rc == 3 else 'prepare rc ' + str(rc)}"
              f"; wrote {out / RESULTS}", flush=True)
        return 3 if rc == 3 else (0 if rc == 0 else 1)

    results = {}
    for name, s in specs.items():
        left = deadline - time.time()
        if left < 90:
            print(f"budget: skipped {name} ({left:.0f}s left; an engine start takes 30–150 s)", flush=True)
            meta["failed"].append(f"{name} (not started: budget)")
            continue
        stem = name.replace("/", "of").replace("+", "-")
        js = out / f"{stem}.json"
        env = dict(os.environ)
        if not s["plugin"]:
            env["VLLM_PLUGINS"] = "none"
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        if s["split"]:   # diagnostic: an S pattern's KV-cache groups without its S layers
            env[SPLIT_ENV] = "always"
        env.setdefault("VLLM_DEEP_GEMM_WARMUP", a.deep_gemm_warmup)
        cmd = [sys.executable, __file__, "--worker", "--name", name, "--model", str(a.model), "--json", str(js),
               "--max-model-len", str(a.max_model_len), "--gpu-util", str(a.gpu_util), "--repeats", str(a.repeats),
               "--decode-tokens", str(a.decode_tokens), "--concurrent", str(a.concurrent),
               "--load-steps", str(a.load_steps), "--profile-steps", str(0 if name == "none" else a.profile_steps),
               "--deadline", str(deadline - 15), *(["--eager"] if a.eager else []),
               "--contexts", "" if name == "none" else ",".join(map(str, a.contexts)),
               "--concurrent-contexts", "" if name == "none" else ",".join(map(str, a.concurrent_contexts)),
               "--check-lens", ",".join(map(str, a.check_lens)),
               "--capture-sizes", ",".join(map(str, a.capture_sizes)),
               *(["--kv-cache-gib", str(a.kv_cache_gib)] if a.kv_cache_gib else [])]
        if s["pattern"]:
            cmd += ["--pattern", s["pattern"]]
        if s["plugin"]:
            cmd.append("--plugin")
        t = time.time()
        log = LOG_DIR / f"{stem}.log"
        rc = run_child(cmd, env, log, deadline - time.time() - 5)
        print(f"{name}: rc {rc} in {time.time() - t:.0f}s", flush=True)
        show_log(log, name, rc != 0)
        if js.is_file():
            results[name] = json.loads(js.read_text())
        if rc != 0:
            meta["failed"].append(name)
        write_results(out, results, meta)
    write_results(out, results, meta)
    print((out / "bench_v4.md").read_text(), flush=True)
    print(f"bench_v4_gpu: {time.time() - t_start:.0f}s; wrote {out / RESULTS}", flush=True)
    return 1 if meta["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""IndexCache inside CUDA vLLM on one GPU (H100 or H200): the plugin side by side with vLLM's native keys (issue 8).

Model: DeepSeek-V3.2 attention geometry (hidden 7168, 128 MLA heads, q_lora_rank 1536, kv_lora_rank 512 + rope 64,
qk_nope 128, v_head 128; lightning indexer 64 heads × 128, top-k 2048), ``--layers`` layers, each with a dense
4096-wide SwiGLU MLP, vocabulary 16384, random bf16 weights (``vllm_indexcache.tools.toy.build_toy_model`` on the GPU).

Every configuration runs in its own process (fresh CUDA context, ``disable_log_stats=False`` so that
``RequestOutput.metrics`` carries engine timestamps; CUDA graphs on — vLLM's default — unless ``--eager``):

* ``none``        — vLLM alone (``VLLM_PLUGINS=none``), all layers F;
* ``native-1/2``, ``native-1/4`` — vLLM alone with ``hf_overrides={"index_topk_pattern": ...}``;
* ``plugin-1/2``, ``plugin-1/4`` — ``attention_backend="indexcache"`` with the same pattern, plugin loaded;
* ``plugin-1``    — the plugin with all layers F (compared with ``none`` in the parity table);
* ``triton-1``, ``triton-1/2``, ``triton-1/4`` — the plugin's Triton fallback (``VLLM_INDEXCACHE_KERNELS=triton``:
  unquantised bf16 indexer K-cache, Triton indexer and sparse MLA kernels, the path of GPUs without FlashMLA /
  DeepGEMM), compared with vLLM native at the same pattern in the fallback table (target: ≤ 1.5× native's time).

Measured per configuration: TTFT (engine: first token − scheduled) and TPOT (``(last − first) / (n − 1)``) at
batch 1 for each ``--contexts`` (median of ``--repeats``, min–max shown); **decode under load**: ``--concurrent``
requests of ``--concurrent-contexts`` tokens are prefilled, then ``--load-steps`` engine steps in which every request
decodes one token are timed (ms per step = per-token decode latency at that batch; ``--repeats`` batches); and the
KV capacity in tokens that vLLM allocated. Checks first (greedy tokens of plugin and native identical for the same
pattern), tables last (the parity table: plugin time / native time − 1 for the same pattern, per metric, medians);
everything under ``--out`` (JSON per configuration, ``bench_vllm.json``, ``bench_vllm.md``).

Parallel runs (2 GPUs) are configurations with ``@pp2`` / ``@tp2``: they only generate the check prompts' greedy
tokens, compared with the single-GPU runs of the same pattern (with 4 layers and PP 2, stage 1 starts on layer 2,
an S layer in ``FSSS``; the plugin makes it F there, so PP ``FSSS`` is also compared with one GPU ``FSFS``).
Each process's log goes to ``$BENCH_LOG_DIR`` (default /tmp/bench-vllm-logs), not ``--out``.

    python scripts/bench_vllm_gpu.py --out $OUT                       # the table (H100 or H200, vLLM 0.26)
    python scripts/bench_vllm_gpu.py --out $OUT --configs plugin-1/4@pp2,plugin-1/4@tp2,native-1/4@pp2
    python scripts/bench_vllm_gpu.py --render dirA,dirB --out docs/benchmarks/h200-vllm   # merge, no GPU
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: DeepSeek-V3.2's attention geometry (config.json of deepseek-ai/DeepSeek-V3.2-Exp), smaller MLP and vocabulary.
V32_GEOMETRY = dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    index_n_heads=64, index_head_dim=128, index_topk=2048, intermediate_size=4096,
                    vocab_size=16384)
#: the default configurations' patterns, as pattern specs (:mod:`vllm_indexcache.pattern`): 1/K = every:K (F at 0,
#: K, 2K, ...)
RETENTIONS = ("1/2", "1/4")


def indexer_layers(a) -> int:
    """The pattern length of ``a.model``: its family's indexer layers (``--layers`` before the model exists: the
    DeepSeek-V3.2 toy built here has an indexer on every layer)."""
    from vllm_indexcache.families import family_for

    path = Path(a.model) / "config.json"
    if not path.is_file():
        return a.layers
    config = json.loads(path.read_text())
    return family_for(config).num_indexer_layers(config)


def build_model(path: Path, layers: int, max_pos: int) -> Path:
    from vllm_indexcache.tools.toy import build_toy_model

    if (path / "config.json").is_file():
        return path
    t = time.time()
    build_toy_model(path, num_layers=layers, first_k_dense_replace=layers, tokenizer=False, init_std=0.02,
                    device="cuda", dtype="bfloat16", max_position_embeddings=max_pos, **V32_GEOMETRY)
    print(f"built {path} in {time.time() - t:.0f}s", flush=True)
    return path


# ------------------------------------------------------------------------------------------------------------ worker
def worker(a) -> int:
    """One engine, one configuration; writes JSON to ``a.json``."""
    from vllm import LLM, SamplingParams

    from vllm_indexcache.tools.bench.measure import _stats, _tpot, kv_capacity

    kwargs = dict(model=str(a.model), skip_tokenizer_init=True, disable_log_stats=False, enforce_eager=a.eager,
                  max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_util, seed=0,
                  max_num_seqs=max(32, a.concurrent), tensor_parallel_size=a.tp, pipeline_parallel_size=a.pp)
    if a.pattern:
        kwargs["hf_overrides"] = {"index_topk_pattern": a.pattern}
    if a.plugin:
        import vllm_indexcache

        vllm_indexcache.register()  # the entry point does this too (EngineArgs.__post_init__); explicit here
        kwargs["attention_backend"] = "indexcache"
    if os.environ.get("BENCH_KV_BYTES"):  # CPU smoke runs: vLLM on CPU sizes its KV cache in bytes
        kwargs.pop("gpu_memory_utilization")
        kwargs["kv_cache_memory_bytes"] = int(os.environ["BENCH_KV_BYTES"])
    t0 = time.time()
    llm = LLM(**kwargs)
    res = {"config": a.name, "pattern": a.pattern, "plugin": a.plugin, "tp": a.tp, "pp": a.pp,
           "kernels": os.environ.get("VLLM_INDEXCACHE_KERNELS", "auto") if a.plugin else "native",
           "cuda_graphs": not a.eager,
           "startup_s": time.time() - t0, "kv_capacity": kv_capacity(llm), "contexts": {}, "tokens": {}}
    rng = random.Random(0)
    vocab = llm.llm_engine.vllm_config.model_config.hf_config.vocab_size
    rand = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    sp = SamplingParams(max_tokens=a.decode_tokens, min_tokens=a.decode_tokens, ignore_eos=True, temperature=0.0)
    llm.generate([{"prompt_token_ids": rand(256)}], sp, use_tqdm=False)  # warm-up
    for n in a.check_lens:  # greedy tokens, compared across configurations by the parent
        out = llm.generate([{"prompt_token_ids": rand(n)}], sp, use_tqdm=False)[0]
        res["tokens"][str(n)] = list(out.outputs[0].token_ids)
    for ctx in a.contexts:
        ttft, tpot = [], []
        for _ in range(a.repeats):
            out = llm.generate([{"prompt_token_ids": rand(ctx)}], sp, use_tqdm=False)[0]
            m = out.metrics
            ttft.append(m.first_token_ts - m.scheduled_ts)
            tpot.append(_tpot(out))
        res["contexts"][str(ctx)] = {"ttft": _stats(ttft), "tpot": _stats(tpot)}
        print(f"[{a.name}] {ctx}: TTFT {statistics.median(ttft):.3f}s TPOT {statistics.median(tpot) * 1e3:.2f}ms",
              flush=True)
    for ctx in a.concurrent_contexts:
        steps, walls = [], []
        for rep in range(a.repeats):
            t = time.perf_counter()
            steps.append(decode_under_load(llm, [rand(ctx) for _ in range(a.concurrent)], a.load_steps, f"r{rep}"))
            walls.append(time.perf_counter() - t)
        res["contexts"].setdefault(str(ctx), {})[f"concurrent{a.concurrent}"] = {
            "decode_step": _stats(steps), "wall_s": statistics.median(walls)}
        print(f"[{a.name}] {a.concurrent}x{ctx}: decode {statistics.median(steps) * 1e3:.3f} ms/step "
              f"{[round(x * 1e3, 3) for x in steps]}", flush=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


def decode_under_load(llm, prompts: list[list[int]], steps: int, tag: str) -> float:
    """Prefill all ``prompts`` together, then time ``steps`` engine steps in which every request decodes one token.

    Returns seconds per step (median). Uses ``LLMEngine.add_request`` / ``step`` / ``abort_request`` (vLLM's public
    engine loop); a step is timed only once every request has its first token and only if it advanced every
    request by one token (no request finishes: ``max_tokens`` is far beyond the window; all are aborted after it).
    """
    return statistics.median(decode_step_times(llm, prompts, steps, tag))


def decode_step_times(llm, prompts: list[list[int]], steps: int, tag: str, profile: bool = False) -> list[float]:
    """The seconds of each counted engine step of :func:`decode_under_load` (its median is that function's
    result); also used by ``scripts/bench_v4_gpu.py``. ``profile``: vLLM's profiler (``LLM(profiler_config=...)``)
    runs from the first step in which every request decodes to the last counted one (``LLM.start_profile`` /
    ``stop_profile``, outside the timed steps; profiled step times are inflated by the profiler)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=1 << 20, ignore_eos=True, temperature=0.0)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, sp)
    seen = dict.fromkeys(ids, 0)
    times = []
    profiling = False
    for _ in range(20000):
        if len(times) >= steps:
            break
        before = min(seen.values())
        if profile and before >= 2 and not profiling:
            llm.start_profile()
            profiling = True
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        for o in outs:
            seen[o.request_id] = len(o.outputs[0].token_ids)
        if before >= 2 and len({o.request_id for o in outs}) == len(ids):
            times.append(dt)
    if profiling:
        llm.stop_profile()
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    if not times:
        raise RuntimeError("decode under load: no step advanced every request")
    return times


# ------------------------------------------------------------------------------------------------------------ parent
LOG_DIR = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/bench-vllm-logs"))  # not under $OUT: 8 files come back at most


def config_spec(name: str, layers: int) -> dict:
    """``none`` | ``native-R`` | ``plugin-R`` | ``triton-R`` [``@tpN`` | ``@ppN``] → pattern, plugin flag, kernel
    choice (``VLLM_INDEXCACHE_KERNELS`` of plugin runs), TP and PP sizes."""
    base, _, par = name.partition("@")
    kind, _, ret = base.partition("-")
    ret = ret or ("1" if kind == "none" else "")
    if kind not in ("none", "native", "plugin", "triton") or not ret \
            or (kind == "native" and ret == "1"):
        raise SystemExit(f"--configs: bad entry {name!r} (expected none, plugin-1, native-1/2, plugin-1/4, triton-1, "
                         "plugin-1/4@pp2, …; after KIND- any pattern spec: 1/K = every:K, freq:K[:OFFSET], FSFS...)")
    tp = int(par[2:]) if par.startswith("tp") else 1
    pp = int(par[2:]) if par.startswith("pp") else 1
    from vllm_indexcache.pattern import resolve_spec

    try:   # "1": all F (no override); otherwise a pattern spec (1/K = every:K)
        pattern = None if ret == "1" else resolve_spec(ret, layers, key="--configs")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return {"pattern": pattern, "plugin": kind in ("plugin", "triton"),
            "kernels": "triton" if kind == "triton" else "auto", "tp": tp, "pp": pp}


def run_config(a, name: str) -> dict | None:
    spec = config_spec(name, indexer_layers(a))
    if spec["pattern"]:
        from vllm_indexcache.pattern import describe_spec

        print(f"{name}: " + describe_spec(name.partition("-")[2].partition("@")[0], spec["pattern"]), flush=True)
    stem = name.replace("/", "of").replace("@", "_")
    out = Path(a.out) / f"{stem}.json"
    env = dict(os.environ)
    if not spec["plugin"]:
        env["VLLM_PLUGINS"] = "none"
    env["VLLM_INDEXCACHE_KERNELS"] = spec["kernels"]
    if spec["tp"] * spec["pp"] == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    parallel = spec["tp"] * spec["pp"] > 1
    cmd = [sys.executable, __file__, "--worker", "--name", name, "--model", str(a.model), "--json", str(out),
           "--max-model-len", str(a.max_model_len), "--gpu-util", str(a.gpu_util), "--repeats", str(a.repeats),
           "--decode-tokens", str(a.decode_tokens), "--concurrent", str(a.concurrent),
           "--load-steps", str(a.load_steps), *(["--eager"] if a.eager else []),
           "--tp", str(spec["tp"]), "--pp", str(spec["pp"]),
           "--contexts", "" if parallel else ",".join(map(str, a.contexts)),
           "--concurrent-contexts", "" if parallel else ",".join(map(str, a.concurrent_contexts)),
           "--check-lens", ",".join(map(str, a.check_lens))]
    if spec["pattern"]:
        cmd += ["--pattern", spec["pattern"]]
    if spec["plugin"]:
        cmd.append("--plugin")
    t = time.time()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{stem}.log"
    with open(log, "w") as f:
        p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    print(f"{name}: rc {p.returncode} in {time.time() - t:.0f}s", flush=True)
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        if "IndexCache" in line or "KV cache size" in line or line.startswith(f"[{name}]"):
            print("   ", line[-200:], flush=True)
    if p.returncode != 0 or not out.is_file():
        # the engine core's root cause sits above the launcher's traceback: its error lines first, then the tail
        causes = [ln for ln in lines[:-30] if "Error" in ln or "error:" in ln][-20:]
        print("\n".join(causes + ["..."] + lines[-30:]), flush=True)
        print(f"full log: {log}", flush=True)
        return None
    return json.loads(out.read_text())


def same_tokens(r1: dict, r2: dict) -> str:
    keys = sorted(set(r1["tokens"]) & set(r2["tokens"]), key=int)
    same = sum(r1["tokens"][k] == r2["tokens"][k] for k in keys)
    return f"{same}/{len(keys)}"


def table(results: dict) -> str:
    """Markdown table of the single-GPU configurations, speedups against ``none``."""
    single = {k: v for k, v in results.items() if v["tp"] * v["pp"] == 1 and v["contexts"]}
    if not single:
        return "(no single-GPU timing results)"
    base = single.get("none")
    any_r = next(iter(single.values()))
    contexts = [c for c, v in any_r["contexts"].items() if "ttft" in v]
    conc = [(c, k) for c, v in any_r["contexts"].items() for k in v if k.startswith("concurrent")]
    kt = lambda c: f"{int(c) // 1024}K" if int(c) >= 1024 else c  # noqa: E731
    head = (["config", "pattern", "KV tokens"] + [f"TTFT {kt(c)} (s)" for c in contexts]
            + [f"TPOT {kt(c)} (ms)" for c in contexts] + [f"decode {k[10:]}×{kt(c)} (ms/step)" for c, k in conc])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in single.items():
        cells = [name, f"`{r['pattern'] or 'FFFF'}`", f"{r['kv_capacity']['tokens']:,}"]
        for c in contexts:
            t = r["contexts"][c]["ttft"]
            sp = f" ({base['contexts'][c]['ttft']['median'] / t['median']:.2f}×)" if base and r is not base else ""
            cells.append(f"{t['median']:.3f} [{t['min']:.3f}–{t['max']:.3f}]{sp}")
        for c in contexts:
            tp = r["contexts"][c]["tpot"]
            cells.append(f"{tp['median'] * 1e3:.3f} [{tp['min'] * 1e3:.3f}–{tp['max'] * 1e3:.3f}]")
        for c, k in conc:
            d = r["contexts"][c][k]["decode_step"]
            b = base["contexts"][c][k]["decode_step"]["median"] if base and r is not base else None
            sp = f" ({b / d['median']:.2f}×)" if b else ""
            cells.append(f"{d['median'] * 1e3:.3f} [{d['min'] * 1e3:.3f}–{d['max'] * 1e3:.3f}]{sp}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _paired_rows(results: dict, prefix: str, compare) -> list[str]:
    """Table rows pairing ``PREFIX-R`` with vLLM native of the same pattern (``none`` for all-F, else ``native-R``):
    TTFT / TPOT per context and decode under load, ``compare(native_median, other_median)`` in the last column."""
    rows = []
    for ret in ("1",) + RETENTIONS:
        nat = results.get("none" if ret == "1" else f"native-{ret}")
        oth = results.get(f"{prefix}-{ret}")
        if not nat or not oth:
            continue
        for c, v in nat["contexts"].items():
            for metric, scale, unit in (("ttft", 1, "s"), ("tpot", 1e3, "ms")):
                if metric in v and metric in oth["contexts"].get(c, {}):
                    a, b = v[metric], oth["contexts"][c][metric]
                    rows.append(f"| {ret} | {metric.upper()} {int(c) // 1024}K ({unit}) | {_spread(a, scale)} | "
                                f"{_spread(b, scale)} | {compare(a['median'], b['median'])} |")
            for k in v:
                if k.startswith("concurrent") and k in oth["contexts"].get(c, {}):
                    a, b = v[k]["decode_step"], oth["contexts"][c][k]["decode_step"]
                    rows.append(f"| {ret} | decode {k[10:]}×{int(c) // 1024}K (ms/step) | {_spread(a, 1e3)} | "
                                f"{_spread(b, 1e3)} | {compare(a['median'], b['median'])} |")
    return rows


def parity(results: dict) -> str:
    """Plugin against vLLM native with the same pattern (all-F: ``plugin-1`` against ``none``): ``plugin / native −
    1`` of each median, in % (positive = plugin slower), with the plugin's and native's min–max spread in brackets."""
    rows = ["| pattern | metric | native (median [min–max]) | plugin (median [min–max]) | plugin vs native |",
            "|---|---|---|---|---|"]
    return "\n".join(rows + _paired_rows(results, "plugin", lambda a, b: f"{(b / a - 1) * 100:+.1f} %"))


def fallback(results: dict) -> str:
    """The Triton fallback against vLLM native with the same pattern: ``triton / native`` of each median (×; the
    target is ≤ 1.5×), with both min–max spreads; empty if no ``triton-R`` ran."""
    rows = ["| pattern | metric | native (median [min–max]) | Triton fallback (median [min–max]) | fallback / native |",
            "|---|---|---|---|---|"] + _paired_rows(results, "triton", lambda a, b: f"{b / a:.2f}×")
    return "\n".join(rows) if len(rows) > 2 else ""


def _spread(st: dict, scale: float) -> str:
    return f"{st['median'] * scale:.3f} [{st['min'] * scale:.3f}–{st['max'] * scale:.3f}]"


def token_checks(results: dict) -> str:
    """Greedy-token comparisons: plugin vs native per pattern, TP/PP runs vs single-GPU runs."""
    by_pat = {}
    for name, r in results.items():
        if r["tp"] * r["pp"] == 1 and not name.startswith("triton"):
            by_pat.setdefault((r["pattern"], r["plugin"]), name)
    pairs = []
    for (pat, plugin), name in by_pat.items():
        if plugin and (pat, False) in by_pat:
            pairs.append((name, by_pat[(pat, False)], "same pattern, plugin vs vLLM alone"))
    for name, r in results.items():
        if name.startswith("triton") and (r["pattern"], False) in by_pat:
            pairs.append((name, by_pat[(r["pattern"], False)], "same pattern, Triton fallback (bf16 indexer keys) "
                          "vs vLLM alone (FP8): selections near ties may differ"))
    for name, r in results.items():
        if r["tp"] * r["pp"] > 1:
            pat = r["pattern"]
            if (pat, r["plugin"]) in by_pat:
                pairs.append((name, by_pat[(pat, r["plugin"])], "same pattern on one GPU"))
            if r["pp"] > 1 and pat and pat[len(pat) // 2] == "S":
                forced = pat[:len(pat) // 2] + "F" + pat[len(pat) // 2 + 1:]
                if (forced, r["plugin"]) in by_pat:
                    pairs.append((name, by_pat[(forced, r["plugin"])], "one GPU with stage 1's first layer F"))
    rows = ["| run | compared with | why | prompts with identical greedy tokens |", "|---|---|---|---|"]
    rows += [f"| {x} | {y} | {why} | {same_tokens(results[x], results[y])} |" for x, y, why in pairs]
    return "\n".join(rows)


def render(dirs: list[str], out: Path) -> None:
    results = {}
    for d in dirs:
        for f in sorted(Path(d).glob("*.json")):
            r = json.loads(f.read_text())
            if isinstance(r, dict) and "config" in r:
                results[r["config"]] = r
    order = lambda n: (("none", "native", "plugin", "triton").index(n.split("-")[0]), n)  # noqa: E731
    results = dict(sorted(results.items(), key=lambda kv: order(kv[0])))
    fb = fallback(results)
    md = (table(results) + "\n\n" + parity(results) + "\n\n" + (fb + "\n\n" if fb else "")
          + token_checks(results) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_vllm.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "bench_vllm.md").write_text(md)
    print(md)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--model", type=Path, default=Path("/root/bench-v32-model"))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--contexts", type=ints, default=[32768, 131072])
    p.add_argument("--concurrent", type=int, default=32)
    p.add_argument("--concurrent-contexts", type=ints, default=[65536])
    p.add_argument("--configs", type=lambda s: s.split(","),
                   default=["none", "plugin-1", "native-1/4", "plugin-1/4", "native-1/2", "plugin-1/2"],
                   help="none | plugin-1 | native-R | plugin-R | triton-R, optionally @tp2 / @pp2 (R: a pattern "
                        "spec, e.g. 1/2 or 1/4 = every:2 / every:4, freq:4, FSFS...; triton-1 too)")
    p.add_argument("--render", help="comma-separated result directories: merge them into --out (no GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load-steps", type=int, default=32, help="timed decode steps per batch under load")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs; default: graphs on)")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=131072 + 256)
    p.add_argument("--gpu-util", type=float, default=0.85)
    p.add_argument("--check-lens", type=ints, default=[300, 3000, 9000, 30000])
    # worker-only
    p.add_argument("--worker", action="store_true")
    p.add_argument("--name")
    p.add_argument("--json")
    p.add_argument("--pattern")
    p.add_argument("--plugin", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.render:
        render(a.render.split(","), Path(a.out))
        return 0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if not (a.model / "config.json").is_file():   # in a child: this process must not hold GPU memory the engines need
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
                        f"import bench_vllm_gpu as b; from pathlib import Path; "
                        f"b.build_model(Path({str(a.model)!r}), {a.layers}, {max(a.max_model_len, 4096) + 1024})"],
                       check=True)
    failed = [name for name in a.configs if run_config(a, name) is None]
    render([a.out], Path(a.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

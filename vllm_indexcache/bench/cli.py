"""``vllm-indexcache bench MODEL --contexts 1024,4096 --patterns all-F,1/2,1/4,1/8 --out DIR``.

Runs vLLM (offline ``LLM``) with the INDEXCACHE backend once per pattern, sequentially, in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the engine core and the CPU worker live here and the indexer can be
profiled directly), and measures per context:

* **batch 1**: TTFT = ``first_token_ts - queued_ts`` (engine-core timestamps of ``RequestOutput.metrics``, which
  vLLM fills with ``disable_log_stats=False``), TPOT = ``(last_token_ts - first_token_ts) / (n - 1)``, decode
  tokens/s = ``1 / TPOT``; each repeat uses a fresh random prompt (no prefix-cache hit);
* **batch 8**: 8 requests whose prompts share the first ``context - 16`` tokens (already in the prefix cache from
  a batch-1 repeat) and differ in the last 16, submitted together: TPOT per request and decode tokens/s =
  ``8 / TPOT``. Their TTFT is *not* a prefill measurement (the shared prefix is cached) and is not reported as one;
* **indexer share (profiled)**: ``vllm_indexcache.backend.indexer.run_lightning_indexer`` is wrapped with
  ``time.perf_counter`` accumulators (``VLLM_INDEXCACHE_PROFILE=1``, set by this command), split into prefill steps
  (some request has more than one query token) and decode steps; share of prefill = indexer prefill seconds / TTFT,
  share of decode = indexer decode seconds / (``last_token_ts - first_token_ts``), per batch-1 request;
* **KV capacity** in tokens as vLLM computed it: ``cache_config.num_gpu_blocks × block_size`` after start-up (the
  CPU counterpart of the "GPU KV cache size: N tokens" log line). The plugin allocates no indexer K-cache for S
  layers, so each pattern's number is the reclaimed capacity; "not reclaimed" is the capacity at the all-F indexer
  footprint with the same ``kv_cache_memory_bytes``, i.e. the all-F engine's reported number (also given by the
  formula ``budget / bytes_per_token`` with all layers' indexer keys counted).

Every metric is the median over ``--repeats`` with min and max. Speedups are all-F / pattern (TTFT, TPOT) and
pattern / all-F (tokens/s). The Amdahl bound for a pattern keeping a fraction ``f`` of the indexers, with the all-F
indexer share ``s`` measured at the same context, is ``1 / ((1 - s) + s·f)``.

Outputs in ``--out``: ``bench.json`` (all samples, medians, shares, capacities, bounds, machine, command),
``speedup.png`` (TTFT and TPOT speedup against context, one line per pattern) and ``summary.md`` (tables).

``MODEL`` is a model directory, or ``toy:LAYERS`` to build the benchmark toy model of :func:`build_bench_model` in
``OUT/model`` (random weights, float32, ``max_position_embeddings`` ≥ the longest context).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROFILE_ENV = "VLLM_INDEXCACHE_PROFILE"
BATCH_SHARED_TAIL = 16


# ----------------------------------------------------------------------------------------------------------- patterns
def resolve_pattern(spec: str, num_layers: int) -> str:
    """``all-F`` → every layer F; ``1/k`` → F at layers ``0, k, 2k, ...`` (``ceil(n/k)`` F layers: exactly ``n/k``
    when ``k`` divides ``n``); a literal F/S string or a preset name/path (``configs/``) as is.

    Raises:
        ValueError: an invalid spec or a pattern of the wrong length.
    """
    from vllm_indexcache.patterns import check_chars, load_preset

    if spec.lower() in ("all-f", "allf", "f", "1/1"):
        return "F" * num_layers
    if spec.startswith("1/") and spec[2:].isdigit():
        k = int(spec[2:])
        if k < 1:
            raise ValueError(f"pattern {spec!r}: k must be >= 1")
        return "".join("F" if i % k == 0 else "S" for i in range(num_layers))
    if set(spec) <= {"F", "S"}:
        pattern = check_chars(spec)
    else:
        pattern = load_preset(spec).pattern
    if len(pattern) != num_layers:
        raise ValueError(f"pattern {spec!r} has {len(pattern)} layers, the model has {num_layers}")
    return pattern


# -------------------------------------------------------------------------------------------------------- profiling
class IndexerProfiler:
    """Wall time of ``run_lightning_indexer`` (the F layers' scoring + top-k + K-cache insert), split by step kind."""

    def __init__(self):
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.calls = {"prefill": 0, "decode": 0}
        self._orig = None

    def install(self) -> None:
        import vllm_indexcache.backend.indexer as ix
        from vllm.forward_context import get_forward_context

        orig = self._orig = ix.run_lightning_indexer
        prof = self

        def timed(q, k, weights, k_cache, topk_buffer, topk):
            meta = get_forward_context().attn_metadata
            if not isinstance(meta, dict):
                return orig(q, k, weights, k_cache, topk_buffer, topk)
            m = meta[k_cache.prefix]
            kind = "decode" if m.num_actual_tokens == m.num_reqs else "prefill"
            t0 = time.perf_counter()
            orig(q, k, weights, k_cache, topk_buffer, topk)
            prof.seconds[kind] += time.perf_counter() - t0
            prof.calls[kind] += 1

        ix.run_lightning_indexer = timed

    def uninstall(self) -> None:
        if self._orig is not None:
            import vllm_indexcache.backend.indexer as ix
            ix.run_lightning_indexer = self._orig
            self._orig = None

    def reset(self) -> None:
        for key in self.seconds:
            self.seconds[key] = 0.0
            self.calls[key] = 0


# ------------------------------------------------------------------------------------------------------------- model
def build_bench_model(out_dir: str | Path, num_layers: int, max_context: int, index_topk: int = 128,
                      seed: int = 0) -> Path:
    """The benchmark toy: :func:`vllm_indexcache.toy.build_toy_model` geometry (hidden 128, 4 MLA heads,
    kv_lora_rank 64 + rope 32, indexer 4 heads × 128), ``num_layers`` DSA layers all with a dense MLP
    (``first_k_dense_replace = num_layers``), ``index_topk`` 128, random float32 weights, no tokenizer."""
    from vllm_indexcache.toy import build_toy_model

    out = Path(out_dir)
    if (out / "config.json").is_file():
        cfg = json.loads((out / "config.json").read_text())
        if (cfg["num_hidden_layers"] == num_layers and cfg["max_position_embeddings"] >= max_context
                and cfg["index_topk"] == index_topk):
            return out
    return build_toy_model(out, num_layers=num_layers, first_k_dense_replace=num_layers, seed=seed,
                           tokenizer=False, index_topk=index_topk,
                           max_position_embeddings=max(4096, 1 << (max_context - 1).bit_length()))


# ------------------------------------------------------------------------------------------------------- measurement
def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "samples": values}


def _ttft(out) -> float:
    m = out.metrics
    return m.first_token_ts - m.queued_ts


def _tpot(out) -> float:
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    return (m.last_token_ts - m.first_token_ts) / max(1, n - 1)


def kv_capacity(llm) -> dict:
    cc = llm.llm_engine.vllm_config.cache_config
    return {"num_blocks": int(cc.num_gpu_blocks), "block_size": int(cc.block_size),
            "tokens": int(cc.num_gpu_blocks) * int(cc.block_size)}


def bytes_per_token(hf_config, pattern: str, dtype_bytes: int) -> dict:
    """Per-token KV bytes of the INDEXCACHE backend: MLA latent ``kv_lora_rank + qk_rope_head_dim`` values in every
    layer, plus indexer keys ``index_head_dim`` values in F layers only (reclaimed) or in every layer (not)."""
    latent = (hf_config.kv_lora_rank + hf_config.qk_rope_head_dim) * dtype_bytes * len(pattern)
    per_indexer = hf_config.index_head_dim * dtype_bytes
    return {"latent": latent, "indexer_reclaimed": per_indexer * pattern.count("F"),
            "indexer_not_reclaimed": per_indexer * len(pattern)}


def run_pattern(model: str, pattern: str, contexts: list[int], repeats: list[int], decode_tokens: int, batch: int,
                engine_kwargs: dict, prof: IndexerProfiler, seed: int, extra_overrides: dict | None = None,
                log=print) -> dict:
    """One engine for ``pattern``; all contexts; returns the raw samples and medians."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, attention_backend="indexcache",
              hf_overrides={"index_topk_pattern": pattern, **(extra_overrides or {})},
              disable_log_stats=False, **engine_kwargs)
    res = {"pattern": pattern, "kv_capacity": kv_capacity(llm), "contexts": {}}
    hf = llm.llm_engine.vllm_config.model_config.hf_config
    res["dtype"] = str(llm.llm_engine.vllm_config.model_config.dtype)
    vocab = hf.vocab_size
    rng = random.Random(seed)
    sp = SamplingParams(max_tokens=decode_tokens, min_tokens=decode_tokens, ignore_eos=True, temperature=0.0)
    rand = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    # warm-up: one short request of each kind
    llm.generate([{"prompt_token_ids": rand(64)}], sp, use_tqdm=False)
    llm.generate([{"prompt_token_ids": rand(64)} for _ in range(batch)], sp, use_tqdm=False)
    for ctx, n_rep in zip(contexts, repeats):
        b1 = {"ttft": [], "tpot": [], "share_prefill": [], "share_decode": [], "indexer_prefill_s": [],
              "indexer_decode_s": []}
        bb = {"tpot": [], "share_decode": []}
        for r in range(n_rep):
            prompt = rand(ctx)
            prof.reset()
            out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
            m = out.metrics
            ttft, tpot = _ttft(out), _tpot(out)
            b1["ttft"].append(ttft)
            b1["tpot"].append(tpot)
            b1["indexer_prefill_s"].append(prof.seconds["prefill"])
            b1["indexer_decode_s"].append(prof.seconds["decode"])
            b1["share_prefill"].append(prof.seconds["prefill"] / ttft)
            b1["share_decode"].append(prof.seconds["decode"] / max(1e-12, m.last_token_ts - m.first_token_ts))
            if batch > 1:
                prefix = prompt[: ctx - BATCH_SHARED_TAIL]
                prompts = [{"prompt_token_ids": prefix + rand(BATCH_SHARED_TAIL)} for _ in range(batch)]
                prof.reset()
                outs = llm.generate(prompts, sp, use_tqdm=False)
                tp = statistics.median(_tpot(o) for o in outs)
                span = (max(o.metrics.last_token_ts for o in outs) - max(o.metrics.first_token_ts for o in outs))
                bb["tpot"].append(tp)
                bb["share_decode"].append(prof.seconds["decode"] / max(1e-12, span))
            log(f"  [{pattern}] ctx {ctx} rep {r}: TTFT {ttft:.3f}s TPOT {tpot * 1e3:.1f}ms "
                f"idx-share prefill {b1['share_prefill'][-1]:.2f} decode {b1['share_decode'][-1]:.2f}"
                + (f" | batch {batch} TPOT {bb['tpot'][-1] * 1e3:.1f}ms" if batch > 1 else ""))
        entry = {"batch1": {k: _stats(v) for k, v in b1.items()}}
        entry["batch1"]["decode_tok_s"] = _stats([1.0 / t for t in b1["tpot"]])
        if batch > 1:
            entry[f"batch{batch}"] = {k: _stats(v) for k, v in bb.items()}
            entry[f"batch{batch}"]["decode_tok_s"] = _stats([batch / t for t in bb["tpot"]])
        res["contexts"][str(ctx)] = entry
    res["bytes_per_token"] = bytes_per_token(hf, pattern, llm.llm_engine.vllm_config.model_config.dtype.itemsize)
    del llm
    gc.collect()
    return res


# ---------------------------------------------------------------------------------------------------------- analysis
def amdahl(s: float, f: float) -> float:
    """Speedup bound when a fraction ``s`` of the time shrinks to ``f`` of itself: ``1 / ((1 - s) + s·f)``."""
    return 1.0 / ((1.0 - s) + s * f)


def analyse(results: dict, batch: int) -> dict:
    """Speedups against all-F and Amdahl bounds per pattern and context."""
    base = results["patterns"]["all-F"]
    n = len(base["pattern"])
    out = {}
    for name, res in results["patterns"].items():
        f = res["pattern"].count("F") / n
        rows = {}
        for ctx, e in res["contexts"].items():
            b = base["contexts"][ctx]
            s_p = b["batch1"]["share_prefill"]["median"]
            s_d = b["batch1"]["share_decode"]["median"]
            row = {"kept_fraction": f,
                   "ttft_speedup": b["batch1"]["ttft"]["median"] / e["batch1"]["ttft"]["median"],
                   "tpot_speedup_b1": b["batch1"]["tpot"]["median"] / e["batch1"]["tpot"]["median"],
                   "share_prefill_allF": s_p, "share_decode_allF": s_d,
                   "bound_prefill": amdahl(s_p, f), "bound_decode": amdahl(s_d, f)}
            key = f"batch{batch}"
            if batch > 1 and key in e:
                row[f"tpot_speedup_b{batch}"] = b[key]["tpot"]["median"] / e[key]["tpot"]["median"]
                s_db = b[key]["share_decode"]["median"]
                row[f"share_decode_allF_b{batch}"] = s_db
                row[f"bound_decode_b{batch}"] = amdahl(s_db, f)
            row["ttft_speedup_over_bound"] = row["ttft_speedup"] / row["bound_prefill"]
            rows[ctx] = row
        cap = res["kv_capacity"]["tokens"]
        out[name] = {"kept_fraction": f, "contexts": rows,
                     "kv_tokens_reclaimed": cap, "kv_tokens_not_reclaimed": base["kv_capacity"]["tokens"],
                     "kv_gain": cap / base["kv_capacity"]["tokens"]}
    return out


def machine() -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)"):
                info[key.strip()] = val.strip()
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch
        import vllm
        info.update(torch=torch.__version__, vllm=vllm.__version__, torch_threads=torch.get_num_threads())
    except Exception:  # noqa: BLE001
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def plot(results: dict, analysis: dict, png: Path, batch: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("ttft_speedup", "TTFT (prefill), batch 1"), ("tpot_speedup_b1", "TPOT (decode), batch 1")]
    if batch > 1 and any(f"tpot_speedup_b{batch}" in r for a in analysis.values() for r in a["contexts"].values()):
        keys.append((f"tpot_speedup_b{batch}", f"TPOT (decode), batch {batch}"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    bound_of = {"ttft_speedup": "bound_prefill", "tpot_speedup_b1": "bound_decode",
                f"tpot_speedup_b{batch}": f"bound_decode_b{batch}"}
    for ax, (key, title) in zip(axes[0], keys):
        for name, a in analysis.items():
            ctxs = sorted(a["contexts"], key=int)
            xs = [int(c) for c in ctxs]
            line, = ax.plot(xs, [a["contexts"][c].get(key, float("nan")) for c in ctxs], marker="o",
                            label=f"{name} (f={a['kept_fraction']:.3g})")
            if a["kept_fraction"] < 1:
                # a marker too, so that the bound shows with a single context
                ax.plot(xs, [a["contexts"][c].get(bound_of[key], float("nan")) for c in ctxs], ls="--", lw=0.8,
                        marker="_", ms=12, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("speedup vs all-F")
        ax.set_title(title)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="dashed: Amdahl bound", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def summary_md(results: dict, analysis: dict, batch: int) -> str:
    def ms(st):
        return f"{st['median'] * 1e3:.0f} [{st['min'] * 1e3:.0f}–{st['max'] * 1e3:.0f}]"

    def sec(st):
        return f"{st['median']:.2f} [{st['min']:.2f}–{st['max']:.2f}]"

    def rate(st):
        return f"{st['median']:.1f} [{st['min']:.1f}–{st['max']:.1f}]"

    many = batch > 1          # batch 1 alone: no second set of batch columns (they would repeat the first)
    head = ("| pattern | F/L | context | TTFT s (b1) | TPOT ms (b1) | tok/s (b1) | "
            + (f"TPOT ms (b{batch}) | tok/s (b{batch}) | " if many else "")
            + "indexer share prefill | indexer share decode (b1) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for name, res in results["patterns"].items():
        p = res["pattern"]
        for ctx, e in res["contexts"].items():
            b1, bb = e["batch1"], e.get(f"batch{batch}")
            batch_cols = f"{ms(bb['tpot']) if bb else '–'} | {rate(bb['decode_tok_s']) if bb else '–'} | "
            lines.append(f"| {name} | {p.count('F')}/{len(p)} | {ctx} | {sec(b1['ttft'])} | {ms(b1['tpot'])} | "
                         f"{rate(b1['decode_tok_s'])} | {batch_cols if many else ''}{sec(b1['share_prefill'])} | "
                         f"{sec(b1['share_decode'])} |")
    lines += ["", "Speedup against all-F (median / median) and Amdahl bound `1/((1-s)+s·f)` from the all-F indexer "
              "share s at the same context:", "",
              "| pattern | f | context | TTFT × | bound | TTFT/bound | TPOT × b1 | bound |"
              + (f" TPOT × b{batch} | bound |" if many else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|---|" if many else "")]
    for name, a in analysis.items():
        for ctx, r in sorted(a["contexts"].items(), key=lambda kv: int(kv[0])):
            batch_cols = (f" {r.get(f'tpot_speedup_b{batch}', float('nan')):.2f} | "
                          f"{r.get(f'bound_decode_b{batch}', float('nan')):.2f} |")
            lines.append(f"| {name} | {a['kept_fraction']:.3g} | {ctx} | {r['ttft_speedup']:.2f} | "
                         f"{r['bound_prefill']:.2f} | {r['ttft_speedup_over_bound']:.2f} | "
                         f"{r['tpot_speedup_b1']:.2f} | {r['bound_decode']:.2f} |" + (batch_cols if many else ""))
    lines += ["", "Drift check: prefill split into the profiled indexer time per F layer and the rest (TTFT minus the "
              "indexer), medians of the batch-1 samples. On an idle machine the per-layer indexer time and the rest are "
              "the same for every pattern at one context; differences measure the load drift between engines.", "",
              "| pattern | context | indexer s per F layer | rest of prefill s |", "|---|---|---|---|"]
    for name, res in results["patterns"].items():
        n_f = res["pattern"].count("F")
        for ctx, e in res["contexts"].items():
            b1 = e["batch1"]
            idx = [v / n_f for v in b1["indexer_prefill_s"]["samples"]]
            rest = [t - i for t, i in zip(b1["ttft"]["samples"], b1["indexer_prefill_s"]["samples"])]
            lines.append(f"| {name} | {ctx} | {statistics.median(idx):.2f} | {statistics.median(rest):.2f} |")
    lines += ["", "KV capacity (tokens, vLLM's num_blocks × block_size at the same kv_cache_memory_bytes):", "",
              "| pattern | reclaimed (reported) | not reclaimed (all-F footprint) | gain | bytes/token reclaimed | "
              "bytes/token not reclaimed |", "|---|---|---|---|---|---|"]
    for name, a in analysis.items():
        bpt = results["patterns"][name]["bytes_per_token"]
        lines.append(f"| {name} | {a['kv_tokens_reclaimed']} | {a['kv_tokens_not_reclaimed']} | "
                     f"{a['kv_gain']:.3f} | {bpt['latent'] + bpt['indexer_reclaimed']} | "
                     f"{bpt['latent'] + bpt['indexer_not_reclaimed']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory, or toy:LAYERS to build the benchmark toy in OUT/model")
    parser.add_argument("--contexts", default="1024,4096,16384", help="comma-separated prompt lengths (tokens)")
    parser.add_argument("--patterns", default="all-F,1/2,1/4,1/8",
                        help="comma-separated: all-F, 1/k (F every k-th layer from 0), an F/S string or a preset; "
                             "all-F is added first if missing (the baseline)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--repeats", default="3",
                        help="repeats per context: one number, or a comma list matching --contexts (e.g. 3,3,2)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="generated tokens per request (>= 2)")
    parser.add_argument("--batch", type=int, default=8, help="decode batch size besides 1 (1 = batch 1 only)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096, help="chunked-prefill budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true",
                        help="only redo the analysis, PNG and summary from OUT/bench.json (no engine)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch/OpenMP threads of the in-process worker (0 = vLLM's own CPU binding); on a shared "
                             "machine 1 avoids OpenMP barrier stalls that dominate small ops")


def finish(results: dict, out: Path) -> None:
    """Analysis, criterion, JSON, PNG and summary of a finished run (also ``--replot``)."""
    batch = results["batch"]
    analysis = analyse(results, batch)
    results["analysis"] = analysis
    longest = str(max(results["contexts"]))
    if "1/4" in analysis:
        r = analysis["1/4"]["contexts"][longest]
        results["criterion_1of4"] = {"context": int(longest), "ttft_speedup": r["ttft_speedup"],
                                     "bound": r["bound_prefill"], "ratio": r["ttft_speedup_over_bound"],
                                     "meets_0.9": r["ttft_speedup_over_bound"] >= 0.9}
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, analysis, out / "speedup.png", batch)
    md = summary_md(results, analysis, batch)
    (out / "summary.md").write_text(md)
    print(md)
    if "criterion_1of4" in results:
        print("1/4 at", longest, "tokens:", json.dumps(results["criterion_1of4"]))


def main(args: argparse.Namespace) -> int:
    if args.replot:
        out = Path(args.out)
        finish(json.loads((out / "bench.json").read_text()), out)
        return 0
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # engine core in this process: profilable
    os.environ[PROFILE_ENV] = "1"
    if args.threads > 0:
        import torch

        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"   # keep our thread count, no core pinning
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    specs = [p.strip() for p in args.patterns.split(",") if p.strip()]
    repeats = [int(r) for r in str(args.repeats).split(",")]
    if len(repeats) == 1:
        repeats = repeats * len(contexts)
    if len(repeats) != len(contexts) or min(repeats) < 1:
        raise SystemExit("--repeats: one number >= 1 or one per context")
    if "all-F" not in specs:
        specs.insert(0, "all-F")
    if args.decode_tokens < 2:
        raise SystemExit("--decode-tokens must be >= 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model.startswith("toy:"):
        model = str(build_bench_model(out / "model", int(model[4:]), max(contexts) + args.decode_tokens + 16))
    cfg = json.loads((Path(model) / "config.json").read_text())
    num_layers = cfg["num_hidden_layers"]
    patterns = {s: resolve_pattern(s, num_layers) for s in specs}
    max_len = max(contexts) + args.decode_tokens + BATCH_SHARED_TAIL
    engine_kwargs = dict(dtype=args.dtype, max_model_len=max_len, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                         enforce_eager=True, seed=args.seed, max_num_seqs=max(8, args.batch),
                         max_num_batched_tokens=max(args.max_num_batched_tokens, max(8, args.batch)),
                         skip_tokenizer_init=True, enable_prefix_caching=True)
    results = {"command": "vllm-indexcache bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                                               else sys.argv[1:]),
               "model": model, "config": {k: cfg.get(k) for k in (
                   "num_hidden_layers", "hidden_size", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
                   "index_n_heads", "index_head_dim", "index_topk", "max_position_embeddings", "dtype")},
               "contexts": contexts, "repeats": repeats, "threads": args.threads, "decode_tokens": args.decode_tokens,
               "batch": args.batch, "engine_kwargs": engine_kwargs,
               "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "patterns": {}}
    overrides_extra = {}
    if cfg.get("max_position_embeddings", 0) < max_len:
        overrides_extra["max_position_embeddings"] = max_len
    prof = IndexerProfiler()
    prof.install()
    t_start = time.perf_counter()
    try:
        for name, pattern in patterns.items():
            print(f"== {name}: {pattern}", flush=True)
            res = run_pattern(model, pattern, contexts, repeats, args.decode_tokens, args.batch,
                              engine_kwargs, prof, args.seed, overrides_extra, log=lambda m: print(m, flush=True))
            results["patterns"][name] = res
            (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")   # partial results survive
    finally:
        prof.uninstall()
    results["wall_s"] = time.perf_counter() - t_start
    finish(results, out)
    print(f"wall {results['wall_s']:.0f} s; wrote {out / 'bench.json'}, {out / 'speedup.png'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

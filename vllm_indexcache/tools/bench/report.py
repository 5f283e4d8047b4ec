"""Report for ``vllm-indexcache bench``: speedups against all-F, the Amdahl bound, the plot and the Markdown
summary of a measured run (:func:`finish` also serves ``--replot``)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path


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
              "indexer), medians of the batch-1 samples. On an idle machine the per-layer indexer time and the rest "
              "are the same for every pattern at one context; differences measure the load drift between engines.", "",
              "| pattern | context | indexer s per F layer | rest of prefill s |", "|---|---|---|---|"]
    for name, res in results["patterns"].items():
        n_f = res["pattern"].count("F")
        for ctx, e in res["contexts"].items():
            b1 = e["batch1"]
            idx = [v / n_f for v in b1["indexer_prefill_s"]["samples"]]
            rest = [t - i for t, i in zip(b1["ttft"]["samples"], b1["indexer_prefill_s"]["samples"])]
            lines.append(f"| {name} | {ctx} | {statistics.median(idx):.2f} | {statistics.median(rest):.2f} |")
    if any("kv_bytes" in res for res in results["patterns"].values()):
        return "\n".join(lines + [""] + kv_bytes_md(results, analysis)) + "\n"
    lines += ["", "KV capacity (tokens, vLLM's num_blocks × block_size at the same kv_cache_memory_bytes):", "",
              "| pattern | reclaimed (reported) | not reclaimed (all-F footprint) | gain | bytes/token reclaimed | "
              "bytes/token not reclaimed |", "|---|---|---|---|---|---|"]
    for name, a in analysis.items():
        bpt = results["patterns"][name]["bytes_per_token"]
        lines.append(f"| {name} | {a['kv_tokens_reclaimed']} | {a['kv_tokens_not_reclaimed']} | "
                     f"{a['kv_gain']:.3f} | {bpt['latent'] + bpt['indexer_reclaimed']} | "
                     f"{bpt['latent'] + bpt['indexer_not_reclaimed']} |")
    return "\n".join(lines) + "\n"


def kv_bytes_md(results: dict, analysis: dict) -> list[str]:
    """DeepSeek-V4's memory table: content bytes of the allocated caches per context token (compressed CSA/HCA KV
    and indexer K-cache) and per request (sliding-window KV and compressor states), all-F vs each pattern, with
    vLLM's KV capacity in tokens at the same ``kv_cache_memory_bytes``
    (:func:`vllm_indexcache.vllm_glue.cpu.deepseek_v4.observe.kv_bytes_per_token`)."""
    base = results["patterns"]["all-F"]
    budget = results.get("engine_kwargs", {}).get("kv_cache_memory_bytes")
    key_format = results.get("engine_kwargs", {}).get("kv_cache_dtype", "fp8")   # runs before the key: fp8
    stored = ("FP8 as vLLM stores them" if key_format == "fp8" else
              f"rows in the model dtype, kv_cache_dtype={key_format}")
    lines = ["KV cache (DeepSeek-V4): content bytes per context token (compressed KV of CSA/HCA layers + indexer "
             f"K-cache, {stored}) and per request (sliding-window KV and compressor states, fixed "
             "size); vLLM's capacity at the same kv_cache_memory_bytes (its 'KV cache size: N tokens', group-aware; "
             "runs before it was recorded: num_blocks × block_size) and the budget per token of that capacity:", "",
             "| pattern | F/CSA | B/token | of which indexer K | vs all-F | B/request (fixed) | of which indexer "
             "state | vLLM capacity tokens | capacity vs all-F | budget B/token |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def capacity(res):
        return res["kv_capacity"].get("size_tokens", res["kv_capacity"]["tokens"])

    for name in analysis:
        res = results["patterns"][name]
        kb, p, cap = res["kv_bytes"], res["pattern"], capacity(res)
        per = f"{budget / cap:.0f}" if budget else "–"
        lines.append(f"| {name} | {p.count('F')}/{len(p)} | {kb['per_token']:.2f} | {kb['indexer_per_token']:.2f} | "
                     f"{kb['per_token'] / base['kv_bytes']['per_token']:.3f} | {kb['per_request']:.0f} | "
                     f"{kb['indexer_state_per_request']:.0f} | {cap} | {cap / capacity(base):.3f} | {per} |")
    return lines


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



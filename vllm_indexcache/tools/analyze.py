"""``vllm-indexcache analyze MODEL --data FILE --out DIR``: why layers can share top-k, and what the indexer costs.

1. **Cross-layer top-k overlap** (IndexCache paper §2): for DSA layers ``i, j`` and query token ``t``,
   ``|T_i(t) ∩ T_j(t)| / k`` where ``T_l(t)`` is the set of key positions layer ``l``'s own lightning indexer
   selects for ``t`` (every layer F: each layer runs its own indexer) and ``k = index_topk``. Averaged over the
   query tokens that see *more* than ``k`` keys (position ``t ≥ k``): for earlier tokens every visible key is
   selected by every layer and the overlap says nothing. The matrix is symmetric with 1 on the diagonal.
   Written as ``overlap.json`` (matrix, adjacent-layer overlaps, identities) and ``overlap.png`` (heatmap).
   DeepSeek-V4: the layers are its CSA layers (ordinals, ``layers`` names their decoder ids), ``T_l(t)`` a set of
   compressed-entry ids (entry ``e`` covers tokens ``4e..4e+3``), and the query tokens averaged over are those with
   more than ``k`` complete entries, ``(t + 1) // 4 > k`` (transformers' ``causal_threshold``,
   ``modeling_deepseek_v4.py`` ``DeepseekV4Indexer.forward``).
2. **Indexer share of prefill time**, per layer: wall time of the layer's indexer forward divided by the wall time
   of the whole decoder layer, measured with forward hooks on the transformers reference
   (:mod:`vllm_indexcache.tools.reference`, ``ties="lower"``: the indexer scores with
   :func:`vllm_indexcache.ops.indexer.cpu.indexer_topk`) on the calibration sequences, median over ``--repeats``
   runs after one warm-up. A proxy on this device and implementation (eager attention, no fused kernels), not a
   vLLM serving measurement. Written to ``overlap.json`` under ``"timing"`` and as ``indexer_time.png``.
   DeepSeek-V4: the reference keeps transformers' own top-k, and a CSA layer's indexer time includes its own
   compressor (``self_attn.compressor.indexer``); ``vllm-indexcache bench`` measures the share inside vLLM.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def overlap_matrix(topks: list[dict[int, torch.Tensor]], index_topk: int, visible=None) -> tuple[torch.Tensor, int]:
    """Mean pairwise top-k overlap over sparse query tokens.

    Args:
        topks: per sequence, ``{layer: [S, index_topk] int}`` as :func:`vllm_indexcache.tools.reference.record_topk`
            returns (key positions or, DeepSeek-V4, compressed-entry ids; ``-1`` = none).
        index_topk: ``k``.
        visible: ``S → [S] long``, the keys (entries) query ``t`` can select; default ``t + 1`` (DeepSeek-V3.2,
            GLM-5), DeepSeek-V4 :func:`v4_visible_entries`. Only queries with more than ``k`` are averaged.

    Returns:
        ``(O [L, L] float64, number of query tokens averaged over)``; ``O[i, j]`` is the mean over query tokens
        with more than ``k`` visible keys (``t ≥ k`` by default) of ``|T_i(t) ∩ T_j(t)| / k``.

    Raises:
        ValueError: no sequence is longer than ``index_topk`` (no query token has a sparse selection).
    """
    layers = sorted(topks[0])
    L = len(layers)
    inter = torch.zeros(L, L, dtype=torch.float64)
    queries = 0
    for rec in topks:
        S = rec[layers[0]].shape[0]
        seen = torch.arange(1, S + 1) if visible is None else visible(S)
        rows = torch.nonzero(seen > index_topk)[:, 0]
        n = int(rows.numel())
        if n == 0:
            continue
        masks = torch.zeros(L, n, S, dtype=torch.bool)
        for a, layer in enumerate(layers):
            idx = rec[layer][rows].long()
            if (idx < 0).any():
                raise ValueError(f"layer {layer}: query rows with more than index_topk visible keys have unselected "
                             "(-1) entries")
            masks[a].scatter_(1, idx, True)
        for a in range(L):
            inter[a] += (masks[a][None] & masks).sum(dim=(1, 2)).double()
        queries += n
    if queries == 0:
        raise ValueError(f"no calibration sequence is longer than index_topk={index_topk}: every layer selects "
                         "every key; use longer sequences (--seq-len)")
    return inter / (queries * index_topk), queries


def v4_visible_entries(S: int) -> torch.Tensor:
    """DeepSeek-V4: the complete compressed entries (4 tokens each) query ``t`` can select, ``(t + 1) // 4``, for
    ``t < S`` (``[S]`` long; transformers ``DeepseekV4Indexer.forward``'s ``causal_threshold``)."""
    from vllm_indexcache.families.deepseek_v4 import CSA_RATIO

    return (torch.arange(S) + 1) // CSA_RATIO


def _is_v4(model) -> bool:
    return type(model).__name__ == "DeepseekV4ForCausalLM"


def indexer_time_share(model, seqs: list[list[int]], repeats: int = 3, progress: bool = False) -> dict:
    """Per-layer indexer and decoder-layer wall time (ms, median over ``repeats``, all sequences summed) and share.

    Runs the model all-F (every layer runs its indexer).
    """
    from vllm_indexcache.families import family_for
    from vllm_indexcache.tools.reference import _indexer, set_pattern

    # the decoder layers that own an indexer, in pattern order
    arch = type(model).__name__
    layers = [model.model.layers[i] for i in family_for(arch).indexer_layers(model.config)]
    set_pattern(model, "F" * len(layers))
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    acc = {"layer": [0.0] * len(layers), "indexer": [0.0] * len(layers)}
    starts: dict = {}
    handles = []
    for i, layer in enumerate(layers):
        for kind, module in (("layer", layer), ("indexer", _indexer(layer, arch))):
            def pre(mod, args, kind=kind, i=i):
                sync()
                starts[(kind, i)] = time.perf_counter()

            def post(mod, args, out, kind=kind, i=i):
                sync()
                acc[kind][i] += time.perf_counter() - starts.pop((kind, i))

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    runs = []
    total = []
    try:
        with torch.no_grad():
            from tqdm import tqdm

            for r in tqdm(range(repeats + 1), desc="indexer timing", unit="run", disable=not progress):
                for k in acc:
                    acc[k] = [0.0] * len(layers)
                t0 = time.perf_counter()
                for s in seqs:
                    model(input_ids=torch.tensor([s], device=dev), use_cache=False)
                sync()
                if r > 0:           # run 0 is a warm-up
                    runs.append({k: list(v) for k, v in acc.items()})
                    total.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    med = {k: [statistics.median(run[k][i] for run in runs) * 1e3 for i in range(len(layers))] for k in acc}
    return {"layer_ms": med["layer"], "indexer_ms": med["indexer"],
            "share": [ix / ly if ly > 0 else None for ix, ly in zip(med["indexer"], med["layer"])],
            "model_forward_ms": statistics.median(total) * 1e3,
            "indexer_share_of_forward": sum(med["indexer"]) / (statistics.median(total) * 1e3),
            "repeats": repeats, "device": str(dev), "tokens": sum(len(s) for s in seqs),
            "sequence_tokens": [len(s) for s in seqs],
            "implementation": "transformers reference, eager attention, vllm_indexcache.ops.indexer.cpu top-k"}


def plot_overlap(O: torch.Tensor, png, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = O.shape[0]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(O.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(im, ax=ax, label="|T_i ∩ T_j| / k")
    if L <= 24:
        for i in range(L):
            for j in range(L):
                ax.text(j, i, f"{O[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if O[i, j] < 0.6 else "black")
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def timing_title(timing: dict) -> str:
    """Title of ``indexer_time.png``: the sequences' lengths (each is its own prefill forward) and their sum, e.g.
    ``prefill of 2 sequences × 2048 tokens (4096 tokens in all) on cpu; indexers = 12.3 % of the forward``."""
    lengths = timing.get("sequence_tokens")
    if not lengths:
        what = f"{timing['tokens']} tokens in all"
    elif len(set(lengths)) == 1:
        what = (f"{len(lengths)} sequence{'s' if len(lengths) > 1 else ''} × {lengths[0]} tokens "
                f"({timing['tokens']} tokens in all)")
    else:
        what = f"{len(lengths)} sequences of {min(lengths)}–{max(lengths)} tokens ({timing['tokens']} tokens in all)"
    return (f"prefill of {what} on {timing['device']}; indexers = "
            f"{100 * timing['indexer_share_of_forward']:.1f} % of the forward")


def plot_timing(timing: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = [s or 0.0 for s in timing["share"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(share)), [100 * s for s in share])
    ax.set_xlabel("layer")
    ax.set_ylabel("indexer share of layer time (%)")
    ax.set_title(timing_title(timing), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def analyze(model_dir, data, out_dir, *, seq_len: int = 2048, num_seqs: int = 4, start: int = 0,
            device: str = "cpu", dtype: str = "float32", repeats: int = 3, timing: bool = True,
            model=None, progress: bool = True) -> dict:
    """Run both analyses and write ``out_dir/overlap.json``, ``overlap.png`` (and ``indexer_time.png``); a tqdm bar
    counts the windows (``progress=False``: none)."""
    from vllm_indexcache.tools.reference import load_reference, record_topk, set_pattern
    from vllm_indexcache.tools.search.state import calibration_identity, load_calibration, model_identity

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seqs = load_calibration(data, model_dir, seq_len=seq_len, num_seqs=num_seqs, start=start)
    if model is None:
        from vllm_indexcache.tools.reference import model_class

        # DeepSeek-V4's reference has transformers' tie rule only
        ties = "transformers" if model_class(model_dir).__name__ == "DeepseekV4ForCausalLM" else "lower"
        model = load_reference(str(model_dir), dtype=getattr(torch, dtype), ties=ties).to(device)
    from vllm_indexcache.families import family_for

    layer_ids = family_for(type(model).__name__).indexer_layers(model.config)
    L = len(layer_ids)
    k = int(model.config.index_topk)
    set_pattern(model, "F" * L)
    from tqdm import tqdm

    v4 = _is_v4(model)
    O, queries = overlap_matrix([record_topk(model, s) for s in tqdm(seqs, desc="overlap", unit="window",
                                                                     disable=not progress)], k,
                                visible=v4_visible_entries if v4 else None)
    res = {"model": model_identity(model_dir), "calibration": calibration_identity(seqs, data), "num_layers": L,
           "layers": list(layer_ids), "index_topk": k, "queries": queries, "overlap": O.tolist(),
           "adjacent": [float(O[i, i + 1]) for i in range(L - 1)],
           "definition": ("mean over query tokens t with (t + 1) // 4 > index_topk of |T_i(t) & T_j(t)| / index_topk "
                          "over compressed-entry ids of CSA layers i, j (ordinals; decoder ids in 'layers'), all F"
                          if v4 else
                          "mean over query tokens t >= index_topk of |T_i(t) & T_j(t)| / index_topk, all layers F")}
    if timing:
        res["timing"] = indexer_time_share(model, seqs, repeats, progress=progress)
        plot_timing(res["timing"], out / "indexer_time.png")
    (out / "overlap.json").write_text(json.dumps(res, indent=1) + "\n")
    plot_overlap(O, out / "overlap.png", f"top-k overlap, {Path(str(model_dir)).name}, k={k}, {queries} queries")
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local DSA model directory")
    parser.add_argument("--data", required=True,
                        help="calibration data (formats of `search --data`: a corpus directory means its train.u16)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-seqs", type=int, default=4)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (after one warm-up)")
    parser.add_argument("--no-timing", action="store_true")


def main(args: argparse.Namespace) -> int:
    from vllm_indexcache.tools.search.state import StateError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        res = analyze(args.model, args.data, args.out, seq_len=args.seq_len, num_seqs=args.num_seqs,
                      start=args.start, device=device, dtype=args.dtype, repeats=args.repeats,
                      timing=not args.no_timing)
    except (StateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"adjacent_overlap": [round(x, 3) for x in res["adjacent"]], "queries": res["queries"],
               "out": str(args.out)}
    if "timing" in res:
        summary["indexer_share_per_layer"] = [round(s, 3) for s in res["timing"]["share"]]
        summary["indexer_share_of_forward"] = round(res["timing"]["indexer_share_of_forward"], 3)
    print(json.dumps(summary, indent=1))
    return 0

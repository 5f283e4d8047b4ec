"""``vllm-indexcache eval MODEL --data DIR [--pattern SPEC] [--dense]``: held-out LM loss and retrieval accuracy.

* LM loss: mean next-token cross-entropy (nats/token) on disjoint windows of ``context`` tokens of the held-out
  split (``heldout.u16``), at each context length (default 1024/2048/4096); at most ``max_tokens`` per context.
* Retrieval: documents of :mod:`vllm_indexcache.tools.data.retrieval` built on held-out text (``needles`` needles, the
  asked one at each ``depth``, ``examples`` documents per cell); a document counts as correct when the model's
  argmax reproduces all six answer digits given the question (teacher-forced = greedy decoding of the answer).

The model runs through :mod:`vllm_indexcache.tools.reference` (transformers, eager attention): with ``pattern``, S
layers
reuse the preceding F layer's top-k (IndexCache). ``dense=True`` sets every indexer's top-k above the context, so
attention is exactly dense (the dense-stage model's setting). :func:`evaluate` is importable by the pattern search
and distillation code; it runs on CPU too (slowly: lower ``max_tokens`` / ``examples``).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_CONTEXTS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def load_model(model_dir: str | Path, pattern: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load ``model_dir`` for evaluation (``reference.load_reference`` when available, else plain transformers)."""
    try:
        from ..reference import load_reference
    except ImportError:  # pragma: no cover - reference module missing
        load_reference = None
    if load_reference is not None:
        model = load_reference(str(model_dir), pattern=pattern, dtype=dtype)
    else:
        if pattern is not None and set(pattern) != {"F"}:
            raise RuntimeError("patterns need vllm_indexcache.tools.reference")
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager").eval()
    return model.to(device)


def set_dense(model, dense: bool) -> None:
    """Make every indexer select all keys (``dense=True``) or restore ``config.index_topk``."""
    for layer in model.model.layers[: model.config.num_hidden_layers]:
        idx = getattr(layer.self_attn, "indexer", None)
        if idx is not None:
            idx.index_topk = 1 << 30 if dense else model.config.index_topk


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def lm_loss(model, tokens: np.ndarray, context: int, max_tokens: int = 131072, batch_size: int = 8,
            progress: bool = False) -> dict:
    """Mean next-token loss over disjoint ``context + 1``-token windows of ``tokens`` (at most ``max_tokens``)."""
    dev = next(model.parameters()).device
    n = min(len(tokens) // (context + 1), max(1, max_tokens // context))
    if n == 0:
        return {"loss": None, "ppl": None, "windows": 0, "tokens": 0}
    windows = np.stack([tokens[i * (context + 1):(i + 1) * (context + 1)] for i in range(n)]).astype(np.int64)
    total, count = 0.0, 0
    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"LM loss @{context}", unit="window", disable=not progress, leave=False)
    for s in range(0, n, batch_size):
        bar.update(min(batch_size, n - s))
        x = torch.from_numpy(windows[s:s + batch_size]).to(dev)
        logits = _logits(model, x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    return {"loss": total / count, "ppl": math.exp(total / count), "windows": n, "tokens": count}


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, haystack: np.ndarray, context: int, depths=DEFAULT_DEPTHS,
                       examples: int = 20, needles: int = 4, seed: int = 0, batch_size: int = 8,
                       progress: bool = False) -> dict:
    """Accuracy per needle depth at one context length (see module docstring)."""
    from ..data.retrieval import RetrievalBuilder

    dev = next(model.parameters()).device
    builder = RetrievalBuilder(tokenizer)
    out = {}
    from tqdm import tqdm

    bar = tqdm(total=examples * len(depths), desc=f"retrieval @{context}", unit="doc", disable=not progress,
               leave=False)
    for d in depths:
        rng = np.random.default_rng([seed, context, int(round(d * 1000))])
        docs = [builder.make_document(rng, haystack, context, needles, 1, target_depth=d) for _ in range(examples)]
        correct = 0
        for s in range(0, examples, batch_size):
            chunk = docs[s:s + batch_size]
            bar.update(len(chunk))
            x = torch.from_numpy(np.stack([c.ids for c in chunk])).to(dev)
            pred = _logits(model, x).argmax(-1)
            for b, c in enumerate(chunk):
                pos = torch.as_tensor(c.answer_pos[0], device=dev)
                correct += bool((pred[b, pos - 1] == x[b, pos]).all())
        out[f"{d:g}"] = correct / examples
    out["mean"] = float(np.mean([out[f"{d:g}"] for d in depths]))
    return out


def evaluate(model_dir: str | Path, data_dir: str | Path, *, pattern: str | None = None, dense: bool = False,
             contexts=DEFAULT_CONTEXTS, depths=DEFAULT_DEPTHS, max_tokens: int = 131072, examples: int = 20,
             needles: int = 4, batch_size: int = 8, device: str | None = None, dtype: str = "float32",
             model=None, seed: int = 0, retrieval: bool = True, progress: bool = False) -> dict:
    """Evaluate a DSA model directory; returns ``{"lm": {ctx: {...}}, "retrieval": {ctx: {depth: acc}}, ...}``.

    ``model`` may be passed pre-loaded (e.g. by the pattern search, which switches patterns in place);
    ``progress`` shows tqdm bars over windows and documents (the ``eval`` command does).
    """
    from tokenizers import Tokenizer

    from ..data.corpus import load_tokens

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    if model is None:
        model = load_model(model_dir, pattern, getattr(torch, dtype), device)
    elif pattern is not None:
        from ..reference import set_pattern
        set_pattern(model, pattern)
    set_dense(model, dense)
    data_dir = Path(data_dir)
    held = load_tokens(data_dir, "heldout")
    tok = Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json"))
    res: dict = {"model": str(model_dir), "pattern": pattern, "dense": dense, "dtype": dtype, "device": str(device),
                 "index_topk": model.config.index_topk, "lm": {}, "retrieval": {}}
    for c in contexts:
        res["lm"][str(c)] = lm_loss(model, held, c, max_tokens, batch_size, progress)
        if retrieval:
            res["retrieval"][str(c)] = retrieval_accuracy(model, tok, held, c, depths, examples, needles, seed,
                                                          batch_size, progress)
    set_dense(model, False)
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (e.g. examples/models/tiny-dsa)")
    parser.add_argument("--data", required=True, help="data directory from scripts/prepare_tiny_dsa_data.py")
    parser.add_argument("--pattern", metavar="SPEC", help="IndexCache pattern spec (vllm_indexcache.pattern: FSFS..., "
                        "all-F, freq:K[:O], every:K, preset:NAME), resolved for the model's indexer layers; "
                        "default all F")
    parser.add_argument("--dense", action="store_true", help="dense attention (indexer selects every key)")
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
    parser.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS))
    parser.add_argument("--max-tokens", type=int, default=131072, help="held-out tokens per context for LM loss")
    parser.add_argument("--examples", type=int, default=20, help="retrieval documents per (context, depth)")
    parser.add_argument("--needles", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-retrieval", action="store_true")
    parser.add_argument("--out", help="write the result JSON here too")


def main(args: argparse.Namespace) -> int:
    pattern = None
    if args.pattern is not None:
        from vllm_indexcache.pattern import describe_spec, resolve_for_model

        pattern = resolve_for_model(args.pattern, json.loads((Path(args.model) / "config.json").read_text()),
                                    key="--pattern")
        print(describe_spec(args.pattern, pattern), flush=True)
    res = evaluate(args.model, args.data, pattern=pattern, dense=args.dense,
                   contexts=[int(c) for c in args.contexts.split(",")],
                   depths=[float(d) for d in args.depths.split(",")], max_tokens=args.max_tokens,
                   examples=args.examples, needles=args.needles, batch_size=args.batch_size, device=args.device,
                   dtype=args.dtype, retrieval=not args.no_retrieval, progress=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0

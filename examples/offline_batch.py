"""Offline batch generation with vLLM + IndexCache: JSONL prompts in, JSONL completions out.

Input lines: {"prompt": "..."} or {"messages": [...]} (chat), optional "max_tokens". Output lines: the input plus
"completion", "prompt_tokens", "completion_tokens".

    python examples/offline_batch.py prompts.jsonl out.jsonl [--model DIR] [--pattern FFSF… | --freq 4 |
        --preset NAME] [--max-tokens 128] [--temperature 0]

Without a pattern option the model's own IndexCache pattern (its config.json) is served.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "tiny-dsa"


def indexcache_overrides(args: argparse.Namespace) -> dict:
    """``--hf-overrides`` for the chosen pattern option (validated by the plugin when the engine starts)."""
    if args.pattern:
        return {"index_topk_pattern": args.pattern}
    if args.preset:
        return {"index_cache_preset": args.preset}
    if args.freq:
        return {"index_topk_freq": args.freq, "index_skip_topk_offset": args.offset}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help='JSONL, one {"prompt": ...} or {"messages": [...]} per line')
    parser.add_argument("output", type=Path, help="JSONL: each input line plus completion and token counts")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pattern", help="explicit F/S pattern, one letter per DSA layer")
    group.add_argument("--preset", help="preset name in configs/ or a path to a preset JSON")
    group.add_argument("--freq", type=int, help="keep one indexer every FREQ layers")
    parser.add_argument("--offset", type=int, default=2, help="index_skip_topk_offset for --freq")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the model's own (the shipped model: 2048, its trained context)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    rows = [json.loads(line) for line in args.input.read_text().splitlines() if line.strip()]
    llm = LLM(model=args.model, attention_backend="indexcache", hf_overrides=indexcache_overrides(args) or None,
              max_model_len=args.max_model_len, kv_cache_memory_bytes=1 << 30)
    tokenizer = llm.get_tokenizer()
    prompts, params = [], []
    for row in rows:
        text = row.get("prompt")
        if text is None:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        prompts.append(text)
        params.append(SamplingParams(temperature=args.temperature,
                                     max_tokens=int(row.get("max_tokens", args.max_tokens))))
    outputs = llm.generate(prompts, params, use_tqdm=True)  # vLLM's tqdm progress bar
    with args.output.open("w") as fh:
        for row, out in zip(rows, outputs):
            fh.write(json.dumps({**row, "completion": out.outputs[0].text,
                                 "prompt_tokens": len(out.prompt_token_ids),
                                 "completion_tokens": len(out.outputs[0].token_ids)}) + "\n")
    print(f"wrote {len(outputs)} completions to {args.output}")


if __name__ == "__main__":
    main()

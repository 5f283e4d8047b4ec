"""``vllm-indexcache reliability --out DIR``: bounded load, KV-pressure, bad-input and search-fault checks.

Everything runs on loopback (``127.0.0.1``) against servers this command starts with ``vllm-indexcache serve`` and
stops again; nothing is downloaded. Phases (``--phases``, default all, in this order):

``load``
    Server A (large KV cache, IndexCache pattern ``--pattern``, prefix caching off so that no request reuses
    another's KV blocks). ``--requests`` streaming completions of mixed prompt lengths (``--min-prompt`` tokens up
    to ``max_model_len - max_tokens``, geometric spacing, random token ids, greedy, ``ignore_eos``) are sent all at
    once with the ``openai`` async client, together with ``--disconnects`` extra streaming clients that close their
    stream after a few tokens. Then the same ``--requests`` are sent again one at a time. Checks: every request
    completes with ``max_tokens`` tokens, no 5xx (no retries: ``max_retries=0``), the concurrent token ids equal the
    sequential ones request by request, and vLLM counts the disconnected requests as aborted.
``badinput``
    On server A: prompts beyond ``max_model_len`` (completion, streaming completion, chat) must get HTTP 400; a prompt
    that fits but whose ``max_tokens`` runs past the limit gets vLLM's usual clamp (200, ``length``); after them the
    server still answers and a reference request still gives its reference tokens. Then invalid IndexCache settings
    (``--hf-overrides`` pattern/freq, presets) must make ``vllm-indexcache serve`` exit non-zero before any engine
    starts, with one ``ERROR: key=value`` line; and a model without a lightning indexer (a tiny random
    ``LlamaForCausalLM`` written here) served with ``--attention-backend indexcache`` must serve with vLLM's default CPU
    backend and log exactly one warning.
``pressure``
    Server B, identical but with a KV cache of about ``max_model_len + --small-kv-extra-tokens`` tokens: the same
    requests at once must force preemptions (``vllm:num_preemptions_total`` on ``/metrics``) and still give the
    sequential tokens of server A.
``search``
    ``vllm-indexcache search`` on a 5-layer toy model: a run SIGKILLed after its first committed step and resumed
    ends with the same trajectory and pattern as an uninterrupted run; a corrupt state file and the state of another
    model or of other calibration data are refused (exit 2, one ``error:`` line) and left byte-for-byte unchanged.

Writes ``DIR/reliability.json`` (figures and pass/fail of every check) and the server logs under ``DIR/logs``;
exits 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vllm_indexcache.tools.testing.checks import (
    bad_requests,
    bad_settings,
    build_non_dsa_model,
    make_prompts,
    non_dsa_model,
    phase_load,
    phase_pressure,
    phase_search,
    vocab_range,
)
from vllm_indexcache.tools.testing.server import Server, server_args

PHASES = ("load", "badinput", "pressure", "search")


def default_pattern(model: str) -> str:
    """The model's own IndexCache pattern (its config.json, resolved as the plugin resolves it) when it sets one,
    else every 4th indexer layer F from layer 0 (spec ``every:4``)."""
    from vllm_indexcache.config import KEYS, resolve_hf_config
    from vllm_indexcache.families import family_for
    from vllm_indexcache.pattern import resolve_spec

    config = json.loads((Path(model) / "config.json").read_text())
    if any(config.get(k) is not None for k in KEYS):
        return resolve_hf_config(config)
    return resolve_spec("every:4", family_for(config).num_indexer_layers(config))


def pattern_of(model: str, spec: str | None) -> str:
    """``--pattern SPEC`` (:mod:`vllm_indexcache.pattern`) for ``model``, printed in full; None:
    :func:`default_pattern`."""
    from vllm_indexcache.pattern import describe_spec, resolve_for_model

    if spec is None:
        return default_pattern(model)
    pattern = resolve_for_model(spec, json.loads((Path(model) / "config.json").read_text()), key="--pattern")
    print(describe_spec(spec, pattern), flush=True)
    return pattern


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_indexcache.commands.serve import default_model

    parser.add_argument("--out", required=True, help="output directory (reliability.json, logs/)")
    parser.add_argument("--model", default=None, help="DSA model directory (default: the shipped tiny-dsa)")
    parser.add_argument("--pattern", default=None, metavar="SPEC",
                        help="pattern spec (F/S string, all-F, freq:K[:OFFSET], every:K = 1/K, preset:NAME; default: "
                             "the model's own pattern, else every:4)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--requests", type=int, default=64, help="concurrent requests that must complete")
    parser.add_argument("--disconnects", type=int, default=8, help="extra clients that disconnect mid-stream")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens generated per request")
    parser.add_argument("--min-prompt", type=int, default=4, help="shortest prompt (tokens)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20, help="server A's KV cache")
    parser.add_argument("--small-kv-extra-tokens", type=int, default=512,
                        help="server B's KV cache holds about max_model_len + this many tokens")
    parser.add_argument("--request-timeout", type=float, default=1200.0, help="seconds, per request")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds, per server start")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(default_model=default_model)


# ------------------------------------------------------------------------------------------------------ servers
def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model or args.default_model()).resolve())
    pattern = pattern_of(model, args.pattern)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        print(f"error: unknown phase(s) {sorted(unknown)}; choose from {', '.join(PHASES)}", file=sys.stderr)
        return 2
    mt, mml = args.max_tokens, args.max_model_len
    vocab = vocab_range(model)
    prompts = make_prompts(args.requests, args.min_prompt, mml - mt, vocab, args.seed)
    disc_prompts = make_prompts(args.disconnects, args.min_prompt, mml - mt, vocab, args.seed + 1)
    disc_after = [1 + (i * 3) % 8 for i in range(args.disconnects)]
    report = {"argv": sys.argv,
              "model": model, "pattern": pattern, "dtype": args.dtype, "max_model_len": mml, "phases": phases,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = out / "reliability.json"

    def save():
        path.write_text(json.dumps(report, indent=1) + "\n")

    t_all = time.time()
    reference = None
    try:
        if "load" in phases or "badinput" in phases or "pressure" in phases:
            with Server(model, out / "logs" / "server-large-kv.log",
                        server_args(pattern, mml, args.kv_cache_memory_bytes, args.dtype),
                        args.startup_timeout) as srv:
                report["server_large_kv"] = {"kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                                             "kv_cache_tokens": srv.kv_cache_tokens(), "startup_s": srv.startup_s}
                bytes_per_token = args.kv_cache_memory_bytes / srv.kv_cache_tokens()
                t0 = time.time()
                # disconnecting clients ask for all the context left, so vLLM normally sees them close mid-generation
                load, reference = phase_load(srv, prompts, disc_prompts, disc_after, mt, args.request_timeout,
                                             [mml - len(p) for p in disc_prompts])
                load["seconds"] = round(time.time() - t0, 1)
                report["load"] = load
                save()
                if "badinput" in phases:
                    i = min(range(len(prompts)), key=lambda j: len(prompts[j]))
                    report["bad_requests"] = bad_requests(srv, mml, vocab, prompts[i], reference[i]["tokens"], mt)
                    save()
            if "badinput" in phases:
                report["bad_settings"] = bad_settings(model, mml, args.dtype, args.startup_timeout)
                save()
                nd = build_non_dsa_model(out / "models" / "llama-no-indexer", model)
                report["non_dsa_model"] = non_dsa_model(nd, out / "logs" / "server-non-dsa.log", args.startup_timeout)
                save()
            if "pressure" in phases:
                small = int(bytes_per_token * (mml + args.small_kv_extra_tokens)) + 1
                with Server(model, out / "logs" / "server-small-kv.log", server_args(pattern, mml, small, args.dtype),
                            args.startup_timeout) as srv:
                    t0 = time.time()
                    pressure = phase_pressure(srv, prompts, reference, mt, args.request_timeout)
                    pressure["kv_cache_memory_bytes"] = small
                    pressure["seconds"] = round(time.time() - t0, 1)
                    report["pressure"] = pressure
                save()
        if "search" in phases:
            t0 = time.time()
            report["search_faults"] = phase_search(out / "search", args.startup_timeout)
            report["search_faults"]["seconds"] = round(time.time() - t0, 1)
    except Exception as e:  # report what ran, then fail
        report["fatal_error"] = repr(e)[:2000]
    report["total_seconds"] = round(time.time() - t_all, 1)
    checks = {f"{section}.{name}": ok for section, body in report.items() if isinstance(body, dict)
              for name, ok in (body.get("checks") or {}).items()}
    report["checks"] = checks
    report["all_passed"] = bool(checks) and all(checks.values()) and "fatal_error" not in report
    save()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if "fatal_error" in report:
        print(f"FAIL  {report['fatal_error'][:500]}")
    print(f"{'all passed' if report['all_passed'] else 'FAILED'}; figures in {path}")
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m vllm_indexcache.tools.reliability")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

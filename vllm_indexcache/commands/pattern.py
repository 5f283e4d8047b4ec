"""``vllm-indexcache pattern MODEL [--freq N [--offset N] | --pattern SPEC | --preset NAME]``.

Resolves and validates the IndexCache pattern of a local model (its ``config.json``, read with plain ``json``: no
vLLM or torch import) and prints the summary line and the F layer ids. Without options the model's own keys are
used; any option *replaces* all of the model's IndexCache keys (so ``--preset`` works on GLM-5.2, whose checkpoint
sets freq 4). ``--pattern`` takes any pattern spec of :mod:`vllm_indexcache.pattern` (``FSFS...``, ``all-F``,
``freq:K[:OFFSET]``, ``every:K`` = ``1/K``, ``preset:NAME``), resolved for the model's indexer layers and printed in
full. Exit status: 0 on success, 2 on an invalid configuration (one-line error on stderr).

Where the family's indexer layers are not simply every backbone layer (DeepSeek-V4: its CSA layers), a third line
gives the pattern as DeepSeek-V4.1 writes reuse: ``index_source_layer_ids``, the decoder layers whose indexer runs
(the F layers; an S layer reuses the most recent one below it). A DeepSeek-V4.1 model
(:mod:`vllm_indexcache.families.deepseek_v41`) is read the other way: without options its declared index sources are
printed as a pattern over its compressed layers; ``--pattern``/``--freq``/``--preset`` give the
``index_source_layer_ids`` that pattern amounts to on it (vLLM reads no IndexCache key for V4.1, so the model's own
IndexCache keys are refused there).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_indexcache.config import KEYS, IndexCacheError, pattern_source, resolve_hf_config, summary
from vllm_indexcache.config_keys import check_model_keys
from vllm_indexcache.families import deepseek_v41 as v41
from vllm_indexcache.families import find_family
from vllm_indexcache.pattern import (
    SPEC_FORMS,
    describe_spec,
    f_layers,
    list_presets,
    resolve_for_model,
    resolve_spec,
    uniform_pattern,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register MODEL and the mutually exclusive --freq/--pattern/--preset options (plus --offset for --freq)."""
    parser.add_argument("model", metavar="MODEL", help="local model directory (or its config.json)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--freq", type=int, help="index_topk_freq: uniform rule, every N-th layer F (1 = off)")
    group.add_argument("--pattern", metavar="SPEC", help=f"index_topk_pattern as a pattern spec, one F/S per indexer "
                                                          f"layer: {SPEC_FORMS}")
    group.add_argument("--preset", help=f"index_cache_preset: one of {', '.join(list_presets())}, or a .json path")
    parser.add_argument("--offset", type=int, help="index_skip_topk_offset for --freq (default 2)")


def main(args: argparse.Namespace) -> int:
    """Print the resolved pattern of ``args.model``; return 0, or 2 with a one-line error on stderr."""
    try:
        config = _read_config(Path(args.model))
        check_model_keys(config)
        if args.offset is not None and args.freq is None:
            raise IndexCacheError(f"index_skip_topk_offset={args.offset!r}: --offset needs --freq")
        if v41.is_deepseek_v41(config):
            return _main_v41(args, config)
        spec_line = None
        explicit = args.pattern
        if args.pattern is not None:
            explicit = _resolve_spec(args.pattern, config)
            spec_line = describe_spec(args.pattern, explicit)
        overrides = {"index_topk_freq": args.freq, "index_skip_topk_offset": args.offset,
                     "index_topk_pattern": explicit, "index_cache_preset": args.preset}
        source = pattern_source(config)
        if any(v is not None for v in overrides.values()):
            config = {k: v for k, v in config.items() if k not in KEYS}
            config.update({k: v for k, v in overrides.items() if v is not None})
            source = "command-line options" + (f", preset {args.preset}" if args.preset else "")
        pattern = resolve_hf_config(config)
    except IndexCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if pattern is None:
        print(f"{args.model}: no lightning indexer (no index_topk); IndexCache does not apply")
        return 0
    if spec_line:
        print(spec_line)
    print(summary(pattern, source))
    family = find_family(config)
    layers = family.indexer_layers(config) if family is not None else None
    sparse = layers is not None and layers != list(range(family.num_backbone_layers(config)))
    print(_f_line(pattern, ordinals=sparse))
    line = _decoder_layers_line(config, pattern)
    if line:
        print(line)
    if sparse:
        print(f"{v41.INDEX_KEY}: {[layer for layer, c in zip(layers, pattern) if c == 'F']}")
    return 0


def _main_v41(args: argparse.Namespace, config: dict) -> int:
    """DeepSeek-V4.1: print its declared index sources as a pattern, or the index sources an option's pattern
    amounts to (module docstring); 0, or 2 with a one-line error on stderr."""
    try:
        text = v41.text_config(config)
        own = [k for k in KEYS if text.get(k) is not None]
        if own:
            raise IndexCacheError(f"{own[0]}={text[own[0]]!r}: vLLM does not read IndexCache keys for "
                                  f"{v41.ARCHITECTURE}; it declares its reuse in {v41.INDEX_KEY} (give --pattern "
                                  "to compute them)")
        declared = v41.declared_pattern(config)
        layers = v41.compressed_layers(config)
        spec_line = None
        if args.pattern is not None or args.preset is not None:
            spec = args.pattern if args.pattern is not None else f"preset:{args.preset}"
            pattern = resolve_spec(spec, len(layers), key="index_topk_pattern", architecture=v41.ARCHITECTURE,
                                   layers=layers)
            spec_line = describe_spec(spec, pattern) if args.pattern is not None else None
            source = "command-line options" + (f", preset {args.preset}" if args.preset else "")
        elif args.freq is not None:
            pattern = uniform_pattern(len(layers), args.freq, 2 if args.offset is None else args.offset)
            source = "command-line options"
        else:
            pattern, source = declared, f"{v41.INDEX_KEY} (model config)"
        sources = v41.index_sources_for(config, pattern)
    except (IndexCacheError, ValueError) as e:   # FamilyError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    if spec_line:
        print(spec_line)
    print(summary(pattern, source))
    print(_f_line(pattern, ordinals=True))
    print(f"{v41.INDEX_KEY}: {sources}")
    return 0


def _f_line(pattern: str, ordinals: bool) -> str:
    """The F entries of ``pattern``. Where the indexer layers are every decoder layer (V3.2, GLM-5) the positions in
    the pattern are decoder layer ids; elsewhere (V4's CSA layers, V4.1's compressed layers) they are ordinals among
    the indexer layers and are labelled so (the decoder ids follow on their own line)."""
    label = "F indexer-layer ordinals (positions in the pattern)" if ordinals else "F layers"
    return f"{label}: " + " ".join(map(str, f_layers(pattern)))


def _decoder_layers_line(config: dict, pattern: str) -> str | None:
    """For a family whose indexer layers are not every decoder layer (DeepSeek-V4: its CSA layers), the decoder
    layer ids of the pattern's F and S entries (the pattern and ``F layers`` count indexer layers); else None."""
    from vllm_indexcache.families import FamilyError, family_for

    try:
        family = family_for(config)
        chars = family.layer_chars(config, pattern)
    except (FamilyError, ValueError):
        return None
    if list(chars) == list(range(family.num_backbone_layers(config))):
        return None
    ids = {c: " ".join(str(i) for i, x in chars.items() if x == c) or "-" for c in "FS"}
    return (f"{family.name} indexer layers (decoder layer ids): {' '.join(map(str, chars))}; "
            f"F: {ids['F']}; S: {ids['S']}")


def _resolve_spec(spec: str, config: dict) -> str:
    """``--pattern SPEC`` as an explicit F/S string for the model's indexer layers (its family's count)."""
    if config.get("index_topk") is None:
        return spec          # resolve_hf_config refuses IndexCache keys on a model without indexer
    try:
        return resolve_for_model(spec, config, key="index_topk_pattern")
    except ValueError as e:   # FamilyError included
        raise IndexCacheError(str(e)) from None


def _read_config(path: Path) -> dict:
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise IndexCacheError(f"MODEL={str(path)!r}: cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise IndexCacheError(f"MODEL={str(path)!r}: {file} is not a JSON object")
    return data

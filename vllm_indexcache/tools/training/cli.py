"""``vllm-indexcache train --config FILE``: run the DSA training recipe (dense → indexer warm-up → sparse).

Re-running the same command resumes: finished stages are skipped, an interrupted one continues from its checkpoint.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config, JSON or YAML (see training/config.py)")
    parser.add_argument("--run-dir", help="override the config's run_dir")
    parser.add_argument("--data-dir", help="override the config's data.dir")
    parser.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    parser.add_argument("--time-limit", type=float, help="minutes; checkpoint and stop after the step that passes it")
    parser.add_argument("--stop-after", type=int, help="checkpoint and stop at this step of the current stage")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train

    cfg = load_config(args.config, run_dir=args.run_dir)
    if args.data_dir:
        cfg.data.dir = args.data_dir
    results = train(cfg, args.stage, time_limit_s=None if args.time_limit is None else args.time_limit * 60,
                    stop_after=args.stop_after, progress=not args.no_progress)
    if results and results[-1]["status"] != "done":
        print("stopped early; run the same command again to resume")
        return 3
    return 0

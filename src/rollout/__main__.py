"""Run one MrDPO rollout from a checkpoint over a manifest's videos.

    python -m src.rollout --ckpt checkpoints/sft/final --data data/synthav/train.jsonl --out runs/x/pairs.jsonl
        [--k 4 --temperature 1.0 --top-p 0.9 --max-new-tokens 128 --min-margin 0] [--batch-size 16] [--seed 0]
        [--round R] [--rank R --world-size W] [--judge synth|llm|hf --judge-config JUDGE.yaml] [--device cuda]

Pairs are appended to OUT (with --world-size W > 1: OUT.rank{R}of{W}.jsonl, one file per rank) as they are made;
OUT.progress lists every finished video, so running the same command again resumes where it stopped. The run's
statistics are printed as one JSON object; unreadable videos are reported on stderr and make the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from src.judge.factory import JUDGE_NAMES
from src.rollout.files import shard_path
from src.rollout.rollout import RolloutSettings, rollout


def main(argv: list[str] | None = None) -> int:
    defaults = RolloutSettings()
    parser = argparse.ArgumentParser(prog="python -m src.rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model directory (src.models.build or a training export)")
    parser.add_argument("--data", required=True, help="SFT manifest whose rows carry ground-truth events")
    parser.add_argument("--out", required=True, help="preference JSONL to append pairs to")
    parser.add_argument("--k", type=int, default=defaults.k, help="samples per video")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--min-margin", type=float, default=defaults.min_margin,
                        help="smallest EER difference between chosen and rejected (ties are always dropped)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per generate call")
    parser.add_argument("--forward-batch-size", type=int, default=defaults.forward_batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--round", type=int, default=None, help="round index written into each pair")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--judge", choices=JUDGE_NAMES, default="synth")
    parser.add_argument("--judge-config", help="llm / hf judge settings: a JSON or YAML mapping (see src.evaluate)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, --world-size), got {args.rank} of {args.world_size}")
    try:
        settings = RolloutSettings(k=args.k, temperature=args.temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   forward_batch_size=args.forward_batch_size, min_margin=args.min_margin,
                                   seed=args.seed)
    except ValueError as err:
        parser.error(str(err))

    from src.data.manifest import read_manifest
    from src.evaluate import read_judge_config
    from src.judge.factory import check_settings, make_judge
    from src.models.build import load_base  # heavy imports after argument errors

    try:
        judge_settings = read_judge_config(args.judge_config) if args.judge_config else {}
        check_settings(args.judge, judge_settings, args.judge_config or "judge settings")
        judge = make_judge(args.judge, **judge_settings)
    except ValueError as err:
        parser.error(str(err))
    with judge:
        rows = read_manifest(args.data, "sft")
        model, processor = load_base(args.ckpt)
        model.to(args.device)
        out = shard_path(args.out, args.rank, args.world_size)
        stats = rollout(model, processor, rows, judge, out, settings, round_index=args.round, rank=args.rank,
                        world_size=args.world_size, progress=not args.no_progress)
    for error in stats.errors:
        print(f"error: {error}", file=sys.stderr)
    print(json.dumps({"out": out, **stats.as_dict()}), flush=True)
    return 1 if stats.errors else 0


if __name__ == "__main__":
    sys.exit(main())

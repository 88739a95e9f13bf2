"""Evaluate a checkpoint's captions against ground-truth events.

    python -m src.evaluate --ckpt checkpoints/sft/final --data data/synthav/test.jsonl [--judge synth]
        [--out DIR] [--batch-size 32] [--max-new-tokens 96] [--limit N]

Captions every row of the manifest greedily (the caption CLI's code), judges each caption against the row's
``events``, prints the rates, and writes to --out (default: the checkpoint directory): eval.json
{"miss", "incorrect", "hallucination", "eer", "repetition", "n_clips", "judge"} and samples.jsonl (per clip: the
caption, its counts and the judge's event lists). Rates are fractions of the ground-truth events.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from src.caption import caption_jobs, row_jobs
from src.data.errors import BadSampleError
from src.data.manifest import read_manifest
from src.judge.metric import rates
from src.judge.synth import SynthJudge
from src.models.generate import GenerationSettings

JUDGES = {"synth": SynthJudge}


def format_rates(result: dict) -> str:
    return (f"miss {result['miss']:.1%}  incorrect {result['incorrect']:.1%}  hallucination "
            f"{result['hallucination']:.1%}  EER {result['eer']:.1%}  repetition {result['repetition']:.1%}  "
            f"({result['n_clips']} clips)")


@torch.no_grad()
def evaluate(model, processor, manifest: str, *, judge: str = "synth", batch_size: int = 32,
             max_new_tokens: int = 96, limit: int | None = None, out: str | Path | None = None) -> dict:
    """Caption and judge every row; returns the rates dict (and writes eval.json / samples.jsonl to ``out``)."""
    rows = read_manifest(manifest, "sft")[:limit]
    missing = [r.source for r in rows if not r.events]
    if missing:
        raise ValueError(f"rows without ground-truth events cannot be judged: {', '.join(missing[:5])}")
    errors: list[str] = []
    jobs = row_jobs(processor, rows, None, errors)
    if errors:  # an evaluation over a silently shrunken test set would not be comparable
        raise BadSampleError(manifest, f"{len(errors)} clips cannot be read: " + "; ".join(errors[:5]))
    scorer = JUDGES[judge]()
    by_id = {row.id: row for row in rows}
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    samples, counts = [], []
    for result in caption_jobs(model, processor, jobs, settings, batch_size=batch_size):
        detail = scorer.score_detail(result["caption"], list(by_id[result["key"]].events))
        counts.append(detail.counts)
        samples.append({"id": result["key"], "caption": result["caption"], "finished": result["finished"],
                        "counts": dataclasses.asdict(detail.counts), "missed": detail.missed,
                        "incorrect": detail.incorrect, "hallucinated": detail.hallucinated})
    result = {**rates(counts), "judge": judge}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", required=True, help="SFT manifest whose rows carry ground-truth events")
    parser.add_argument("--judge", default="synth", choices=sorted(JUDGES))
    parser.add_argument("--out", default=None, help="default: the checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from src.models.build import load_base

    model, processor = load_base(args.ckpt)
    model.to(args.device)
    result = evaluate(model, processor, args.data, judge=args.judge, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, out=args.out or args.ckpt)
    print(f"{args.ckpt} on {args.data}: {format_rates(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Greedy captions against beam search and best-of-K sampling reranked by the model's own log-prob, on one
manifest, synth judge.

    python bench/decoding_rerank.py --ckpt checkpoints/sft/final --data data/synthav/test.jsonl --k 8 \
        --temperature 0.7 [--beams 4 8] [--length-penalties 0 1]

Captions every row greedily, by beam search for each beam count and length penalty, and K times sampled (one seeded
generator), then judges the choices per clip: greedy; each beam search; the candidate (greedy + K samples) with the
highest summed log-prob; the one with the highest mean log-prob per token; the first sample alone. Prints the
captioning times, then one line of rates per choice. bench/RESULTS.md ("Decoding") has the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.caption import caption_jobs, row_jobs  # noqa: E402
from src.data.manifest import read_manifest  # noqa: E402
from src.evaluate import judge_captions  # noqa: E402
from src.judge.factory import make_judge  # noqa: E402
from src.models.build import load_base  # noqa: E402
from src.models.generate import GenerationSettings  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="checkpoints/sft/final")
    parser.add_argument("--data", default="data/synthav/test.jsonl")
    parser.add_argument("--k", type=int, default=8, help="sampled captions per clip")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beams", type=int, nargs="*", default=[4], help="beam counts to try (none: skip)")
    parser.add_argument("--length-penalties", type=float, nargs="+", default=[0.0, 1.0])
    args = parser.parse_args(argv)

    model, processor = load_base(args.ckpt)
    rows = read_manifest(args.data)
    errors: list[str] = []
    jobs = row_jobs(processor, rows, None, errors)
    if errors:
        raise SystemExit(f"{args.data}: {len(errors)} clips cannot be read: " + "; ".join(errors[:5]))
    start = time.perf_counter()
    greedy = {r["key"]: r for r in caption_jobs(model, processor, jobs,
                                                 GenerationSettings(max_new_tokens=args.max_new_tokens), batch_size=32)}
    greedy_s = time.perf_counter() - start
    beams, beam_s = {}, {}
    for n in args.beams:
        for penalty in args.length_penalties:
            name, began = f"beam search, {n} beams, length penalty {penalty:g}", time.perf_counter()
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=n, length_penalty=penalty)
            beams[name] = {r["key"]: r for r in caption_jobs(model, processor, jobs, settings, batch_size=32)}
            beam_s[name] = time.perf_counter() - began
    start = time.perf_counter()
    sampling = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature)
    candidates = defaultdict(list)
    for r in caption_jobs(model, processor, jobs, sampling, num_samples=args.k, batch_size=32,
                          generator=torch.Generator().manual_seed(args.seed)):
        candidates[r["key"]].append(r)
    print(f"captioned {len(rows)} clips: greedy {greedy_s:.1f} s, {args.k} samples each "
          f"{time.perf_counter() - start:.1f} s" + "".join(f", {name} {t:.1f} s" for name, t in beam_s.items()),
          flush=True)
    first = {key: found[0] for key, found in candidates.items()}
    for key, found in candidates.items():
        found.append(greedy[key])
    choices = {"greedy": greedy, **beams,
               f"best of {args.k + 1}, summed log-prob": {k: max(v, key=lambda r: r["logp"])
                                                          for k, v in candidates.items()},
               f"best of {args.k + 1}, mean log-prob": {k: max(v, key=lambda r: r["logp"] / max(r["tokens"], 1))
                                                        for k, v in candidates.items()},
               "one sample": first}
    judge = make_judge("synth")
    for name, chosen in choices.items():
        preds = {row.id: {"caption": chosen[row.id]["caption"], "finished": chosen[row.id]["finished"]}
                 for row in rows}
        rates = judge_captions(rows, preds, judge).result
        print(f"{name}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rates.items()}))


if __name__ == "__main__":
    main()

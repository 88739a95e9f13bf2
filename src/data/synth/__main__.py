"""python -m src.data.synth --out data/synthav --train 2000 --val 200 --test 200 --seed 0 [--workers N]

Writes the SynthAV data set (DESIGN section 6); see src/data/synth/__init__.py for the layout.
"""

from __future__ import annotations

import argparse
import os
import time

from src.data.synth.generate import ClipSettings, generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.data.synth", description=__doc__.splitlines()[2])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per clip")
    parser.add_argument("--size", type=int, default=56, help="frame side in pixels (even)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--sample-rate", type=int, default=16000, help="audio samples per second")
    args = parser.parse_args(argv)
    if args.size % 2:
        parser.error("--size must be even (yuv420p)")
    counts = {split: n for split, n in (("train", args.train), ("val", args.val), ("test", args.test)) if n > 0}
    settings = ClipSettings(args.duration, args.size, args.fps, args.sample_rate)
    start = time.perf_counter()
    rows = generate(args.out, counts, args.seed, args.workers, settings)
    n = sum(len(r) for r in rows.values())
    print(f"wrote {n} clips to {args.out} in {time.perf_counter() - start:.1f} s ({args.workers} workers)")


if __name__ == "__main__":
    main()

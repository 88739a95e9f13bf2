"""Decoded clips/s through the real stream (StreamingDataset + ClipProcessor + DataLoader workers).

Two inputs, each with 1 and 2 DataLoader workers, side by side in one run:
- SynthAV clips (4 s, 56x56, 8 fps, 16 kHz AAC), decoded with the paper's settings (a frame every 0.1 s,
  max_pixels 61,250, 16 kHz mono audio);
- a generated 60 s 854x480 30 fps h264 clip with 44.1 kHz stereo AAC, same settings (600 frames resized to the
  pixel budget, 60 s of audio resampled and downmixed).

    python bench/data_throughput.py [--synth-clips 200] [--long-clips 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from src.data.clip_processor import ClipProcessor  # noqa: E402
from src.data.media import FrameSampling  # noqa: E402
from src.data.streaming import Source, StreamingDataset  # noqa: E402
from src.data.synth.generate import generate  # noqa: E402
from tests.media_fixtures import write_av  # noqa: E402


def throughput(manifest: Path, workers: int) -> dict:
    """One pass over the manifest; clips/s, frames/s and audio seconds/s, worker start-up included."""
    ds = StreamingDataset([Source(str(manifest))], ClipProcessor(FrameSampling()), repeat=False, shuffle_buffer=0,
                          num_workers=workers, rank=0, world_size=1)
    start = time.perf_counter()
    clips = frames = 0
    audio_s = 0.0
    for batch in DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=ds.collate):
        clips += 1
        frames += batch["frames"][0].shape[0]
        audio_s += batch["audio"][0].numel() / 16000
    seconds = time.perf_counter() - start
    return {"workers": workers, "clips": clips, "seconds": round(seconds, 3),
            "clips_per_s": round(clips / seconds, 2), "frames_per_s": round(frames / seconds, 1),
            "audio_s_per_s": round(audio_s / seconds, 1)}


def long_clip_manifest(folder: Path, copies: int) -> Path:
    clip = write_av(folder / "long480p.mp4", duration=60.0, fps=30, size=(480, 854), audio_rate=44100, channels=2,
                    tone_onset=1.0, crf=23)
    manifest = folder / "long.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"long{i}", "video": str(clip), "caption": "a long clip"}) + "\n"
                                for i in range(copies)))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synth-clips", type=int, default=200)
    parser.add_argument("--long-clips", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "synthav", {"train": args.synth_clips}, seed=0)
        inputs = {"synthav_4s_56px": tmp / "synthav" / "train.jsonl",
                  "generated_60s_480p": long_clip_manifest(tmp, args.long_clips)}
        results = {name: [throughput(path, w) for w in (1, 2)] for name, path in inputs.items()}

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return
    print(f"machine: {machine}\n")
    print("| input | workers | clips | clips/s | frames/s | audio s/s |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['workers']} | {r['clips']} | {r['clips_per_s']} | {r['frames_per_s']} | "
                  f"{r['audio_s_per_s']} |")
    for name, (one, two) in results.items():
        print(f"\n{name}: 2 workers / 1 worker = {two['clips_per_s'] / one['clips_per_s']:.2f}x")


if __name__ == "__main__":
    main()

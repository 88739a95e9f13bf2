"""Generate a SynthAV data set: DIR/{split}/<id>.mp4, DIR/{split}.jsonl, DIR/{split}_audio.jsonl (the same
clips as audio-only rows captioned with their sounds, for the audio-alignment stage) and DIR/meta.json.

Clip ``index`` of ``split`` draws its randomness from SeedSequence((seed, split code, index)) alone, so the
output does not depend on the worker count or the order in which workers finish.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.data.synth import grammar
from src.data.synth.encode import write_clip
from src.data.synth.scene import sample_scene
from src.data.synth.world import (
    BEEP_HZ, COLOURS, DIRECTIONS, MAX_EVENTS, MIN_EVENTS, PITCHES, SHAPES, SOUND_KINDS, TONE_HZ, WORLD_VERSION, Event,
    TimedEvent,
)

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ClipSettings:
    """Media settings shared by every clip of a data set."""

    duration: float = 4.0
    size: int = 56
    fps: int = 8
    sample_rate: int = 16000


def split_code(split: str) -> int:
    """A stable integer per split name (fixed for the standard three, crc32 for any other)."""
    return SPLIT_CODES.get(split, zlib.crc32(split.encode()))


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split_code(split), index])


def clip_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def make_clip(out: str | os.PathLike, split: str, index: int, seed: int, settings: ClipSettings) -> dict:
    """Sample, render and write one clip; returns its manifest row."""
    scene = sample_scene(clip_rng(seed, split, index), settings.duration, settings.size, settings.fps,
                         settings.sample_rate)
    name = clip_id(split, index)
    video = f"{split}/{name}.mp4"
    write_clip(scene, Path(out) / video)
    return {
        "id": name,
        "video": video,
        "caption": scene.caption(),
        "events": scene.sentences(),
        "use_audio": True,
        "timeline": [te.to_dict() for te in scene.events],
    }


def _make_clip_job(job: tuple) -> dict:
    return make_clip(*job)


def audio_row(row: dict) -> dict:
    """The audio-only view of a clip's row, for the audio-alignment stage: the clip's file as audio, and as
    caption only what can be heard (the sounds, tied ones included), in time order."""
    sounds = [TimedEvent(e["t"], Event.from_dict(e["sound"] if "sound" in e else e)) for e in row["timeline"]
              if "sound" in e or e["kind"] in SOUND_KINDS]
    sentences = [grammar.sentence(te.event) for te in sounds]
    return {"id": row["id"] + "-audio", "audio": row["video"], "caption": " ".join(sentences), "events": sentences,
            "use_audio": True}


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def meta(seed: int, counts: dict[str, int], settings: ClipSettings) -> dict:
    """Everything that decides the data (and nothing that does not, such as the worker count)."""
    return {
        "world_version": WORLD_VERSION,
        "seed": seed,
        "counts": dict(counts),
        **settings.__dict__,
        "video": {"codec": "h264", "pix_fmt": "yuv420p", "container": "mp4"},
        "audio": {"codec": "aac", "channels": 1},
        "events_per_clip": [MIN_EVENTS, MAX_EVENTS],
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "directions": list(DIRECTIONS),
        "pitches": list(PITCHES),
        "sound_kinds": list(SOUND_KINDS),
        "tone_hz": TONE_HZ,
        "beep_hz": BEEP_HZ,
    }


def generate(out: str | os.PathLike, counts: dict[str, int], seed: int = 0, workers: int | None = None,
             settings: ClipSettings = ClipSettings()) -> dict[str, list[dict]]:
    """Write every split in ``counts`` (e.g. {"train": 2000, "val": 200, "test": 200}) under ``out``.

    ``workers`` processes (default os.cpu_count(); 1 runs in this process). Returns the rows per split.
    """
    out = Path(out)
    for split in counts:
        (out / split).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), split, i, seed, settings) for split, n in counts.items() for i in range(n)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    if workers == 1:
        rows = [_make_clip_job(job) for job in jobs]
    else:
        # spawn: safe even when the caller has already started threads (torch, a test runner)
        with mp.get_context("spawn").Pool(workers) as pool:
            rows = pool.map(_make_clip_job, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    by_split: dict[str, list[dict]] = {split: [] for split in counts}
    for job, row in zip(jobs, rows):
        by_split[job[1]].append(row)
    for split, split_rows in by_split.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows)
        write_text_atomic(out / f"{split}.jsonl", text)
        audio_text = "".join(json.dumps(audio_row(row), ensure_ascii=False) + "\n" for row in split_rows)
        write_text_atomic(out / f"{split}_audio.jsonl", audio_text)
    write_text_atomic(out / "meta.json", json.dumps(meta(seed, counts, settings), indent=2) + "\n")
    return by_split

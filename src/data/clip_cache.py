"""A disk cache of decoded clips, so that epochs after the first skip video and audio decoding.

Decoding (PyAV: demux, H.264/AAC decode, scale, resample) is most of a small model's data cost: on SynthAV with the
tiny model it takes about as long as the training step itself and competes with it for the same CPU cores. The
cache stores what ``media.load_clip`` returns (uint8 frames, their times, float32 audio: exactly, so a cached
epoch sees the same tensors as a decoded one), one safetensors file per clip, keyed by the media files' paths,
sizes and modification times and by every setting that changes the decode (frame sampling, sample rate,
use_audio). A changed file or setting is a new key, never a stale hit. Writes are atomic (temp file + rename), so
DataLoader workers and ranks may share one cache directory; a corrupt entry is reported, removed and re-decoded.
Bad media are never cached: their error is raised again each time, for the stream to report and count.
An audio-only request for a file whose audio-visual entry holds its whole audio (not cut at the video's end) is
served from that entry: the same samples an audio-only decode returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from src.data.errors import BadSampleError
from src.data.media import AVClip, FrameSampling, audio_only_duration, load_clip

log = logging.getLogger(__name__)


def _file_stamp(path: str | None) -> list | None:
    if path is None:
        return None
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def media_file_key(video: str | None, audio: str | None, sampling: FrameSampling, use_audio: bool,
                   sample_rate: int) -> str:
    """What a decode of these files with these settings returns, as a hex key: the files' absolute paths, sizes and
    modification times, and the settings. A stat() of each file per call: cheap next to a decode, and it catches
    files rewritten in place. OSError when a file is missing."""
    fields = {"video": _file_stamp(video), "audio": _file_stamp(audio), "sampling": asdict(sampling),
              "use_audio": use_audio, "sample_rate": sample_rate}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class ClipCache:
    """``get(video, audio, sampling=..., use_audio=..., sample_rate=..., decode=load_clip)`` -> AVClip."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)  # created at the first write
        self.hits = self.misses = 0

    def key(self, video: str | None, audio: str | None, sampling: FrameSampling, use_audio: bool,
            sample_rate: int) -> str:
        return media_file_key(video, audio, sampling, use_audio, sample_rate)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, video: str | None, audio: str | None, *, sampling: FrameSampling, use_audio: bool,
            sample_rate: int, decode: Callable[..., AVClip]) -> AVClip:
        try:
            key = self.key(video, audio, sampling, use_audio, sample_rate)
        except OSError:  # a missing file: let the decoder raise its own, well-described error
            return decode(video, audio, sampling=sampling, use_audio=use_audio, sample_rate=sample_rate)
        path = self.path(key)
        if path.is_file():
            clip = self._read(path)
            if clip is not None:
                self.hits += 1
                return clip
        if video is None and audio is not None and use_audio:
            clip = self._audio_from_av_entry(audio, sampling, sample_rate)
            if clip is not None:
                self.hits += 1
                return clip
        clip = decode(video, audio, sampling=sampling, use_audio=use_audio, sample_rate=sample_rate)
        self._write(path, clip)
        self.misses += 1
        return clip

    def _audio_from_av_entry(self, audio: str, sampling: FrameSampling, sample_rate: int) -> AVClip | None:
        """The audio-only clip of ``audio`` out of the file's audio-visual entry, when there is one whose audio was
        not cut at the video's end: both decodes run the same ``decode_audio`` on the file, so the samples and their
        start are the same, and an audio-only clip ends with its audio (``media.load_clip``). The align stage reads
        SynthAV's audio-only rows this way from the entries `make base` decoded (8.8 ms a clip otherwise)."""
        try:
            path = self.path(self.key(audio, None, sampling, True, sample_rate))
        except OSError:
            return None
        if not path.is_file():
            return None
        entry = self._read(path, names=("audio",))
        if entry is None or entry.audio_cut is not False or entry.audio_status != "ok" or entry.audio is None:
            return None  # cut, or written before entries recorded it: decode
        return AVClip(path=os.fspath(audio), frames=None, frame_times=None, audio=entry.audio,
                      audio_start=entry.audio_start, sample_rate=entry.sample_rate,
                      duration=audio_only_duration(entry.audio_start, entry.audio, entry.sample_rate),
                      audio_status="ok", audio_cut=False)

    @staticmethod
    def _read(path: Path, names: Sequence[str] | None = None) -> AVClip | None:
        """The entry at ``path`` (only the tensors in ``names`` when given; the others None)."""
        try:
            with safe_open(path, framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys() if names is None or name in names}
                fields = json.loads(f.metadata()["clip"])
        except (OSError, SafetensorError, ValueError, KeyError) as err:
            log.warning("clip cache: dropping unreadable entry %s (%s)", path, err)
            path.unlink(missing_ok=True)
            return None
        return AVClip(path=fields["path"], frames=tensors.get("frames"), frame_times=tensors.get("frame_times"),
                      audio=tensors.get("audio"), audio_start=fields["audio_start"],
                      sample_rate=fields["sample_rate"], duration=fields["duration"],
                      audio_status=fields["audio_status"], audio_cut=fields.get("audio_cut"))

    @staticmethod
    def _write(path: Path, clip: AVClip) -> None:
        tensors = {name: getattr(clip, name).contiguous() for name in ("frames", "frame_times", "audio")
                   if getattr(clip, name) is not None}
        fields = {"path": clip.path, "audio_start": clip.audio_start, "sample_rate": clip.sample_rate,
                  "duration": clip.duration, "audio_status": clip.audio_status, "audio_cut": clip.audio_cut}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, tmp, metadata={"clip": json.dumps(fields)})
            os.replace(tmp, path)
        except OSError as err:  # a full or read-only disk costs speed, never the sample
            log.warning("clip cache: could not write %s (%s)", path, err)
            tmp.unlink(missing_ok=True)


def _warm_chunk(directory: str, clips: list[tuple], sampling: FrameSampling, sample_rate: int) -> tuple[int, int]:
    cache, failed = ClipCache(directory), 0
    for video, audio, use_audio in clips:
        try:
            load_clip_cached(cache, video, audio, sampling=sampling, use_audio=use_audio, sample_rate=sample_rate)
        except BadSampleError:  # bad media are not cached: the stream reports and counts them when it meets them
            failed += 1
    return cache.misses, failed


def warm_clip_cache(directory: str | os.PathLike, clips: Sequence[tuple[str | None, str | None, bool]], *,
                    sampling: FrameSampling, sample_rate: int, workers: int = 2, chunk: int = 64) -> dict[str, int]:
    """Decode every (video, audio, use_audio) of ``clips`` into the cache at ``directory`` with ``workers``
    processes, before a run that will read them in its main process (an SFT run with num_workers 0 decodes its first
    epoch serially otherwise). Entries already there are read, not decoded. Returns {"clips", "decoded", "failed"}.
    """
    clips = list(clips)
    parts = [clips[i:i + chunk] for i in range(0, len(clips), chunk)]
    if workers <= 1 or len(parts) <= 1:
        results = [_warm_chunk(str(directory), part, sampling, sample_rate) for part in parts]
    else:  # spawn: the parent has started torch's thread pool, which a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_warm_chunk, [str(directory)] * len(parts), parts, [sampling] * len(parts),
                                    [sample_rate] * len(parts)))
    return {"clips": len(clips), "decoded": sum(r[0] for r in results), "failed": sum(r[1] for r in results)}


def load_clip_cached(cache: ClipCache | None, video: str | None, audio: str | None, *, sampling: FrameSampling,
                     use_audio: bool, sample_rate: int) -> AVClip:
    """``media.load_clip`` through ``cache`` when there is one."""
    if cache is None:
        return load_clip(video, audio, sampling=sampling, use_audio=use_audio, sample_rate=sample_rate)
    return cache.get(video, audio, sampling=sampling, use_audio=use_audio, sample_rate=sample_rate, decode=load_clip)

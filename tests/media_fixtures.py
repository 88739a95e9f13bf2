"""Small media files written with PyAV whose content encodes time, for tests of decoding and sync.

Video: a flat grey frame whose level says when the frame is shown (``level_at(t)``: 16 + 50 * t, so clips up
to ~4 s), plus an optional white square in the top-left quarter from ``square_onset`` on. Audio: silence, then
a sine tone from ``tone_onset`` on, on one channel or all. Helpers also write broken files (zero-length,
truncated, random bytes, a valid header followed by garbage).

Each writer takes the destination path and returns it as a ``Path``; codecs follow the suffix.
"""

from __future__ import annotations

import os
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVEL_AT_ZERO = 16
LEVEL_PER_SECOND = 50
TONE_AMPLITUDE = 0.5

# suffix -> (video codec, audio codec, container format)
_CODECS = {
    ".mp4": ("libx264", "aac", "mp4"),
    ".mov": ("libx264", "aac", "mov"),
    ".m4a": (None, "aac", "ipod"),
    ".mkv": ("libx264", "aac", "matroska"),
    ".ts": ("libx264", "aac", "mpegts"),
    ".webm": ("libvpx", "libopus", "webm"),
    ".wav": (None, "pcm_s16le", "wav"),
    ".mp3": (None, "libmp3lame", "mp3"),
    ".flac": (None, "flac", "flac"),
}
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def level_at(t: float) -> int:
    """The grey level (0-255) of a frame shown at t seconds."""
    return round(min(235.0, LEVEL_AT_ZERO + LEVEL_PER_SECOND * t))


def time_from_level(level: float) -> float:
    """Inverse of :func:`level_at` (s); codec error of ~2 levels is ~0.04 s."""
    return (level - LEVEL_AT_ZERO) / LEVEL_PER_SECOND


def frame_image(t: float, size: tuple[int, int], square_onset: float | None = None) -> np.ndarray:
    """(h, w, 3) uint8 RGB: grey at ``level_at(t)``, white top-left quarter once t >= square_onset."""
    height, width = size
    image = np.full((height, width, 3), level_at(t), np.uint8)
    if square_onset is not None and t >= square_onset:
        image[: height // 2, : width // 2] = 255
    return image


def tone(duration: float, rate: int, hz: float = 440.0, onset: float = 0.5, channels: int = 1,
         channel: int | None = 0) -> np.ndarray:
    """(channels, n) float32: silence, then a sine of ``hz`` from ``onset`` s on ``channel`` (None: all)."""
    n = round(duration * rate)
    t = np.arange(n) / rate
    signal = np.where(t >= onset, TONE_AMPLITUDE * np.sin(2 * np.pi * hz * (t - onset)), 0.0).astype(np.float32)
    audio = np.zeros((channels, n), np.float32)
    if channel is None:
        audio[:] = signal
    else:
        audio[channel] = signal
    return audio


def write_av(path, *, duration: float = 2.0, fps: int = 8, size: tuple[int, int] = (56, 56),
             audio_rate: int = 16000, channels: int = 1, video: bool = True, audio: bool = True,
             audio_duration: float | None = None, vfr_times: list[float] | None = None, tone_hz: float = 440.0,
             tone_onset: float = 0.5, tone_channel: int | None = 0, square_onset: float | None = None,
             audio_delay: float = 0.0, options: dict | None = None, crf: int = 0) -> Path:
    """Write a clip: ``duration`` s of video at ``fps`` (or frames at ``vfr_times``, s) and ``audio_duration``
    s (default: ``duration``) of a tone at ``audio_rate`` Hz with ``channels`` channels, its first sample at
    ``audio_delay`` s (the tone's onset is counted from there).

    ``options`` go to the muxer (e.g. {"movflags": "faststart"}). Video is near-lossless by default (``crf`` 0)
    so grey levels survive to within ~2 (benchmarks pass a typical 23); audio is the codec's default quality.
    """
    path = Path(path)
    video_codec, audio_codec, container_format = _CODECS[path.suffix]
    video = video and video_codec is not None
    with av.open(str(path), "w", format=container_format, options=options or {}) as container:
        if video:
            video_stream = container.add_stream(video_codec, rate=fps)
            video_stream.width, video_stream.height = size[1], size[0]
            video_stream.pix_fmt = "yuv420p"
            if video_codec == "libx264":
                video_stream.options = {"crf": str(crf)}
            if vfr_times is not None:
                video_stream.codec_context.time_base = Fraction(1, 1000)
        if audio:
            audio_stream = container.add_stream(audio_codec, rate=audio_rate, layout=_LAYOUTS[channels])
        if video:
            frame_times = vfr_times if vfr_times is not None else [i / fps for i in range(round(duration * fps))]
            for index, t in enumerate(frame_times):
                frame = av.VideoFrame.from_ndarray(frame_image(t, size, square_onset), format="rgb24")
                if vfr_times is not None:
                    frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
                else:
                    frame.pts, frame.time_base = index, Fraction(1, fps)
                container.mux(video_stream.encode(frame))
            container.mux(video_stream.encode(None))
        if audio:
            samples = tone(audio_duration if audio_duration is not None else duration, audio_rate, tone_hz,
                           tone_onset, channels, tone_channel)
            for start in range(0, samples.shape[1], 1024):
                chunk = np.ascontiguousarray(samples[:, start:start + 1024])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=_LAYOUTS[channels])
                pts = start + round(audio_delay * audio_rate)
                frame.sample_rate, frame.pts, frame.time_base = audio_rate, pts, Fraction(1, audio_rate)
                container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode(None))
    return path


def write_zero_length(path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_truncated(source, path, fraction: float = 0.5) -> Path:
    """The first ``fraction`` of ``source``'s bytes. A plain mp4 (moov atom at the end) then cannot be opened
    at all; faststart mp4, mkv and ts keep their headers and lose the tail of the data."""
    data = Path(source).read_bytes()
    path = Path(path)
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_random_bytes(path, size: int = 4096, seed: int = 0) -> Path:
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_garbage_after_header(path, size: int = 4096, seed: int = 0) -> Path:
    """An mp4 'ftyp' box that promises an mp4, followed by random bytes."""
    header = (24).to_bytes(4, "big") + b"ftypisom" + (512).to_bytes(4, "big") + b"isomiso2"
    path = Path(path)
    path.write_bytes(header + np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_empty_wav(path, rate: int = 16000) -> Path:
    """A valid WAV header with zero samples: an audio stream without a single packet."""
    path = Path(path)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"")
    return path


def write_no_streams(path) -> Path:
    """A file FFmpeg opens (as ffmetadata, found by content whatever the suffix) that holds no stream."""
    path = Path(path)
    path.write_text(";FFMETADATA1\ntitle=no streams here\n")
    return path


def write_dangling_symlink(path) -> Path:
    path = Path(path)
    os.symlink(path.with_name(path.name + ".missing-target"), path)
    return path

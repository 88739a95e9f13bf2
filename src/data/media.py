"""Media decoding with PyAV: frames at chosen times and 16 kHz mono audio, on one clock, with typed errors.

The clip clock: seconds from the container's start time (``container.start_time``, else the earliest stream
start), so frame times and audio times are directly comparable. A separate audio file is read on its own clock
and assumed to start together with the video (that is how extracted .wav/.mp3 tracks are made).

Every failure of a public function is a :class:`MediaError` naming the file and the reason in words; raw
``av.error`` / ``OSError`` never escape, so the streaming dataset can quarantine the sample and go on.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from src.data.errors import BadSampleError


class MediaError(BadSampleError):
    """A media file cannot be used as a sample."""


class UnreadableMediaError(MediaError):
    """The path does not lead to a readable file: missing, a directory, a dangling link, permission denied."""


class EmptyMediaError(MediaError):
    """The file holds nothing to decode: zero bytes, no audio/video stream, zero duration, no samples."""


class CorruptMediaError(MediaError):
    """The container cannot be opened, or demuxing/decoding fails, or the data ends before its declared end."""


class MissingAudioError(MediaError):
    """Audio was asked for but neither the video nor a separate audio file has an audio stream."""


# A stream that ends this much (or two frames) before its declared duration is reported as truncated.
# Smaller gaps are normal: encoders round the last frame/packet, muxers round the declared duration.
TRUNCATION_TOLERANCE_S = 0.25
# How far before its declared end a stream's tail is scanned for its real end.
_TAIL_SCAN_S = 1.0


@dataclass(frozen=True)
class FrameSampling:
    """How many frames to take from a clip and how large (defaults: the paper's evaluation settings)."""

    interval: float = 0.1  # target seconds between frames (10 fps)
    min_frames: int = 2
    max_frames: int = 768
    max_pixels: int = 61250  # per-frame pixel budget after resizing
    min_pixels: int = 3136  # 56 * 56
    multiple: int = 28  # resized sides are multiples of this (ViT patch 14 x merger 2)

    def num_frames(self, duration: float) -> int:
        """round(duration / interval) (halves up), clamped to [min_frames, max_frames]."""
        if not duration > 0:
            raise ValueError(f"duration must be > 0 s, got {duration}")
        return min(self.max_frames, max(self.min_frames, math.floor(duration / self.interval + 0.5)))

    def timestamps(self, duration: float) -> list[float]:
        """Uniform frame times in seconds: frame i of n at i * duration / n, the start of its slot."""
        n = self.num_frames(duration)
        return [i * duration / n for i in range(n)]


def fit_size(height: int, width: int, max_pixels: int = 61250, min_pixels: int = 3136, multiple: int = 28):
    """Resized (h, w): sides multiples of ``multiple``, aspect ratio kept to within one multiple,
    min_pixels <= h * w <= max_pixels (a side never drops below ``multiple``)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    h = max(multiple, round(height / multiple) * multiple)
    w = max(multiple, round(width / multiple) * multiple)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(multiple, math.floor(height / scale / multiple) * multiple)
        w = max(multiple, math.floor(width / scale / multiple) * multiple)
        # Extreme aspect ratios: the short side is pinned at `multiple`, so trim the long one to fit.
        if h * w > max_pixels:
            if h >= w:
                h = max(multiple, max_pixels // w // multiple * multiple)
            else:
                w = max(multiple, max_pixels // h // multiple * multiple)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / multiple) * multiple
        w = math.ceil(width * scale / multiple) * multiple
    return h, w


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` learns. Times in seconds; ``duration`` is the clip's end on the clip clock
    (the video's end when there is video, else the audio's). Fields of an absent stream are None."""

    path: str
    duration: float
    start_time: float  # the clip clock's origin, on the container's own clock
    has_video: bool
    has_audio: bool
    width: int | None
    height: int | None
    fps: float | None  # average frame rate
    audio_rate: int | None
    audio_channels: int | None


# ---------------------------------------------------------------------------------------------- opening


def _ffmpeg_reason(err: Exception) -> str:
    reason = getattr(err, "strerror", None) or str(err)
    log = getattr(err, "log", None)  # only filled when the caller enabled av.logging
    if log and len(log) >= 3 and log[2]:
        reason = f"{reason} ({log[2].strip()})"
    return reason


def _check_readable(path: str) -> None:
    """Name the usual reasons before FFmpeg turns them into a vaguer message."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnreadableMediaError(path, f"no such file (dangling symlink to {os.readlink(path)})") from None
        where = "" if os.path.isdir(os.path.dirname(path) or ".") else " (no such directory)"
        raise UnreadableMediaError(path, "no such file" + where) from None
    except NotADirectoryError:
        raise UnreadableMediaError(path, "no such file (a parent is not a directory)") from None
    except PermissionError:  # a parent directory is not searchable
        raise UnreadableMediaError(path, "permission denied") from None
    except OSError as err:
        raise UnreadableMediaError(path, f"cannot stat: {err.strerror or err}") from None
    if stat.S_ISDIR(status.st_mode):
        raise UnreadableMediaError(path, "is a directory")
    if not os.access(path, os.R_OK):
        raise UnreadableMediaError(path, "permission denied")
    if stat.S_ISREG(status.st_mode) and status.st_size == 0:
        raise EmptyMediaError(path, "zero-length file")


def _open(path) -> av.container.InputContainer:
    path = os.fspath(path)
    _check_readable(path)
    try:
        return av.open(path, mode="r")
    except PermissionError as err:  # av.error.PermissionError subclasses it
        raise UnreadableMediaError(path, "permission denied") from err
    except av.error.FFmpegError as err:
        raise CorruptMediaError(path, f"cannot open container: {_ffmpeg_reason(err)}") from err
    except OSError as err:
        raise UnreadableMediaError(path, f"cannot read: {err.strerror or err}") from err


def _single_threaded(stream):
    """Decode on the calling thread. FFmpeg's decoder and scaler thread pools make their contexts unsafe to free
    in a forked child: a DataLoader worker forked while a failed decode's objects were still waiting for the
    collector deadlocked freeing them (seen in CI; tests/test_media.py reproduces it). Parallelism comes from
    the DataLoader's worker processes instead."""
    if stream is not None:
        stream.thread_type = "NONE"
        stream.codec_context.thread_count = 1
    return stream


def _video_stream(container):
    """The first real video stream: cover art in .mp3/.m4a is a one-picture 'video' stream, not a video."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return _single_threaded(stream)
    return None


def _audio_stream(container):
    return _single_threaded(container.streams.audio[0]) if container.streams.audio else None


def _origin(container) -> float:
    """The clip clock's zero on the container's clock, in seconds."""
    if container.start_time is not None:
        return container.start_time / av.time_base
    starts = [float(s.start_time * s.time_base) for s in container.streams if s.start_time is not None]
    return min(starts, default=0.0)


def _stream_start(stream) -> float | None:
    return None if stream.start_time is None else float(stream.start_time * stream.time_base)


_HMS = re.compile(r"^(\d+):(\d+):(\d+(?:\.\d*)?)$")


def _declared_end(stream) -> float | None:
    """Where the stream says it ends (container clock, s): start + duration, or the DURATION tag that FFmpeg's
    Matroska/WebM muxer writes per track (the end timestamp of the track's last packet, not a length)."""
    if stream.duration is not None and stream.duration > 0:
        return (_stream_start(stream) or 0.0) + float(stream.duration * stream.time_base)
    match = _HMS.match(stream.metadata.get("DURATION", "").strip())
    if match:
        hours, minutes, seconds = match.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None


def _frame_seconds(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(1 / rate) if rate else 0.0


def _scanned_end(path: str, container, stream) -> tuple[float, float] | None:
    """(start of the last frame/packet, real end) of the stream on the container clock (s), from its last
    packets: seek near the declared end and demux the tail (one GOP). None when there are no packets.

    Needed because declared durations lie: missing in some webm/raw streams, short for VFR mp4 with B-frames,
    long for truncated files. Video ends one (average) frame after its last pts: per-packet durations of
    reordered streams are decode-order deltas, not display times. Audio packet durations are exact.
    """
    declared = _declared_end(stream)
    last_pts, last_packet_end, untimed = None, None, False

    def scan(container, stream):
        nonlocal last_pts, last_packet_end, untimed
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream flush packet
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:  # raw elementary streams carry no timestamps: count packet durations
                    untimed = True
                    pts = last_packet_end or 0
                packet_end = pts + (packet.duration or 0)
                last_pts = pts if last_pts is None else max(last_pts, pts)
                last_packet_end = packet_end if last_packet_end is None else max(last_packet_end, packet_end)
        except av.error.FFmpegError as err:
            raise CorruptMediaError(path, f"demux failed in the {stream.type} stream: {_ffmpeg_reason(err)}") from err

    if declared is not None:
        # A second before the declared end: demuxers with exact seeking (wav) would otherwise land past the
        # last packet.
        try:
            container.seek(int((declared - _TAIL_SCAN_S) / stream.time_base), stream=stream, backward=True)
            scan(container, stream)
        except av.error.FFmpegError:
            pass  # unseekable: scan it all below
    if last_pts is None:  # no declared end, unseekable, or nothing in the tail (truncated): scan everything
        with _open(path) as fresh:
            scan(fresh, fresh.streams[stream.index])
    if last_pts is None:
        return None
    last_start = float(last_pts * stream.time_base)
    if stream.type == "video" and not untimed:
        return last_start, last_start + _frame_seconds(stream)
    return last_start, float(last_packet_end * stream.time_base)


def _check_truncated(path: str, stream, real_end: float, origin: float) -> None:
    declared = _declared_end(stream)
    tolerance = TRUNCATION_TOLERANCE_S
    if stream.type == "video":
        tolerance = max(tolerance, 2 * _frame_seconds(stream))
    if declared is not None and real_end < declared - tolerance:
        raise CorruptMediaError(path, f"truncated: {stream.type} stream ends at {real_end - origin:.2f} s "
                                f"of {declared - origin:.2f} s declared")


def _tick_seconds(stream):
    """ticks -> seconds in ``stream``'s time base: ``float(ticks * stream.time_base)`` without a Fraction per call
    (int / int is correctly rounded, as Fraction's float() is: the same float). The decode loops call it per frame;
    Fraction arithmetic there was about an eighth of a SynthAV clip's decode under cProfile, and the clip decodes
    0.7 ms faster of 11 (6 alternated passes over 300 clips, identical outputs; bench/RESULTS.md, "Tiny SFT")."""
    time_base = stream.time_base
    num, den = time_base.numerator, time_base.denominator
    return lambda ticks: ticks * num / den


def _failed_at(stream, time: float | None, origin: float) -> str:
    """'decode failed at 1.23 s of 4.00 s declared': the declared end hints at truncation."""
    where = "decode failed" if time is None else f"decode failed at {time - origin:.2f} s"
    declared = _declared_end(stream)
    return where if declared is None else f"{where} of {declared - origin:.2f} s declared"


def _stream_end(path: str, container, stream, origin: float) -> float:
    """The stream's end on the clip clock (s); raises when it is truncated or has no packets."""
    scanned = _scanned_end(path, container, stream)
    if scanned is None:
        raise EmptyMediaError(path, f"{stream.type} stream has no packets")
    last_start, end = scanned
    _check_truncated(path, stream, end, origin)
    declared = _declared_end(stream)
    if declared is not None and declared > last_start:
        end = declared  # consistent with the packets seen; exact where the scan estimates or includes padding
    return end - origin


def probe(path) -> MediaInfo:
    """Streams, sizes and the clip's duration, without decoding. Raises the typed errors of this module."""
    path = os.fspath(path)
    with _open(path) as container:
        video, audio = _video_stream(container), _audio_stream(container)
        if video is None and audio is None:
            raise EmptyMediaError(path, "no audio or video stream")
        origin = _origin(container)
        duration = _stream_end(path, container, video or audio, origin)
        if duration <= 0:
            raise EmptyMediaError(path, "zero duration")
        return MediaInfo(
            path=path, duration=duration, start_time=origin,
            has_video=video is not None, has_audio=audio is not None,
            width=video.codec_context.width if video else None,
            height=video.codec_context.height if video else None,
            fps=float(video.average_rate) if video is not None and video.average_rate else None,
            audio_rate=audio.codec_context.sample_rate if audio else None,
            audio_channels=audio.codec_context.channels if audio else None,
        )


# ---------------------------------------------------------------------------------------------- video

# Seeking costs a keyframe search plus decoding from that keyframe; below this lead-in, just decode.
_SEEK_LEAD_IN_S = 1.0
# A frame whose pts is within this of a requested time counts as shown at it: float(pts * time_base) and
# i * duration / n round differently (0.3 vs 0.30000000000000004).
_SAME_TIME_S = 1e-6


def decode_frames(path, times: Sequence[float], size: tuple[int, int] | None = None, *,
                  max_pixels: int = 61250, min_pixels: int = 3136, multiple: int = 28,
                  interpolation: str = "BICUBIC"):
    """The frames on screen at ``times`` (seconds on the clip clock).

    For each time t: the last frame with pts <= t, or the first frame when t precedes it; real PTS are used,
    so variable frame rate is handled. One sequential decoding pass (one seek when the first time is more than
    a second in); a frame shown at several times is converted once. Frames are resized to ``size`` (h, w), or
    to :func:`fit_size` of the source with the given budget, by swscale (antialiased when shrinking).

    Returns (frames, shown_times): uint8 (t, 3, h, w) RGB in the order of ``times``, and float64 (t,) the pts
    (s, clip clock) of each frame shown.
    """
    path = os.fspath(path)
    if len(times) == 0:
        raise ValueError("no frame times requested")
    order = sorted(range(len(times)), key=lambda i: times[i])
    shown = None
    for seek in (True, False):
        with _open(path) as container:
            stream = _video_stream(container)
            if stream is None:
                raise EmptyMediaError(path, "no video stream")
            origin = _origin(container)
            if size is None:
                source_height, source_width = stream.codec_context.height, stream.codec_context.width
                if source_height <= 0 or source_width <= 0:
                    raise CorruptMediaError(path, "video stream declares no frame size")
                size = fit_size(source_height, source_width, max_pixels, min_pixels, multiple)
            lead_in = times[order[0]] + origin - (_stream_start(stream) or 0.0)
            shown = _scan_frames(path, container, stream, times, order, size, interpolation, origin,
                                 seek=seek and lead_in > _SEEK_LEAD_IN_S)
        if shown is not None:
            break
        # The seek failed or overshot (inexact seeking in some demuxers, e.g. mpeg-ts): decode from the start.
    frames, shown_times = shown
    # numpy's transpose-copy: torch's permute().contiguous() on uint8 is ~40x slower here (8 ms for 40 frames).
    frames = torch.from_numpy(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2)))
    return frames, torch.tensor(shown_times, dtype=torch.float64)


def _scan_frames(path, container, stream, times, order, size, interpolation, origin, seek):
    """One pass over the decoded frames; None when the seek failed or landed after the first wanted time."""
    height, width = size
    frames: list = [None] * len(times)
    shown_times = [0.0] * len(times)
    fallback_step = _frame_seconds(stream)
    pending = 0  # index into `order` of the next time to fill
    previous, previous_time, previous_rgb = None, None, None
    first = True

    # One reformatter for the pass: it keeps its swscale context, while frame.reformat() builds a new one per
    # frame (3x slower on small frames). threads=1: see _single_threaded.
    reformatter = VideoReformatter()

    def rgb(frame):
        converted = reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                         interpolation=interpolation, threads=1)
        return converted.to_ndarray()

    def assign(frame, frame_time, cached):
        nonlocal pending
        array = cached if cached is not None else rgb(frame)
        index = order[pending]
        frames[index], shown_times[index] = array, frame_time - origin
        pending += 1
        return array

    if seek:
        target = times[order[0]] + origin
        try:
            container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            return None
    frame_time, packet_pts, untimed_clock = None, None, _stream_start(stream) or 0.0
    seconds = _tick_seconds(stream)
    try:
        for packet in container.demux(stream):
            frame_time, packet_pts = None, packet.pts  # the packet's time only for an error message: see except
            for frame in packet.decode():
                if frame.pts is not None:
                    frame_time = seconds(frame.pts)
                else:  # raw elementary streams carry no timestamps: count frame durations
                    frame_time = untimed_clock
                untimed_clock = frame_time + (seconds(frame.duration) if frame.duration else fallback_step)
                if first and seek and frame_time > times[order[0]] + origin + _SAME_TIME_S:
                    return None
                first = False
                cached = None
                # Times before this frame show the previous one (or this one, if nothing came before).
                while pending < len(order) and times[order[pending]] + origin < frame_time - _SAME_TIME_S:
                    if previous is None:
                        cached = assign(frame, frame_time, cached)
                    else:
                        previous_rgb = assign(previous, previous_time, previous_rgb)
                previous, previous_time, previous_rgb = frame, frame_time, cached
                if pending == len(order):
                    break
            if pending == len(order):
                break
    except av.error.FFmpegError as err:
        if frame_time is None and packet_pts is not None:
            frame_time = seconds(packet_pts)
        raise CorruptMediaError(path, f"video {_failed_at(stream, frame_time, origin)}: "
                                f"{_ffmpeg_reason(err)}") from err
    if previous is None:
        if seek:  # some demuxers (mpeg-ts) land past the only keyframe: nothing decodes from there
            return None
        raise EmptyMediaError(path, "no decodable video frames")
    if pending < len(order):  # past the last frame: it stays on screen, unless the stream was cut short
        _check_truncated(path, stream, untimed_clock, origin)
        while pending < len(order):
            previous_rgb = assign(previous, previous_time, previous_rgb)
    return frames, shown_times


# ---------------------------------------------------------------------------------------------- audio


def decode_audio(path, sample_rate: int = 16000):
    """The file's first audio stream as mono float32 at ``sample_rate``, on the clip clock.

    Downmix and resampling by libswresample (its standard matrix: 5.1 keeps the centre and surrounds, drops
    LFE). Trimmed to the stream's declared end, which removes AAC end padding; AAC priming samples are already
    dropped by the demuxer/decoder where the container records them (mp4/m4a edit lists, mkv codec delay;
    mpeg-ts has no record, there the priming sits before the first video frame, which keeps sync).

    Returns (audio float32 (n,), start): ``start`` is the time (s, clip clock) of audio[0].
    """
    path = os.fspath(path)
    with _open(path) as container:
        stream = _audio_stream(container)
        if stream is None:
            raise MissingAudioError(path, "no audio stream")
        origin = _origin(container)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks, start, packet_pts = [], None, None
        seconds = _tick_seconds(stream)
        try:
            for packet in container.demux(stream):
                packet_pts = packet.pts  # its time only for an error message: see except
                for frame in packet.decode():
                    if start is None and frame.pts is not None:
                        start = seconds(frame.pts)
                    elif start is None:  # untimed raw stream: it starts where the stream says, else at 0
                        start = _stream_start(stream) if stream.start_time is not None else origin
                    chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except av.error.FFmpegError as err:
            frame_time = None if packet_pts is None else seconds(packet_pts)
            raise CorruptMediaError(path, f"audio {_failed_at(stream, frame_time, origin)}: "
                                    f"{_ffmpeg_reason(err)}") from err
        except ValueError as err:  # the resampler refuses a mid-stream change of rate/layout
            raise CorruptMediaError(path, f"audio decode failed: {err}") from err
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        if audio.size == 0:
            raise EmptyMediaError(path, "audio stream has no decodable samples")
        decoded_end = start + audio.size / sample_rate
        _check_truncated(path, stream, decoded_end, origin)
        declared = _declared_end(stream)
        if declared is not None and start < declared < decoded_end:
            audio = audio[: round((declared - start) * sample_rate)]
    # Container start times are whole microseconds; don't report -2e-7 s for an audio that starts at 0.
    return torch.from_numpy(np.ascontiguousarray(audio)), round(start - origin, 6)


# ---------------------------------------------------------------------------------------------- clips


@dataclass
class AVClip:
    """One decoded sample. Times in seconds on the clip clock; ``duration`` is the clip's end on it.

    frames: uint8 (t, 3, h, w) or None (audio-only); frame_times: float64 (t,) the pts of each frame shown.
    audio: float32 (n,) mono at ``sample_rate``, real audio only (never padded), starting at ``audio_start``
    and ending by ``duration``; None when ``audio_status`` is "disabled".
    """

    path: str
    frames: torch.Tensor | None
    frame_times: torch.Tensor | None
    audio: torch.Tensor | None
    audio_start: float
    sample_rate: int
    duration: float
    audio_status: str  # "ok" | "disabled"
    # True when the audio was cut at the video's end (audio-visual clips); None when not known (load_clip always
    # knows; a clip built by hand does not). An uncut audio is exactly what an audio-only decode of the same file
    # returns (src.data.clip_cache serves one from the other).
    audio_cut: bool | None = None


def load_clip(video=None, audio=None, *, sampling: FrameSampling = FrameSampling(), use_audio: bool = True,
              sample_rate: int = 16000) -> AVClip:
    """Decode one sample: frames at ``sampling.timestamps(duration)`` and, if ``use_audio``, its audio.

    ``audio`` is a separate audio file (it wins over the video's own track); without it the video's track is
    used. A file without a video stream, or ``video=None``, makes an audio-only clip. Audio past the video's
    end is cut; shorter audio stays short. use_audio=True with no audio anywhere raises MissingAudioError.
    """
    if video is None and audio is None:
        raise MediaError(None, "neither a video nor an audio path was given")
    info = probe(video) if video is not None else None
    has_video = info is not None and info.has_video
    audio_source = audio if audio is not None else video
    if not has_video and not use_audio:
        raise EmptyMediaError(audio_source, "audio-only sample with use_audio=False: nothing to decode")

    frames = frame_times = None
    if has_video:
        duration = info.duration
        frames, frame_times = decode_frames(video, sampling.timestamps(duration), max_pixels=sampling.max_pixels,
                                            min_pixels=sampling.min_pixels, multiple=sampling.multiple)

    samples, audio_start, status, cut = None, 0.0, "disabled", False
    if use_audio:
        if audio is None and not info.has_audio:
            raise MissingAudioError(video, "no audio stream (and no separate audio file given)")
        samples, audio_start = decode_audio(audio_source, sample_rate)
        status = "ok"
        if has_video:
            if audio_start >= duration:
                raise MissingAudioError(audio_source, f"audio starts at {audio_start:.2f} s, after the video "
                                        f"ends at {duration:.2f} s")
            decoded = samples.numel()
            samples = samples[: round((duration - audio_start) * sample_rate)]
            cut = samples.numel() < decoded
        else:
            duration = audio_only_duration(audio_start, samples, sample_rate)
    return AVClip(path=os.fspath(video if video is not None else audio), frames=frames, frame_times=frame_times,
                  audio=samples, audio_start=audio_start, sample_rate=sample_rate, duration=duration,
                  audio_status=status, audio_cut=cut)


def audio_only_duration(audio_start: float, samples: torch.Tensor, sample_rate: int) -> float:
    """An audio-only clip ends with its audio."""
    return audio_start + samples.numel() / sample_rate

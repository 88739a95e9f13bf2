"""src.data.media: frames shown at requested times, 16 kHz mono audio on the same clock, typed errors.

Clips come from tests/media_fixtures.py: a frame's grey level encodes its time (16 + 50 * t), the audio is
silence then a sine from a known onset. Tolerances: +-2 ms for audio onsets (the brief's bound; the codecs
land within ~0.1 ms), one FFT bin for tone frequencies, ~0.04 s (2 grey levels) for frame content.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from src.data import media
from src.data.media import (
    CorruptMediaError, EmptyMediaError, FrameSampling, MediaError, MissingAudioError, UnreadableMediaError,
    decode_audio, decode_frames, fit_size, load_clip, probe,
)
from tests import media_fixtures as fx

SR = 16000


def onset_seconds(audio: torch.Tensor, start: float, threshold: float = fx.TONE_AMPLITUDE / 2) -> float:
    """Clip-clock time of the first sample above half the tone's amplitude (a sine gets there 1/12 of a period
    after its onset: 0.08 ms at 1 kHz). Low-level codec pre-echo stays below it."""
    above = np.flatnonzero(np.abs(audio.numpy()) > threshold)
    assert above.size, "no tone found"
    return start + above[0] / SR


def peak_hz(audio: torch.Tensor, begin: float, end: float) -> float:
    segment = audio.numpy()[int(begin * SR):int(end * SR)]
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(segment.size)))
    return float(np.argmax(spectrum) * SR / segment.size)


def shown_content_times(frames: torch.Tensor) -> np.ndarray:
    """The time each frame's grey level encodes (s), read from its bottom-right quarter (clear of the square)."""
    h, w = frames.shape[-2:]
    return np.array([fx.time_from_level(f[:, h // 2:, w // 2:].float().mean().item()) for f in frames])


# ------------------------------------------------------------------------------------------ sampling / sizes


def test_timestamps_uniform_at_slot_starts():
    sampling = FrameSampling()
    times = sampling.timestamps(4.0)
    assert len(times) == 40  # round(4.0 / 0.1)
    assert times[0] == 0.0 and times[-1] == pytest.approx(3.9)
    assert np.allclose(np.diff(times), 0.1)


def test_timestamps_clamped_to_min_and_max():
    sampling = FrameSampling()
    assert sampling.timestamps(0.05) == [0.0, 0.025]  # round(0.5) halves up to 1 -> min_frames 2
    long = sampling.timestamps(600.0)  # 6000 wanted -> max_frames 768, spread over the whole clip
    assert len(long) == 768
    assert np.allclose(np.diff(long), 600.0 / 768)
    assert FrameSampling(interval=1.0, min_frames=4).timestamps(2.0) == [0.0, 0.5, 1.0, 1.5]
    with pytest.raises(ValueError):
        sampling.timestamps(0.0)


@pytest.mark.parametrize("height, width", [(1080, 1920), (1920, 1080), (480, 640), (56, 56), (28, 28), (360, 640),
                                           (720, 1280), (100, 3000), (3000, 100), (250, 245)])
def test_fit_size_multiples_budget_and_aspect(height, width):
    h, w = fit_size(height, width, max_pixels=61250, min_pixels=3136, multiple=28)
    assert h % 28 == 0 and w % 28 == 0
    assert 3136 <= h * w <= 61250
    # Same scale on both sides, up to one multiple per side.
    scale = math.sqrt(h * w / (height * width))
    if min(h, w) > 28:  # a side pinned at the minimum can't keep extreme aspect ratios
        assert abs(h - scale * height) <= 28 and abs(w - scale * width) <= 28


def test_fit_size_examples():
    assert fit_size(56, 56) == (56, 56)  # already fits: untouched
    assert fit_size(1080, 1920) == (168, 308)  # 51,744 pixels; 196 x 336 would be 65,856 > 61,250
    assert fit_size(10, 10) == (56, 56)  # grown to min_pixels


# ------------------------------------------------------------------------------------------ frames


def test_cfr_frames_and_shown_times(tmp_path):
    path = fx.write_av(tmp_path / "cfr.mp4", duration=4.0, fps=8)
    times = FrameSampling().timestamps(4.0)
    frames, shown = decode_frames(path, times)
    assert frames.shape == (40, 3, 56, 56) and frames.dtype == torch.uint8
    expected = np.floor(np.array(times) * 8 + 1e-9) / 8  # 8 fps: the frame on screen at t
    assert np.allclose(shown.numpy(), expected)
    assert np.allclose(shown_content_times(frames), expected, atol=0.04)


VFR_TIMES = [0.2, 0.25, 0.5, 0.6, 1.1, 1.3, 1.9, 2.5, 2.6, 3.0, 3.9]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_vfr_shows_the_frame_on_screen(tmp_path, suffix):
    path = fx.write_av(tmp_path / f"vfr{suffix}", duration=4.0, vfr_times=VFR_TIMES)
    queries = [0.0, 0.1, 0.24, 0.25, 0.3, 0.55, 1.0, 1.2, 2.0, 2.55, 2.7, 3.5, 3.95, 4.5]
    frames, shown = decode_frames(path, queries)
    # Last frame with pts <= t; before the first frame (0.2 s) the first one.
    expected = [max([v for v in VFR_TIMES if v <= q], default=VFR_TIMES[0]) for q in queries]
    assert np.allclose(shown.numpy(), expected)
    assert np.allclose(shown_content_times(frames), expected, atol=0.04)
    assert probe(path).duration >= 3.9  # the declared duration of a VFR mp4 with B-frames can be short


def test_seek_and_order_match_a_full_pass(tmp_path, monkeypatch):
    path = fx.write_av(tmp_path / "seek.mp4", duration=4.0, fps=8)
    opened = []
    monkeypatch.setattr(media, "_open", lambda p, _open=media._open: opened.append(p) or _open(p))
    queries = [3.3, 2.0, 2.6, 2.6]  # first time > 1 s in: decoded after one seek; unsorted, repeated
    frames, shown = decode_frames(path, queries)
    assert len(opened) == 1  # the seek landed before 2.0 s: no second pass from the start
    full, full_shown = decode_frames(path, [0.0, *queries])
    assert torch.equal(frames, full[1:]) and torch.equal(shown, full_shown[1:])
    assert shown.tolist() == [3.25, 2.0, 2.5, 2.5]


def test_inexact_seek_falls_back_to_a_full_pass(tmp_path):
    """mpeg-ts seeks by bytes and can land past the clip's only keyframe: nothing decodes from there."""
    path = fx.write_av(tmp_path / "seek.ts", duration=4.0, fps=8)
    frames, shown = decode_frames(path, [2.0, 3.0])
    full, full_shown = decode_frames(path, [0.0, 2.0, 3.0])
    assert torch.equal(frames, full[1:]) and torch.equal(shown, full_shown[1:])


def test_frames_resized_to_budget(tmp_path):
    path = fx.write_av(tmp_path / "wide.mp4", duration=1.0, size=(120, 320), audio=False)
    frames, _ = decode_frames(path, [0.0, 0.5], max_pixels=28 * 28 * 12)
    assert frames.shape == (2, 3, *fit_size(120, 320, 28 * 28 * 12))
    frames, _ = decode_frames(path, [0.0], size=(56, 84))
    assert frames.shape == (1, 3, 56, 84)


# ------------------------------------------------------------------------------------------ audio


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_resampled_tone_keeps_frequency_onset_and_length(tmp_path, rate, suffix):
    path = fx.write_av(tmp_path / f"tone{rate}{suffix}", duration=2.0, audio_rate=rate, tone_hz=1000.0,
                       tone_onset=0.7)
    audio, start = decode_audio(path)
    assert audio.dtype == torch.float32 and audio.ndim == 1
    assert start == 0.0
    # AAC priming (1024 samples at the source rate) is dropped in both. mp4 also records the real length, so
    # the end padding is trimmed: exactly 2 s. Matroska records no end padding for AAC: up to one frame more.
    if suffix == ".mp4":
        assert abs(audio.numel() - 2 * SR) <= 1
    else:
        assert 2 * SR - 1 <= audio.numel() <= 2 * SR + 1024 * SR / rate + 1
    assert abs(onset_seconds(audio, start) - 0.7) <= 0.002
    assert abs(peak_hz(audio, 1.0, 1.5) - 1000.0) <= SR / (0.5 * SR)  # one bin of a 0.5 s window: 2 Hz


@pytest.mark.parametrize("suffix, rate", [(".m4a", 44100), (".wav", 22050), (".mp3", 44100), (".flac", 48000)])
def test_audio_only_files(tmp_path, suffix, rate):
    path = fx.write_av(tmp_path / f"audio{suffix}", video=False, duration=2.0, audio_rate=rate, tone_onset=0.5)
    clip = load_clip(path)
    assert clip.frames is None and clip.frame_times is None
    assert clip.audio_status == "ok"
    assert clip.duration == pytest.approx(2.0, abs=0.002)
    assert abs(onset_seconds(clip.audio, clip.audio_start) - 0.5) <= 0.002
    assert probe(path).has_video is False
    assert load_clip(None, audio=path).audio.shape == clip.audio.shape


@pytest.mark.parametrize("channels, tone_channel", [(2, 1), (6, 0), (6, 2), (6, 5)])
def test_downmix_keeps_a_tone_on_one_channel(tmp_path, channels, tone_channel):
    """swresample's standard downmix: stereo L/R at -3 dB, 5.1 front/centre/surrounds kept (LFE dropped)."""
    path = fx.write_av(tmp_path / f"ch{channels}.mp4", duration=1.5, channels=channels, tone_channel=tone_channel,
                       audio_rate=48000, tone_hz=440.0, tone_onset=0.5)
    audio, start = decode_audio(path)
    assert audio.ndim == 1
    assert audio[int(0.6 * SR):].abs().max() > 0.2
    assert abs(peak_hz(audio, 0.6, 1.4) - 440.0) <= 2.0
    assert abs(onset_seconds(audio, start, threshold=0.1) - 0.5) <= 0.002


def test_audio_and_video_share_one_clock(tmp_path):
    """The tone starts when the square appears: same clip-clock time for both modalities."""
    path = fx.write_av(tmp_path / "sync.mp4", duration=3.0, fps=10, audio_rate=44100, tone_onset=1.2,
                       square_onset=1.2, tone_hz=1000.0)
    clip = load_clip(path)
    has_square = clip.frames[:, :, :20, :20].float().mean(dim=(1, 2, 3)) > 250
    first_square_time = float(clip.frame_times[has_square][0])
    assert first_square_time == pytest.approx(1.2)
    assert abs(onset_seconds(clip.audio, clip.audio_start) - first_square_time) <= 0.002


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_audio_starting_after_the_video(tmp_path, suffix):
    path = fx.write_av(tmp_path / f"late{suffix}", duration=3.0, audio_delay=0.5, tone_onset=0.5, audio_duration=2.0)
    clip = load_clip(path)
    # mkv records the AAC priming as codec delay and drops it; an mp4 whose audio starts late records none,
    # so its 1024 priming samples stay, placed at their real time (0.436 s), shifting nothing.
    assert 0.5 - 1024 / SR - 1e-6 <= clip.audio_start <= 0.5 + 1e-6
    assert abs(onset_seconds(clip.audio, clip.audio_start) - 1.0) <= 0.002
    end = clip.audio_start + clip.audio.numel() / SR
    end_padding = 1024 / SR if suffix == ".mkv" else 0.0  # unrecorded in Matroska, see the resampling test
    assert 2.5 - 0.002 <= end <= 2.5 + end_padding + 0.002


def test_audio_longer_than_video_is_cut_at_the_video_end(tmp_path):
    path = fx.write_av(tmp_path / "long_audio.mp4", duration=2.0, audio_duration=3.0)
    clip = load_clip(path)
    assert clip.duration == pytest.approx(2.0)
    assert clip.audio.numel() == 2 * SR
    assert len(clip.frames) == 20


def test_audio_shorter_than_video_stays_short(tmp_path):
    path = fx.write_av(tmp_path / "short_audio.mp4", duration=2.0, audio_duration=1.0)
    clip = load_clip(path)
    assert clip.duration == pytest.approx(2.0)
    assert clip.audio.numel() == SR  # 1 s of real audio, no zero padding to the video's 2 s
    assert clip.audio[-100:].abs().max() > 0.1  # the tone runs to the last sample: nothing appended


def test_separate_audio_file_wins(tmp_path):
    video = fx.write_av(tmp_path / "silent.mp4", duration=2.0, audio=False)
    track = fx.write_av(tmp_path / "track.wav", video=False, duration=3.0, tone_onset=0.3)
    clip = load_clip(video, track)
    assert clip.audio.numel() == 2 * SR  # cut at the video's end
    assert abs(onset_seconds(clip.audio, clip.audio_start) - 0.3) <= 0.002


def test_missing_audio_track_is_an_error(tmp_path):
    path = fx.write_av(tmp_path / "no_audio.mp4", duration=1.0, audio=False)
    with pytest.raises(MissingAudioError) as caught:
        load_clip(path)
    assert str(path) in str(caught.value) and "no audio stream" in str(caught.value)
    with pytest.raises(MissingAudioError):
        decode_audio(path)


def test_use_audio_false_does_not_touch_audio(tmp_path, monkeypatch):
    path = fx.write_av(tmp_path / "no_audio.mp4", duration=1.0, audio=False)

    def refuse(*args, **kwargs):
        raise AssertionError("audio decoded although use_audio=False")

    monkeypatch.setattr(media, "decode_audio", refuse)
    clip = load_clip(path, use_audio=False)
    assert clip.audio is None and clip.audio_status == "disabled"
    assert clip.frames.shape == (10, 3, 56, 56)


def test_neither_video_nor_audio_given():
    with pytest.raises(MediaError, match="neither a video nor an audio"):
        load_clip(None)


# ------------------------------------------------------------------------------------------ bad files


def _assert_error(function, path, error_type, reason):
    with pytest.raises(error_type) as caught:
        function(path)
    assert caught.value.path == os.fspath(path)
    assert os.fspath(path) in str(caught.value) and reason in str(caught.value), str(caught.value)


PUBLIC = [probe, load_clip, decode_audio, lambda path: decode_frames(path, [0.0, 1.0])]
PUBLIC_IDS = ["probe", "load_clip", "decode_audio", "decode_frames"]


@pytest.fixture(params=PUBLIC, ids=PUBLIC_IDS)
def public(request):
    return request.param


def test_zero_length(tmp_path, public):
    _assert_error(public, fx.write_zero_length(tmp_path / "empty.mp4"), EmptyMediaError, "zero-length file")


def test_random_bytes(tmp_path, public):
    _assert_error(public, fx.write_random_bytes(tmp_path / "noise.mp4"), CorruptMediaError, "cannot open container")


def test_mp4_header_then_garbage(tmp_path, public):
    _assert_error(public, fx.write_garbage_after_header(tmp_path / "garbage.mp4"), CorruptMediaError,
                  "cannot open container")


def test_truncated_mp4_with_moov_at_the_end(tmp_path, public):
    """Half a plain mp4 loses its index (moov is written last): FFmpeg refuses to open it."""
    source = fx.write_av(tmp_path / "whole.mp4", duration=2.0)
    _assert_error(public, fx.write_truncated(source, tmp_path / "half.mp4"), CorruptMediaError,
                  "cannot open container")


@pytest.mark.parametrize("suffix, options", [(".mp4", {"movflags": "faststart"}), (".mkv", None)])
def test_truncated_file_with_header_first(tmp_path, suffix, options):
    """Faststart mp4 and mkv keep the header (and the declared duration): the cut shows as a short stream."""
    source = fx.write_av(tmp_path / f"whole{suffix}", duration=4.0, options=options)
    half = fx.write_truncated(source, tmp_path / f"half{suffix}")
    for function in (probe, load_clip, lambda path: decode_frames(path, [0.0, 3.9])):
        _assert_error(function, half, CorruptMediaError, "truncated: video stream ends at")
    with pytest.raises(CorruptMediaError, match=r"(truncated: audio stream ends at|decode failed at).* s declared"):
        decode_audio(half)  # mkv: "truncated: audio stream ends ..."; mp4: "decode failed at ... of 4.00 s"


def test_nonexistent_path(tmp_path, public):
    _assert_error(public, tmp_path / "nothing.mp4", UnreadableMediaError, "no such file")


def test_path_in_a_missing_directory(tmp_path, public):
    _assert_error(public, tmp_path / "no_dir" / "clip.mp4", UnreadableMediaError, "no such directory")


def test_dangling_symlink(tmp_path, public):
    _assert_error(public, fx.write_dangling_symlink(tmp_path / "link.mp4"), UnreadableMediaError,
                  "dangling symlink")


def test_directory(tmp_path, public):
    folder = tmp_path / "clip.mp4"
    folder.mkdir()
    _assert_error(public, folder, UnreadableMediaError, "is a directory")


def test_unreadable_file(tmp_path, public):
    path = fx.write_av(tmp_path / "locked.mp4", duration=1.0)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not deny reading")
        _assert_error(public, path, UnreadableMediaError, "permission denied")
    finally:
        path.chmod(0o644)


def test_no_audio_or_video_stream(tmp_path):
    path = fx.write_no_streams(tmp_path / "meta.mp4")
    for function in (probe, load_clip):
        _assert_error(function, path, EmptyMediaError, "no audio or video stream")
    _assert_error(decode_audio, path, MissingAudioError, "no audio stream")
    _assert_error(lambda p: decode_frames(p, [0.0]), path, EmptyMediaError, "no video stream")


def test_audio_stream_without_samples(tmp_path):
    path = fx.write_empty_wav(tmp_path / "silent.wav")
    _assert_error(load_clip, path, EmptyMediaError, "audio stream has no packets")
    _assert_error(decode_audio, path, EmptyMediaError, "audio stream has no decodable samples")


def _collect_in_child():
    import gc

    gc.collect()


def test_decoder_state_left_in_a_cycle_is_safe_to_free_in_a_forked_worker(tmp_path):
    """A decode that fails mid-pass leaves its objects reachable from the caught error's traceback (a bad sample
    that was reported keeps them until the collector runs). A DataLoader worker forked meanwhile must be able to
    free them: with swscale's default slice threads the child deadlocked in sws_freeContext (seen in CI)."""
    import gc
    import multiprocessing as mp

    whole = fx.write_av(tmp_path / "whole.mkv", duration=4.0, fps=8, size=(360, 640), crf=23)
    cut = fx.write_truncated(whole, tmp_path / "cut.mkv", fraction=0.6)
    gc.disable()
    try:
        try:
            media.decode_frames(cut, [0.0, 0.5, 1.0, 3.9])
        except media.MediaError as err:
            assert any(tb.tb_frame.f_code.co_name == "_scan_frames" for tb in _tracebacks(err))
            box = {"err": err}  # err -> traceback -> the decode's frames, held by a cycle only:
            box["box"] = box  # the first collector to run frees them, here the forked child's
        del box
        child = mp.get_context("fork").Process(target=_collect_in_child)
        child.start()
        child.join(timeout=20)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive and child.exitcode == 0
    finally:
        gc.enable()


def _tracebacks(err):
    tb = err.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next

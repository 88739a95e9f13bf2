"""The decoded-clip cache returns exactly what decoding returns, and never a stale or broken entry."""

from __future__ import annotations

import os

import pytest
import torch

from src.data.clip_cache import ClipCache, warm_clip_cache
from src.data.errors import BadSampleError
from src.data.manifest import read_manifest
from src.data.media import FrameSampling, load_clip

SAMPLING = FrameSampling(interval=0.25, max_pixels=56 * 56, min_pixels=56 * 56)


class CountingDecoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return load_clip(*args, **kwargs)


def _same(a, b):
    assert (a.path, a.audio_start, a.sample_rate, a.duration, a.audio_status) == \
        (b.path, b.audio_start, b.sample_rate, b.duration, b.audio_status)
    for name in ("frames", "frame_times", "audio"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y)


def _get(cache, video, decode, **kw):
    settings = dict(sampling=SAMPLING, use_audio=True, sample_rate=16000) | kw
    return cache.get(video, None, decode=decode, **settings)


def test_hit_is_identical_to_a_decode(tmp_path, synthav):
    video = str(synthav / read_manifest(synthav / "train.jsonl")[0].video)
    cache, decode = ClipCache(tmp_path / "cache"), CountingDecoder()
    first = _get(cache, video, decode)
    second = _get(ClipCache(tmp_path / "cache"), video, decode)  # a fresh object: the entry is on disk
    assert decode.calls == 1
    _same(first, load_clip(video, sampling=SAMPLING))
    _same(second, first)


def test_settings_and_rewritten_files_are_new_keys(tmp_path, synthav):
    rows = read_manifest(synthav / "train.jsonl")
    video = tmp_path / "clip.mp4"
    video.write_bytes((synthav / rows[0].video).read_bytes())
    cache, decode = ClipCache(tmp_path / "cache"), CountingDecoder()
    _get(cache, str(video), decode)
    _get(cache, str(video), decode, use_audio=False)
    _get(cache, str(video), decode, sampling=FrameSampling(interval=0.5, max_pixels=56 * 56, min_pixels=56 * 56))
    assert decode.calls == 3
    video.write_bytes((synthav / rows[1].video).read_bytes())  # same path, new content
    os.utime(video, ns=(1, 1))
    clip = _get(cache, str(video), decode)
    assert decode.calls == 4
    _same(clip, load_clip(str(video), sampling=SAMPLING))


def test_corrupt_entry_is_dropped_and_redecoded(tmp_path, synthav):
    video = str(synthav / read_manifest(synthav / "train.jsonl")[0].video)
    cache, decode = ClipCache(tmp_path / "cache"), CountingDecoder()
    _get(cache, video, decode)
    (entry,) = (tmp_path / "cache").rglob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    clip = _get(cache, video, decode)
    assert decode.calls == 2
    _same(clip, load_clip(video, sampling=SAMPLING))


def test_bad_media_is_never_cached(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    cache = ClipCache(tmp_path / "cache")
    for _ in range(2):
        with pytest.raises(BadSampleError, match="bad.mp4"):
            _get(cache, str(bad), load_clip)
    with pytest.raises(BadSampleError, match="missing.mp4"):
        _get(cache, str(tmp_path / "missing.mp4"), load_clip)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_warm_decodes_in_worker_processes_what_a_run_then_reads(tmp_path, synthav):
    """Two spawned workers fill the cache; a bad clip is counted and left out; a second warm decodes nothing, and
    a run's reads are hits equal to a decode."""
    videos = [str(synthav / r.video) for r in read_manifest(synthav / "train.jsonl")[:3]]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    clips = [(v, None, True) for v in videos] + [(str(bad), None, True)]
    warm = dict(sampling=SAMPLING, sample_rate=16000, workers=2, chunk=2)
    assert warm_clip_cache(tmp_path / "cache", clips, **warm) == {"clips": 4, "decoded": 3, "failed": 1}
    assert warm_clip_cache(tmp_path / "cache", clips, **warm) == {"clips": 4, "decoded": 0, "failed": 1}
    cache, decode = ClipCache(tmp_path / "cache"), CountingDecoder()
    _same(_get(cache, videos[2], decode), load_clip(videos[2], sampling=SAMPLING))
    assert decode.calls == 0 and cache.hits == 1


def test_datamodule_epochs_through_the_cache_match_decoding(tmp_path, synthav):
    from src.data.datamodule import AVDataModule

    def epoch(dm):
        dm.setup("fit")
        return {i: (f, a) for batch in dm.val_dataloader() for i, f, a in zip(batch["id"], batch["frames"], batch["audio"])}

    plain = epoch(AVDataModule(val=synthav / "train.jsonl", batch_size=4, num_workers=0, sampling=SAMPLING))
    cached = AVDataModule(val=synthav / "train.jsonl", batch_size=4, num_workers=2, sampling=SAMPLING,
                          cache_dir=str(tmp_path / "cache"))
    first, second = epoch(cached), epoch(cached)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(plain) == 8
    assert plain.keys() == first.keys() == second.keys()
    for key, (frames, audio) in plain.items():
        for other in (first, second):
            assert torch.equal(frames, other[key][0]) and torch.equal(audio, other[key][1])


def test_cache_dir_needs_a_processor_that_can_use_it(tmp_path, synthav):
    from src.data.datamodule import AVDataModule

    class Plain:
        def __call__(self, row):
            return {}

    with pytest.raises(ValueError, match="cache_dir"):
        AVDataModule(train=synthav / "train.jsonl", processor=Plain(), cache_dir=str(tmp_path))


def test_model_processor_reads_through_the_cache(tmp_path, synthav):
    from src.data.datamodule import AVDataModule
    from src.models.build import build_tiny

    base = build_tiny(tmp_path / "base", tokenizer_texts=300)
    dm = AVDataModule(train=synthav / "train.jsonl", base=str(base), cache_dir=str(tmp_path / "cache"))
    row = read_manifest(synthav / "train.jsonl")[0]
    decoded = dm.processor(row)
    cached = dm.processor(row)
    assert dm.processor.clip_cache.hits == 1 and dm.processor.clip_cache.misses == 1
    assert decoded.keys() == cached.keys()
    for key, value in decoded.items():
        assert torch.equal(value, cached[key]) if isinstance(value, torch.Tensor) else value == cached[key]


class RefusingDecoder:
    def __call__(self, *args, **kwargs):
        raise AssertionError("decoded although the cache could serve the clip")


def test_audio_only_request_is_served_from_the_audio_visual_entry(tmp_path, synthav):
    """SynthAV's audio-only rows name the clip's mp4 as their audio: once the clip's audio-visual entry exists, the
    audio-only clip comes from it, equal to an audio-only decode, with no decode."""
    video = str(synthav / read_manifest(synthav / "train.jsonl")[0].video)
    cache = ClipCache(tmp_path / "cache")
    av = _get(cache, video, CountingDecoder())
    assert av.audio_cut is False
    fresh = ClipCache(tmp_path / "cache")
    served = fresh.get(None, video, sampling=SAMPLING, use_audio=True, sample_rate=16000, decode=RefusingDecoder())
    assert fresh.hits == 1
    _same(served, load_clip(None, video, sampling=SAMPLING))
    assert served.frames is None and served.audio_cut is False


def test_audio_cut_at_the_video_end_or_unrecorded_is_decoded(tmp_path):
    """A clip whose audio runs past its video: the audio-visual entry holds the cut audio, so the audio-only request
    decodes. An entry written before entries recorded the cut is not used either."""
    from tests import media_fixtures as fx

    long_audio = str(fx.write_av(tmp_path / "long_audio.mp4", duration=2.0, audio_duration=3.0))
    cache, decode = ClipCache(tmp_path / "cache"), CountingDecoder()
    assert _get(cache, long_audio, decode).audio_cut is True
    served = cache.get(None, long_audio, sampling=SAMPLING, use_audio=True, sample_rate=16000, decode=decode)
    assert decode.calls == 2
    _same(served, load_clip(None, long_audio, sampling=SAMPLING))
    assert served.duration > 2.9  # the whole audio, not the video's 2 s

    plain = str(fx.write_av(tmp_path / "plain.mp4", duration=2.0))
    clip = load_clip(plain, sampling=SAMPLING)
    clip.audio_cut = None  # what _read gives for an entry without the field
    ClipCache._write(cache.path(cache.key(plain, None, SAMPLING, True, 16000)), clip)
    cache.get(None, plain, sampling=SAMPLING, use_audio=True, sample_rate=16000, decode=decode)
    assert decode.calls == 3

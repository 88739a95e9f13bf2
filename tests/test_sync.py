"""A generated clip, decoded, shows a known event at the right time in both modalities.

The scene says where the shape is at time t and when (and at what pitch) its sound starts; the decoder must
find the shape's centroid there in the frames and the sound's frequency peak in the audio around its onset.
"""

from __future__ import annotations

import numpy as np
import pytest

from src.data.media import decode_audio, decode_frames, load_clip
from src.data.synth.generate import ClipSettings, clip_rng, make_clip
from src.data.synth.scene import sample_scene, shape_radius, sound_length
from src.data.synth.world import BEEP_HZ, COLOUR_RGB, TONE_HZ


def find_scene(want):
    """The first train index whose scene satisfies ``want`` (seed 0), with the scene."""
    settings = ClipSettings()
    for index in range(500):
        scene = sample_scene(clip_rng(0, "train", index), settings.duration, settings.size, settings.fps)
        if want(scene):
            return index, scene
    raise AssertionError("no such scene in 500 draws")


def appears_with_sound(scene):
    return any(te.event.kind == "appear" and te.event.sound is not None and te.event.sound.kind != "noise"
               for te in scene.events)


def colour_centroid(frame: np.ndarray, rgb, near: tuple[float, float], radius: float) -> tuple[float, float] | None:
    """Mean (x, y) of the pixels within 60 of ``rgb`` per channel and ``radius`` px of ``near`` (another object
    may share the colour elsewhere); frame (3, h, w) uint8."""
    close = (np.abs(frame.astype(int) - np.array(rgb)[:, None, None]) < 60).all(axis=0)
    ys, xs = np.nonzero(close)
    keep = np.hypot(xs - near[0], ys - near[1]) <= radius
    return (float(xs[keep].mean()), float(ys[keep].mean())) if keep.sum() > 3 else None


@pytest.fixture(scope="module")
def tied_clip(tmp_path_factory):
    index, scene = find_scene(appears_with_sound)
    out = tmp_path_factory.mktemp("sync")
    (out / "train").mkdir()
    row = make_clip(out, "train", index, 0, ClipSettings())
    event = next(te for te in scene.events if te.event.kind == "appear" and te.event.sound is not None)
    return out / row["video"], scene, event


def test_shape_appears_at_its_time_and_place(tied_clip):
    path, scene, timed = tied_clip
    t, shape, colour = timed.t, timed.event.shape, timed.event.colour
    frames, shown = decode_frames(path, [t - 0.25, t, t + 0.25], size=(scene.size, scene.size))
    assert np.allclose(shown.numpy(), [t - 0.25, t, t + 0.25], atol=1e-6)  # onsets sit on frames (8 fps)
    radius = 2 * shape_radius(scene.size)
    assert scene.object_centroid(shape, t - 0.25) is None
    assert colour_centroid(frames[0].numpy(), COLOUR_RGB[colour], scene.object_centroid(shape, t), radius) is None
    for frame, when in zip(frames[1:], (t, t + 0.25)):
        expected = scene.object_centroid(shape, when)
        found = colour_centroid(frame.numpy(), COLOUR_RGB[colour], expected, radius)
        assert found is not None
        assert np.hypot(found[0] - expected[0], found[1] - expected[1]) < 1.5


def test_its_sound_starts_at_the_same_time_with_its_pitch(tied_clip):
    path, scene, timed = tied_clip
    sound, t = timed.event.sound, timed.t
    audio, start = decode_audio(path)
    audio = audio.numpy()
    rate = 16000
    assert start == pytest.approx(0.0, abs=1e-3)
    assert len(audio) == pytest.approx(scene.duration * rate, abs=rate * 0.01)

    # onset: the first 2 ms frame whose RMS rises above a tenth of the sound's RMS
    hop = rate // 500
    rms = np.sqrt(np.convolve(audio ** 2, np.ones(hop) / hop, mode="same"))
    onset = np.argmax(rms > 0.1 * rms[int((t + 0.03) * rate)]) / rate
    assert onset == pytest.approx(t, abs=0.01)

    # pitch: the spectral peak over the sound's first beep / first 80 ms
    span = audio[int(t * rate): int((t + min(0.08, sound_length(sound))) * rate)]
    spectrum = np.abs(np.fft.rfft(span * np.hanning(len(span)), n=8 * len(span)))
    peak = np.fft.rfftfreq(8 * len(span), 1 / rate)[np.argmax(spectrum)]
    expected = (TONE_HZ if sound.kind == "tone" else BEEP_HZ)[sound.pitch]
    assert peak == pytest.approx(expected, rel=0.03)


def test_load_clip_puts_both_on_one_clock(tied_clip):
    path, scene, _ = tied_clip
    clip = load_clip(path)
    assert clip.audio_status == "ok" and clip.duration == pytest.approx(scene.duration, abs=0.01)
    assert clip.frame_times[0] == pytest.approx(0.0) and clip.audio_start == pytest.approx(0.0, abs=1e-3)
    assert clip.frames.shape[0] == round(scene.duration / 0.1)

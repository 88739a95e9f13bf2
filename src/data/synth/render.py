"""Scene -> frames and samples, vectorised with numpy (a 4 s clip renders in about a millisecond)."""

from __future__ import annotations

import numpy as np

from src.data.synth.scene import Scene, SceneObject, shape_radius, sound_length
from src.data.synth.world import (
    BACKGROUND_RGB, BEEP_GAP_S, BEEP_HZ, BEEP_S, COLOUR_RGB, COLOURS, FADE_S, NOISE_AMPLITUDE, SOUND_AMPLITUDE,
    TONE_HZ, Event,
)

_PALETTE = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.uint8)  # (n_colours, 3)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test on pixel offsets from the centre; dx, dy broadcast to (T, H, W)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        side = 0.85 * r  # a slightly smaller square keeps its area close to the circle's
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if shape == "triangle":
        # apex up at dy = -r, base at dy = +r, half-width growing from 0 to r
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def object_masks(obj: SceneObject, times: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where ``obj`` is drawn at ``times`` (T,): mask (T, size, size) bool and colour index (T,)."""
    visible, cx, cy, colour = obj.track(times, size)
    coords = np.arange(size, dtype=np.float64)
    dx = coords[None, None, :] - cx[:, None, None]
    dy = coords[None, :, None] - cy[:, None, None]
    mask = _shape_mask(obj.shape, dx, dy, shape_radius(size)) & visible[:, None, None]
    return mask, colour


def frame_times(scene: Scene) -> np.ndarray:
    """(T,) seconds shown by each frame: frame i is the state at i / fps."""
    return np.arange(scene.n_frames) / scene.fps


def render_video(scene: Scene) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames; later objects are drawn over earlier ones (they never overlap anyway)."""
    times = frame_times(scene)
    frames = np.empty((len(times), scene.size, scene.size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND_RGB
    for obj in scene.objects:
        mask, colour = object_masks(obj, times, scene.size)
        frames = np.where(mask[..., None], _PALETTE[colour][:, None, None, :], frames)
    return frames


def _fade(n: int, sample_rate: int) -> np.ndarray:
    """(n,) envelope rising and falling over FADE_S with a raised cosine."""
    env = np.ones(n)
    k = min(n // 2, max(1, round(FADE_S * sample_rate)))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
    env[:k] *= ramp
    env[n - k:] *= ramp[::-1]
    return env


def _sine(hz: float, seconds: float, sample_rate: int) -> np.ndarray:
    n = round(seconds * sample_rate)
    return SOUND_AMPLITUDE * np.sin(2 * np.pi * hz * np.arange(n) / sample_rate) * _fade(n, sample_rate)


def sound_wave(sound: Event, sample_rate: int, noise_rng: np.random.Generator) -> np.ndarray:
    """(n,) float64 waveform of one sound, n = sound_length * sample_rate."""
    if sound.kind == "tone":
        return _sine(TONE_HZ[sound.pitch], sound_length(sound), sample_rate)
    if sound.kind == "beep":
        beep = _sine(BEEP_HZ[sound.pitch], BEEP_S, sample_rate)
        period = round((BEEP_S + BEEP_GAP_S) * sample_rate)
        out = np.zeros(round(sound_length(sound) * sample_rate))
        for i in range(sound.count):
            out[i * period:i * period + len(beep)] = beep[: len(out) - i * period]
        return out
    if sound.kind == "noise":
        n = round(sound_length(sound) * sample_rate)
        return NOISE_AMPLITUDE * noise_rng.uniform(-1.0, 1.0, n) * _fade(n, sample_rate)
    raise ValueError(f"not a sound: {sound.kind!r}")


def render_audio(scene: Scene) -> np.ndarray:
    """(n,) float32 mono at scene.sample_rate, silence except the scene's sounds; n = duration * sample_rate."""
    out = np.zeros(scene.n_samples)
    noise_rng = np.random.default_rng(scene.noise_seed)
    for timed in scene.sounds:
        wave = sound_wave(timed.event, scene.sample_rate, noise_rng)
        start = round(timed.t * scene.sample_rate)
        end = min(start + len(wave), len(out))
        out[start:end] += wave[: end - start]
    return out.astype(np.float32)

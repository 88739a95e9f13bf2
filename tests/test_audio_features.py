"""Whisper log-mel features: our batched torch version against transformers' WhisperFeatureExtractor, and the
0.5 s window count that decides how many audio tokens a clip gets."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperFeatureExtractor

from src.models.audio import AudioSettings, chunk_audio, log_mel_chunks, num_windows

SR = 16000


def _signal(seconds: float, seed: int = 0) -> torch.Tensor:
    """A chirp plus noise whose loudness swings 1000x over a 20 s period, with 0.3 s of digital silence at 1 s:
    the (max - 8) clamp bites inside a chunk."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(round(seconds * SR)) / SR
    tone = torch.sin(2 * torch.pi * (200 + 300 * t) * t)
    loudness = 0.5 * (1 + torch.sin(2 * torch.pi * t / 20)) + 1e-3
    audio = loudness * (0.6 * tone + 0.1 * torch.randn(t.shape, generator=g))
    audio[round(1.0 * SR):round(1.3 * SR)] = 0.0
    return audio.to(torch.float32)


def _reference(chunk: torch.Tensor, settings: AudioSettings) -> torch.Tensor:
    """(n_mels, chunk_frames) from WhisperFeatureExtractor run on one chunk of at most chunk_samples."""
    extractor = WhisperFeatureExtractor(
        feature_size=settings.n_mels, sampling_rate=SR, chunk_length=int(settings.chunk_seconds),
        n_fft=settings.n_fft, hop_length=settings.hop_length,
    )
    out = extractor(chunk.numpy(), sampling_rate=SR, return_tensors="pt", padding="max_length")
    return out.input_features[0]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_short_clip_matches_extractor(n_mels):
    settings = AudioSettings(n_mels=n_mels, chunk_seconds=4.0)
    audio = _signal(2.3)
    ours = log_mel_chunks(audio, settings)
    assert ours.shape == (1, n_mels, 400) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[0], _reference(audio, settings), atol=1e-4, rtol=0)


def test_long_clip_is_chunked_like_whisper():
    """65 s with 30 s chunks: 3 chunks, each equal to the extractor on its own 30 s slice (last one 5 s)."""
    settings = AudioSettings()
    audio = _signal(65.0, seed=1)
    audio[30 * SR:60 * SR] *= 1e-3  # a quiet middle chunk: its floor must follow its own max, not the clip's
    ours = log_mel_chunks(audio, settings)
    assert ours.shape == (3, 128, 3000)
    for i in range(3):
        piece = audio[i * settings.chunk_samples:(i + 1) * settings.chunk_samples]
        torch.testing.assert_close(ours[i], _reference(piece, settings), atol=1e-4, rtol=0)
    # A clip-wide clamp would floor the quiet chunk at the loud chunk's floor.
    assert ours[1].min() < ours[0].min() - 1.0


def test_chunking_and_empty_audio():
    settings = AudioSettings(n_mels=80, chunk_seconds=4.0)
    rows = chunk_audio(torch.ones(70000), settings)
    assert rows.shape == (2, 64000)
    assert rows[1, :6000].eq(1).all() and rows[1, 6000:].eq(0).all()
    assert log_mel_chunks(torch.zeros(0), settings).shape == (0, 80, 400)
    with pytest.raises(ValueError, match="mono"):
        log_mel_chunks(torch.zeros(2, 100), settings)


@pytest.mark.parametrize("seconds,windows", [(3.0, 6), (3.2, 7), (0.0, 0), (0.5, 1), (0.5 + 1 / SR, 2)])
def test_num_windows(seconds, windows):
    assert num_windows(round(seconds * SR), AudioSettings()) == windows


def test_settings_geometry():
    large = AudioSettings()
    assert (large.chunk_samples, large.chunk_frames, large.encoder_frames_per_chunk) == (480000, 3000, 1500)
    assert large.frames_per_window == 25
    tiny = AudioSettings(n_mels=80, chunk_seconds=4.0)
    assert (tiny.chunk_frames, tiny.encoder_frames_per_chunk, tiny.frames_per_window) == (400, 200, 25)
    with pytest.raises(ValueError, match="multiple of window_seconds"):
        AudioSettings(chunk_seconds=4.2)
    with pytest.raises(ValueError, match="encoder frames"):
        AudioSettings(window_seconds=0.25)

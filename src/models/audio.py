"""Whisper's audio front end in torch: fixed-length chunks, their log-mel spectrograms, and the 0.5 s window count.

Whisper only accepts a fixed input (30 s = 3000 mel frames for large-v3), so long audio is cut into chunks and
the last one is zero-padded. The aligner turns every 0.5 s window of encoder frames into audio tokens, but only
the windows that hold real audio: :func:`num_windows` counts them from the clip's sample count, which is what
keeps the official code's tokens-for-padding-silence bug out.

:func:`log_mel_chunks` reproduces ``transformers.WhisperFeatureExtractor`` (torch path) chunk by chunk, batched
over chunks so a long clip costs one ``torch.stft`` call.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from transformers.audio_utils import mel_filter_bank

# Whisper's mel filters stop at 8 kHz whatever the sample rate (the Nyquist frequency of its 16 kHz input).
_MEL_MAX_HZ = 8000.0
# Log-mel floor and dynamic range, as in Whisper: values below (chunk max - 8) in log10 are clamped.
_LOG_FLOOR = 1e-10
_DYNAMIC_RANGE = 8.0


@dataclass(frozen=True)
class AudioSettings:
    """Whisper input geometry. Defaults: Whisper-large-v3 (128 mel bins, 30 s chunks) and 0.5 s aligner windows.

    A tiny encoder uses a shorter chunk (e.g. 4 s = 400 mel frames for ``max_source_positions=200``).
    """

    sample_rate: int = 16000
    n_mels: int = 128
    chunk_seconds: float = 30.0
    window_seconds: float = 0.5
    hop_length: int = 160
    n_fft: int = 400

    def __post_init__(self):
        # Non-integral geometry would make windows straddle mel frames or chunks, and the token count would
        # no longer follow from the sample count alone.
        if abs(self.chunk_samples - self.chunk_seconds * self.sample_rate) > 1e-6:
            raise ValueError(f"chunk_seconds={self.chunk_seconds} is not a whole number of samples")
        if abs(self.window_samples - self.window_seconds * self.sample_rate) > 1e-6:
            raise ValueError(f"window_seconds={self.window_seconds} is not a whole number of samples")
        if self.window_samples % (2 * self.hop_length):
            raise ValueError(
                f"a {self.window_seconds} s window is not a whole number of encoder frames "
                f"(2 mel hops of {self.hop_length} samples each)"
            )
        if self.chunk_samples % self.window_samples:
            raise ValueError(f"chunk_seconds={self.chunk_seconds} is not a multiple of window_seconds")

    @property
    def chunk_samples(self) -> int:
        """Samples per Whisper chunk (480,000 for 30 s)."""
        return round(self.chunk_seconds * self.sample_rate)

    @property
    def window_samples(self) -> int:
        """Samples per aligner window (8,000 for 0.5 s)."""
        return round(self.window_seconds * self.sample_rate)

    @property
    def chunk_frames(self) -> int:
        """Mel frames per chunk (3000 for 30 s): Whisper drops the STFT's last (centre-padded) frame."""
        return self.chunk_samples // self.hop_length

    @property
    def encoder_frames_per_chunk(self) -> int:
        """Encoder output frames per chunk (1500 for 30 s): the encoder's second conv has stride 2."""
        return self.chunk_frames // 2

    @property
    def frames_per_window(self) -> int:
        """Encoder frames per aligner window (25 for 0.5 s at 50 frames/s)."""
        return self.window_samples // (2 * self.hop_length)


def num_windows(n_samples: int, settings: AudioSettings) -> int:
    """Aligner windows that hold real audio: ceil(n_samples / window samples); a partial last window counts.

    3 s at 16 kHz -> 6, 3.2 s -> 7, 0 samples -> 0.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    return math.ceil(n_samples / settings.window_samples)


def num_chunks(n_samples: int, settings: AudioSettings) -> int:
    """Whisper chunks needed to cover n_samples (the last one zero-padded); 0 for empty audio."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    return math.ceil(n_samples / settings.chunk_samples)


@functools.lru_cache(maxsize=8)
def _mel_filters(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) float32 slaney filters, the ones WhisperFeatureExtractor builds (cached: ~5 ms)."""
    filters = mel_filter_bank(
        num_frequency_bins=1 + n_fft // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=_MEL_MAX_HZ,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters).to(torch.float32)


def chunk_audio(audio: torch.Tensor, settings: AudioSettings) -> torch.Tensor:
    """Cut (n,) audio into (n_chunks, chunk_samples) rows; chunk i = samples [i * chunk, (i + 1) * chunk),
    the last row zero-padded. Empty audio gives (0, chunk_samples)."""
    if audio.dim() != 1:
        raise ValueError(f"audio must be mono (n,), got shape {tuple(audio.shape)}")
    n_chunks = num_chunks(audio.shape[0], settings)
    padded = audio.new_zeros(n_chunks * settings.chunk_samples)
    padded[: audio.shape[0]] = audio
    return padded.view(n_chunks, settings.chunk_samples)


def log_mel_chunks(audio: torch.Tensor, settings: AudioSettings) -> torch.Tensor:
    """Whisper log-mel features of (n,) 16 kHz mono audio: (n_chunks, n_mels, chunk_frames) float32.

    Equals ``WhisperFeatureExtractor(...)(chunk, padding="max_length")`` run on each chunk separately: the
    STFT's reflect padding and the (max - 8) dynamic-range clamp are per chunk, as Whisper sees one chunk at a
    time. Runs on ``audio``'s device.
    """
    chunks = chunk_audio(audio.to(torch.float32), settings)
    if chunks.shape[0] == 0:
        return chunks.new_zeros(0, settings.n_mels, settings.chunk_frames)
    window = torch.hann_window(settings.n_fft, device=chunks.device)
    stft = torch.stft(chunks, settings.n_fft, settings.hop_length, window=window, return_complex=True)
    parts = torch.view_as_real(stft[..., :-1])  # re^2 + im^2: a third of the time of |z| ** 2, same to 3e-7
    power = parts[..., 0] ** 2 + parts[..., 1] ** 2  # (n_chunks, n_freq, chunk_frames)
    filters = _mel_filters(settings.n_mels, settings.n_fft, settings.sample_rate).to(chunks.device)
    log_spec = torch.clamp(filters.T @ power, min=_LOG_FLOOR).log10()
    chunk_max = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, chunk_max - _DYNAMIC_RANGE)
    return (log_spec + 4.0) / 4.0

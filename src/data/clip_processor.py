"""The minimal sample step: decode a row's clip and keep its texts. The model's AVProcessor replaces it.

Runs in DataLoader workers. Media failures surface as BadSampleError subclasses from src.data.media, which the
streaming dataset quarantines; nothing here swallows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from src.data.clip_cache import ClipCache, load_clip_cached
from src.data.manifest import PreferenceRow, SFTRow
from src.data.media import FrameSampling

# Row fields carried into the sample as they are (those a row kind lacks are left out).
ROW_FIELDS = ("prompt", "caption", "chosen", "rejected", "gt", "ref_chosen_logp", "ref_rejected_logp")


@dataclass
class ClipProcessor:
    """Row -> {"id", "frames" (t, 3, h, w) uint8 | None, "frame_times" (t,) | None, "audio" (n,) float32 | None,
    "audio_start", "duration", and the row's texts and reference log-probs}; collate keeps variable-size tensors as lists."""

    sampling: FrameSampling = field(default_factory=FrameSampling)
    sample_rate: int = 16_000
    clip_cache: ClipCache | None = None

    def __call__(self, row: SFTRow | PreferenceRow) -> dict[str, Any]:
        clip = load_clip_cached(self.clip_cache, row.video, row.audio, sampling=self.sampling,
                                use_audio=row.use_audio, sample_rate=self.sample_rate)
        sample = {"id": row.id, "frames": clip.frames, "frame_times": clip.frame_times, "audio": clip.audio,
                  "audio_start": clip.audio_start, "duration": clip.duration}
        sample.update({name: getattr(row, name) for name in ROW_FIELDS if hasattr(row, name)})
        return sample

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: [s[key] for s in samples] for key in samples[0]}

"""Video tokens of a frozen vision path, computed once per clip and reused in later epochs.

When neither the vision tower nor its merger trains (the embedded default's SFT: the tiny base's tower was
pretrained when the base was built), a clip's video tokens are the same every epoch, yet the tower's forward is
about a third of a tiny SFT step on CPU. ``FrozenVideoCache`` keeps them, on CPU, keyed by the sample id, the
video's patch grid and two checksums of its pixels, one of them order-sensitive, so a changed clip under the same
id is a miss, never a stale hit. 8,000 SynthAV clips take 131 MB. ``AVLLM.embed`` reads it for batches that pass
``video_keys`` (``SFTModule`` with ``cache_video_tokens``).

Use it only with a frozen vision path: ``tokens`` refuses a tower or merger with trainable parameters, whose
tokens change every step. Each process (rank) keeps its own cache; nothing is saved in checkpoints, so a resumed
run computes the tokens again the first time it meets a clip (the same values, up to float summation order).
"""

from __future__ import annotations

from typing import Sequence

import torch

from src.models.av_llm import AVLLM


class FrozenVideoCache:
    def __init__(self):
        self.store: dict[tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def check_frozen(model: AVLLM) -> None:
        trainable = [n for n, p in model.visual.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the video-token cache needs a frozen vision path, but {len(trainable)} of its "
                             f"parameters train (e.g. {trainable[0]}); leave 'vision' and 'merger' out of trainable")

    def tokens(self, model: AVLLM, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor,
               keys: Sequence[str]) -> torch.Tensor:
        """(tokens, d) video tokens of every video in order, as ``model.video_embeddings`` gives them; ``keys``:
        one sample id per video."""
        self.check_frozen(model)
        grids = video_grid_thw.view(-1, 3)
        if len(keys) != grids.shape[0]:
            raise ValueError(f"{len(keys)} keys for {grids.shape[0]} videos")
        sizes = [int(g.prod()) for g in grids]
        pixels = torch.split(pixel_values_videos, sizes)
        full = [(key, tuple(g.tolist()), *checksums(p)) for key, g, p in zip(keys, grids, pixels)]
        missing = [i for i, k in enumerate(full) if k not in self.store]
        self.hits += len(full) - len(missing)
        self.misses += len(missing)
        if missing:
            merge = model.visual.config.spatial_merge_size
            with torch.no_grad():
                out = model.video_embeddings(torch.cat([pixels[i] for i in missing]), grids[missing])
            for i, t in zip(missing, torch.split(out, [sizes[i] // merge ** 2 for i in missing])):
                self.store[full[i]] = t.detach().to("cpu", copy=True)
        device = pixel_values_videos.device
        return torch.cat([self.store[k] for k in full]).to(device)


def checksums(pixels: torch.Tensor) -> tuple[float, float]:
    """Two cheap sums of a video's (patches, values) pixels: the plain sum, and one weighted by patch index, so that
    reordered patches change it too."""
    rows = pixels.double().sum(dim=1)
    return float(rows.sum()), float((rows * torch.arange(1, len(rows) + 1, dtype=rows.dtype)).sum())


def video_keys(batch: dict, video_token_id: int) -> list[str]:
    """The sample id of each video in a collated SFT batch (videos are in the order of the samples that have one)."""
    has_video = (batch["input_ids"] == video_token_id).any(dim=1).tolist()
    return [sample_id for sample_id, has in zip(batch["id"], has_video) if has]

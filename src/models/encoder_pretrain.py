"""Pretraining of a scratch base's encoders on SynthAV's timelines: the tiny default's stand-in for the pretrained
ViT and Whisper that every real base (Qwen2.5-VL, whisper-large-v3) brings.

Why: a real base's encoders already see shapes, colours and motion and hear tones and beeps, and SFT teaches the
LLM to put what they perceive into words. The tiny base's encoders start random, and the caption loss alone does
not teach them: the shape is one caption token in about 40, and after 2,000 SFT steps the tiny model ranked the
right shape first 55% of the time (chance 33%), although the same tower trained on shapes directly reaches
80-95% (README, "Status"). So the base build trains the encoders first, each with a small classifier on what the
clip's manifest timeline says (``src.data.synth.labels``), and throws the classifiers away:

- ``VISION``: the vision tower and its merger, per temporal patch (2 frames): per shape, absent or its colour,
  and still or its direction of motion. Through the merger, so the LLM-facing tokens carry it.
- ``AUDIO``: the Whisper encoder, per encoder frame (20 ms): silence, a tone or a beep of either pitch, or noise.
  The aligner is not pretrained; the align stage trains it, as it does for a real base.

Only the training split's clips and their timelines are used. Clips are decoded through the processor (and the
DataModule's clip cache when given, so SFT later reads them from the cache instead of decoding them again).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from src.data.synth.labels import (
    IGNORE, N_COLOUR_CLASSES, N_MOTION_CLASSES, N_SOUND_CLASSES, SILENT, sound_classes, span_labels,
)
from src.data.synth.world import SHAPES
from src.models.av_llm import AVLLM
from src.models.processor import AVProcessor


@dataclass(frozen=True)
class PretrainSettings:
    clips: int = 2000  # training clips used (the first ones of the manifest)
    steps: int = 1000
    batch_size: int = 8  # clips per step
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    eval_clips: int = 64  # held-out clips (the val manifest) for the report
    seed: int = 0


def _timeline(row) -> list:
    timeline = (row.extra or {}).get("timeline")
    if timeline is None or row.video is None:
        raise ValueError(f"{row.source or row.id}: encoder pretraining needs a SynthAV row (video and "
                         "extra.timeline)")
    return timeline


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    keep = target != IGNORE
    return (logits.argmax(-1)[keep] == target[keep]).float().mean().item()


# -- vision -----------------------------------------------------------------------------------------------------
class SceneHeads(nn.Module):
    """Per temporal patch: max over its merged tokens, then per shape a colour and a motion classifier."""

    def __init__(self, dim: int, n_shapes: int = len(SHAPES)):
        super().__init__()
        self.n_shapes = n_shapes
        self.colour = nn.Linear(dim, n_shapes * N_COLOUR_CLASSES)
        self.motion = nn.Linear(dim, n_shapes * N_MOTION_CLASSES)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (spans, tokens_per_span, d) -> colour (spans, shapes, C) and motion (spans, shapes, M) logits."""
        pooled = tokens.amax(dim=1)
        return (self.colour(pooled).view(-1, self.n_shapes, N_COLOUR_CLASSES),
                self.motion(pooled).view(-1, self.n_shapes, N_MOTION_CLASSES))


class VisionTask:
    """Vision tower + merger; targets (spans, shapes, 2) of colour and motion per temporal patch."""

    name = "vision"

    @staticmethod
    def module(model: AVLLM) -> nn.Module:
        return model.visual

    @staticmethod
    def heads(model: AVLLM) -> nn.Module:
        return SceneHeads(model.visual.config.out_hidden_size)

    @staticmethod
    def example(row, processor: AVProcessor) -> dict:
        timeline = _timeline(row)
        clip = processor.load_clip(row.video, row.audio, use_audio=row.use_audio)
        pixels, grid, _ = processor.video_inputs(clip.frames, clip.frame_times)
        tp = processor.settings.vision.temporal_patch_size
        times = clip.frame_times.tolist()
        last = len(times) - 1
        spans = [span_labels(timeline, times[min(g * tp, last)], times[min(g * tp + tp - 1, last)])
                 for g in range(int(grid[0]))]
        return {"pixels": pixels, "grid": grid, "targets": torch.tensor(spans, dtype=torch.long),
                "merge": processor.settings.vision.merge_size}

    @staticmethod
    def features(model: AVLLM, batch: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged video tokens grouped by temporal patch (spans, tokens_per_span, d), and their targets."""
        grids = torch.stack([c["grid"] for c in batch])
        tokens = model.video_embeddings(torch.cat([c["pixels"] for c in batch]), grids)
        per_span = [int(g[1] * g[2]) // c["merge"] ** 2 for g, c in zip(grids, batch)]
        chunks = torch.split(tokens, [int(g[0]) * n for g, n in zip(grids, per_span)])
        spans = torch.cat([t.view(-1, n, t.shape[-1]) for t, n in zip(chunks, per_span)])
        return spans, torch.cat([c["targets"] for c in batch])

    @staticmethod
    def loss(heads: nn.Module, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        colour, motion = heads(features)
        return (F.cross_entropy(colour.flatten(0, 1), targets[..., 0].flatten(), ignore_index=IGNORE)
                + F.cross_entropy(motion.flatten(0, 1), targets[..., 1].flatten(), ignore_index=IGNORE))

    @staticmethod
    def metrics(heads: nn.Module, features: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """colour-or-absent per (span, shape); motion per (span, visible shape); "present": how often a shape
        on screen is told apart from absent."""
        colour, motion = heads(features)
        present = (targets[..., 0] != IGNORE) & (targets[..., 0] != 0)
        return {"colour": _accuracy(colour, targets[..., 0]), "motion": _accuracy(motion, targets[..., 1]),
                "present": (colour.argmax(-1)[present] != 0).float().mean().item()}


# -- audio ------------------------------------------------------------------------------------------------------
class AudioTask:
    """Whisper encoder; one target per encoder frame (padding frames of the last chunk ignored)."""

    name = "audio"

    @staticmethod
    def module(model: AVLLM) -> nn.Module:
        return model.whisper

    @staticmethod
    def heads(model: AVLLM) -> nn.Module:
        return nn.Linear(model.whisper.config.d_model, N_SOUND_CLASSES)

    @staticmethod
    def example(row, processor: AVProcessor) -> dict:
        timeline = _timeline(row)
        clip = processor.load_clip(row.video, row.audio, use_audio=True)
        if clip.audio is None or not clip.audio.numel():
            raise ValueError(f"{row.source or row.id}: no audio to pretrain on")
        features, _ = processor.audio_inputs(clip.audio)
        audio = processor.settings.audio
        frame_s = 2 * audio.hop_length / audio.sample_rate  # Whisper's stem halves the mel frame rate
        per_chunk = features.shape[-1] // 2
        n_real = math.ceil(clip.audio.numel() / (2 * audio.hop_length))
        times = [clip.audio_start + (j + 0.5) * frame_s for j in range(features.shape[0] * per_chunk)]
        targets = torch.tensor(sound_classes(timeline, times), dtype=torch.long)
        targets[n_real:] = IGNORE
        return {"features": features, "targets": targets.view(features.shape[0], per_chunk)}

    @staticmethod
    def features(model: AVLLM, batch: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        mels = torch.cat([c["features"] for c in batch]).to(model.whisper.dtype)
        return model.whisper(mels).last_hidden_state, torch.cat([c["targets"] for c in batch])

    @staticmethod
    def loss(heads: nn.Module, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(heads(features).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    @staticmethod
    def metrics(heads: nn.Module, features: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """frame accuracy; "sounding": accuracy on frames where something is audible."""
        logits = heads(features)
        sounding = torch.where(targets == SILENT, IGNORE, targets)
        return {"frames": _accuracy(logits, targets), "sounding": _accuracy(logits, sounding)}


VISION, AUDIO = VisionTask(), AudioTask()
TASKS = {t.name: t for t in (VISION, AUDIO)}


@torch.no_grad()
def evaluate(task, model: AVLLM, heads: nn.Module, examples: Sequence[dict]) -> dict[str, float]:
    return task.metrics(heads, *task.features(model, examples)) if examples else {}


def pretrain_encoder(task, model: AVLLM, processor: AVProcessor, rows: Sequence, eval_rows: Sequence = (),
                     settings: PretrainSettings = PretrainSettings(), log: Callable[[str], None] | None = print
                     ) -> dict:
    """Train ``task.module(model)`` in place on ``rows`` with a throw-away classifier; return a report (losses,
    held-out metrics before and after, the same metrics on as many training clips after, seconds)."""
    torch.manual_seed(settings.seed)
    t_start = time.perf_counter()
    train = [task.example(r, processor) for r in rows[: settings.clips]]
    held = [task.example(r, processor) for r in eval_rows[: settings.eval_clips]]
    seen = train[: settings.eval_clips]  # the fit, reported next to the held-out metrics
    encoder, heads = task.module(model), task.heads(model)
    params = list(encoder.parameters()) + list(heads.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, cosine to 5%
        warm = min(1.0, (step + 1) / max(1, settings.warmup))
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, settings.steps)))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(settings.seed)
    order, pos, losses = torch.randperm(len(train), generator=gen).tolist(), 0, []
    before = evaluate(task, model, heads, held)
    was_training = encoder.training
    encoder.train()
    for step in range(settings.steps):
        if pos + settings.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen).tolist(), 0
        batch = [train[i] for i in order[pos:pos + settings.batch_size]]
        pos += settings.batch_size
        loss = task.loss(heads, *task.features(model, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % 100 == 0:
            log(f"{task.name} pretraining step {step + 1}/{settings.steps}: loss {sum(losses[-100:]) / 100:.3f}")
    encoder.train(was_training)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    return {"task": task.name, "before": before, "after": evaluate(task, model, heads, held),
            "train": evaluate(task, model, heads, seen),
            "first_loss": losses[0] if losses else None, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
            "clips": len(train), "steps": settings.steps, "seconds": time.perf_counter() - t_start}

"""Data-dependent initialisation of a scratch base's media path, measured on a few training clips.

A base trained from scratch (the tiny default) starts with encoders whose outputs barely depend on their input:
SynthAV frames are mostly one dark background and its log-mels mostly silence, so a random patch embedding or
Whisper convolution maps every clip to nearly the same vector (measured on the tiny base: audio tokens vary by
3.6% of their norm from clip to clip and window to window, video tokens by 22%, while text embeddings vary by
100%). The LLM then learns the caption grammar as an unconditional language model first and finds the media
late, slowly, or not at all.

``calibrate_media`` fixes that at build time, in the spirit of LSUV (Mishkin & Matas, "All you need is a good
init", 2016) and data-dependent weight-norm init (Salimans & Kingma, 2016):

1. Pixels are normalised with the data's own per-channel mean and standard deviation (a processor setting, saved
   in av_processor.json, as any image processor's mean/std is) instead of CLIP's.
2. Whisper's two stem convolutions are rescaled and re-biased so that their outputs, on the clips, have zero mean
   per channel and unit variance before each GELU.
3. The last layer of each projector (the visual merger's and the audio aligner's) is re-biased and rescaled so
   that media tokens are centred and spread as widely as the LLM's text embeddings.

Real bases are never calibrated: their encoders and projectors are pretrained.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from src.models.av_llm import AVLLM
from src.models.processor import AVProcessor


def spread(x: torch.Tensor) -> tuple[float, float]:
    """(norm of the mean token, mean distance of a token from that mean) over all tokens of ``x`` (..., d)."""
    x = x.reshape(-1, x.shape[-1]).float()
    mean = x.mean(0)
    return mean.norm().item(), (x - mean).norm(dim=-1).mean().item()


def _media(model: AVLLM, samples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    video = [model.video_embeddings(s["pixel_values_videos"], s["video_grid_thw"].view(-1, 3))
             for s in samples if "pixel_values_videos" in s]
    audio = [model.audio_embeddings(s["input_features"], [s["input_features"].shape[0]], [s["audio_windows"]])
             for s in samples if "input_features" in s]
    if not video or not audio:
        raise ValueError("calibration needs clips with both video and audio")
    return torch.cat(video), torch.cat(audio)


@torch.no_grad()
def _standardise_conv(conv: torch.nn.Conv1d, out: torch.Tensor) -> None:
    """Rescale ``conv`` so that ``out`` (its output on the clips) would have per-channel mean 0 and variance 1."""
    mean, std = out.mean(dim=(0, 2)), out.std().clamp_min(1e-6)
    conv.weight.div_(std)
    conv.bias.sub_(mean).div_(std)


@torch.no_grad()
def _match_spread(linear: torch.nn.Linear, out: torch.Tensor, target: float) -> None:
    """Re-bias and rescale ``linear`` so that its output tokens ``out`` are centred with mean spread ``target``."""
    flat = out.reshape(-1, out.shape[-1]).float()
    centre = flat.mean(0)
    scale = target / (flat - centre).norm(dim=-1).mean().clamp_min(1e-6).item()
    linear.bias.sub_(centre.to(linear.bias.dtype)).mul_(scale)
    linear.weight.mul_(scale)


@torch.no_grad()
def calibrate_media(model: AVLLM, processor: AVProcessor, rows: Sequence) -> tuple[AVProcessor, dict]:
    """Calibrate ``model`` in place on manifest ``rows`` (clips with video and audio); return the processor with
    the data's pixel statistics and a report of media-token spreads before and after (for the build log)."""
    if not rows:
        raise ValueError("calibration needs at least one clip")
    raw = replace(processor.settings.vision, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    raw_processor = AVProcessor(processor.tokenizer, replace(processor.settings, vision=raw))
    channels = torch.cat([raw_processor(r)["pixel_values_videos"].view(-1, 3, raw.temporal_patch_size *
                                                                          raw.patch_size ** 2) for r in rows])
    mean = channels.mean(dim=(0, 2)).tolist()
    std = channels.std(dim=(0, 2)).clamp_min(1e-3).tolist()
    vision = replace(processor.settings.vision, image_mean=tuple(mean), image_std=tuple(std))
    processor = AVProcessor(processor.tokenizer, replace(processor.settings, vision=vision))
    samples = [processor(r) for r in rows]

    video, audio = _media(model, samples)
    report = {"before": {"video": spread(video), "audio": spread(audio)}}

    whisper = model.whisper
    features = torch.cat([s["input_features"] for s in samples]).to(whisper.conv1.weight.dtype)
    _standardise_conv(whisper.conv1, whisper.conv1(features))
    _standardise_conv(whisper.conv2, whisper.conv2(torch.nn.functional.gelu(whisper.conv1(features))))

    report["after"], report["text_spread"] = _match_projectors(model, samples)
    report["pixel_mean"], report["pixel_std"] = mean, std
    return processor, report


def _match_projectors(model: AVLLM, samples: Sequence[dict]) -> tuple[dict, float]:
    """Step 3: re-bias and rescale both projectors' last layers so that their tokens on ``samples`` are centred and
    spread like text embeddings. Returns the tokens' (mean norm, spread) after, and the text spread."""
    target = model.get_input_embeddings().weight.float().norm(dim=-1).mean().item()
    video, audio = _media(model, samples)
    _match_spread(model.visual.merger.mlp[-1], video, target)
    _match_spread(model.aligner.out_proj, audio, target)
    video, audio = _media(model, samples)
    return {"video": spread(video), "audio": spread(audio)}, target


@torch.no_grad()
def recalibrate_projectors(model: AVLLM, processor: AVProcessor, rows: Sequence) -> dict:
    """Step 3 again, after the encoders were trained (``encoder_pretrain``): the visual merger's and the aligner's
    tokens are re-centred and re-spread like text embeddings; the pixel statistics and Whisper's stem stay.
    Returns the media tokens' (mean norm, spread) after."""
    return _match_projectors(model, [processor(r) for r in rows])[0]

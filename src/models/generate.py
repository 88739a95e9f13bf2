"""Batched generation with a KV cache for AVLLM, greedy or sampled (temperature, top-p).

The prompt (left-padded by the processor) is run once; each new token then costs one cached step. Its 3-D
position continues from the row's largest prompt position + 1 on all three axes, as Qwen2.5-VL's text does after
a media span. Each sample's summed log-prob is taken under the model's own distribution (temperature 1, no
top-p truncation), whatever the sampling settings: that is the number DPO needs as the reference log-prob.

``generator`` is one torch.Generator for the whole batch, or one per row: with per-row generators a row's
samples depend only on its own generator, not on which other rows share its batch (the rollout's resumability).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from transformers.cache_utils import DynamicCache


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Generated:
    """tokens (b, t) padded with pad_token_id after each row's end; lengths (b,) tokens per row including the end
    token when emitted; logps (b,) summed log-probs of those tokens; finished (b,) rows that emitted the end."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    logps: torch.Tensor
    finished: torch.Tensor


Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def pick_next(logits: torch.Tensor, settings: GenerationSettings, generator: Generators) -> torch.Tensor:
    """(b, v) logits -> (b,) token ids: argmax, or a sample from the tempered, top-p truncated distribution
    (drawn with ``generator``, or row i with ``generator[i]``)."""
    if not settings.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(settings.temperature, 1e-5), dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if isinstance(generator, Sequence):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, batch: dict, settings: GenerationSettings, *, eos_token_id: int, pad_token_id: int,
             generator: Generators = None) -> Generated:
    """Generate for a left-padded batch from AVProcessor.collate(..., padding_side="left")."""
    input_ids, attention_mask, position_ids = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    b = input_ids.shape[0]
    embeds = model.embed(input_ids, batch.get("pixel_values_videos"), batch.get("video_grid_thw"),
                         batch.get("input_features"), batch.get("audio_chunks"), batch.get("audio_windows"))
    cache = DynamicCache()
    out = model(input_ids, position_ids, attention_mask, inputs_embeds=embeds, cache=cache, use_cache=True,
                return_logits=False)
    logits = model.lm_head(out.hidden_states[:, -1])
    next_pos = position_ids.masked_fill(attention_mask[None] == 0, -1).amax(dim=(0, 2)) + 1  # (b,)

    tokens, logps = [], torch.zeros(b, dtype=torch.float32, device=input_ids.device)
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    lengths = torch.zeros(b, dtype=torch.long, device=input_ids.device)
    for _ in range(settings.max_new_tokens):
        token = pick_next(logits, settings, generator)
        token = token.masked_fill(finished, pad_token_id)
        step_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None]).squeeze(-1)
        logps += step_logp.masked_fill(finished, 0.0)
        lengths += (~finished).long()
        tokens.append(token)
        finished |= token == eos_token_id
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        positions = next_pos.view(1, b, 1).expand(3, b, 1)
        out = model.llm(inputs_embeds=model.get_input_embeddings()(token[:, None]), position_ids=positions,
                        attention_mask=attention_mask, cache=out.cache, use_cache=True)
        logits = model.lm_head(out.last_hidden_state[:, -1])
        next_pos = next_pos + 1
    return Generated(tokens=torch.stack(tokens, dim=1), lengths=lengths, logps=logps, finished=finished)

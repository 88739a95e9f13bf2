"""Batched generation with a KV cache for AVLLM: greedy, sampled (temperature, top-p) or beam search.

The prompt (left-padded by the processor) is run once; each new token then costs one cached step. Its 3-D
position continues from the row's largest prompt position + 1 on all three axes, as Qwen2.5-VL's text does after
a media span. Each sample's summed log-prob is taken under the model's own distribution (temperature 1, no
top-p truncation), whatever the sampling settings: that is the number DPO needs as the reference log-prob.

``generator`` is one torch.Generator for the whole batch, or one per row: with per-row generators a row's
samples depend only on its own generator, not on which other rows share its batch (the rollout's resumability).

Beam search (``num_beams`` > 1, not sampled): each row keeps its ``num_beams`` most likely partial captions; a beam
that emits the end token becomes a finished hypothesis, scored by its summed log-prob over its length (end token
included) to the power ``length_penalty`` (0: the plain sum, which favours short captions; 1: the mean). A row stops
once it has ``num_beams`` finished hypotheses and none of its live beams scores better (at its current length) than
the worst of them, as transformers' default does; beams cut at ``max_new_tokens`` compete unfinished. The cache is
expanded to rows x beams after the prompt pass (the prompt runs once per row) and reordered as beams are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from transformers.cache_utils import DynamicCache

# with media keys in the batch, a video repeated in it (K samples of it) goes through the encoders once
from src.models.media_cache import MEDIA_OUTPUTS


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {self.max_new_tokens}, "
                             f"{self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search, which does not sample: use one or the other")


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


def prompt_pass(model, batch: dict):
    """Run the left-padded prompts once with a fresh cache: (model output, (b, vocab) next-token logits, (b,) the
    position of each row's first new token)."""
    input_ids, attention_mask, position_ids = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    embeds = model.embed(input_ids, batch.get("pixel_values_videos"), batch.get("video_grid_thw"),
                         batch.get("input_features"), batch.get("audio_chunks"), batch.get("audio_windows"),
                         **{name: batch[name] for name in MEDIA_OUTPUTS if name in batch})
    out = model(input_ids, position_ids, attention_mask, inputs_embeds=embeds, cache=DynamicCache(), use_cache=True,
                return_logits=False)
    next_pos = position_ids.masked_fill(attention_mask[None] == 0, -1).amax(dim=(0, 2)) + 1
    return out, model.lm_head(out.hidden_states[:, -1]), next_pos


def decode_step(model, token: torch.Tensor, next_pos: torch.Tensor, attention_mask: torch.Tensor, cache):
    """One cached step for (rows,) new tokens at positions ``next_pos`` (all three M-RoPE axes): (output, logits)."""
    rows = token.shape[0]
    out = model.llm(inputs_embeds=model.get_input_embeddings()(token[:, None]),
                    position_ids=next_pos.view(1, rows, 1).expand(3, rows, 1), attention_mask=attention_mask,
                    cache=cache, use_cache=True)
    return out, model.lm_head(out.last_hidden_state[:, -1])


@torch.no_grad()
def generate(model, batch: dict, settings: GenerationSettings, *, eos_token_id: int, pad_token_id: int,
             generator: Generators = None) -> Generated:
    """Generate for a left-padded batch from AVProcessor.collate(..., padding_side="left")."""
    if settings.num_beams > 1:
        return beam_search(model, batch, settings, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    b = input_ids.shape[0]
    out, logits, next_pos = prompt_pass(model, batch)

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
        out, logits = decode_step(model, token, next_pos, attention_mask, out.cache)
        next_pos = next_pos + 1
    return Generated(tokens=torch.stack(tokens, dim=1), lengths=lengths, logps=logps, finished=finished)


@dataclass
class _Hypothesis:
    score: float  # logp / length ** length_penalty
    tokens: list[int]
    logp: float
    finished: bool


def _normalised(logp: float, length: int, length_penalty: float) -> float:
    return logp / length ** length_penalty


@torch.no_grad()
def beam_search(model, batch: dict, settings: GenerationSettings, *, eos_token_id: int,
                pad_token_id: int, num_return_sequences: int = 1) -> Generated:
    """Beam search for a left-padded batch (module docstring): each row's best hypothesis, its summed log-prob
    under the model (the plain sum, whatever ``length_penalty`` ranked it by) and whether it ended.
    ``num_return_sequences`` n (<= num_beams): each row's n best hypotheses instead, best first, as rows r*n ..
    r*n+n-1 (a row with fewer than n distinct ones repeats its last)."""
    k, penalty = settings.num_beams, settings.length_penalty
    if not 1 <= num_return_sequences <= k:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={k}], got {num_return_sequences}")
    attention_mask = batch["attention_mask"]
    b = attention_mask.shape[0]
    out, logits, next_pos = prompt_pass(model, batch)
    cache = out.cache
    cache.batch_repeat_interleave(k)  # row r's beams are rows r*k .. r*k+k-1 from here on
    attention_mask, next_pos = attention_mask.repeat_interleave(k, 0), next_pos.repeat_interleave(k, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).repeat_interleave(k, 0)  # (b*k, vocab)
    scores = torch.full((b, k), float("-inf"), device=logp.device)
    scores[:, 0] = 0.0  # the k beams start identical: expand the first only
    beams: list[list[int]] = [[] for _ in range(b * k)]
    hypotheses: list[list[_Hypothesis]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(settings.max_new_tokens):
        vocab = logp.shape[-1]
        top_scores, top_index = (scores.view(b * k, 1) + logp).view(b, k * vocab).topk(2 * k, dim=-1)
        top_beam, top_token = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        top_scores = top_scores.tolist()
        keep_beam, keep_token = [[0] * k for _ in range(b)], [[pad_token_id] * k for _ in range(b)]
        keep_score = [[float("-inf")] * k for _ in range(b)]
        for row in range(b):
            if done[row]:
                continue
            kept = 0
            for rank, (score, beam, token) in enumerate(zip(top_scores[row], top_beam[row], top_token[row])):
                if token == eos_token_id:
                    if rank < k:  # an end among the k best continuations (transformers' rule)
                        tokens = beams[row * k + beam] + [token]
                        hypotheses[row].append(_Hypothesis(_normalised(score, len(tokens), penalty), tokens,
                                                           score, True))
                    continue
                keep_beam[row][kept], keep_token[row][kept], keep_score[row][kept] = beam, token, score
                kept += 1
                if kept == k:
                    break
            hypotheses[row] = sorted(hypotheses[row], key=lambda h: -h.score)[:k]
            best_live = _normalised(max(keep_score[row]), step + 1, penalty)
            done[row] = len(hypotheses[row]) == k and hypotheses[row][-1].score >= best_live
        if all(done):
            break
        order = [row * k + beam for row in range(b) for beam in keep_beam[row]]
        beams = [beams[i] + [token] for i, token in zip(order, (t for row in keep_token for t in row))]
        scores = torch.tensor(keep_score, device=logp.device)
        if step + 1 == settings.max_new_tokens:
            break  # no next token to score: the live beams compete unfinished
        index = torch.tensor(order, device=logp.device)
        cache.reorder_cache(index)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        token = torch.tensor([t for row in keep_token for t in row], device=logp.device)
        out, logits = decode_step(model, token, next_pos, attention_mask, cache)
        logp = torch.log_softmax(logits.float(), dim=-1)
        next_pos = next_pos + 1
    best = []
    for row in range(b):
        pool = list(hypotheses[row])
        if not done[row]:  # cut at max_new_tokens: its live beams compete too
            pool += [_Hypothesis(_normalised(s, len(beams[row * k + j]), penalty), beams[row * k + j], s, False)
                     for j, s in enumerate(scores[row].tolist()) if s > float("-inf")]
        ranked = sorted(pool, key=lambda h: -h.score)[:num_return_sequences]  # stable: ties keep pool order
        best += ranked + ranked[-1:] * (num_return_sequences - len(ranked))
    width = max(len(h.tokens) for h in best)
    tokens = torch.full((len(best), width), pad_token_id, dtype=torch.long, device=logp.device)
    for row, h in enumerate(best):
        tokens[row, :len(h.tokens)] = torch.tensor(h.tokens, dtype=torch.long)
    return Generated(tokens=tokens, lengths=torch.tensor([len(h.tokens) for h in best], device=logp.device),
                     logps=torch.tensor([h.logp for h in best], device=logp.device),
                     finished=torch.tensor([h.finished for h in best], device=logp.device))

"""Response log-probs and cross-entropy from logits, per example.

Conventions (the same for SFT and DPO): ``labels`` are the input ids with -100 everywhere but the response
(and its end token); position t's logits predict token t + 1. Padding is labelled -100, so it never changes a
result.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labelled tokens and their mask.

    logits (b, s, v), labels (b, s) -> logps (b, s - 1) float32 (0 where unlabelled), mask (b, s - 1) bool.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~mask, 0.0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b,) SUM of response-token log-probs: log pi(y | x), as DPO uses it."""
    logps, _ = token_logps(logits, labels)
    return logps.sum(-1)


def response_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b,) MEAN cross-entropy over each example's response tokens, and (b,) its response token counts.

    An example without response tokens gets CE 0 and count 0.
    """
    logps, mask = token_logps(logits, labels)
    counts = mask.sum(-1)
    return -logps.sum(-1) / counts.clamp(min=1), counts


def mean_response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The SFT loss: per-example mean response CE, averaged over the examples that have a response.

    Averaging per example (not per token over the batch) makes micro-batch 4 == micro-batch 1 x accumulation 4
    exactly, and every caption counts the same whatever its length.
    """
    ce, counts = response_ce(logits, labels)
    has = counts > 0
    if not bool(has.any()):
        return logits.sum() * 0.0  # keeps the graph: a batch of prompts only trains nothing
    return ce[has].mean()

"""Response log-probs and cross-entropy, per example: from full logits (the dense oracle) or from hidden states
through the response-only LM head, which never builds a (b, s, v) logits tensor.

Conventions (the same for SFT and DPO): ``labels`` are the input ids with -100 everywhere but the response
(and its end token); position t's logits predict token t + 1. Padding is labelled -100, so it never changes a
result.

Response-only head: ``response_positions(labels)`` names the N hidden positions that predict a labelled token and
their targets; ``linear_token_logps(hidden[index], lm_head.weight, targets)`` gives their (N,) log-probs, computing
logits ``chunk_size`` rows at a time and keeping only one logsumexp per token for backward, which recomputes each
chunk's logits. Peak memory for the head is O(chunk_size x v) in forward and backward instead of O(b x s x v);
the price is a second chunked matmul (h @ W^T) in backward, about +50% of the head's FLOPs.
``scatter_response_logps`` lays the (N,) values out as ``token_logps`` would, so every loss below reads both.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
HEAD_CHUNK_ELEMENTS = 1 << 26  # default chunk: rows x v <= 64 M logits (256 MB in fp32); 441 rows at v = 151,936


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
    return response_ce_from_logps(*token_logps(logits, labels))


def mean_response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The SFT loss: per-example mean response CE, averaged over the examples that have a response.

    Averaging per example (not per token over the batch) makes micro-batch 4 == micro-batch 1 x accumulation 4
    exactly, and every caption counts the same whatever its length.
    """
    return mean_response_ce_from_logps(*token_logps(logits, labels))


def response_ce_from_logps(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_ce`` from ``token_logps``'s (b, s - 1) log-probs (0 where unlabelled) and mask."""
    counts = mask.sum(-1)
    return -logps.sum(-1) / counts.clamp(min=1), counts


def mean_response_ce_from_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_response_ce`` from ``token_logps``'s (b, s - 1) log-probs and mask."""
    ce, counts = response_ce_from_logps(logps, mask)
    has = counts > 0
    if not bool(has.any()):
        return logps.sum() * 0.0  # keeps the graph: a batch of prompts only trains nothing
    return ce[has].mean()


# -- the response-only LM head -----------------------------------------------------------------------------------


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (b, s) -> (N,) flat indices into the (b * s) hidden positions that predict a labelled token (row
    major: position t of row i is i * s + t, predicting labels[i, t + 1]) and the (N,) tokens they predict."""
    s = labels.shape[1]
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * s + cols, labels[rows, cols + 1]


def scatter_response_logps(logps: torch.Tensor, index: torch.Tensor, labels: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) log-probs at ``response_positions(labels)``'s indices -> ``token_logps``'s (b, s - 1) log-probs (0 where
    unlabelled) and mask, so sums and means run over the same tensor, in the same order, as on the dense path."""
    b, s = labels.shape
    dense = logps.new_zeros(b * s).index_put((index,), logps).view(b, s)[:, :-1]
    return dense, labels[:, 1:] != IGNORE_INDEX


def _chunk_rows(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, HEAD_CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _softmax_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(hidden.dtype, torch.float32)


class _LinearTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight^T + bias)[n, targets[n]] chunk by chunk; saves only the (N,) logsumexp."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        n, acc = hidden.shape[0], _softmax_dtype(hidden)
        logps = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            logits = nn.functional.linear(hidden[start:end], weight, bias).to(acc)  # (c, v)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows = chunk_rows
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # accumulated in the weight's own dtype: an fp32 copy would add a (v, d) buffer, 2.2 GB for a 7B head
        grad_weight = torch.zeros_like(weight) if need_weight else None
        acc = _softmax_dtype(hidden)
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        grad_logps = grad_logps.to(acc)
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, n)
            h, go = hidden[start:end], grad_logps[start:end, None]
            # d logp_n / d logit_nj = [j == target_n] - softmax_nj, built in place in one (c, v) fp32 buffer
            grad_logits = nn.functional.linear(h, weight, bias).to(acc)
            grad_logits.sub_(lse[start:end, None]).exp_().mul_(-go)
            grad_logits.scatter_add_(1, targets[start:end, None], go)
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """(N,) float32 (float64 for float64 inputs) log-probs log_softmax(hidden @ weight^T + bias)[n, targets[n]]
    without (N, v) logits.

    hidden (N, d), weight (v, d), targets (N,) in [0, v), bias (v,) or None. The matmul runs in the inputs' dtype
    (under autocast, in autocast's dtype, as nn.Linear would), the log-softmax in float32 (or float64). ``chunk_size`` rows of
    logits exist at a time, in forward and in backward (which recomputes them); None picks rows so that
    rows x v <= HEAD_CHUNK_ELEMENTS. Gradients reach hidden, weight and bias, whichever require them.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _LinearTokenLogps.apply(hidden, weight, bias, targets, _chunk_rows(chunk_size, weight.shape[0]))
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but the head's weight is {weight.dtype}")
    return _LinearTokenLogps.apply(hidden, weight, bias, targets, _chunk_rows(chunk_size, weight.shape[0]))


def module_token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       chunk_size: int | None = None, vocab: int | None = None) -> torch.Tensor:
    """``linear_token_logps`` for any head module (a LoRA-wrapped or sharded one): each chunk runs ``head`` under
    activation checkpointing, so backward keeps only the chunk's input and recomputes its (c, v) logits (and
    replays its dropout). ``vocab`` sizes the default chunk (it reads ``head.out_features`` when given none)."""
    vocab = vocab or getattr(head, "out_features", None) or HEAD_CHUNK_ELEMENTS
    rows = _chunk_rows(chunk_size, vocab)

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head(h).float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)

    chunks = zip(hidden.split(rows), targets.split(rows)) if hidden.shape[0] else [(hidden, targets)]
    return torch.cat([checkpoint(chunk_logps, h, t, use_reentrant=False) for h, t in chunks])


def head_token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                     chunk_size: int | None = None) -> torch.Tensor:
    """(N,) log-probs of ``targets`` under ``head`` applied to hidden (N, d): the fused ``linear_token_logps`` on
    a plain nn.Linear whose weight is a whole tensor (under FSDP2 call this inside the root's forward, where the
    root unit's parameters are gathered), ``module_token_logps`` on anything else."""
    if isinstance(head, nn.Linear) and not isinstance(head.weight, DTensor):
        return linear_token_logps(hidden, head.weight, targets, head.bias, chunk_size)
    return module_token_logps(head, hidden, targets, chunk_size)

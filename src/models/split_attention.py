"""Prefix-shared rows in two SDPA calls per layer: the prompt causal (the flash kernel), the rest under a mask.

A packed row (src.models.packing.PackedPairs) is [prompt | chosen | rejected | gt | padding]. With one 4-D mask
over the whole row, SDPA cannot take its flash kernel (which knows only "causal" or nothing): it runs a masked
kernel over all L x L query-key blocks, twice the causal work, reading an L x L mask in every layer. Yet the
first ``prefix`` tokens of every row (its first pair's prompt, the bulk of the row) need exactly the causal rule
among themselves. ``SplitMask`` says so: ``prefix`` (the shortest such prompt over the rows) and ``rest``, the
additive mask of the queries after it, (r, 1, L - prefix, L). ``split_sdpa_attention`` then runs

- queries [0, prefix) on keys [0, prefix), ``is_causal`` (flash on CUDA and CPU);
- queries [prefix, L) on all L keys under ``rest`` (the responses see the prompt and their own past; a second
  pair in the same row, or a longer prompt than the shortest, is covered by the mask too, only less cheaply);

which is the function of the one dense mask, row for row, with the work of the KV-cache form (prompt causal,
responses against prompt + responses) and the kernel launches of one pass. Any other mask (a plain tensor or
None: generation, the plain path) goes to transformers' SDPA function unchanged, so a model can keep this
implementation for everything. tests/test_split_attention.py checks it against one call under the dense mask,
values and gradients; tests/test_packing.py the DPO step against the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "prefix_split_sdpa"
LAYER_TYPES = ("full_attention", "sliding_attention")  # the keys of a Qwen text model's per-layer-type masks


@dataclass(frozen=True)
class SplitMask:
    """prefix: the queries [0, prefix) of every row attend causally within [0, prefix); rest: (r, 1, L - prefix,
    L) additive float mask of the queries after them over all keys."""

    prefix: int
    rest: torch.Tensor

    def layer_masks(self) -> dict[str, SplitMask]:
        """The per-layer-type mapping a Qwen text model takes as ``attention_mask`` as it is (no mask is built)."""
        return dict.fromkeys(LAYER_TYPES, self)


def split_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: SplitMask | torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (r, heads, L, d), key / value (r, kv_heads, L, d) -> ((r, L, heads, d), None), as transformers'
    SDPA function; a ``SplitMask`` runs the two calls of the module docstring."""
    if not isinstance(attention_mask, SplitMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    p = attention_mask.prefix
    if not 0 < p <= query.shape[2] or attention_mask.rest.shape[-2:] != (query.shape[2] - p, key.shape[2]):
        raise ValueError(f"SplitMask with prefix {p} and rest {tuple(attention_mask.rest.shape)} does not fit "
                         f"{query.shape[2]} queries on {key.shape[2]} keys")
    head, _ = sdpa_attention_forward(module, query[:, :, :p], key[:, :, :p], value[:, :, :p], None, is_causal=True,
                                     **kwargs)
    if p == query.shape[2]:
        return head, None
    tail, _ = sdpa_attention_forward(module, query[:, :, p:], key, value, attention_mask.rest, is_causal=False,
                                     **kwargs)
    return torch.cat([head, tail], dim=1), None


AttentionInterface.register(NAME, split_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # generation and other callers build SDPA's usual masks

"""Window attention of the vision tower in a few batched calls instead of one call per window.

transformers' Qwen2.5-VL vision attention gives the attention function the whole packed sequence with its
``cu_seqlens`` only for "flash" implementations. For every other implementation it loops in Python over the
windows (and, in the full-attention blocks, the frames), one SDPA call each. That is 64 calls per block for a
batch of 8 SynthAV clips, and thousands per block for a two-minute clip in the 7B's tower. ``NAME`` registers
``grouped_window_attention`` under a name that contains "flash", so the tower passes ``cu_seqlens`` in one call.
The function groups the windows by length and runs one batched SDPA call per length, with no mask and no
padding: the tiny tower's windows all have one length, and a real tower's have a few (the windows cut at a
frame's edges).

It computes the same function as the loop, which tests/test_vision_attention.py checks in fp32, values and
gradients. AVLLM sets it on its vision tower (``use_grouped_window_attention``).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

NAME = "flash_grouped_sdpa"  # "flash" in the name is what makes the tower pass cu_seqlens in one call


def grouped_window_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                             dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                             cu_seq_lens_k: torch.Tensor | None = None, is_causal: bool = False,
                             **_: object) -> tuple[torch.Tensor, None]:
    """query / key / value (1, heads, tokens, head_dim) packed windows with boundaries ``cu_seq_lens_q`` ->
    ((1, tokens, heads, head_dim), None), each window attending to itself only (non-causal)."""
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or query.shape[0] != 1 or (
            cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_q, cu_seq_lens_k)):
        raise ValueError(f"{NAME} is the vision tower's window self-attention: it takes one packed row with "
                         "cu_seq_lens, no mask, not causal")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"{NAME}: {query.shape[1]} query heads but {key.shape[1]} key heads")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    tokens, heads, dim = q.shape
    bounds = cu_seq_lens_q.tolist()
    starts, lengths = torch.tensor(bounds[:-1]), torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1])
    if bounds[-1] != tokens:
        raise ValueError(f"{NAME}: cu_seq_lens ends at {bounds[-1]}, the sequence has {tokens} tokens")
    dropout = dropout if module.training else 0.0

    def attend(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor) -> torch.Tensor:
        """(n, length, heads, dim) each -> the same shape."""
        out = torch.nn.functional.scaled_dot_product_attention(
            qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2)

    distinct = lengths[lengths > 0].unique()  # (no empty window reaches here; one would be skipped)
    if len(distinct) == 1 and bool((lengths > 0).all()):  # every window one length (the tiny tower): a view
        n, length = len(lengths), int(distinct[0])
        out = attend(*(t.reshape(n, length, heads, dim) for t in (q, k, v)))
        return out.reshape(1, tokens, heads, dim), None
    out = q.new_empty(tokens, heads, dim)
    for length in distinct.tolist():
        rows = starts[lengths == length]
        index = (rows[:, None] + torch.arange(length)).to(q.device)  # (n, length) token positions
        part = attend(q[index], k[index], v[index])
        out = out.index_put((index.reshape(-1),), part.reshape(-1, heads, dim))
    return out.unsqueeze(0), None


AttentionInterface.register(NAME, grouped_window_attention)


def use_grouped_window_attention(vision_config) -> None:
    """Point a Qwen2.5-VL vision config (shared by its blocks, read at every forward) at the grouped function."""
    vision_config._attn_implementation = NAME

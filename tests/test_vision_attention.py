"""The vision tower's grouped window attention (src/models/vision_attention.py) computes what transformers' loop
over windows computes: values and gradients in fp32, for windows of one length and of several, and through the
tiny base's whole tower."""

from __future__ import annotations

import pytest
import torch

from src.data.manifest import read_manifest
from src.models.build import load_base
from src.models.vision_attention import NAME, grouped_window_attention

HEADS, DIM = 3, 8


def loop_attention(q, k, v, bounds, scaling):
    """transformers' non-flash path: one SDPA call per window."""
    outs = [torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scaling)
            for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2)  # (1, tokens, heads, dim)


@pytest.mark.parametrize("bounds", [[0, 4, 8, 12, 16], [0, 16, 20, 36, 39, 40, 56]], ids=["one-length", "several"])
def test_grouped_equals_the_window_loop_values_and_gradients(bounds):
    torch.manual_seed(0)
    tokens = bounds[-1]
    inputs = [torch.randn(1, HEADS, tokens, DIM, requires_grad=True) for _ in range(3)]
    module = torch.nn.Module().eval()
    cu = torch.tensor(bounds, dtype=torch.int32)
    ours, _ = grouped_window_attention(module, *inputs, scaling=DIM ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, inputs, grad_out)
    theirs = loop_attention(*inputs, bounds, DIM ** -0.5)
    theirs_grads = torch.autograd.grad(theirs, inputs, grad_out)
    assert ours.shape == (1, tokens, HEADS, DIM)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_refuses_what_it_is_not_for():
    q = torch.randn(1, HEADS, 4, DIM)
    cu = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="window self-attention"):
        grouped_window_attention(torch.nn.Module(), q, q, q, is_causal=True, cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="window self-attention"):
        grouped_window_attention(torch.nn.Module(), q, q, q)


def test_the_tower_uses_it_and_matches_sdpa(tiny_base, synthav):
    model, processor = load_base(tiny_base)
    assert model.visual.config._attn_implementation == NAME
    model.train()
    rows = read_manifest(synthav / "train.jsonl")[:3]
    batch = processor.collate([processor(r) for r in rows])
    results = {}
    for implementation in (NAME, "sdpa"):
        model.visual.config._attn_implementation = implementation
        model.zero_grad(set_to_none=True)
        tokens = model.video_embeddings(batch["pixel_values_videos"], batch["video_grid_thw"])
        tokens.square().sum().backward()
        results[implementation] = tokens.detach(), {n: p.grad.clone() for n, p in model.visual.named_parameters()}
    (ours, ours_grads), (theirs, theirs_grads) = results[NAME], results["sdpa"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) > 0
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], atol=1e-5, rtol=1e-4, msg=name)

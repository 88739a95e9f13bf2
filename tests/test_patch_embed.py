"""The vision tower's patch embedding as a matmul (src/models/patch_embed.py) computes what Qwen2.5-VL's Conv3d
computes: values and gradients in fp32, close under bf16 autocast, through the tiny base's tower, with the same
parameters and state-dict keys."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

from src.models.build import load_base
from src.models.patch_embed import LinearPatchEmbed, use_linear_patch_embed


def embed_pair(**sizes):
    torch.manual_seed(0)
    conv = Qwen2_5_VisionPatchEmbed(**sizes)
    linear = Qwen2_5_VisionPatchEmbed(**sizes)
    linear.load_state_dict(conv.state_dict())
    use_linear_patch_embed(linear)
    return conv, linear


@pytest.mark.parametrize("sizes", [dict(patch_size=7, temporal_patch_size=2, in_channels=3, embed_dim=16),
                                   dict(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=24)],
                         ids=["tiny", "qwen-patch"])
def test_equals_the_convolution_values_and_gradients(sizes):
    conv, linear = embed_pair(**sizes)
    assert isinstance(linear, LinearPatchEmbed) and list(linear.state_dict()) == list(conv.state_dict())
    per_patch = sizes["in_channels"] * sizes["temporal_patch_size"] * sizes["patch_size"] ** 2
    x = torch.randn(37, per_patch)
    grad_out = torch.randn(37, sizes["embed_dim"])
    results = []
    for module in (conv, linear):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.backward(grad_out)
        results.append((out.detach(), xi.grad, module.proj.weight.grad))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = linear(x), conv(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)


def test_refuses_a_convolution_that_is_not_per_patch():
    embed = Qwen2_5_VisionPatchEmbed(patch_size=7, temporal_patch_size=2, in_channels=3, embed_dim=8)
    embed.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 7, 7), stride=(1, 7, 7), bias=False)
    with pytest.raises(TypeError, match="kernel = stride"):
        use_linear_patch_embed(embed)


def test_the_tower_uses_it_and_matches_the_convolution(tiny_base, synthav):
    from src.data.manifest import read_manifest

    model, processor = load_base(tiny_base)
    embed = model.visual.patch_embed
    assert type(embed) is LinearPatchEmbed
    rows = read_manifest(synthav / "train.jsonl")[:2]
    batch = processor.collate([processor(r) for r in rows])
    results = {}
    for cls in (LinearPatchEmbed, Qwen2_5_VisionPatchEmbed):
        embed.__class__ = cls
        model.zero_grad(set_to_none=True)
        tokens = model.video_embeddings(batch["pixel_values_videos"], batch["video_grid_thw"])
        tokens.square().sum().backward()
        results[cls] = tokens.detach(), embed.proj.weight.grad.clone()
    embed.__class__ = LinearPatchEmbed
    (ours, ours_grad), (theirs, theirs_grad) = results[LinearPatchEmbed], results[Qwen2_5_VisionPatchEmbed]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # the weight's gradient sums over every patch of the batch, in another order than oneDNN's: compare on its scale
    scale = theirs_grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-5 * scale, rtol=1e-4)

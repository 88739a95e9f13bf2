"""The vision tower's patch embedding as one matmul instead of a Conv3d.

Qwen2.5-VL embeds each patch (channels x temporal patch x patch x patch values, flattened by the processor) with a
``Conv3d`` whose kernel equals its stride and covers the whole patch: a linear map of the flattened patch. On CPU,
oneDNN runs that convolution far slower than the equivalent matmul, worst under bf16 autocast: for the 8,192 patches
of 16 SynthAV clips, 56 ms against 1 ms in bf16 and 14 ms against 2 ms in fp32 (the convolution was half the tiny
tower's forward in the SFT run's first epoch, where it fills the media cache; bench/RESULTS.md, "Tiny SFT").

``LinearPatchEmbed`` keeps the convolution's parameter (same state-dict keys, same initialisation, checkpoints
load either way) and computes ``F.linear(patches, weight.reshape(out, -1))``, the same function (tests/
test_patch_embed.py checks values and gradients in fp32). AVLLM sets it on its tower (``use_linear_patch_embed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed


class LinearPatchEmbed(Qwen2_5_VisionPatchEmbed):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(patches, c*tp*p*p) -> (patches, embed_dim)."""
        weight = self.proj.weight
        flat = weight.reshape(weight.shape[0], -1)
        return F.linear(hidden_states.reshape(-1, flat.shape[1]).to(weight.dtype), flat, self.proj.bias)


def use_linear_patch_embed(patch_embed: nn.Module) -> None:
    """Switch a Qwen2.5-VL patch embedding to the matmul in place (its parameters untouched)."""
    proj = patch_embed.proj
    if not isinstance(patch_embed, Qwen2_5_VisionPatchEmbed) or not isinstance(proj, nn.Conv3d) or (
            tuple(proj.kernel_size) != tuple(proj.stride) or any(proj.padding) or proj.groups != 1):
        raise TypeError(f"use_linear_patch_embed: expected Qwen2.5-VL's patch embedding (a Conv3d with kernel = "
                        f"stride, no padding), got {type(patch_embed).__name__} with {proj!r}")
    patch_embed.__class__ = LinearPatchEmbed

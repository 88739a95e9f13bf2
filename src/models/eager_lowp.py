"""Eager attention that stays in the compute dtype: the tiny recipes' kernel for bf16 autocast on CPU.

transformers' eager attention adds the additive mask (built in the model's dtype, float32 under autocast) to the
bf16 scores, which promotes the (batch, heads, L, L) scores to float32, runs the softmax there and casts the result
back to bf16; autograd then casts the gradients both ways again. On the tiny SFT step (16 rows of 122 tokens,
6 layers, bf16 autocast on a 2-core CPU) those copies of the score tensor were about a tenth of the step
(bench/RESULTS.md, "Tiny SFT"). Here the scores are scaled and masked in place in their own dtype (the mask cast
to it: 0 and the dtype's lowest value, exact in bf16, whose exponent range is float32's) and the softmax runs on
them directly; PyTorch's CPU and CUDA softmax kernels accumulate a bf16 row in float32 and round the result once,
which is what the float32 softmax followed by a cast gives. In float32 it is the eager function, op for op.

Registered as ``eager_lowp`` (``attn_implementation: eager_lowp``). tests/test_eager_lowp.py checks it against
transformers' eager attention: equal in float32, values and gradients within bf16 rounding under autocast.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import repeat_kv

NAME = "eager_lowp"


def eager_lowp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                                 dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3))
    scores.mul_(scaling)  # in place: a matmul's backward needs its inputs, not its output
    if attention_mask is not None:
        scores.add_(attention_mask[..., : key.shape[-2]].to(scores.dtype))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(NAME, eager_lowp_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)

"""src.models.split_attention: the two SDPA calls (the shared prompt prefix causal, the rest under a mask) give
what one SDPA call under the whole dense mask gives, values and gradients, in fp32; other masks pass through."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from src.models.packing import PADDING, PROMPT, PackedPairs, additive
from src.models.split_attention import SplitMask, split_sdpa_attention


class Heads(torch.nn.Module):
    """What transformers' SDPA function reads from an attention module."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = heads // kv_heads, True


def rows(*layouts: list[tuple[int, int, list[int]]]) -> PackedPairs:
    """Packed rows from, per row, a list of (pair, prompt length, response lengths), padded to one length."""
    pairs, parts = [], []
    for layout in layouts:
        pair, part = [], []
        for index, prompt, responses in layout:
            pair += [index] * (prompt + sum(responses))
            part += [PROMPT] * prompt + [j + 1 for j, n in enumerate(responses) for _ in range(n)]
        pairs.append(pair), parts.append(part)
    length = max(map(len, pairs))
    pad = lambda seq: seq + [PADDING] * (length - len(seq))  # noqa: E731
    pair, part = torch.tensor([pad(p) for p in pairs]), torch.tensor([pad(p) for p in parts])
    empty = torch.zeros(0, dtype=torch.long)
    return PackedPairs(input_ids=torch.zeros_like(pair), position_ids=torch.zeros(3, *pair.shape, dtype=torch.long),
                       pair=pair, part=part, logp_index=empty, logp_targets=empty, logp_segment=empty,
                       pairs=int(pair.max()) + 1, responses=3, rows=[])


LAYOUTS = {
    "equal prompts": ([(0, 9, [3, 2, 4])], [(1, 9, [1, 4, 2])]),
    "different prompts, padding": ([(0, 7, [3, 2, 4])], [(1, 11, [2, 1, 1])]),
    "two pairs in a row": ([(0, 6, [2, 3, 1]), (1, 5, [1, 2, 2])], [(2, 8, [3, 3, 3])]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_split_attention_equals_one_call_under_the_dense_mask(layout, heads, kv_heads):
    packed = rows(*LAYOUTS[layout])
    r, length = packed.pair.shape
    split = packed.split_mask(torch.float32)
    assert split.prefix == min(row[0][1] for row in LAYOUTS[layout])
    assert torch.equal(split.rest == 0, packed.dense_mask()[:, :, split.prefix:])
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(r, n, length, 8, generator=generator, requires_grad=True)
               for n in (heads, kv_heads, kv_heads)]
    module = Heads(heads, kv_heads)
    outputs, gradients = [], []
    for mask in (additive(packed.dense_mask(), torch.float32), split):
        out, weights = (split_sdpa_attention if mask is split else sdpa_attention_forward)(
            module, *tensors, mask, scaling=8 ** -0.5, dropout=0.0)
        assert weights is None and out.shape == (r, length, heads, 8)
        seen = packed.pair != PADDING  # padding's output is never read; both give it its own value
        outputs.append(out[seen])
        gradients.append(torch.autograd.grad((out[seen] * torch.linspace(-1, 1, 8)).sum(), tensors))
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-6
    for dense, shared in zip(*gradients):
        assert (dense - shared).abs().max() <= 1e-5


def test_other_masks_go_to_sdpa_unchanged():
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    module = Heads(4, 4)
    ours, _ = split_sdpa_attention(module, q, k, v, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    assert torch.equal(ours, theirs)


def test_a_split_mask_that_does_not_fit_is_refused():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="does not fit"):
        split_sdpa_attention(Heads(2, 2), q, q, q, SplitMask(4, torch.zeros(1, 1, 3, 6)))

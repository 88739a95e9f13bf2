"""src.models.eager_lowp: eager attention kept in the compute dtype. In float32 it is transformers' eager attention
(loss and every gradient); under bf16 autocast it differs from it only by bf16 rounding, on padded rows (the
mask) through the whole tiny model."""

from __future__ import annotations

import pytest
import torch

from src.data.manifest import read_manifest
from src.lit.sft import SFTModule
from src.models.processor import AVProcessor


def loss_and_grads(base, batch, impl: str, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    module = SFTModule(base=str(base), stage="sft", trainable=["llm", "aligner"], attn_implementation=impl)
    module.configure_model()
    assert {layer.self_attn.config._attn_implementation for layer in module.model.llm.layers} == {impl}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = module(batch).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return loss.detach().float(), grads


@pytest.fixture(scope="module")
def padded_batch(tiny_base, synthav):
    proc = AVProcessor.from_pretrained(tiny_base)
    batch = proc.collate([proc(r) for r in read_manifest(synthav / "train.jsonl")[:4]])
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: the padding mask is exercised
    return batch


def test_float32_is_eager_attention(tiny_base, padded_batch):
    loss, grads = loss_and_grads(tiny_base, padded_batch, "eager", autocast=False)
    lowp_loss, lowp_grads = loss_and_grads(tiny_base, padded_batch, "eager_lowp", autocast=False)
    torch.testing.assert_close(lowp_loss, loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(lowp_grads, grads, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_differs_from_eager_by_rounding_only(tiny_base, padded_batch):
    loss, grads = loss_and_grads(tiny_base, padded_batch, "eager", autocast=True)
    lowp_loss, lowp_grads = loss_and_grads(tiny_base, padded_batch, "eager_lowp", autocast=True)
    _, float_grads = loss_and_grads(tiny_base, padded_batch, "eager", autocast=False)
    # measured on the tiny base: the two bf16 runs' gradients 0.3% apart (relative L2), each 1.5% from float32's;
    # attention without the padding mask is 49% off
    assert abs(lowp_loss - loss) / loss < 1e-3
    assert (lowp_grads - grads).norm() / grads.norm() < 1e-2
    assert (lowp_grads - float_grads).norm() / float_grads.norm() < 3e-2

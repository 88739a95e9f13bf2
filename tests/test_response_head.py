"""The response-only LM head (src.losses.logprobs.linear_token_logps and AVLLM's ``logp_index`` path) against the
dense oracle, log_softmax over full logits: the same per-token log-probs, SFT loss and gradients, for any chunk
size, no tokens, bf16 and autocast; and proof that no (rows x v) tensor wider than a chunk exists, in forward or
backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from src.data.media import load_clip
from src.lit.sft import SFTModule, model_inputs
from src.losses.logprobs import (IGNORE_INDEX, head_token_logps, linear_token_logps,
                                 module_token_logps, response_positions, scatter_response_logps, sequence_logps,
                                 token_logps)
from src.models.build import load_base
from src.models.lora import LoraSettings
from src.rollout.rollout import teacher_forced_logps
from tests import media_fixtures as fx

CAPTIONS = ("The red square appears. A high tone plays.", "A blue circle moves left.", "Silence, then a low hum.")


def dense_logps(hidden, weight, bias, targets):
    """The oracle: full (N, v) logits, log-softmax in float32, pick the targets."""
    logits = nn.functional.linear(hidden, weight, bias).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def head_inputs(n=13, d=6, v=17, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=dtype)
    weight = torch.randn(v, d, generator=gen, dtype=dtype)
    bias = torch.randn(v, generator=gen, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    return hidden, weight, bias, targets, upstream


def values_and_grads(fn, hidden, weight, bias, targets, upstream):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in (hidden, weight, bias)]
    out = fn(*leaves, targets)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad for t in leaves]


class WideTensors(TorchDispatchMode):
    """Records the row count of every tensor an op allocates whose last dimension is ``vocab`` (views skipped:
    they allocate nothing), in forward and backward alike."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                    self.rows.append(t.numel() // self.vocab)
        return out


# -- the function -------------------------------------------------------------------------------------------------


def test_gradcheck_in_float64():
    hidden, weight, bias, targets, _ = head_inputs(n=7, d=4, v=5, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda h, w, b: linear_token_logps(h, w, targets, b, chunk_size=3), inputs)
    assert torch.autograd.gradcheck(lambda h, w: linear_token_logps(h, w, targets, chunk_size=2), inputs[:2])


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100, None])
def test_values_and_grads_equal_dense_for_any_chunk(chunk_size):
    """13 tokens in chunks of 1, 4 (4+4+4+1), 13, 100 and the default: values, and the grads of hidden, weight and
    bias under a random upstream gradient, equal the dense path's."""
    inputs = head_inputs()
    ours, our_grads = values_and_grads(lambda h, w, b, t: linear_token_logps(h, w, t, b, chunk_size), *inputs)
    dense, dense_grads = values_and_grads(dense_logps, *inputs)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=0)
    for mine, theirs in zip(our_grads, dense_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_frozen_weight_or_frozen_hidden_get_no_grad():
    hidden, weight, _, targets, upstream = head_inputs()
    dense_h = hidden.clone().requires_grad_()
    (dense_logps(dense_h, weight, None, targets) * upstream).sum().backward()
    h = hidden.clone().requires_grad_()
    (linear_token_logps(h, weight, targets, chunk_size=5) * upstream).sum().backward()
    torch.testing.assert_close(h.grad, dense_h.grad, atol=1e-5, rtol=0)

    dense_w = weight.clone().requires_grad_()
    (dense_logps(hidden, dense_w, None, targets) * upstream).sum().backward()
    w = weight.clone().requires_grad_()
    out = linear_token_logps(hidden, w, targets, chunk_size=5)
    (out * upstream).sum().backward()
    torch.testing.assert_close(w.grad, dense_w.grad, atol=1e-5, rtol=0)
    assert not linear_token_logps(hidden, weight, targets).requires_grad


def test_no_tokens_give_an_empty_result_and_zero_grads():
    _, weight, _, _, _ = head_inputs()
    hidden = torch.zeros(0, weight.shape[1], requires_grad=True)
    w = weight.clone().requires_grad_()
    out = linear_token_logps(hidden, w, torch.zeros(0, dtype=torch.long), chunk_size=4)
    assert out.shape == (0,) and out.dtype == torch.float32
    (out.sum() * 0.0).backward()
    assert hidden.grad.shape == (0, weight.shape[1]) and not w.grad.any()


def test_bf16_inputs_match_the_dense_bf16_path():
    """Both paths multiply in bf16 and log-softmax in fp32; they differ only by bf16 rounding of chunked matmuls."""
    hidden, weight, bias, targets, upstream = head_inputs(n=40, d=32, v=50, dtype=torch.bfloat16)
    ours, our_grads = values_and_grads(lambda h, w, b, t: linear_token_logps(h, w, t, b, chunk_size=7),
                                       hidden, weight, bias, targets, upstream)
    dense, dense_grads = values_and_grads(dense_logps, hidden, weight, bias, targets, upstream)
    assert ours.dtype == torch.float32 and [g.dtype for g in our_grads] == [torch.bfloat16] * 3
    torch.testing.assert_close(ours, dense, atol=0.05, rtol=0.01)
    for mine, theirs in zip(our_grads, dense_grads):
        torch.testing.assert_close(mine.float(), theirs.float(), atol=0.1, rtol=0.02)


def test_autocast_multiplies_in_bf16_like_nn_linear():
    """fp32 weights under bf16 autocast: the head casts as nn.Linear would, and fp32 weights get fp32 grads."""
    hidden, weight, _, targets, upstream = head_inputs(n=20, d=16, v=30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, (gh, gw, _) = values_and_grads(lambda h, w, b, t: linear_token_logps(h, w, t, chunk_size=6),
                                             hidden, weight, torch.zeros(1), targets, upstream)
        dense, (dh, dw, _) = values_and_grads(lambda h, w, b, t: dense_logps(h, w, None, t),
                                              hidden, weight, torch.zeros(1), targets, upstream)
    assert gw.dtype == torch.float32
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=0)  # the same bf16 products, rows independent
    torch.testing.assert_close(gh, dh, atol=0.05, rtol=0.02)
    torch.testing.assert_close(gw, dw, atol=0.05, rtol=0.02)


def test_response_positions_by_hand():
    """labels row 0: [-100, -100, 7, 8] -> positions 1, 2 predict 7, 8 (flat 1, 2); row 1: [-100, 5, -100, -100]
    -> position 0 predicts 5 (flat 4 + 0 = 4). Scattered back, they sit where token_logps puts them."""
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]])
    index, targets = response_positions(labels)
    assert index.tolist() == [1, 2, 4] and targets.tolist() == [7, 8, 5]
    logits = torch.randn(2, 4, 9)
    dense, dense_mask = token_logps(logits, labels)
    picked = torch.log_softmax(logits.flatten(0, 1)[index], -1).gather(-1, targets[:, None]).squeeze(-1)
    scattered, mask = scatter_response_logps(picked, index, labels)
    assert torch.equal(mask, dense_mask)
    torch.testing.assert_close(scattered, dense, atol=1e-6, rtol=0)


def test_head_keeps_no_tensor_wider_than_a_chunk():
    """40 tokens, v 64, chunk 3: no allocated (rows, v) tensor has more than 3 rows, forward or backward; the
    dense path builds one of 40 rows (the check would see full logits)."""
    hidden, weight, bias, targets, upstream = head_inputs(n=40, d=4, v=64)
    with WideTensors(64) as ours:
        values_and_grads(lambda h, w, b, t: linear_token_logps(h, w, t, b, chunk_size=3),
                         hidden, weight, bias, targets, upstream)
    with WideTensors(64) as dense:
        values_and_grads(dense_logps, hidden, weight, bias, targets, upstream)
    assert ours.rows and max(ours.rows) <= 3
    assert max(dense.rows) == 40


def test_a_lora_head_goes_through_the_checkpointed_module_path():
    """A peft-wrapped head is no nn.Linear: module_token_logps runs it per chunk under checkpointing, with the
    dense values and grads (LoRA B set non-zero so the adapter matters) and no tensor wider than a chunk."""
    hidden, weight, _, targets, upstream = head_inputs(n=30, d=8, v=40)
    holder = nn.Module()
    holder.head = nn.Linear(8, 40, bias=False)
    holder.head.weight.data.copy_(weight)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["head"]), holder)
    head = holder.head
    nn.init.normal_(head.lora_B["default"].weight)
    head.eval()
    assert not isinstance(head, nn.Linear)
    with WideTensors(40) as seen:
        h = hidden.clone().requires_grad_()
        (head_token_logps(head, h, targets, chunk_size=4) * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad}
    head.zero_grad()
    dense_h = hidden.clone().requires_grad_()
    dense = torch.log_softmax(head(dense_h).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    (dense * upstream).sum().backward()
    torch.testing.assert_close(module_token_logps(head, hidden, targets, chunk_size=4), dense.detach(), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(h.grad, dense_h.grad, atol=1e-5, rtol=0)
    for name, p in head.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=0)
    assert max(seen.rows) <= 4


# -- the tiny AV LLM ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_base):
    model, processor = load_base(tiny_base)
    return model.eval(), processor


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return fx.write_av(folder / "square_tone.mp4", duration=2.0, fps=8, size=(56, 56), square_onset=0.5,
                       tone_hz=1000.0, tone_onset=0.5)


def mixed_batch(processor, clip_path) -> dict:
    """Right-padded: an audio-visual, a video-only and a text-only sample."""
    av = load_clip(clip_path, sampling=processor.settings.sampling, use_audio=True)
    video = load_clip(clip_path, sampling=processor.settings.sampling, use_audio=False)
    return processor.collate([processor.encode(clip, response=text) for clip, text in zip((av, video, None),
                                                                                            CAPTIONS)])


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_token_logps_loss_and_grads_equal_the_dense_path(loaded, clip_path):
    """Per-token log-probs at response_positions(labels), the SFT loss, and every parameter's grad (the tied
    embedding / LM head included) from return_logits=False equal those of the full logits."""
    model, processor = loaded
    batch = mixed_batch(processor, clip_path)
    labels = batch["labels"]
    model.zero_grad()
    dense = model(**batch)
    dense.loss.backward()
    dense_grads = grads_of(model)
    model.zero_grad()
    ours = model(**batch, return_logits=False, logp_chunk_size=5)
    ours.loss.backward()
    our_grads = grads_of(model)

    assert ours.logits is None
    index, targets = response_positions(labels)
    dense_token, mask = token_logps(dense.logits, labels)
    torch.testing.assert_close(ours.token_logps, dense_token[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, dense.loss, atol=1e-5, rtol=0)
    assert dense_grads.keys() == our_grads.keys() and model.lm_head.weight.grad is not None  # tied to embed_tokens
    for name in dense_grads:
        torch.testing.assert_close(our_grads[name], dense_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    with torch.no_grad():  # the explicit arguments the DPO side passes: the same values
        explicit = model(**{k: v for k, v in batch.items() if k != "labels"}, logp_index=index,
                         logp_targets=targets, return_logits=False)
    assert explicit.loss is None and explicit.logits is None
    torch.testing.assert_close(explicit.token_logps, dense_token[mask].detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sequence_logps(dense.logits, labels).detach(),
                               scatter_response_logps(explicit.token_logps, index, labels)[0].sum(-1), atol=1e-5,
                               rtol=0)


def test_model_without_response_tokens_trains_nothing(loaded, clip_path):
    """N = 0: loss 0 with a graph (backward runs, every grad zero), as on the dense path."""
    model, processor = loaded
    batch = mixed_batch(processor, clip_path)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    model.zero_grad()
    out = model(**batch, return_logits=False)
    assert out.token_logps.shape == (0,) and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(not g.any() for g in grads_of(model).values())


def test_model_training_step_never_builds_full_logits(loaded, clip_path):
    """Forward + backward of the SFT loss with return_logits=False, chunk 4: no allocated tensor with the
    vocabulary as its last dimension has more than 4 rows. The dense path has a (b, s, v) one."""
    model, processor = loaded
    batch = mixed_batch(processor, clip_path)
    vocab = model.lm_head.out_features
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with WideTensors(vocab) as ours:
        model(**batch, return_logits=False, logp_chunk_size=4).loss.backward()
    with WideTensors(vocab) as dense:
        model(**batch).loss.backward()
    model.zero_grad()
    assert n > 4 and ours.rows and max(ours.rows) <= 4
    assert max(dense.rows) >= batch["input_ids"].numel()


def test_model_in_bf16_matches_its_dense_path(tiny_base, clip_path):
    model, processor = load_base(tiny_base)
    model = model.eval().to(torch.bfloat16)
    batch = mixed_batch(processor, clip_path)
    ours = model(**batch, return_logits=False, logp_chunk_size=7)
    ours.loss.backward()
    assert ours.token_logps.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.bfloat16
    with torch.no_grad():
        dense = model(**batch).loss
    torch.testing.assert_close(ours.loss.detach(), dense, atol=2e-2, rtol=1e-2)


def test_sft_module_uses_the_no_logits_path(tiny_base, clip_path):
    module = SFTModule(base=str(tiny_base), stage="sft", lora=LoraSettings(r=4, alpha=8))
    module.configure_model()
    module.model.eval()
    batch = mixed_batch(module.processor, clip_path)
    out = module(batch)
    assert out.logits is None
    with torch.no_grad():
        dense = module.model(**model_inputs(batch)).loss
    torch.testing.assert_close(out.loss.detach(), dense, atol=1e-5, rtol=0)


def test_rollout_teacher_forced_logps_equal_dense_sequence_logps(loaded, clip_path):
    model, processor = loaded
    clip = load_clip(clip_path, sampling=processor.settings.sampling, use_audio=True)
    items = [(clip, None, text) for text in CAPTIONS]
    with torch.no_grad():
        ours = teacher_forced_logps(model, processor, items, "cpu")
        batch = processor.collate([processor.encode(*item) for item in items])
        dense = sequence_logps(model(**batch).logits, batch["labels"])
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=0)
    assert ours.shape == (3,)

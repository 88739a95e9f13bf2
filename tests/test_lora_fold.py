"""MrDPO round primitives: fold the LoRA into the base in place, re-initialise it, bypass it, forget its optimizer
state. The merge identity, in float32 on the tiny base:

    adapter-on logits before the fold == adapter-disabled logits after fold + reset == adapter-on logits after it

(the first pair to atol 2e-5: W x + s B (A x) and (W + s B A) x round differently; the second pair exactly: B = 0
adds exact zeros). The same on FSDP2 shards over 2 CPU processes (gloo), where the folded weights also equal the
single-process fold.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from src.data.media import AVClip
from src.models.build import load_base
from src.models.lora import (ADAPTER, ATTENTION_PROJECTIONS, MLP_PROJECTIONS, LoraSettings, adapters_disabled,
                             attach_lora, clear_optimizer_state_, fold_lora_, lora_layers, lora_parameters,
                             merged_state_dict, lora_scalings, reset_lora_)

LOGIT_ATOL = 2e-5


def synthetic_clip(seed: int = 0) -> AVClip:
    """4 frames of noise (56 x 56, 0.25 s apart) and 1.5 s of noise audio: media without decoding."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (4, 3, 56, 56), generator=g, dtype=torch.uint8)
    audio = torch.rand(24_000, generator=g) - 0.5
    return AVClip(path="synthetic", frames=frames, frame_times=torch.arange(4, dtype=torch.float64) * 0.25,
                  audio=audio, audio_start=0.0, sample_rate=16_000, duration=1.5, audio_status="ok")


def batch_for(processor) -> dict:
    samples = [processor.encode(synthetic_clip(0), response="The red square appears. A high tone plays."),
               processor.encode(synthetic_clip(1), response="A blue circle moves left.")]
    return processor.collate(samples)


ALL_LINEAR = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def lora_model(base, r: int = 4, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")):
    """The tiny base with LoRA (dropout 0) whose B is random too, so the adapter really changes the output; the
    same in every process (peft draws A from the global RNG)."""
    model, processor = load_base(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_lora(model, LoraSettings(r=r, alpha=2 * r, dropout=0.0, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B[ADAPTER].weight
            weight.copy_(torch.randn(weight.shape, generator=g) * 0.5)
    return model.eval(), processor


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def merge_identity(model, batch, generator) -> dict[str, torch.Tensor]:
    with adapters_disabled(model):
        base_before = logits(model, batch)
    on_before = logits(model, batch)
    assert fold_lora_(model) == reset_lora_(model, generator) == len(lora_layers(model)) >= 2 * 3  # >= 2 layers x q/k/v
    with adapters_disabled(model):
        off_after = logits(model, batch)
    return {"base_before": base_before, "on_before": on_before, "off_after": off_after,
            "on_after": logits(model, batch)}


def check_identity(out: dict[str, torch.Tensor]) -> None:
    # the adapter mattered: far more than the tolerance
    assert (out["on_before"] - out["base_before"]).abs().max() > 1e3 * LOGIT_ATOL
    assert torch.allclose(out["on_before"], out["off_after"], atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(out["off_after"], out["on_after"])


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj"), ALL_LINEAR])
def test_fold_then_reset_keeps_the_function_and_the_parameters(tiny_base, targets):
    model, processor = lora_model(tiny_base, targets=targets)
    batch = batch_for(processor)
    params_before = {name: p for name, p in model.named_parameters()}
    expected = merged_state_dict({k: v.clone() for k, v in model.state_dict().items()}, lora_scalings(model))
    check_identity(merge_identity(model, batch, torch.Generator().manual_seed(1)))
    # same Parameter objects (an optimizer holding them stays valid); the base holds W + s B A
    assert all(p is params_before[name] for name, p in model.named_parameters())
    folded = merged_state_dict(model.state_dict(), lora_scalings(model))  # B = 0 now: adds nothing
    assert folded.keys() == expected.keys()
    assert all(torch.allclose(folded[k], expected[k], atol=1e-6) for k in expected)


def test_targets_reach_only_the_named_decoder_projections(tiny_base):
    model, _ = lora_model(tiny_base, targets=("v_proj", "o_proj", "up_proj", "down_proj"))
    names = [name for name, _ in lora_layers(model)]
    layers = len(model.llm.layers)
    assert len(names) == 4 * layers and all("language_model.layers." in n for n in names)
    assert sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names}) == [
        "mlp.down_proj", "mlp.up_proj", "self_attn.o_proj", "self_attn.v_proj"]
    with pytest.raises(ValueError, match="unknown LoRA targets.*'qkv'"):
        attach_lora(load_base(tiny_base)[0], LoraSettings(r=2, alpha=4, targets=("q_proj", "qkv")))


def test_reset_draws_peft_init_from_the_generator(tiny_base):
    model, _ = lora_model(tiny_base)
    reset_lora_(model, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for _, layer in lora_layers(model):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        expected = torch.empty(a.shape)
        torch.nn.init.kaiming_uniform_(expected, a=5 ** 0.5, generator=g)  # peft's init_lora_weights=True
        assert torch.equal(a, expected) and not b.any()
        assert a.abs().max() <= a.shape[1] ** -0.5  # kaiming(a=sqrt 5) bound = 1 / sqrt(fan_in)


def test_adapters_disabled_bypasses_lora_and_keeps_requires_grad(tiny_base):
    model, processor = lora_model(tiny_base)
    batch = batch_for(processor)
    for i, p in enumerate(lora_parameters(model)):
        p.requires_grad_(i % 2 == 0)
    flags = [p.requires_grad for p in lora_parameters(model)]
    on = logits(model, batch)
    with adapters_disabled(model):
        assert [p.requires_grad for p in lora_parameters(model)] == flags
        off = logits(model, batch)
    assert [p.requires_grad for p in lora_parameters(model)] == flags
    assert torch.equal(logits(model, batch), on) and not torch.allclose(on, off, atol=1e-3)
    # the bypassed model is the base without any LoRA
    plain, _ = load_base(tiny_base)
    assert torch.allclose(off, logits(plain.eval(), batch), atol=1e-6)


def test_clear_optimizer_state_forgets_only_the_given_parameters(tiny_base):
    model, processor = lora_model(tiny_base)
    model.train()
    merger = list(model.visual.merger.parameters())
    for p in merger:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*lora_parameters(model), *merger], lr=1e-3)
    model(**batch_for(processor)).loss.backward()
    optimizer.step()
    assert all(optimizer.state[p] for p in lora_parameters(model))
    assert clear_optimizer_state_(optimizer, lora_parameters(model)) == len(lora_parameters(model))
    assert not any(p in optimizer.state for p in lora_parameters(model))
    assert all(int(optimizer.state[p]["step"]) == 1 for p in merger)
    optimizer.step()  # lazily re-initialised: step 1 again for LoRA, 2 for the merger
    assert all(int(optimizer.state[p]["step"]) == 1 for p in lora_parameters(model))
    assert all(int(optimizer.state[p]["step"]) == 2 for p in merger)


# -- FSDP2 on 2 CPU processes --------------------------------------------------------------------------------

def _fsdp2_worker(rank: int, world: int, port: int, base: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from src.callbacks.export import full_state_dict
    from src.models.sharding import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, processor = lora_model(base)
        shard_model(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)))
        assert all(type(p).__name__ == "DTensor" for p in lora_parameters(model))
        result = merge_identity(model, batch_for(processor), torch.Generator().manual_seed(1))
        state = full_state_dict(model)  # a collective: every rank
        if rank == 0:
            result["state"] = {k: v for k, v in state.items() if "language_model" in k}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(fn, *args, timeout: float = 240.0) -> None:
    """torch.multiprocessing spawn (never a re-launch of pytest), with a deadline that terminates the ranks."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=(2, _free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


@pytest.mark.slow
def test_fold_and_reset_on_fsdp2_shards_of_two_cpu_processes(tiny_base, tmp_path):
    """Each rank folds W_local += s B_local A_full; logits on every rank satisfy the identity, and the gathered
    folded weights equal the single-process fold (same generator -> same A on any world size)."""
    run_two_processes(_fsdp2_worker, str(tiny_base), str(tmp_path))
    single, processor = lora_model(tiny_base)
    reference = merge_identity(single, batch_for(processor), torch.Generator().manual_seed(1))
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        check_identity(out)
        assert torch.allclose(out["on_after"], reference["on_after"], atol=LOGIT_ATOL, rtol=0)
    gathered = torch.load(tmp_path / "rank0.pt")["state"]
    local = single.state_dict()
    assert gathered and all(torch.allclose(v, local[k], atol=1e-6) for k, v in gathered.items())
    assert any(".lora_A." in k for k in gathered) and any(".base_layer." in k for k in gathered)

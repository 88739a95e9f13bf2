"""The media cache under FSDP2 (2 CPU processes, gloo), as a sharded MrDPO run meets it: the ranks' rollouts ran
different forwards with whole weights, then one rank finds the clip's encoder outputs in its cache while the other
computes them, and both train a step.

Two things keep the ranks' collectives matched, and each is checked here:
- the cached encoders get no FSDP2 units of their own (shard_model's ``whole``, what SFTModule / DPOModule ask for
  when a cache is set): per-layer units would leave the computing rank in all-gathers the other never joins;
- ``forget_forward_order`` before the training forward: FSDP2 records every unit's forward, grad or not, and in
  backward a unit prefetches the one recorded before it. Here rank 0's rollout-like forward ends in a decoder
  layer and rank 1's in the root, so without it the aligner, the first unit of the training forward, prefetches a
  resharded layer on rank 0 (an all-gather) and nothing on rank 1: the hang a 2-process MrDPO run showed.

The two ranks are plain subprocesses of this file (not pytest re-launches, see ENV-NOTES), killed on timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.models.build import build_tiny
from tests.test_rollout_fsdp import free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), tokenizer_texts=300)


def run_ranks(base: Path, synthav: Path, out: Path, forget: bool) -> tuple[list[int | None], list[str]]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_media_cache_fsdp", str(base),
                               str(synthav / "train.jsonl"), str(out), str(int(forget))], cwd=ROOT,
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    outputs = ["timed out"] * len(procs)  # a rank that times out stops the wait for all (a hang holds both)
    try:
        for i, proc in enumerate(procs):
            outputs[i] = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs], outputs


def test_a_hit_on_one_rank_and_a_miss_on_the_other_after_uneven_rollouts(base, synthav, tmp_path):
    codes, outputs = run_ranks(base, synthav, tmp_path, forget=True)
    for rank, (code, output) in enumerate(zip(codes, outputs)):
        assert code == 0, f"rank {rank} failed:\n{output[-4000:]}"
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(2)]
    # rank 0 met the clip before sharding, then hits in every forward; rank 1 computes it every time
    assert [r["hits"] for r in results] == [{"video": 3, "audio": 3}, {"video": 0, "audio": 0}]
    assert [r["misses"] for r in results] == [{"video": 1, "audio": 1}, {"video": 3, "audio": 3}]
    for r in results:
        assert r["units"] == {"llm": True, "aligner": True, "vision": False, "whisper": False}
        assert r["logits_max_diff"] < 1e-5
        assert abs(r["loss"] - r["want_loss"]) < 1e-5
        assert abs(r["grad_norm"] - r["want_grad_norm"]) < 1e-5 * max(1.0, r["want_grad_norm"])


@pytest.mark.slow
def test_without_forgetting_the_rollouts_forwards_the_ranks_hang(base, synthav, tmp_path):
    """The control: the same ranks without ``forget_forward_order`` do not finish the step (killed at the
    timeout), so the test above checks the fix and not a lucky order."""
    codes, outputs = run_ranks(base, synthav, tmp_path, forget=False)
    assert "timed out" in outputs, [o[-2000:] for o in outputs]
    assert not (tmp_path / "result0.json").exists() or not (tmp_path / "result1.json").exists()


# ------------------------------------------------------------------------------------------------ one rank

def run_rank(base: str, manifest: str, out: Path, forget: bool) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from src.data.manifest import read_manifest
    from src.models.build import load_base
    from src.models.media_cache import FrozenMediaCache
    from src.models.sharding import forget_forward_order, full_tensor, shard_model
    from src.rollout.unshard import unsharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, processor = load_base(base)
    model.requires_grad_(False)
    model.aligner.requires_grad_(True)  # a trainable unit that runs first in the forward, as in SFT and DPO
    processor.media_keys = True
    row = read_manifest(manifest, "sft")[0]
    batch = processor.collate([processor(row)])

    def grad_norm() -> float:
        return float(torch.stack([full_tensor(p.grad).norm() for p in model.aligner.parameters()]).norm())

    want_logits = model(**batch).logits.detach()
    want = model(**batch, return_logits=False)
    want.loss.backward()
    want_loss, want_grad_norm = float(want.loss), grad_norm()
    model.zero_grad(set_to_none=True)

    cache = FrozenMediaCache()
    cache.attach(model)
    # rank 0 has met the clip (before sharding, alone: no collective); rank 1 never stores it (no keys)
    keys = {"video_keys": batch["video_keys"], "audio_keys": batch["audio_keys"]} if rank == 0 else {
        "video_keys": None, "audio_keys": None}
    inputs = {**batch, **keys}
    if rank == 0:
        with torch.no_grad():
            model.embed(batch["input_ids"], batch["pixel_values_videos"], batch["video_grid_thw"],
                        batch["input_features"], batch["audio_chunks"], batch["audio_windows"], **keys)
    shard_model(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)),
                whole=["video", "audio"])
    with torch.no_grad():
        got_logits = model(**inputs).logits  # rank 0 a hit, rank 1 a miss; the root's all-gather on both
    with torch.no_grad(), unsharded(model):  # a rollout: whole weights, each rank its own forwards
        if rank == 0:  # generation-like: the decoder stack called directly, so its last recorded unit is a layer
            embeds = model.embed(batch["input_ids"], batch["pixel_values_videos"], batch["video_grid_thw"],
                                 batch["input_features"], batch["audio_chunks"], batch["audio_windows"], **keys)
            model.llm(inputs_embeds=embeds, position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        else:  # a full forward: the root is recorded last
            model(**inputs)
    if forget:
        forget_forward_order(model)
    out_step = model(**inputs, return_logits=False)  # rank 0 a hit, rank 1 a miss
    out_step.loss.backward()
    units = {name: isinstance(module, FSDPModule) for name, module in
             (("llm", model.llm.layers[0]), ("aligner", model.aligner), ("vision", model.visual.blocks[0]),
              ("whisper", model.whisper.layers[0]))}
    (out / f"result{rank}.json").write_text(json.dumps({
        "hits": cache.hits, "misses": cache.misses, "units": units,
        "logits_max_diff": float((got_logits - want_logits).abs().max()),
        "loss": float(out_step.loss), "want_loss": want_loss, "grad_norm": grad_norm(),
        "want_grad_norm": want_grad_norm}))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(sys.argv[1], sys.argv[2], Path(sys.argv[3]), bool(int(sys.argv[4])))

"""The media cache under FSDP2 (2 CPU processes, gloo): one rank finds a clip's encoder outputs in its cache while
the other computes them. With the cached encoders left out of their own FSDP2 units (shard_model's ``whole``, what
SFTModule / DPOModule ask for when a cache is set) the forward finishes on both ranks and gives the unsharded
model's logits; per-layer units there would leave the computing rank waiting in an all-gather for the other.

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
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), tokenizer_texts=300)


def test_a_hit_on_one_rank_and_a_miss_on_the_other(base, synthav, tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_media_cache_fsdp", str(base),
                               str(synthav / "train.jsonl"), str(tmp_path)], cwd=ROOT, env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(2)]
    assert [r["hits"] for r in results] == [{"video": 1, "audio": 1}, {"video": 0, "audio": 0}]
    assert [r["misses"] for r in results] == [{"video": 1, "audio": 1}, {"video": 1, "audio": 1}]
    for r in results:
        assert r["logits_max_diff"] < 1e-5
        assert r["units"] == {"llm": True, "vision": False, "whisper": False}


# ------------------------------------------------------------------------------------------------ one rank

def run_rank(base: str, manifest: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from src.data.manifest import read_manifest
    from src.models.build import load_base
    from src.models.media_cache import FrozenMediaCache
    from src.models.sharding import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, processor = load_base(base)
    model.eval().requires_grad_(False)
    processor.media_keys = True
    row = read_manifest(manifest, "sft")[0]
    batch = processor.collate([processor(row)])
    with torch.no_grad():
        want = model(**batch).logits
    cache = FrozenMediaCache()
    cache.attach(model)
    if rank == 0:  # rank 0 has met the clip before (here before sharding, alone: no collective)
        with torch.no_grad():
            model.embed(batch["input_ids"], batch["pixel_values_videos"], batch["video_grid_thw"],
                        batch["input_features"], batch["audio_chunks"], batch["audio_windows"],
                        video_keys=batch["video_keys"], audio_keys=batch["audio_keys"])
    shard_model(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)),
                whole=["video", "audio"])
    with torch.no_grad():
        got = model(**batch).logits  # rank 0: a hit, rank 1: a miss; the root's all-gather on both
    units = {name: isinstance(module, FSDPModule) for name, module in
             (("llm", model.llm.layers[0]), ("vision", model.visual.blocks[0]), ("whisper", model.whisper.layers[0]))}
    (out / f"result{rank}.json").write_text(json.dumps({
        "hits": cache.hits, "misses": cache.misses, "units": units,
        "logits_max_diff": float((got - want).abs().max())}))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(sys.argv[1], sys.argv[2], Path(sys.argv[3]))

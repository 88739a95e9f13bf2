"""The rollout on an FSDP2-sharded model (2 CPU processes, gloo): uneven shards (4 vs 3 videos, one per generate
call) finish without a deadlock, give exactly the pairs and samples the unsharded model gives, and leave the model
sharded and working.

The two ranks are plain subprocesses of this file (not pytest re-launches, see ENV-NOTES), killed on timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from src.models.build import build_tiny

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 7  # rank 0 takes rows 0, 2, 4, 6 and rank 1 rows 1, 3, 5: different numbers of forwards
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), tokenizer_texts=300)


def test_sharded_rollout_equals_unsharded(base, synthav, tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_rollout_fsdp", str(base), str(synthav / "train.jsonl"),
                               str(tmp_path)], cwd=ROOT, env={**env, "RANK": str(rank)},
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
    assert [r["videos"] for r in results] == [4, 3]
    for r in results:
        assert r["plain_pairs"] == r["sharded_pairs"]
        assert r["plain_samples"] == r["sharded_samples"]
        assert r["logits_max_diff"] < 1e-5


# ------------------------------------------------------------------------------------------------ one rank

def run_rank(base: str, manifest: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from src.data.manifest import read_manifest, row_to_dict
    from src.judge.synth import SynthJudge
    from src.models.sharding import shard_model
    from src.rollout import RolloutSettings, read_progress, rollout, shard_path
    from tests.test_rollout import steered

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = read_manifest(manifest, "sft")[:N_ROWS]
    model, processor = steered(base, rows)
    settings = RolloutSettings(k=4, batch_size=4, max_new_tokens=16, seed=5)
    row = rows[rank]
    probe = processor.collate([processor.encode(processor.load_clip(row.video, row.audio), row.prompt, row.caption)])
    with torch.no_grad():
        logits = model(**probe).logits

    def run(name: str):
        path = shard_path(out / f"{name}.jsonl", rank, world)
        stats = rollout(model, processor, rows, SynthJudge(), path, settings, rank=rank, world_size=world,
                        progress=False)
        pairs = [row_to_dict(r) for r in read_manifest(path, "preference", check_media=False, allow_empty=True)] \
            if os.path.exists(path) else []
        return stats, pairs, [r["samples"] for r in read_progress(path)]

    plain_stats, plain_pairs, plain_samples = run("plain")
    shard_model(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)))
    sharded_stats, sharded_pairs, sharded_samples = run("sharded")
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())  # resharded on exit
    with torch.no_grad():  # and a sharded forward (collective, on both ranks) still gives the same logits
        after = model(**probe).logits
    (out / f"result{rank}.json").write_text(json.dumps({
        "videos": sharded_stats.videos, "plain_pairs": plain_pairs, "sharded_pairs": sharded_pairs,
        "plain_samples": plain_samples, "sharded_samples": sharded_samples,
        "logits_max_diff": float((after - logits).abs().max())}))
    assert plain_stats.videos == sharded_stats.videos
    dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(sys.argv[1], sys.argv[2], Path(sys.argv[3]))

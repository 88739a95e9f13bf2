"""The stream under real DDP (2 CPU processes, gloo, ddp_spawn): no sample on two ranks, and a checkpoint
taken mid-run resumes every rank at its next sample (the cursor is gathered from all ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from src.data.datamodule import AVDataModule
from tests.test_streaming import IdProcessor, write_rows


class RankRecorder(pl.LightningModule):
    """Appends the ids each rank trains on to <out>/rank<r>.jsonl (ddp_spawn returns nothing to the parent)."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        with open(Path(self.out) / f"rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.global_step, "ids": batch["id"]}) + "\n")
        return self.layer(torch.ones(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(tmp_path: Path, name: str, manifest: str, max_steps: int, ckpt_path=None, ckpt_dir=None) -> Path:
    out = tmp_path / name
    out.mkdir()
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1,
                                                      filename="{step}"))
    dm = AVDataModule(train=manifest, batch_size=2, num_workers=2, shuffle_buffer=8, seed=5,
                      processor=IdProcessor(), check_media=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         enable_checkpointing=ckpt_dir is not None, default_root_dir=tmp_path)
    trainer.fit(RankRecorder(str(out)), datamodule=dm, ckpt_path=ckpt_path)
    return out


def ids_by_rank(out: Path, after_step: int = -1) -> list[list[str]]:
    return [[i for line in (out / f"rank{r}.jsonl").read_text().splitlines()
             for rec in [json.loads(line)] if rec["step"] > after_step for i in rec["ids"]] for r in range(2)]


def test_ddp_ranks_disjoint_and_resume_from_checkpoint(tmp_path):
    manifest = write_rows(tmp_path / "m.jsonl", [f"clip{i:02d}" for i in range(40)])
    full = run(tmp_path, "full", manifest, max_steps=6, ckpt_dir=tmp_path / "ckpt")
    ranks = ids_by_rank(full)
    assert all(len(r) == 12 for r in ranks)
    assert not set(ranks[0]) & set(ranks[1])  # 24 of 40 samples: within one epoch, nothing twice

    state = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=True)["AVDataModule"]["train"]
    assert state["world_size"] == 2 and len(state["shards"]) == 4  # both ranks' two worker shards

    resumed = run(tmp_path, "resumed", manifest, max_steps=6, ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert ids_by_rank(resumed) == ids_by_rank(full, after_step=2)

"""Logs the data stream's health: how many bad samples were skipped (and quarantined) so far."""

from __future__ import annotations

import lightning.pytorch as pl


class BadSampleMonitor(pl.Callback):
    """Logs ``data/bad_samples``: bad training samples skipped so far, summed over ranks.

    The count comes from the DataModule's stream cursor, so it survives resume. Costs one all-reduce of a
    scalar per logged step under DDP/FSDP.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        count = getattr(trainer.datamodule, "bad_samples", None)
        if count is not None:
            pl_module.log("data/bad_samples", float(count), on_step=True, reduce_fx="sum", sync_dist=True)

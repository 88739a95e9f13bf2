"""LightningDataModules over SFT and preference manifests, streaming synchronised frames and audio.

Training streams epoch after epoch (runs are driven by ``max_steps``); validation and test stream one epoch in
file order. The training cursor (see src.data.streaming) is updated in ``on_before_batch_transfer``, which
Lightning calls for exactly the batch about to be trained on (its prefetched batch is not counted), and lives in
this module's ``state_dict``, so Lightning's checkpoints carry it and ``fit(ckpt_path=...)`` resumes the stream at
the next sample. A LightningModule that overrides ``on_before_batch_transfer`` takes that hook from the
DataModule: it must call ``trainer.datamodule.on_before_batch_transfer`` itself.

Data that changes during a run (MrDPO: each round trains on the pairs its rollout just wrote): set ``train_source``
to a callable returning the manifest(s); ``train_dataloader()`` calls it each time Lightning asks for the loader
(with ``reload_dataloaders_every_n_epochs=1``, at every epoch start). A new source ends the old stream (dataset and
cursor dropped) and starts the new one from its beginning. A saved cursor names the sources it belongs to, and a
resume applies it to those sources only (a mismatch is an error, never a cursor applied to other data).
"""

from __future__ import annotations

import os

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from src.data.clip_cache import ClipCache
from src.data.clip_processor import ClipProcessor
from src.data.media import FrameSampling
from src.data.streaming import OnBadSample, SampleProcessor, Source, StreamCursor, StreamingDataset

Sources = Sequence[Source] | str | None


def as_sources(value: Sources) -> list[Source]:
    """A manifest path, a list of Source, or None -> list of Source."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Source(os.fspath(value))]
    return [s if isinstance(s, Source) else Source(**s) for s in value]


def single_threaded_worker(worker_id: int) -> None:
    """Decoding workers run one torch thread each: the trainer's process owns the cores' math threads, and
    N workers x N threads on N cores thrash (measured: 3x slower steps on 2 cores)."""
    torch.set_num_threads(1)


class AVDataModule(pl.LightningDataModule):
    """Streams manifest rows through a sample processor (decoding happens in the workers).

    Args:
        train / val / test: a manifest path or a list of Source(path, weight).
        processor: row -> sample and samples -> batch; defaults to ClipProcessor(sampling).
        sampling: frame sampling of the default processor (a given processor carries its own).
        base: a model directory: its AVProcessor (saved with the model) encodes the samples for that model.
        on_bad_sample: "skip" (report, count, quarantine, continue) or "raise".
        run_dir: where quarantine.jsonl goes; defaults to the trainer's log_dir.
        group_by_length: training batches of similar length (less padding): each window of this many batches
            is sorted by the rows' text length, cut into batches, and the batches shuffled (0 or 1: off).
        cache_dir: a directory for decoded clips (``clip_cache.ClipCache``): epochs after the first read them
            instead of decoding again. Off by default; worth it when decoding rivals the step (small models).
    """

    kind: Literal["sft", "preference"] = "sft"

    def __init__(self, train: Sources = None, val: Sources = None, test: Sources = None, *, batch_size: int = 1,
                 num_workers: int = 2, shuffle_buffer: int = 10_000, seed: int = 0,
                 sampling: FrameSampling | None = None, processor: SampleProcessor | None = None,
                 base: str | None = None, on_bad_sample: OnBadSample = "skip", run_dir: str | None = None,
                 check_media: bool = True, cache_dir: str | None = None, group_by_length: int = 0):
        super().__init__()
        self.sources = {"train": as_sources(train), "val": as_sources(val), "test": as_sources(test)}
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed, self.group_by_length = shuffle_buffer, seed, group_by_length
        if sum(x is not None for x in (processor, sampling, base)) > 1:
            raise ValueError("give at most one of processor, sampling (for the default processor) and base")
        if base is not None:
            from src.models.processor import AVProcessor  # the model package only when a model is involved

            processor = AVProcessor.from_pretrained(base)
        self.processor = processor or ClipProcessor(sampling or FrameSampling())
        if cache_dir is not None:
            if not hasattr(self.processor, "clip_cache"):
                raise ValueError(f"cache_dir: {type(self.processor).__name__} has no clip_cache to use it")
            self.processor.clip_cache = ClipCache(cache_dir)
        self.on_bad_sample, self.run_dir, self.check_media = on_bad_sample, run_dir, check_media
        self.datasets: dict[str, StreamingDataset] = {}
        self._train_state: dict[str, Any] | None = None  # a checkpoint's cursor, until the train dataset takes it
        self._train_state_sources: list[list] | None = None  # the sources that cursor belongs to
        self.train_source: Callable[[], Sources] | None = None

    # -- datasets ----------------------------------------------------------------------------------------
    def _run_dir(self) -> str | None:
        if self.run_dir is None and self.trainer is not None:
            return self.trainer.log_dir
        return self.run_dir

    def dataset(self, split: str) -> StreamingDataset:
        if split not in self.datasets:
            if not self.sources[split]:
                raise ValueError(f"{type(self).__name__}: no {split} manifest configured")
            train = split == "train"
            ds = StreamingDataset(
                self.sources[split], self.processor, kind=self.kind, seed=self.seed, repeat=train,
                shuffle_buffer=self.shuffle_buffer if train else 0, on_bad_sample=self.on_bad_sample,
                run_dir=self._run_dir(), check_media=self.check_media, num_workers=self.num_workers,
                group_by_length=self.group_by_length if train else 0, batch_size=self.batch_size)
            if train and self._train_state is not None:
                self._check_cursor_sources()
                ds.load_state_dict(self._train_state)
                self._train_state = self._train_state_sources = None
            self.datasets[split] = ds
        return self.datasets[split]

    def _loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=ds.collate,
                          worker_init_fn=single_threaded_worker, persistent_workers=False, pin_memory=False)

    def train_dataloader(self) -> DataLoader:
        if self.train_source is not None:
            self.use_train_sources(self.train_source())
        return self._loader("train")

    def use_train_sources(self, value: Sources) -> None:
        """Train on ``value`` from the next ``train_dataloader()`` on. Other data than now: the current stream (its
        dataset and cursor) ends; a checkpoint's cursor still waiting to be restored is kept (it names its data)."""
        sources = as_sources(value)
        if not sources:
            raise ValueError(f"{type(self).__name__}: train_source gave no training manifest")
        if sources != self.sources["train"]:
            self.sources["train"] = sources
            self.datasets.pop("train", None)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- resume ------------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and "train" in self.datasets:
            self.datasets["train"].cursor.update(batch["stream"])
        return batch

    @property
    def bad_samples(self) -> int:
        """Bad training samples skipped so far on this rank (since the start of the run, resumes included)."""
        return self.datasets["train"].cursor.bad_samples if "train" in self.datasets else 0

    def _source_list(self) -> list[list]:
        return [[s.path, s.weight] for s in self.sources["train"]]

    def _check_cursor_sources(self) -> None:
        saved = self._train_state_sources
        if saved is not None and saved != self._source_list():
            raise ValueError(f"cannot resume the data stream: the checkpoint's cursor belongs to the training data "
                             f"{saved}, this run trains on {self._source_list()}")

    def state_dict(self) -> dict[str, Any]:
        """The training cursor of every rank merged into one (Lightning saves rank 0's dict only), with the training
        sources it belongs to."""
        if "train" not in self.datasets:
            if not self._train_state:
                return {}
            return {"train": self._train_state, "train_sources": self._train_state_sources}
        local = self.datasets["train"].state_dict()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, local)
        else:
            states = [local]
        return {"train": StreamCursor.merged(states), "train_sources": self._source_list()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_state = state_dict.get("train")
        self._train_state_sources = state_dict.get("train_sources")  # absent in checkpoints of older code
        self.datasets.pop("train", None)


class PreferenceDataModule(AVDataModule):
    """The same stream over preference rows (chosen / rejected / gt and optional reference log-probs). With a
    model's AVProcessor (``base``), a batch holds each sample's media once and its responses stacked in blocks
    (AVProcessor.collate_preference): what src.lit.dpo.DPOModule trains on."""

    kind = "preference"

"""Streaming dataset over JSONL manifests: weighted mixing, buffer shuffle, rank x worker sharding, exact resume.

How an epoch is laid out (all of it cheap index arithmetic; media is decoded only for the samples a shard yields):

1. Mixing. Source ``s`` with ``n_s`` rows and weight ``w_s`` contributes ``floor(w_s) * n_s`` rows (every row
   ``floor(w_s)`` times) plus a seeded subset of ``round(frac(w_s) * n_s)`` rows, so weight 1 = every row once,
   2 = twice, 0.5 = half. The sources are interleaved in proportion (each item sits at fractional position
   ``(i + 0.5) / count_s`` of its source, merged by that position), keeping each source's file order.
2. Shuffle. A seeded shuffle buffer of ``shuffle_buffer`` items runs over that stream (0 = file order; a buffer
   as large as the epoch = a full permutation). The seed is ``(seed, epoch)``, so every rank and worker computes
   the same order without talking to each other.
   Optionally (``group_by_length`` > 1) the shuffled stream is then grouped by length: windows of that many
   batches are sorted by the rows' text length and cut into batches whose order is shuffled, so a batch pads
   little and its neighbours still come in random order (:func:`length_grouped`).
3. Sharding. Position ``p`` of the epoch belongs to shard ``p % (world_size * num_workers)``. Each (rank, worker)
   owns one shard, so the union over ranks and workers is the epoch, each item exactly once.

Resume. Every yielded sample carries a :class:`StreamPos` (shard, epoch, offset within the shard's items, bad
samples skipped just before it). The process that consumes batches feeds them to :class:`StreamCursor`; its
state (per shard: the epoch and the next offset) makes a new dataset start each shard exactly after the last
consumed sample. DataLoader hands out batches round-robin over workers (batch j from worker j % N); the cursor
also stores which worker is next and the resumed workers rotate their shard ids to match, so the remaining
samples arrive in the same order as in an uninterrupted run. Samples that a worker had prefetched but nobody
consumed are simply produced again.

Bad samples. The processor raises :class:`BadSampleError` for a sample it cannot use. The dataset logs the path
and reason, appends a line to ``<run_dir>/quarantine.jsonl``, counts it (``StreamPos.skipped`` of the next
sample, summed by the cursor) and moves on; ``on_bad_sample="raise"`` re-raises instead. Any other exception is
a bug and propagates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch.utils.data import IterableDataset, get_worker_info

from src.data.errors import BadSampleError
from src.data.manifest import read_manifest

log = logging.getLogger(__name__)

OnBadSample = Literal["skip", "raise"]


@dataclass(frozen=True)
class Source:
    """One manifest and its mixing weight (1.0 = every row once per epoch)."""

    path: str
    weight: float = 1.0


class StreamPos(NamedTuple):
    """Where a sample came from: enough to resume right after it. (A NamedTuple: Lightning's batch transfer
    rebuilds tuples but refuses frozen dataclasses.)"""

    shard: int
    epoch: int
    offset: int  # index among the shard's items of this epoch
    skipped: int = 0  # bad samples this shard skipped since its previous yielded sample


class SampleProcessor(Protocol):
    """Turns a manifest row into a sample (in a DataLoader worker) and samples into a batch.

    Raise :class:`BadSampleError` for a sample that cannot be used; anything else is treated as a bug.
    """

    def __call__(self, row: Any) -> dict[str, Any]: ...

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------------------
# Epoch order: pure functions of (sizes, weights, seed, epoch, buffer)


def mixed_items(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> list[tuple[int, int]]:
    """(source, row) pairs of one epoch before shuffling, sources interleaved in proportion to their counts."""
    rng = random.Random(f"mix:{seed}:{epoch}")
    keyed: list[tuple[float, int, int]] = []
    for src, (n, w) in enumerate(zip(sizes, weights)):
        if w < 0 or not math.isfinite(w):
            raise ValueError(f"source {src}: weight must be a finite number >= 0, got {w}")
        whole, frac = divmod(w, 1.0)
        rows = list(range(n)) * int(whole)
        extra = round(frac * n)
        if extra:
            rows += sorted(rng.sample(range(n), extra))
        count = len(rows)
        keyed += [((i + 0.5) / count, src, row) for i, row in enumerate(rows)]
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [(src, row) for _, src, row in keyed]


def buffer_shuffle(items: Sequence[Any], buffer_size: int, seed: int, epoch: int) -> list[Any]:
    """Shuffle a stream through a buffer: fill it, then emit a random slot and refill it with the next item."""
    if buffer_size <= 1:
        return list(items)
    rng = random.Random(f"shuffle:{seed}:{epoch}")
    out: list[Any] = []
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = rng.randrange(buffer_size)
        out.append(buf[j])
        buf[j] = item
    rng.shuffle(buf)
    out += buf
    return out


def length_grouped(items: Sequence[Any], lengths: Sequence[float], block: int, window: int, seed: int,
                   epoch: int) -> list[Any]:
    """Batches of similar length with the order still random: cut the (shuffled) stream into windows of ``window``
    blocks of ``block`` items, sort each window by length, cut it into blocks and shuffle the blocks' order.

    ``block`` = batch size x shards, so that the ``batch size`` items a shard takes for one batch (positions
    ``shard + k * shards``) come from one block. The whole permutation is a function of its arguments alone.
    """
    if window <= 1 or block < 1:
        return list(items)
    rng = random.Random(f"group:{seed}:{epoch}")
    out: list[Any] = []
    size = block * window
    for start in range(0, len(items), size):
        chunk = sorted(range(start, min(start + size, len(items))), key=lambda i: lengths[i])
        blocks = [chunk[i:i + block] for i in range(0, len(chunk), block)]
        tail = blocks.pop() if len(blocks[-1]) < block else []  # a short last block stays last: the full ones
        rng.shuffle(blocks)                                     # before it keep the shards' batch boundaries
        out += [items[i] for b in blocks for i in b] + [items[i] for i in tail]
    return out


def row_length(row: Any) -> int:
    """A row's length for grouping without decoding its media: the characters of its texts (caption, or chosen +
    rejected + gt, and its prompt). Media length is not in a manifest; it varies little within most data sets."""
    return sum(len(getattr(row, name, None) or "") for name in ("prompt", "caption", "chosen", "rejected", "gt"))


def epoch_order(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int,
                shuffle_buffer: int) -> list[tuple[int, int]]:
    return buffer_shuffle(mixed_items(sizes, weights, seed, epoch), shuffle_buffer, seed, epoch)


# ----------------------------------------------------------------------------------------------------------
# Cursor: what has been consumed, in the process that consumes batches


class StreamCursor:
    """Consumption state of one rank, mergeable across ranks into one resumable state.

    State: ``{"world_size", "num_workers", "shards": {shard: [epoch, next_offset]}, "next_worker": {rank: w},
    "bad_samples": int}``.
    """

    def __init__(self, world_size: int = 1, num_workers: int = 1, rank: int = 0):
        self.world_size, self.num_workers, self.rank = world_size, max(num_workers, 1), rank
        self.shards: dict[int, tuple[int, int]] = {}
        self.next_worker: dict[int, int] = {}
        self.bad_samples = 0

    def update(self, positions: Sequence[StreamPos]) -> None:
        """Record one consumed batch (all its samples come from one worker)."""
        for pos in positions:
            nxt = (pos.epoch, pos.offset + 1)
            if nxt > self.shards.get(pos.shard, (-1, 0)):
                self.shards[pos.shard] = nxt
            self.bad_samples += pos.skipped
        self.next_worker[self.rank] = (self.next_worker.get(self.rank, 0) + 1) % self.num_workers

    def state_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shards": {str(k): list(v) for k, v in sorted(self.shards.items())},
            "next_worker": {str(k): v for k, v in sorted(self.next_worker.items())},
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["world_size"], state["num_workers"]) != (self.world_size, self.num_workers):
            raise ValueError(
                f"cannot resume the data stream: it was saved with world_size={state['world_size']} x "
                f"num_workers={state['num_workers']}, this run has {self.world_size} x {self.num_workers}; "
                "resume with the same numbers of processes and DataLoader workers")
        self.shards = {int(k): tuple(v) for k, v in state["shards"].items()}
        self.next_worker = {int(k): int(v) for k, v in state["next_worker"].items()}
        self.bad_samples = int(state["bad_samples"])

    @classmethod
    def merged(cls, states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One state from the states of all ranks (each rank only knows its own shards)."""
        out = dict(states[0], shards={}, next_worker={}, bad_samples=0)
        for st in states:
            out["shards"].update(st["shards"])
            out["next_worker"].update(st["next_worker"])
            out["bad_samples"] += st["bad_samples"]
        return out


# ----------------------------------------------------------------------------------------------------------
# The dataset


def position_rank(position: int, world_size: int, num_workers: int) -> int:
    """The rank whose stream yields an epoch's item ``position`` (module docstring, step 3: shard ``position %
    (world_size x workers)``, shards ``rank x workers ...`` belong to ``rank``; ``StreamingDataset._local_shard``)."""
    workers = max(num_workers, 1)
    return (position % (world_size * workers)) // workers


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingDataset(IterableDataset):
    """Iterable over one or more manifests; decoding (the processor) runs in the DataLoader workers.

    ``repeat=True`` streams epoch after epoch (training driven by max_steps); ``repeat=False`` yields one epoch,
    ``self.epoch`` (see :meth:`set_epoch`). ``rank`` / ``world_size`` default to torch.distributed's.
    ``num_workers`` must equal the DataLoader's (0 and 1 both mean one stream per rank). ``group_by_length`` N > 1
    groups each window of N batches (of ``batch_size``, the DataLoader's, per shard) by length (module docstring).
    """

    def __init__(self, sources: Sequence[Source], processor: SampleProcessor, *, kind: str = "sft",
                 shuffle_buffer: int = 10_000, seed: int = 0, repeat: bool = True,
                 on_bad_sample: OnBadSample = "skip", run_dir: str | None = None, check_media: bool = True,
                 num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
                 rows: Sequence[Sequence[Any]] | None = None, group_by_length: int = 0, batch_size: int = 1):
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        if not sources:
            raise ValueError("StreamingDataset needs at least one source manifest")
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in sources]
        self.rows = list(rows) if rows is not None else [
            read_manifest(s.path, kind, check_media=check_media) for s in self.sources]
        self.processor = processor
        self.shuffle_buffer, self.seed, self.repeat = shuffle_buffer, seed, repeat
        if group_by_length < 0 or batch_size < 1:
            raise ValueError(f"group_by_length must be >= 0 and batch_size >= 1, got {group_by_length}, {batch_size}")
        self.group_by_length, self.batch_size = group_by_length, batch_size
        self.lengths = [[row_length(r) for r in rows] for rows in self.rows] if group_by_length > 1 else None
        self.on_bad_sample, self.run_dir = on_bad_sample, run_dir
        self.epoch = 0
        default_rank, default_world = dist_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.cursor = StreamCursor(self.world_size, num_workers, self.rank)

    # -- order -----------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return self.world_size * self.cursor.num_workers

    def epoch_items(self, epoch: int) -> list[tuple[int, int]]:
        sizes = [len(r) for r in self.rows]
        items = epoch_order(sizes, [s.weight for s in self.sources], self.seed, epoch, self.shuffle_buffer)
        if self.lengths is not None:
            lengths = [self.lengths[src][idx] for src, idx in items]
            items = length_grouped(items, lengths, self.batch_size * self.num_shards, self.group_by_length,
                                   self.seed, epoch)
        return items

    def epoch_size(self) -> int:
        """Items per epoch over all ranks, bad samples included. (No __len__: the stream may be infinite, and
        Lightning would take a length for the number of batches of this rank.)"""
        return len(mixed_items([len(r) for r in self.rows], [s.weight for s in self.sources], self.seed, 0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- resume ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.cursor.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cursor.load_state_dict(state)

    def _local_shard(self) -> tuple[int, int]:
        """(shard id, worker id) of the calling worker, rotated so a resumed run keeps the batch order."""
        info = get_worker_info()
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        if n != self.cursor.num_workers:
            raise ValueError(f"StreamingDataset was built for num_workers={self.cursor.num_workers} but the "
                             f"DataLoader runs {n} workers: pass the same number to both")
        rotation = self.cursor.next_worker.get(self.rank, 0)
        return self.rank * n + (worker + rotation) % n, worker

    # -- iteration -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, worker = self._local_shard()
        # a finished epoch of a finite stream is behind self.epoch: start the new one from its beginning
        epoch, offset = max(self.cursor.shards.get(shard, (self.epoch, 0)), (self.epoch, 0))
        skipped = 0
        while True:
            items = self.epoch_items(epoch)
            for k in range(offset, len(range(shard, len(items), self.num_shards))):
                src, idx = items[shard + k * self.num_shards]
                row = self.rows[src][idx]
                try:
                    sample = self.processor(row)
                except BadSampleError as err:
                    self._quarantine(row, err, shard=shard, worker=worker, epoch=epoch)
                    if self.on_bad_sample == "raise":
                        raise
                    skipped += 1
                    continue
                sample["stream"] = StreamPos(shard, epoch, k, skipped)
                skipped = 0
                yield sample
            if not self.repeat:
                return
            epoch, offset = epoch + 1, 0

    def _quarantine(self, row: Any, err: BadSampleError, **where: int) -> None:
        source = getattr(row, "source", None)
        log.warning("bad sample %s (%s): %s", getattr(row, "id", "?"), source, err)
        if self.run_dir is None:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "id": getattr(row, "id", None), "source": source,
                  "path": err.path, "reason": err.reason, "error": type(err).__name__, "rank": self.rank, **where}
        append_jsonl_line(os.path.join(self.run_dir, "quarantine.jsonl"), record)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The processor's batch plus ``batch["stream"]``: the StreamPos of each sample, for the cursor."""
        positions = [s.pop("stream") for s in samples]
        batch = self.processor.collate(samples)
        batch["stream"] = positions
        return batch


def append_jsonl_line(path: str, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor (safe across worker processes)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


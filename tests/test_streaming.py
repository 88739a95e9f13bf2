"""The stream's contracts: every sample once per epoch across ranks x workers, exact resume, mixing, bad samples.

The processor here decodes nothing (tests/test_streaming_media.py runs real clips through the same code).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from src.callbacks.data_monitor import BadSampleMonitor
from src.data.datamodule import AVDataModule
from src.data.errors import BadSampleError
from src.data.streaming import Source, StreamCursor, StreamingDataset, buffer_shuffle, mixed_items


class IdProcessor:
    """Yields the row id; rows whose id contains "bad" fail like an undecodable clip would."""

    def __call__(self, row):
        if "bad" in row.id:
            raise BadSampleError(row.video, "corrupt on purpose")
        return {"id": row.id}

    def collate(self, samples):
        return {"id": [s["id"] for s in samples]}


def write_rows(path: Path, ids: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": i, "video": f"{i}.mp4", "caption": f"caption {i}"}) + "\n"
                            for i in ids))
    return str(path)


def make_ds(manifests, *, num_workers=0, rank=0, world_size=1, repeat=False, **kw) -> StreamingDataset:
    sources = [m if isinstance(m, Source) else Source(m) for m in manifests]
    return StreamingDataset(sources, IdProcessor(), check_media=False, num_workers=num_workers, rank=rank,
                            world_size=world_size, repeat=repeat, **kw)


def take(ds: StreamingDataset, n_batches: int | None, *, batch_size=4, num_workers=0, track=True) -> list[str]:
    """Ids of the first n_batches batches (all when None), feeding each batch to the cursor like the trainer."""
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=ds.collate)
    ids: list[str] = []
    for i, batch in enumerate(loader):
        if n_batches is not None and i == n_batches:
            break
        if track:
            ds.cursor.update(batch["stream"])
        ids += batch["id"]
    return ids


@pytest.fixture
def manifest(tmp_path) -> tuple[str, list[str]]:
    ids = [f"clip{i:03d}" for i in range(103)]
    ids[17], ids[58] = "bad017", "bad058"
    return write_rows(tmp_path / "m.jsonl", ids), ids


def test_two_ranks_two_workers_see_every_sample_exactly_once(manifest):
    path, ids = manifest
    seen = []
    for rank in range(2):
        ds = make_ds([path], num_workers=2, rank=rank, world_size=2, shuffle_buffer=16)
        seen += take(ds, None, num_workers=2)
    good = [i for i in ids if "bad" not in i]
    assert len(seen) == len(good)
    assert Counter(seen) == Counter(good)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_stream_yields_the_same_remaining_samples(manifest, num_workers):
    """Stop after 11 batches (crossing bad samples), resume from the state: the next 19 batches are identical
    to batches 11..29 of an uninterrupted run, across the epoch boundary (101 good samples per epoch)."""
    path, _ = manifest
    full = take(make_ds([path], num_workers=num_workers, repeat=True), 30, num_workers=num_workers)
    first = make_ds([path], num_workers=num_workers, repeat=True)
    head = take(first, 11, num_workers=num_workers)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive serialisation
    resumed = make_ds([path], num_workers=num_workers, repeat=True)
    resumed.load_state_dict(state)
    tail = take(resumed, 19, num_workers=num_workers)
    assert head == full[:44]
    assert tail == full[44:]
    if num_workers == 0:  # one shard: the bad samples counted are those met before the 120th good one
        stream = [resumed.rows[0][i].id for e in (0, 1) for _, i in resumed.epoch_items(e)]
        last = [k for k, i in enumerate(stream) if "bad" not in i][119]
        assert resumed.cursor.bad_samples == sum("bad" in i for i in stream[:last])


def test_resume_two_ranks_from_merged_state(manifest):
    path, ids = manifest
    runs = [make_ds([path], num_workers=2, rank=r, world_size=2, repeat=True) for r in range(2)]
    full = [take(make_ds([path], num_workers=2, rank=r, world_size=2, repeat=True), 12, num_workers=2)
            for r in range(2)]
    heads = [take(ds, 5, num_workers=2) for ds in runs]
    merged = StreamCursor.merged([ds.state_dict() for ds in runs])
    for r in range(2):
        resumed = make_ds([path], num_workers=2, rank=r, world_size=2, repeat=True)
        resumed.load_state_dict(merged)
        assert heads[r] + take(resumed, 7, num_workers=2) == full[r]


def test_resume_refuses_a_different_worker_count(manifest):
    path, _ = manifest
    ds = make_ds([path], num_workers=2, repeat=True)
    take(ds, 3, num_workers=2)
    other = make_ds([path], num_workers=1, repeat=True)
    with pytest.raises(ValueError, match="num_workers=2"):
        other.load_state_dict(ds.state_dict())


def test_weights_repeat_and_subsample_sources(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [f"a{i}" for i in range(10)])
    b = write_rows(tmp_path / "b.jsonl", [f"b{i}" for i in range(10)])
    ds = make_ds([Source(a, 2.0), Source(b, 0.5)], shuffle_buffer=0)
    ids = take(ds, None)
    counts = Counter(i[0] for i in ids)
    assert counts == {"a": 20, "b": 5}
    assert all(Counter(ids)[f"a{i}"] == 2 for i in range(10))
    # interleaved in proportion: every window of 5 consecutive items holds 4 "a" and 1 "b"
    assert [sum(i[0] == "b" for i in ids[k:k + 5]) for k in range(0, 25, 5)] == [1] * 5


def test_mixing_and_shuffle_are_deterministic_per_seed_and_epoch():
    items = mixed_items([50, 30], [1.0, 1.0], seed=0, epoch=0)
    assert sorted(items) == sorted([(0, i) for i in range(50)] + [(1, i) for i in range(30)])
    assert buffer_shuffle(items, 0, 0, 0) == items
    once = buffer_shuffle(items, 16, seed=3, epoch=1)
    assert once == buffer_shuffle(items, 16, seed=3, epoch=1)
    assert once != buffer_shuffle(items, 16, seed=4, epoch=1)
    assert once != buffer_shuffle(items, 16, seed=3, epoch=2)
    assert sorted(once) == sorted(items)
    # a buffer of b items delays nothing by more than b positions' worth of look-ahead
    assert all(once.index(it) >= i - 16 for i, it in enumerate(items))


def test_bad_samples_are_quarantined_counted_and_skipped(manifest, tmp_path):
    path, ids = manifest
    ds = make_ds([path], run_dir=str(tmp_path / "run"), shuffle_buffer=0)
    seen = take(ds, None)
    assert seen == [i for i in ids if "bad" not in i]
    assert ds.cursor.bad_samples == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["id"], r["path"], r["reason"]) for r in lines] == [
        ("bad017", str(tmp_path / "bad017.mp4"), "corrupt on purpose"),
        ("bad058", str(tmp_path / "bad058.mp4"), "corrupt on purpose")]
    assert lines[0]["source"].endswith("m.jsonl:18")


def test_on_bad_sample_raise_stops_with_the_path(manifest):
    path, _ = manifest
    ds = make_ds([path], on_bad_sample="raise", shuffle_buffer=0)
    with pytest.raises(BadSampleError, match=r"/bad017\.mp4: corrupt on purpose"):
        take(ds, None)


# -- through Lightning: the DataModule's cursor rides in the checkpoint ------------------------------------


class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["id"]
        return self.layer(torch.ones(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, path, max_steps, ckpt_path=None):
    dm = AVDataModule(train=path, batch_size=4, num_workers=2, shuffle_buffer=0, seed=1,
                      processor=IdProcessor(), check_media=False)
    model = Recorder()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path / "logs"),
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         callbacks=[BadSampleMonitor()], default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model


def test_datamodule_resumes_from_a_lightning_checkpoint(manifest, tmp_path):
    path, _ = manifest
    _, full = fit(tmp_path / "full", path, max_steps=9)
    trainer, head = fit(tmp_path / "head", path, max_steps=4)
    ckpt = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(ckpt)
    trainer, tail = fit(tmp_path / "tail", path, max_steps=9, ckpt_path=str(ckpt))
    assert head.seen + tail.seen == full.seen
    assert len(full.seen) == 36 and len(set(full.seen)) == 36
    # file order, 2 workers: worker 0 takes even positions (20 samples: 0..38), worker 1 odd ones (16 samples,
    # 1..33 minus bad017 at position 17), so exactly one bad sample was skipped before step 9
    assert trainer.datamodule.bad_samples == 1
    assert trainer.callback_metrics["data/bad_samples"] == 1


# -- length grouping ----------------------------------------------------------------------------------------
def varied_rows(path: Path, n: int = 96) -> str:
    """``n`` rows whose captions have 1 to 40 words, drawn with a fixed seed."""
    rng = random.Random(7)
    words = [rng.randint(1, 40) for _ in range(n)]
    path.write_text("".join(json.dumps({"id": f"c{i:03d}", "video": f"c{i:03d}.mp4", "caption": " ".join(["w"] * k)})
                            + "\n" for i, k in enumerate(words)))
    return str(path)


def batch_spreads(ds: StreamingDataset, batch_size: int, num_workers: int = 0) -> list[int]:
    """max - min caption length within each batch of one epoch."""
    length = {r.id: len(r.caption) for r in ds.rows[0]}
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=ds.collate)
    return [max(length[i] for i in b["id"]) - min(length[i] for i in b["id"]) for b in loader]


def test_length_grouped_is_a_seeded_permutation_with_sorted_blocks():
    from src.data.streaming import length_grouped

    items = list(range(50))
    lengths = [(i * 37) % 23 for i in items]
    out = length_grouped(items, lengths, block=4, window=3, seed=0, epoch=0)
    assert sorted(out) == items
    assert out == length_grouped(items, lengths, block=4, window=3, seed=0, epoch=0)
    assert out != length_grouped(items, lengths, block=4, window=3, seed=0, epoch=1)
    for start in range(0, 48, 12):  # each window of 12 holds its own items, in blocks cut from its sorted order
        window = out[start:start + 12]
        assert sorted(window) == items[start:start + 12]
        order = sorted(window, key=lambda i: lengths[i])
        cuts = [order[k:k + 4] for k in range(0, 12, 4)]
        assert sorted(tuple(window[k:k + 4]) for k in range(0, 12, 4)) == sorted(tuple(c) for c in cuts)
    last = out[48:]  # the short last window: its short block (50 = 12 x 4 + 2) stays at the end
    assert sorted(last) == [48, 49]
    assert length_grouped(items, lengths, block=4, window=1, seed=0, epoch=0) == items  # off
    odd = length_grouped(list(range(22)), [i % 5 for i in range(22)], block=4, window=6, seed=0, epoch=0)
    assert sorted(odd[-2:], key=lambda i: i % 5) == sorted(range(22), key=lambda i: i % 5)[-2:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_grouped_batches_pad_less_and_still_cover_the_epoch_once(tmp_path, num_workers):
    path = varied_rows(tmp_path / "v.jsonl")
    plain = make_ds([path], num_workers=num_workers, shuffle_buffer=96)
    grouped = make_ds([path], num_workers=num_workers, shuffle_buffer=96, group_by_length=6, batch_size=4)
    assert sorted(take(grouped, None, num_workers=num_workers, track=False)) == sorted(r.id for r in plain.rows[0])
    spread_plain = sum(batch_spreads(plain, 4, num_workers))
    spread_grouped = sum(batch_spreads(grouped, 4, num_workers))
    assert spread_grouped < spread_plain / 3, (spread_grouped, spread_plain)


def test_grouped_stream_resumes_exactly(tmp_path):
    path = varied_rows(tmp_path / "v.jsonl")
    kw = dict(repeat=True, shuffle_buffer=96, group_by_length=6, batch_size=4)
    full = take(make_ds([path], **kw), 40)
    first = make_ds([path], **kw)
    head = take(first, 13)
    resumed = make_ds([path], **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + take(resumed, 27) == full


def test_datamodule_groups_only_the_training_stream(tmp_path):
    path = varied_rows(tmp_path / "v.jsonl")
    dm = AVDataModule(train=path, val=path, batch_size=4, num_workers=0, processor=IdProcessor(),
                      check_media=False, group_by_length=8)
    assert (dm.dataset("train").group_by_length, dm.dataset("train").batch_size) == (8, 4)
    assert dm.dataset("val").group_by_length == 0
    with pytest.raises(ValueError, match="group_by_length"):
        make_ds([path], group_by_length=-1)

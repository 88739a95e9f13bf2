"""Each bad-input case through the real stream: reported with its file and reason, counted, quarantined and
skipped, while every good sample of the epoch still arrives (2 DataLoader workers, real decoding)."""

from __future__ import annotations

import json
import os

import pytest
from torch.utils.data import DataLoader

from src.data.clip_processor import ClipProcessor
from src.data.media import CorruptMediaError, FrameSampling
from src.data.streaming import Source, StreamingDataset
from tests import media_fixtures as fx

SAMPLING = FrameSampling(interval=0.5, max_pixels=56 * 56)


def corrupt_after_header(d):
    return fx.write_garbage_after_header(d / "garbage.mp4")


BAD_CASES = {
    # name: (writer of the bad file in dir d, words its reason must contain)
    "zero_length": (lambda d: fx.write_zero_length(d / "empty.mp4"), "zero-length"),
    "truncated": (lambda d: fx.write_truncated(fx.write_av(d / "whole.mp4", duration=1.0), d / "half.mp4"), ""),
    "corrupt": (lambda d: fx.write_random_bytes(d / "noise.mp4"), "cannot open"),
    "corrupt_after_header": (corrupt_after_header, ""),
    "missing_path": (lambda d: d / "nowhere" / "clip.mp4", "no such file"),
    "directory": (lambda d: (d / "adir.mp4").mkdir() or d / "adir.mp4", "is a directory"),
    "dangling_symlink": (lambda d: fx.write_dangling_symlink(d / "link.mp4"), "dangling symlink"),
    "no_audio_track": (lambda d: fx.write_av(d / "silent.mp4", duration=1.0, audio=False), "no audio stream"),
}


def stream_with(synthav, bad_path, tmp_path, on_bad_sample="skip"):
    rows = [json.loads(line) for line in (synthav / "train.jsonl").read_text().splitlines()]
    for row in rows:
        row["video"] = str(synthav / row["video"])
    rows.insert(3, {"id": "the-bad-one", "video": str(bad_path), "caption": "A red circle appears."})
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = StreamingDataset([Source(str(manifest))], ClipProcessor(SAMPLING), check_media=False, repeat=False,
                          shuffle_buffer=0, num_workers=2, rank=0, world_size=1, run_dir=str(tmp_path / "run"),
                          on_bad_sample=on_bad_sample)
    return ds, [r["id"] for r in rows if r["id"] != "the-bad-one"]


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_reported_counted_and_skipped(case, synthav, tmp_path):
    write, words = BAD_CASES[case]
    bad_path = write(tmp_path)
    ds, good_ids = stream_with(synthav, bad_path, tmp_path)
    seen = []
    for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ds.collate):
        ds.cursor.update(batch["stream"])
        seen += batch["id"]
        assert all(f.dtype.is_floating_point is False and f.shape[1] == 3 for f in batch["frames"])
    assert sorted(seen) == sorted(good_ids)
    assert ds.cursor.bad_samples == 1
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    assert record["id"] == "the-bad-one" and record["path"] == os.fspath(bad_path)
    assert words in record["reason"] and record["reason"].strip()
    assert record["source"].endswith("mixed.jsonl:4")


def test_raise_setting_stops_at_the_bad_file(synthav, tmp_path):
    bad_path = fx.write_random_bytes(tmp_path / "noise.mp4")
    ds, _ = stream_with(synthav, bad_path, tmp_path, on_bad_sample="raise")
    batches = iter(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ds.collate))
    try:
        with pytest.raises(CorruptMediaError, match=f"{bad_path}: cannot open container"):
            for _ in batches:
                pass
    finally:
        # The re-raised error's traceback holds the iterator in a reference cycle, so only a later GC pass would
        # free it; that pass closes its index queues (weakref finalizers) before __del__ asks the workers to stop,
        # the stop never arrives, and the join waits out torch's 5 s timeout in whichever test runs then.
        batches._shutdown_workers()


def test_use_audio_false_and_audio_only_rows_are_good_samples(tmp_path):
    """Neither is an error: a row that says use_audio false decodes no audio; a file without video is an
    audio-only sample."""
    silent = fx.write_av(tmp_path / "silent.mp4", duration=1.0, audio=False)
    sound = fx.write_av(tmp_path / "sound.m4a", duration=1.0, video=False)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "v", "video": str(silent), "use_audio": False, "caption": "x"}) + "\n"
                        + json.dumps({"id": "a", "audio": str(sound), "caption": "y"}) + "\n")
    ds = StreamingDataset([Source(str(manifest))], ClipProcessor(SAMPLING), repeat=False, shuffle_buffer=0,
                          rank=0, world_size=1)
    video_only, audio_only = list(ds)
    assert video_only["audio"] is None and video_only["frames"].shape[0] == 2
    assert audio_only["frames"] is None and audio_only["audio"].numel() == pytest.approx(16000, abs=160)

"""The DataModules take their settings the way recipes give them (jsonargparse, as LightningCLI does): typed
nested settings arrive with their types, the processor is pluggable by class_path, and a real SynthAV batch
comes out with frames and audio on one clock."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from src.data.clip_processor import ClipProcessor
from src.data.datamodule import AVDataModule, PreferenceDataModule
from src.data.media import FrameSampling
from src.data.streaming import Source


def build(*args: str) -> AVDataModule:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(AVDataModule, "data")
    return parser.instantiate(parser.parse_args(list(args))).data


def test_cli_overrides_reach_nested_settings_with_their_types(synthav):
    dm = build(f"--data.train=[{{path: {synthav}/train.jsonl, weight: 2}}]", "--data.sampling.interval=0.5",
               "--data.sampling.max_pixels=3136", "--data.batch_size=3", "--data.num_workers=0")
    assert dm.sources["train"] == [Source(f"{synthav}/train.jsonl", 2.0)]
    assert dm.processor == ClipProcessor(FrameSampling(interval=0.5, max_pixels=3136))
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["id"]) == 3 and all(f.shape == (8, 3, 56, 56) for f in batch["frames"])
    assert all(a.dtype == torch.float32 and a.numel() == 64000 for a in batch["audio"])
    assert all(t[1] - t[0] == pytest.approx(0.5) for t in batch["frame_times"])


def test_processor_is_pluggable_by_class_path(synthav):
    dm = build(f"--data.train={synthav}/train.jsonl", "--data.processor=src.data.clip_processor.ClipProcessor",
               "--data.processor.sample_rate=8000")
    assert dm.processor.sample_rate == 8000


def test_processor_and_sampling_together_is_an_error(synthav):
    with pytest.raises(ValueError, match="at most one of processor"):
        AVDataModule(f"{synthav}/train.jsonl", processor=ClipProcessor(), sampling=FrameSampling())


def test_preference_module_reads_preference_rows(tmp_path, synthav):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text('{"id": "p0", "video": "%s/train/train-000000.mp4", "chosen": "A low tone plays.", '
                        '"rejected": "A high tone plays.", "ref_chosen_logp": -3.5, "ref_rejected_logp": -4.0}\n'
                        % synthav)
    dm = PreferenceDataModule(train=str(manifest), num_workers=0, batch_size=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen"] == ["A low tone plays."] and batch["rejected"] == ["A high tone plays."]
    assert batch["ref_chosen_logp"] == [-3.5] and batch["ref_rejected_logp"] == [-4.0]

"""The tiny base's encoder pretraining (src/models/encoder_pretrain.py): each encoder learns what the timeline
says, and the base build changes those encoders (and the projectors' calibration) and nothing else."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from src.data.manifest import read_manifest
from src.data.synth.labels import IGNORE, SILENT
from src.models.build import build_tiny, load_base, main
from src.models.encoder_pretrain import AUDIO, VISION, PretrainSettings, pretrain_encoder

FAST = PretrainSettings(clips=8, steps=100, batch_size=4, lr=3e-3, warmup=5, eval_clips=8)


@pytest.fixture(scope="module")
def rows(synthav):
    return read_manifest(synthav / "train.jsonl")


def test_vision_targets_follow_the_temporal_patches(tiny_base, rows):
    _, proc = load_base(tiny_base)
    example = VISION.example(rows[0], proc)
    assert example["targets"].shape == (int(example["grid"][0]), 3, 2)
    assert example["pixels"].shape[0] == int(example["grid"].prod())
    with pytest.raises(ValueError, match="timeline"):
        VISION.example(type(rows[0])(**{**rows[0].__dict__, "extra": {}}), proc)


def test_audio_targets_cover_the_encoder_frames(tiny_base, rows):
    _, proc = load_base(tiny_base)
    example = AUDIO.example(rows[0], proc)
    chunks, n_mels, frames = example["features"].shape
    assert example["targets"].shape == (chunks, frames // 2)
    real = example["targets"][example["targets"] != IGNORE]
    assert (real == SILENT).any() and (real != SILENT).any()  # every SynthAV clip has silence and a sound


@pytest.mark.parametrize("task, metric", [(VISION, "colour"), (AUDIO, "frames")])
def test_pretraining_teaches_the_encoder(tiny_base, rows, task, metric):
    """Memorising 8 clips (evaluated on the same clips: the point is that it learns, not that it generalises)."""
    model, proc = load_base(tiny_base)
    model.requires_grad_(False)  # as a frozen model: pretraining must hand it back frozen
    own = ("visual." if task is VISION else "whisper.")
    others = {k: v.clone() for k, v in model.state_dict().items() if own not in k}
    report = pretrain_encoder(task, model, proc, rows, rows, FAST, log=None)
    assert report["after"][metric] > report["before"][metric] + 0.2
    assert report["after"][metric] > 0.8
    assert report["clips"] == 8 and report["final_loss"] < report["first_loss"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items())
    assert not any(p.requires_grad for p in model.parameters())


def test_build_changes_only_the_encoders_and_projectors_and_saves_no_head(tmp_path, rows):
    plain = build_tiny(tmp_path / "plain", tokenizer_texts=300, calibration=rows[:4])
    trained = build_tiny(tmp_path / "trained", tokenizer_texts=300, calibration=rows[:4], pretrain_rows=rows,
                         pretrain={"vision": FAST, "audio": FAST}, clip_cache=tmp_path / "cache")
    a, b = load_file(plain / "model.safetensors"), load_file(trained / "model.safetensors")
    assert a.keys() == b.keys()  # the classifier heads are not part of the base
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    allowed = ("visual.", "whisper.", "aligner.out_proj.")
    assert all(any(p in k for p in allowed) for k in changed), sorted(changed)
    for part in ("visual.blocks", "visual.merger", "whisper.layers", "aligner.out_proj"):
        assert any(part in k for k in changed), part
    assert any((tmp_path / "cache").rglob("*.safetensors"))  # the decoded clips are cached for SFT


def test_cli_needs_a_manifest_for_pretraining(tmp_path):
    with pytest.raises(SystemExit):
        main(["--tiny", "--out", str(tmp_path / "o"), "--pretrain-vision-steps", "10"])


"""The scratch base's data-dependent media init: media tokens start centred and as spread as text embeddings."""

from __future__ import annotations

import pytest
import torch

from src.data.manifest import read_manifest
from src.models.build import build_tiny, load_base, main
from src.models.calibrate import _media, spread
from src.models.processor import CLIP_MEAN


@pytest.fixture(scope="module")
def rows(synthav):
    return read_manifest(synthav / "train.jsonl")[:6]


def test_calibrated_media_tokens_are_centred_and_spread_like_text(tmp_path, rows):
    raw_model, raw_proc = load_base(build_tiny(tmp_path / "raw", tokenizer_texts=300))
    model, proc = load_base(build_tiny(tmp_path / "cal", tokenizer_texts=300, calibration=rows))
    text = model.get_input_embeddings().weight.norm(dim=-1).mean().item()

    with torch.no_grad():
        before = _media(raw_model, [raw_proc(r) for r in rows])
        after = _media(model, [proc(r) for r in rows])
    for raw, cal in zip(before, after):
        raw_mean, raw_spread = spread(raw)
        mean, cal_spread = spread(cal)
        assert raw_spread < 0.5 * raw_mean  # the problem: at random init a media token is mostly a constant
        assert mean < 1e-3 * text
        assert cal_spread == pytest.approx(text, rel=1e-3)

    # The pixel statistics are the data's, saved with the processor (dark background: far below CLIP's mean).
    assert proc.settings.vision.image_mean != CLIP_MEAN
    assert all(m < 0.3 for m in proc.settings.vision.image_mean)
    assert raw_proc.settings.vision.image_mean == CLIP_MEAN


def test_cli_refuses_calibration_of_a_real_base(tmp_path, synthav):
    with pytest.raises(SystemExit):
        main(["--qwen", str(tmp_path), "--whisper", str(tmp_path), "--out", str(tmp_path / "o"),
              "--calibrate", str(synthav / "train.jsonl")])

"""The real-model path on tiny stand-ins: Qwen2.5-VL and Whisper directories saved in the hub's layout, with the
real Qwen2 vocabulary, go through `python -m src.models.build --qwen DIR --whisper DIR --out DIR` and come back
as a working base (offline, no remote code). A user with the real 7B directories runs the same code."""

from __future__ import annotations

import json

import pytest
import torch

from src.data.media import load_clip
from src.models import build
from tests import media_fixtures as fx
from tests.model_fixtures import write_tiny_qwen_dir, write_tiny_whisper_dir


@pytest.fixture(scope="module")
def real_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    qwen = write_tiny_qwen_dir(root / "Qwen2.5-VL-7B-Instruct")
    whisper = write_tiny_whisper_dir(root / "whisper-large-v3")
    build.main(["--qwen", str(qwen), "--whisper", str(whisper), "--out", str(root / "av-base"), "--dtype", "float32"])
    return root


def test_builder_writes_one_loadable_directory(real_base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = real_base / "av-base"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "av_llm" and config["audio_token_id"] == 151665
    assert config["qwen_config"]["text_config"]["vocab_size"] == 151936  # the new token fits: no resize
    model, processor = build.load_base(out)
    assert len(processor.tokenizer) == 151666 and processor.audio_token_id == 151665
    assert processor.settings.audio.n_mels == 128 and processor.settings.audio.chunk_seconds == 4.0
    assert processor.settings.sampling.interval == 0.1 and processor.settings.sampling.max_pixels == 61250


def test_whisper_and_qwen_weights_are_copied(real_base):
    from transformers import WhisperModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    model, _ = build.load_base(real_base / "av-base")
    whisper = WhisperModel.from_pretrained(real_base / "whisper-large-v3").get_encoder()
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(real_base / "Qwen2.5-VL-7B-Instruct")
    for ours, theirs in ((model.whisper, whisper), (model.qwen, qwen)):
        mine = ours.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in theirs.state_dict().items())


def test_real_base_captions_an_av_clip(real_base, tmp_path):
    model, processor = build.load_base(real_base / "av-base")
    clip = fx.write_av(tmp_path / "clip.mp4", duration=2.0, fps=8, size=(112, 112), square_onset=1.0)
    sample = processor.encode(load_clip(clip, sampling=processor.settings.sampling), response="A square appears.")
    batch = processor.collate([sample])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert int((batch["input_ids"] == 151665).sum()) == 4  # 2 s of audio, 4 windows
    text = processor.tokenizer.decode(batch["input_ids"][0, :sample["response_start"]])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|video_pad|>")
    assert text.endswith("<|vision_end|>" + processor.settings.prompt + "<|im_end|>\n<|im_start|>assistant\n")

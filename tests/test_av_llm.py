"""The tiny AV LLM end to end on CPU: every input kind trains, save/load is exact, the KV cache is exact, audio and
video share one clock, and audio tokens exist only for real audio."""

from __future__ import annotations

import pytest
import torch

from src.data.media import FrameSampling, load_clip
from src.models.build import build_tiny, load_base
from src.models.generate import GenerationSettings, generate
from src.models.layout import AUDIO_TOKEN_TYPE
from src.models.processor import AVProcessor, ProcessorSettings, patchify
from tests import media_fixtures as fx

CAPTION = "The red square appears. A high tone plays."


@pytest.fixture(scope="module")
def loaded(tiny_base):
    model, processor = load_base(tiny_base)
    return model.eval(), processor


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """3 s: a white square appears at 1.0 s as a 1 kHz tone starts."""
    folder = tmp_path_factory.mktemp("clips")
    return fx.write_av(folder / "square_tone.mp4", duration=3.0, fps=8, size=(56, 56), square_onset=1.0,
                       tone_hz=1000.0, tone_onset=1.0)


def inputs(processor: AVProcessor, clip_path, kind: str, response: str | None = CAPTION) -> dict:
    clip = load_clip(clip_path, sampling=processor.settings.sampling, use_audio=kind in ("av", "audio"))
    if kind == "audio":
        clip.frames = clip.frame_times = None
    if kind == "text":
        clip = None
    return processor.encode(clip, response=response)


@pytest.mark.parametrize("kind", ["av", "video", "audio", "text"])
def test_forward_and_backward_for_every_input_kind(loaded, clip_path, kind):
    model, processor = loaded
    batch = processor.collate([inputs(processor, clip_path, kind)])
    model.zero_grad()
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters()}
    assert any(g for n, g in grads.items() if n.startswith("qwen.model.language_model"))
    assert any(g for n, g in grads.items() if n.startswith("qwen.model.visual")) == (kind in ("av", "video"))
    assert any(g for n, g in grads.items() if n.startswith("aligner")) == (kind in ("av", "audio"))


def test_mixed_batch_pads_and_matches_single_samples(loaded, clip_path):
    """Right-padded batch of an AV, a video-only and a text-only sample: each row's logits equal its own run."""
    model, processor = loaded
    samples = [inputs(processor, clip_path, k) for k in ("av", "video", "text")]
    with torch.no_grad():
        batch_logits = model(**processor.collate(samples)).logits
        for i, sample in enumerate(samples):
            alone = model(**processor.collate([sample])).logits[0]
            assert torch.allclose(batch_logits[i, :alone.shape[0]], alone, atol=1e-5)


def test_labels_cover_only_the_response(loaded, clip_path):
    model, processor = loaded
    sample = inputs(processor, clip_path, "av")
    learned = sample["input_ids"][sample["labels"] != -100].tolist()
    assert processor.tokenizer.decode(learned) == CAPTION + "<|im_end|>"


def test_sequence_memo_gives_fresh_equal_tensors_and_is_not_pickled(loaded, clip_path):
    """A repeated sample reads its token sequence from the processor's memo: equal tensors, not shared ones (a
    caller that edits its copy changes nothing for the next one); another response is built anew; a pickled
    processor (what DataLoader workers get) starts with an empty memo."""
    import pickle

    _, processor = loaded
    first = inputs(processor, clip_path, "av")
    first["labels"][:] = 0  # a caller editing its sample in place
    again = inputs(processor, clip_path, "av")
    fresh = processor._build_sequence(*processor._media(load_clip(clip_path, sampling=processor.settings.sampling))[1:],
                                      None, CAPTION)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(again[key], fresh[key])
    other = inputs(processor, clip_path, "av", response="A low tone plays.")
    assert not torch.equal(other["input_ids"][-5:], again["input_ids"][-5:])
    assert len(processor._sequences) >= 2 and pickle.loads(pickle.dumps(processor))._sequences == {}


@pytest.mark.parametrize("kind", ["av", "video", "audio", "text"])
@pytest.mark.parametrize("response", [CAPTION, "", None], ids=["caption", "empty", "none"])
def test_sequence_from_the_shared_prompt_side_equals_the_whole_build(loaded, clip_path, kind, response):
    """The processor builds a sequence from its memoised prompt side plus the response: the same ids, labels,
    3-D positions, rope delta and response start as tokenising the whole chat and computing its positions."""
    from src.models.layout import sequence_positions
    from src.models.tokenizer import chat_ids

    _, processor = loaded
    sample = inputs(processor, clip_path, kind, response=response)
    clip = load_clip(clip_path, sampling=processor.settings.sampling, use_audio=kind in ("av", "audio"))
    if kind == "audio":
        clip.frames = clip.frame_times = None
    _, spans, span_ids = processor._media(None if kind == "text" else clip)
    ids, start, _ = chat_ids(processor.tokenizer, processor.settings.prompt, system=processor.settings.system,
                             span=span_ids, response=response)
    whole = torch.tensor(ids)
    positions, delta = sequence_positions(whole, spans, video_token_id=processor.video_token_id,
                                          audio_token_id=processor.audio_token_id)
    assert torch.equal(sample["input_ids"], whole) and torch.equal(sample["position_ids"], positions)
    assert sample["rope_delta"] == delta and sample["response_start"] == start
    assert torch.equal(sample["labels"] != -100, (torch.arange(len(ids)) >= start) & (response is not None))


def test_save_then_load_gives_identical_logits(loaded, clip_path, tmp_path):
    model, processor = loaded
    batch = processor.collate([inputs(processor, clip_path, "av")])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, processor2 = load_base(tmp_path)
    assert processor2.settings == processor.settings
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again.eval()(**batch).logits)


def test_greedy_kv_cache_generation_equals_repeated_full_forwards(loaded, clip_path):
    model, processor = loaded
    samples = [inputs(processor, clip_path, "av", response=None), inputs(processor, clip_path, "text", response=None)]
    batch = processor.collate(samples, padding_side="left")
    out = generate(model, batch, GenerationSettings(max_new_tokens=8), eos_token_id=-1,
                   pad_token_id=processor.pad_token_id)
    for row, sample in enumerate(samples):
        ids, expected, logp = sample["input_ids"], [], 0.0
        for _ in range(8):
            grown = dict(sample, input_ids=torch.tensor(ids.tolist() + expected), labels=None)
            grown["labels"] = torch.full_like(grown["input_ids"], -100)
            n_new = len(expected)
            pos = sample["position_ids"]
            nxt = pos.max() + 1 + torch.arange(n_new)
            grown["position_ids"] = torch.cat([pos, nxt.expand(3, n_new)], dim=1)
            with torch.no_grad():
                logits = model(**processor.collate([grown])).logits[0, -1]
            expected.append(int(logits.argmax()))
            logp += float(torch.log_softmax(logits, -1).max())
        assert out.tokens[row].tolist() == expected
        assert out.logps[row].item() == pytest.approx(logp, abs=1e-4)


def test_tone_and_square_at_one_second_share_the_temporal_id(loaded, clip_path):
    """Frames every 0.25 s -> grids of 0.5 s; the grid starting at 1.0 s and the audio window starting at 1.0 s
    both get temporal id 2 (2 units per second), and that window's token comes right after that grid."""
    model, processor = loaded
    sample = inputs(processor, clip_path, "av")
    ids, pos = sample["input_ids"], sample["position_ids"]
    span_start = int((ids == processor.video_token_id).nonzero()[0]) - 1  # the <|vision_start|> token
    rel_t = pos[0] - (span_start + 1)
    audio_at = (ids == processor.audio_token_id).nonzero().flatten()
    video_at = (ids == processor.video_token_id).nonzero().flatten()
    window_2 = int(audio_at[2])
    grid_at_1s = [int(i) for i in video_at if rel_t[i] == 2]
    assert grid_at_1s and rel_t[window_2] == 2
    assert max(grid_at_1s) < window_2 and all(ids[max(grid_at_1s) + 1:window_2] == processor.audio_token_id)
    # and the pixels agree: the square is absent in grid 1 (0.5-1.0 s) and present in grid 2 (1.0-1.5 s)
    frames = load_clip(clip_path, sampling=processor.settings.sampling).frames
    assert frames[2:4, :, :20, :20].float().mean() < 100 < frames[4:6, :, :20, :20].float().mean()


def test_three_second_clip_yields_six_audio_tokens(loaded, clip_path):
    model, processor = loaded
    sample = inputs(processor, clip_path, "audio")
    assert int((sample["input_ids"] == processor.audio_token_id).sum()) == 6
    assert sample["audio_windows"] == 6 and sample["input_features"].shape[0] == 1  # one 4 s Whisper chunk
    from src.models.layout import AVLayout, span_token_types
    assert (span_token_types(AVLayout(video=None, audio_windows=6)) == AUDIO_TOKEN_TYPE).all()


def test_patchify_matches_qwen_video_processor():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = torch.randint(0, 256, (4, 3, 56, 84), dtype=torch.uint8)
    ours, grid = patchify(frames, ProcessorSettings().vision)
    hf = Qwen2VLVideoProcessor(do_resize=False, do_sample_frames=False)(videos=[frames], return_tensors="pt")
    assert list(hf["video_grid_thw"][0]) == list(grid)
    assert torch.allclose(ours, hf["pixel_values_videos"], atol=1e-5)


def test_processor_settings_round_trip(loaded, tmp_path):
    _, processor = loaded
    custom = AVProcessor(processor.tokenizer, ProcessorSettings(sampling=FrameSampling(interval=0.5, max_frames=8),
                                                               prompt="Say what happens."))
    custom.save_pretrained(tmp_path)
    assert AVProcessor.from_pretrained(tmp_path).settings == custom.settings


def test_tiny_patch_and_merge_sizes_are_settings(tmp_path, clip_path):
    """patch 7 x merge 4 covers the same 28 px per LLM token as 14 x 2 (same sequence layout), with 4x as many
    ViT patches: the vision tower and the processor agree on the grid, and the model trains."""
    out = build_tiny(tmp_path / "p7", tokenizer_texts=300, patch_size=7, merge_size=4)
    model, processor = load_base(out)
    assert (processor.settings.vision.patch_size, processor.settings.vision.merge_size) == (7, 4)
    assert model.visual.config.patch_size == 7 and model.visual.config.spatial_merge_size == 4
    sample = inputs(processor, clip_path, "av")
    t, h, w = sample["video_grid_thw"].tolist()
    assert (h, w) == (8, 8) and sample["pixel_values_videos"].shape == (t * h * w, 3 * 2 * 7 * 7)
    default_grid = AVProcessor(processor.tokenizer, ProcessorSettings(sampling=processor.settings.sampling,
                                                                      audio=processor.settings.audio))
    reference = inputs(default_grid, clip_path, "av")
    assert torch.equal(sample["input_ids"], reference["input_ids"])  # same tokens as the 14 x 2 layout
    out = model(**processor.collate([sample]))
    out.loss.backward()
    assert model.visual.patch_embed.proj.weight.grad.abs().sum() > 0

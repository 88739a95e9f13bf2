"""Build a base model directory: tiny (random, from configs) or real (from local Qwen2.5-VL + Whisper dirs).

    python -m src.models.build --tiny --out checkpoints/tiny-base
    python -m src.models.build --qwen checkpoints/Qwen2.5-VL-7B-Instruct --whisper checkpoints/whisper-large-v3 \
        --out checkpoints/av-base-7b

Either way the result is one HF-format directory: config.json (every model setting), model.safetensors (sharded
for big models), the tokenizer with the <|audio_pad|> token, and av_processor.json. ``load_base(dir)`` reads it
back with no network and no remote code. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2_5_VLConfig, WhisperConfig, WhisperModel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from src.data.clip_cache import ClipCache, warm_clip_cache
from src.data.media import FrameSampling
from src.data.synth.scene import sample_scene
from src.data.manifest import SFTRow, read_manifest
from src.models.aligner import AlignerConfig, WindowQFormer
from src.models.audio import AudioSettings
from src.models.av_llm import AVLLM, AVLLMConfig, parameter_summary
from src.models.calibrate import calibrate_media, recalibrate_projectors
from src.models.processor import DEFAULT_PROMPT, AVProcessor, ProcessorSettings, VisionSettings
from src.models.tokenizer import DEFAULT_SYSTEM, ensure_audio_token, special_ids, train_tiny_tokenizer
from src.models.encoder_pretrain import TASKS, PretrainSettings, pretrain_encoder

# Tiny defaults: small enough for CPU training in minutes, shaped like the real thing (same classes, same layout).
# The tests build these; `make base` (the embedded default) gives the LLM 6 layers instead (--llm-layers).
TINY = {
    "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 384,
    "vision_hidden": 96, "vision_depth": 2, "vision_heads": 2, "patch_size": 7, "merge_size": 4,
    "whisper_hidden": 64, "whisper_layers": 2, "whisper_heads": 2, "n_mels": 80, "chunk_seconds": 4.0,
    "aligner_hidden": 64, "aligner_layers": 2, "aligner_heads": 2,
    "vocab": 1024, "tokenizer_texts": 4000, "llm_init_std": 0.08,
}
TINY_SAMPLING = FrameSampling(interval=0.25, min_frames=2, max_frames=64, max_pixels=56 * 56, min_pixels=56 * 56)


def tokenizer_texts(n_scenes: int, seed: int = 0) -> list[str]:
    """SynthAV captions of ``n_scenes`` sampled scenes (no rendering) plus every other text of a chat sequence (the
    prompt, the system text, the role names): the tiny vocabulary. Without the chat texts their words were spelt
    letter by letter, 33 of a training sequence's ~147 tokens."""
    rng = np.random.default_rng(seed)
    chat = [DEFAULT_PROMPT, f"system\n{DEFAULT_SYSTEM}", "user\n", "assistant\n"]
    return [sample_scene(rng).caption() for _ in range(n_scenes)] + chat


def tiny_configs(tokenizer, sizes: dict) -> AVLLMConfig:
    ids = special_ids(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64  # a multiple of 64, as real vocabularies are padded
    head_dim = sizes["hidden"] // sizes["heads"]
    unit = head_dim // 16  # M-RoPE splits head_dim / 2 into (t, h, w) sections in Qwen's 16:24:24 proportion
    text = dict(vocab_size=vocab, hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
                num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                num_key_value_heads=sizes["kv_heads"], max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [2 * unit, 3 * unit, 3 * unit]},
                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"])
    vision = dict(depth=sizes["vision_depth"], hidden_size=sizes["vision_hidden"],
                  intermediate_size=2 * sizes["vision_hidden"], num_heads=sizes["vision_heads"],
                  out_hidden_size=sizes["hidden"], window_size=2 * sizes["patch_size"] * sizes["merge_size"],
                  fullatt_block_indexes=[sizes["vision_depth"] - 1], tokens_per_second=2,
                  patch_size=sizes["patch_size"], temporal_patch_size=2, spatial_merge_size=sizes["merge_size"])
    qwen = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    audio = AudioSettings(n_mels=sizes["n_mels"], chunk_seconds=sizes["chunk_seconds"])
    whisper = WhisperConfig(num_mel_bins=sizes["n_mels"], d_model=sizes["whisper_hidden"],
                            encoder_layers=sizes["whisper_layers"], encoder_attention_heads=sizes["whisper_heads"],
                            encoder_ffn_dim=4 * sizes["whisper_hidden"], decoder_layers=1,
                            decoder_attention_heads=sizes["whisper_heads"], decoder_ffn_dim=4 * sizes["whisper_hidden"],
                            max_source_positions=audio.chunk_frames // 2, vocab_size=64, pad_token_id=0,
                            bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    aligner = AlignerConfig(hidden_size=sizes["aligner_hidden"], num_layers=sizes["aligner_layers"],
                            num_heads=sizes["aligner_heads"], intermediate_size=4 * sizes["aligner_hidden"],
                            frames_per_window=audio.frames_per_window)
    return AVLLMConfig(qwen_config=qwen, whisper_config=whisper, aligner=aligner.to_dict(), audio=asdict(audio),
                       audio_token_id=ids["<|audio_pad|>"])


def build_tiny(out: str | os.PathLike, *, seed: int = 0, calibration: Sequence[SFTRow] = (),
               pretrain: Mapping[str, PretrainSettings] | None = None, pretrain_rows: Sequence[SFTRow] = (),
               pretrain_eval_rows: Sequence[SFTRow] = (), clip_cache: str | os.PathLike | None = None,
               **overrides) -> Path:
    """A random tiny base: a BPE tokenizer trained on SynthAV captions, small Qwen2.5-VL/Whisper/aligner.

    ``calibration`` rows (training clips with video and audio) set the media path's data-dependent init
    (``calibrate.calibrate_media``); without them the media path keeps its random init, which trains far more
    slowly (see that module). ``pretrain`` ({"vision": settings, "audio": settings}, either or both) then trains
    those encoders on ``pretrain_rows`` (SynthAV training rows with timelines; ``encoder_pretrain``), reported on
    ``pretrain_eval_rows``, and the projectors are calibrated again. ``clip_cache``: a ClipCache directory for the
    decoded clips (SFT reads them from it later)."""
    sizes = {**TINY, **overrides}
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(tokenizer_texts(sizes["tokenizer_texts"], seed), vocab_size=sizes["vocab"])
    config = tiny_configs(tokenizer, sizes)
    config._attn_implementation = "sdpa"
    model = AVLLM(config)
    scratch_init(model, sizes["llm_init_std"])
    settings = ProcessorSettings(sampling=TINY_SAMPLING, audio=AudioSettings(**config.audio),
                                 vision=VisionSettings(patch_size=sizes["patch_size"], merge_size=sizes["merge_size"]))
    processor = AVProcessor(tokenizer, settings)
    if pretrain and not calibration:
        raise ValueError("encoder pretraining needs calibration rows (the pixel statistics come from them)")
    if calibration:
        processor, report = calibrate_media(model, processor, calibration)
        print("calibrated the media path on {} clips: token spread video {:.3f} -> {:.3f}, audio {:.3f} -> {:.3f} "
              "(text {:.3f})".format(len(calibration), report["before"]["video"][1], report["after"]["video"][1],
                                     report["before"]["audio"][1], report["after"]["audio"][1],
                                     report["text_spread"]))
    if pretrain:
        if clip_cache is not None:  # every clip decoded once, in parallel: pretraining and SFT then read them
            started = time.perf_counter()
            rows = list(pretrain_rows) + list(pretrain_eval_rows)
            warmed = warm_clip_cache(clip_cache, [(r.video, r.audio, r.use_audio) for r in rows],
                                     sampling=processor.settings.sampling,
                                     sample_rate=processor.settings.audio.sample_rate, workers=2)
            print(f"clip cache {clip_cache}: {warmed['decoded']} of {warmed['clips']} clips decoded "
                  f"({warmed['failed']} failed) in {time.perf_counter() - started:.0f} s")
        processor.clip_cache = ClipCache(clip_cache) if clip_cache is not None else None
        for name, task_settings in pretrain.items():
            report = pretrain_encoder(TASKS[name], model, processor, pretrain_rows, pretrain_eval_rows, task_settings)
            held = ", ".join(f"{k} {report['before'][k]:.1%} -> {v:.1%}" for k, v in report["after"].items())
            print(f"pretrained the {name} encoder on {report['clips']} clips, {report['steps']} steps in "
                  f"{report['seconds']:.0f} s: loss {report['first_loss']:.3f} -> {report['final_loss']:.3f}"
                  + (f"; held-out accuracy {held}" if held else "")
                  + ("; on training clips " + ", ".join(f"{k} {v:.1%}" for k, v in report["train"].items())
                     if report["train"] else ""))
        recalibrate_projectors(model, processor, calibration)  # re-centre and re-spread the new media tokens
        processor.clip_cache = None
    return save_base(model, processor, out)


@torch.no_grad()
def scratch_init(model: AVLLM, llm_std: float) -> None:
    """Initialisation for a base trained from scratch (the tiny default), measured on SynthAV: with transformers'
    std 0.02 the LLM's attention stays uniform and media tokens, nearly alike at init, never earn attention (val
    loss with matched media == with another clip's media after 1,000 steps); with std 0.08 on the LLM's linear
    layers the two separate within 200 steps. Whisper's fixed sinusoidal positions swamp a random encoder's
    content (clip-to-clip output difference 0.4% of its scale), so the scratch encoder starts without them (the
    aligner has its own position-in-window embedding). Real bases keep their pretrained weights."""
    for module in model.llm.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(0.0, llm_std)
    model.whisper.embed_positions.weight.zero_()


def build_real(qwen_dir: str | os.PathLike, whisper_dir: str | os.PathLike, out: str | os.PathLike, *,
               aligner: AlignerConfig | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Qwen2.5-VL + the Whisper encoder from local directories, a fresh aligner, the audio token added."""
    torch.manual_seed(seed)
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=dtype, trust_remote_code=False)
    whisper = WhisperModel.from_pretrained(whisper_dir, dtype=dtype, trust_remote_code=False).get_encoder()
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir, trust_remote_code=False)
    audio_id = ensure_audio_token(tokenizer)
    if audio_id >= qwen.config.text_config.vocab_size:
        qwen.resize_token_embeddings(audio_id + 1, pad_to_multiple_of=64)
    wcfg = whisper.config
    audio = AudioSettings(n_mels=wcfg.num_mel_bins, chunk_seconds=2 * wcfg.max_source_positions * 160 / 16000)
    aligner = aligner or AlignerConfig(frames_per_window=audio.frames_per_window)
    config = AVLLMConfig(qwen_config=qwen.config, whisper_config=wcfg, aligner=aligner.to_dict(), audio=asdict(audio),
                         audio_token_id=audio_id)
    with torch.device("meta"):
        model = AVLLM(config)
    model.qwen, model.whisper = qwen, whisper
    model.aligner = WindowQFormer(aligner, encoder_dim=wcfg.d_model,
                                  llm_dim=qwen.config.text_config.hidden_size).to(dtype)
    settings = ProcessorSettings(audio=audio, vision=vision_settings_from(Path(qwen_dir)))
    return save_base(model, AVProcessor(tokenizer, settings), out)


def vision_settings_from(qwen_dir: Path) -> VisionSettings:
    """Patch sizes and normalisation from the Qwen directory's preprocessor config (defaults if absent)."""
    path = qwen_dir / "preprocessor_config.json"
    if not path.is_file():
        return VisionSettings()
    cfg = json.loads(path.read_text())
    base = VisionSettings()
    return VisionSettings(patch_size=cfg.get("patch_size", base.patch_size),
                          temporal_patch_size=cfg.get("temporal_patch_size", base.temporal_patch_size),
                          merge_size=cfg.get("merge_size", base.merge_size),
                          image_mean=tuple(cfg.get("image_mean", base.image_mean)),
                          image_std=tuple(cfg.get("image_std", base.image_std)))


def save_base(model: AVLLM, processor: AVProcessor, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load_base(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> tuple[AVLLM, AVProcessor]:
    """The model and its processor from one directory written by this module (or by a training export)."""
    model = AVLLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    return model, AVProcessor.from_pretrained(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the base into")
    parser.add_argument("--tiny", action="store_true", help="random tiny base from configs (CPU-friendly)")
    parser.add_argument("--qwen", help="local Qwen2.5-VL-*-Instruct directory")
    parser.add_argument("--whisper", help="local whisper-large-v3 (or other Whisper) directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", metavar="MANIFEST",
                        help="tiny only: training manifest whose first clips set the media path's init")
    parser.add_argument("--calibration-clips", type=int, default=64)
    parser.add_argument("--llm-layers", type=int, default=TINY["layers"], metavar="N",
                        help="tiny only: decoder layers of the LLM (the tests' bases keep TINY's %(default)s; the "
                             "Makefile's embedded default has more)")
    for name in TASKS:
        parser.add_argument(f"--pretrain-{name}-steps", type=int, default=0, metavar="N",
                            help=f"tiny only: pretrain the {name} encoder for N steps on the --calibrate manifest's "
                                 "timelines (src/models/encoder_pretrain.py); 0 = off")
    parser.add_argument("--pretrain-clips", type=int, default=PretrainSettings.clips)
    parser.add_argument("--pretrain-eval", metavar="MANIFEST", help="held-out rows for the pretraining report (val)")
    parser.add_argument("--clip-cache", metavar="DIR", help="decoded-clip cache to fill (the SFT recipes' cache_dir)")
    args = parser.parse_args(argv)
    pretrain = {name: PretrainSettings(steps=getattr(args, f"pretrain_{name}_steps"), clips=args.pretrain_clips,
                                       seed=args.seed)
                for name in TASKS if getattr(args, f"pretrain_{name}_steps")}
    if args.tiny == bool(args.qwen or args.whisper):
        parser.error("give either --tiny or both --qwen and --whisper")
    if (args.calibrate or pretrain or args.llm_layers != TINY["layers"]) and not args.tiny:
        parser.error("--calibrate, --pretrain-* and --llm-layers are for a tiny base trained from scratch; "
                     "a real base keeps its pretrained init")
    if pretrain and not args.calibrate:
        parser.error("--pretrain-*-steps needs --calibrate MANIFEST (its rows are the pretraining data)")
    if args.tiny:
        rows = read_manifest(args.calibrate) if args.calibrate else []
        held = read_manifest(args.pretrain_eval) if args.pretrain_eval else []
        out = build_tiny(args.out, seed=args.seed, calibration=rows[:args.calibration_clips], pretrain=pretrain,
                         pretrain_rows=rows, pretrain_eval_rows=held, clip_cache=args.clip_cache,
                         layers=args.llm_layers)
    else:
        if not (args.qwen and args.whisper):
            parser.error("--qwen and --whisper go together")
        for name in (args.qwen, args.whisper):
            if not Path(name, "config.json").is_file():
                parser.error(f"{name}: not a model directory (no config.json)")
        out = build_real(args.qwen, args.whisper, args.out, dtype=getattr(torch, args.dtype), seed=args.seed)
    model, _ = load_base(out)
    print(f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in parameter_summary(model).items()))


if __name__ == "__main__":
    main()

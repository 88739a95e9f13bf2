"""One gDPO training step, three ways: pairs/s and peak memory of the plain path, TRL's DPOTrainer and the fast path.

    python bench/dpo_step.py --prompt-len 4096 --json       # one JSON object on stdout
    make bench-dpo PROMPT_LEN=4096                           # the same through .venv-bench, which has TRL

Every path runs full training steps (forward, backward, gradient clipping at 1.0, AdamW step) of gDPO with
beta 0.1 and lambda 0.1 on the SAME LLM (same config, same weights) and the same number of pairs per step:

- plain: src.lit.dpo.DPOModule with ``packed=False``: chosen, rejected and gt as separate padded sequences, each
  holding the whole prompt, and no reference log-probs in the rows, so a no-grad reference pass runs every step.
- trl: the real TRL DPOTrainer (bench/requirements-trl.txt pins it; it lives in .venv-bench, never in .venv) on
  the Qwen2.5-VL text model as a Qwen2ForCausalLM with the AV model's LLM weights copied in (M-RoPE with three
  equal position axes is 1-D RoPE, so it is the same function on text; tests/test_bench_dpo_step.py checks the
  logits). TRL takes no video or audio, so its prompt is text of the same token length. gDPO's gt term cannot be
  expressed: TRL 1.16 has no rpo_alpha any more, and its closest option, loss_type ["sigmoid", "sft"] with
  loss_weights [1, lambda], puts the NLL on the CHOSEN response, so TRL runs 2 sequences per pair where gDPO runs
  3 (TRL does less work than the gDPO paths). Its reference pass runs every step (precompute_ref_log_probs
  False): with LoRA the adapter is disabled for it (TRL's own way with a PEFT model), with --trainable llm a
  separate reference model holds a copy of the weights. max_length None (no truncation), dropout disabled (TRL's
  default; LoRA dropout 0 on our side to match), gradient checkpointing as --checkpointing, the same for all
  paths (TRL's own default is on; the benchmark's is off, on for the 7b). TRL 1.16 takes log-probs through its
  own fused, chunked LM head (no full logits tensor): on CPU over every position, on CUDA (Triton) over the
  completion positions only.
- fast: DPOModule with ``packed=True`` and its default ``prefix_sharing="split"`` (--prefix-sharing): each pair
  one packed row [prompt | chosen | rejected | gt], the prompt once, SDPA with the shared prompt causal and a mask
  for the responses (src.models.split_attention; "cache": the prompts once, their KV cache shared by the
  responses, src.models.packing.PrefixBatch), the LM head on response tokens only. Measured twice: ``fast``
  with the reference pass every step (the fair comparison with plain and TRL) and ``fast_rollout_ref`` with
  reference log-probs supplied by the rows, as the MrDPO rollout provides them (no reference pass at all).
  ``fast_rollout_media``: fast_rollout_ref with DPOModule's media cache (cache_video_tokens / cache_audio_states
  for the encoders --trainable leaves frozen): the rollout's pass, which computes the reference log-probs, also
  stores the frozen vision path's tokens and Whisper's states of each clip, as MrDPO's rollout does for the round's
  videos, so the timed steps run no encoder (their outputs are copied in from CPU memory).
- trl_precomputed_ref: TRL as above with ``precompute_ref_log_probs=True``: its reference log-probs computed in
  one pass over the data set when the trainer is built, before the timed steps, so its steps run no reference
  pass either: the same-settings counterpart of fast_rollout_ref (ratio ``fast_rollout_ref/trl_precomputed_ref``).

plain and fast get the same audio-visual prompt: a synthetic clip (random frames at --frame-side px, 2 frames per
second, random 16 kHz audio) long enough that media tokens fill the prompt, plus the chat template and text so
that the prompt is exactly --prompt-len tokens, encoded by the project's AVProcessor.encode_preference /
collate_preference. Responses are exactly --response-len tokens (end token included) for chosen, rejected and gt.

Models (--model): ``tiny-wide`` (the CPU default): LLM hidden 512, 4 layers, 8 heads / 2 KV heads (head_dim 64,
GQA 4:1), MLP 1,536 (3x, the tiny base's ratio; the 7B's 5.3x costs 40% more CPU time for the same picture),
8,192 vocabulary rows (--vocab) over the tiny SynthAV tokenizer; the media encoders stay at the tiny base's sizes
(they run once per sample in both of our paths, and TRL has none). The vocabulary sets how much the LM head
weighs, and so how much a response-only head can save. At 8,192 the head is 26% of the LLM's per-token
matmul FLOPs and its fp32 logits + log-softmax about 28% of the plain path's activation memory; in the 7B (152k
rows, hidden 3,584, 28 layers, bf16 activations, fp32 log-softmax) the same shares are about 8% and 18%. So 8,192
favours the response-only head somewhat (4,096 would match the 7B's memory share, 16,384 would double the FLOPs
share, and the real 151,936 would make the head dominate a model this narrow and put the plain path at 16k far
past 24 GiB).
``7b`` (CUDA only, bf16, random init): Qwen2.5-VL-7B's LLM (hidden 3584, 28 layers, 28 / 4 heads, MLP 18,944,
vocabulary 152,064, untied head), its vision tower's shape (1280 wide, 32 blocks) and Whisper-large-v3's encoder
(1280 wide, 32 layers, 128 mel bins, 30 s chunks). ``tiny``: the tiny base's sizes, for the smoke test.

Trainable (--trainable): ``lora`` (default): a fresh LoRA r 128 / alpha 256 on q/k/v of the LLM (the paper's DPO
adapter) for all paths; our reference = adapter bypassed, TRL's = adapter disabled. ``lora,aligner,merger`` is
the project's DPO set (TRL still trains the LoRA only). ``llm``: the whole LLM (TRL with a reference model copy).

Measurement: each path runs in its own subprocess, so memory peaks are isolated and an out-of-memory is reported as
``"oom": true`` instead of ending the benchmark. --warmup steps, then --steps timed steps; pairs_per_s = pairs /
median step time. peak_mem_mb: on CPU the peak resident set during the steps minus the resident set just before
them (model, batch and optimizer built; the kernel's high-water mark reset through /proc/self/clear_refs), on
CUDA torch.cuda.max_memory_allocated minus the allocated memory before the steps; peak_rss_mb is the absolute
peak. On CPU (--memory live, the default) peak_mem_mb comes from a second, untimed run of each path (1 warm-up
+ 1 step) under glibc malloc with a fixed mmap threshold, so that the resident set follows the live tensors
rather than the freed memory glibc keeps (FIXED_MMAP_THRESHOLD); the timed run's resident-set peak under glibc's
own tuning is reported as peak_rss_glibc_mb, with its ratios. On CPU each child's address space is capped
(--mem-limit-gb, default: the memory available at its start minus 1 GiB) so that an oversized path fails with an allocation error instead of waking the kernel's OOM killer on a
shared machine. other_load_cores: CPU cores that other processes kept busy while the path ran (0 on a quiet
machine; timings on a loaded machine are not comparable).
"""

from __future__ import annotations

import argparse
import faulthandler
import inspect
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import record_function  # noqa: E402

from bench.model_forward import busy_cpu_seconds  # noqa: E402  (one /proc/stat reader for the benches)

PATHS = ("plain", "trl", "fast", "fast_rollout_ref", "fast_rollout_media", "trl_precomputed_ref")
ROLLOUT_PATHS = ("fast_rollout_ref", "fast_rollout_media")  # the reference log-probs from a rollout pass
BETA, GT_WEIGHT, MAX_GRAD_NORM, LR = 0.1, 0.1, 1.0, 5e-6
LORA_R, LORA_ALPHA, LORA_TARGETS = 128, 256, ("q_proj", "k_proj", "v_proj")
FPS = 2.0  # frames per second of the synthetic clip: one temporal grid (2 frames) per second
BENCH_VENV_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

# Model sizes, in src.models.build.TINY's keys (+ the LLM's vocabulary rows and config edits build does not expose).
# tiny-wide keeps the vision tower its recorded figures were taken with (patch 14 x merge 2, width 64), and 7b has
# Qwen2.5-VL's, whatever TINY's tower is.
QWEN_PATCHES = {"patch_size": 14, "merge_size": 2}
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "tiny-wide": {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 2, "intermediate": 1536, "llm_vocab": 8192,
                  "vision_hidden": 64, **QWEN_PATCHES},
    "7b": {**QWEN_PATCHES, "hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "intermediate": 18944, "llm_vocab": 152064,
           "vision_hidden": 1280, "vision_depth": 32, "vision_heads": 16, "vision_intermediate": 3420,
           "vision_window": 112, "vision_fullatt": [7, 15, 23, 31], "tie_word_embeddings": False,
           "whisper_hidden": 1280, "whisper_layers": 32, "whisper_heads": 20, "n_mels": 128, "chunk_seconds": 30.0,
           "aligner_hidden": 768, "aligner_layers": 2, "aligner_heads": 12},
}
FRAME_SIDE = {"tiny": 56, "tiny-wide": 224, "7b": 224}


@dataclass
class Settings:
    prompt_len: int = 4096
    response_len: int = 256
    pairs: int = 2
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    model: str = "tiny-wide"
    trainable: str = "lora"
    checkpointing: bool = False
    frame_side: int | None = None
    vocab: int | None = None
    threads: int | None = None
    mem_limit_gb: float | None = None
    memory: str = "live"
    seed: int = 0
    profile: str | None = None
    prefix_sharing: str = "split"
    llm_attention: str | None = None
    pack_tokens: int | None = None
    compile_decoder: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    @property
    def parts(self) -> list[str]:
        return [p.strip() for p in self.trainable.split(",") if p.strip()]

    @property
    def side(self) -> int:
        return self.frame_side or FRAME_SIDE[self.model]


# -- the shared inputs: base model, audio-visual batch, TRL's texts --------------------------------------------------
def base_config(settings: Settings):
    """(AVLLMConfig, tokenizer, sizes) of ``settings.model``: src.models.build's tiny configs at the model's sizes, the
    tiny SynthAV tokenizer (its ids are all the benchmark's text needs), the LLM's vocabulary rows set apart."""
    from src.models.build import TINY, tiny_configs, tokenizer_texts
    from src.models.tokenizer import train_tiny_tokenizer

    extra = dict(MODELS[settings.model])
    sizes = {**TINY, **{k: v for k, v in extra.items() if k in TINY}}
    tokenizer = train_tiny_tokenizer(tokenizer_texts(sizes["tokenizer_texts"], settings.seed), sizes["vocab"])
    config = tiny_configs(tokenizer, sizes)
    text, vision = config.qwen_config.text_config, config.qwen_config.vision_config
    text.max_position_embeddings = max(text.max_position_embeddings, 2 * settings.prompt_len)
    vocab = settings.vocab or extra.get("llm_vocab")
    if vocab is not None:
        if vocab < text.vocab_size:
            raise ValueError(f"--vocab {vocab} is smaller than the tokenizer's {text.vocab_size} ids")
        text.vocab_size = vocab
    if "vision_intermediate" in extra:
        vision.intermediate_size = extra["vision_intermediate"]
        vision.window_size = extra["vision_window"]
        vision.fullatt_block_indexes = extra["vision_fullatt"]
    if "tie_word_embeddings" in extra:
        config.qwen_config.tie_word_embeddings = extra["tie_word_embeddings"]
        text.tie_word_embeddings = extra["tie_word_embeddings"]
    config._attn_implementation = "sdpa"
    return config, tokenizer, sizes


def build_base(settings: Settings, out: Path) -> Path:
    """The benchmark's base directory (src.models.build's format) with a random model of ``settings.model``'s
    sizes; transformers' default init (std 0.02): the weights' values do not change the timing."""
    from src.models.audio import AudioSettings
    from src.models.av_llm import AVLLM
    from src.models.build import TINY_SAMPLING, save_base
    from src.models.processor import AVProcessor, ProcessorSettings, VisionSettings

    torch.manual_seed(settings.seed)
    config, tokenizer, sizes = base_config(settings)
    if settings.device == "cuda":  # the 7B: built on the GPU in bf16 (minutes on CPU in fp32)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(settings.dtype)
        with torch.device("cuda"):
            model = AVLLM(config)
        torch.set_default_dtype(previous)
    else:
        model = AVLLM(config)
    vision = VisionSettings(patch_size=sizes.get("patch_size", 14), merge_size=sizes.get("merge_size", 2))
    processor = AVProcessor(tokenizer, ProcessorSettings(sampling=TINY_SAMPLING, audio=AudioSettings(**config.audio),
                                                         vision=vision))
    saved = save_base(model, processor, out)
    del model
    if settings.device == "cuda":  # else this process's caching allocator keeps the 7B's 17.6 GB from the paths
        torch.cuda.empty_cache()
    return saved


def filler_words(tokenizer) -> list[str]:
    """Words that are one token both alone and after a space (text of an exact token length)."""
    from src.models.build import tokenizer_texts

    words = {w.strip(".,") for text in tokenizer_texts(400) for w in text.split()}
    single = sorted(w for w in words if w.isalpha() and len(tokenizer.encode(w, add_special_tokens=False)) == 1
                    and len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1)
    if len(single) < 2:
        raise RuntimeError(f"the tokenizer has too few single-token words to build exact lengths: {single}")
    return single


def words_text(words: list[str], n: int, generator: torch.Generator) -> str:
    """n words drawn from ``words``, space-separated (n tokens with the tokenizer ``words`` came from)."""
    picks = torch.randint(len(words), (n,), generator=generator).tolist()
    return " ".join(words[i] for i in picks)


def synthetic_clip(seconds: int, side: int, generator: torch.Generator):
    """Random frames (2 per second, side x side) and random 16 kHz audio: the processor's input for a clip."""
    from src.data.media import AVClip

    frames = max(2, int(seconds * FPS))
    return AVClip(path="synthetic", frames=torch.randint(0, 256, (frames, 3, side, side), dtype=torch.uint8,
                                                          generator=generator),
                  frame_times=torch.arange(frames, dtype=torch.float64) / FPS,
                  audio=0.1 * torch.randn(seconds * 16000, generator=generator), audio_start=0.0, sample_rate=16000,
                  duration=float(seconds), audio_status="ok")


def media_tokens(sample: dict[str, Any], processor) -> int:
    ids = sample["chosen"]["input_ids"]
    return int(((ids == processor.video_token_id) | (ids == processor.audio_token_id)).sum())


def preference_batch(processor, settings: Settings) -> tuple[dict[str, Any], dict[str, int]]:
    """``pairs`` preference samples (``preference_samples``), collated, and the prompt's token counts."""
    samples = preference_samples(processor, settings)
    batch = processor.collate_preference(samples)
    media = media_tokens(samples[0], processor)
    info = {"prompt_tokens": settings.prompt_len, "media_tokens": media, "clip_seconds": samples[0]["clip_seconds"],
            "frame_side": settings.side, "text_prompt_tokens": settings.prompt_len - media,
            "stacked_rows": int(batch["input_ids"].shape[0]), "stacked_length": int(batch["input_ids"].shape[1])}
    return batch, info


def preference_samples(processor, settings: Settings) -> list[dict[str, Any]]:
    """``pairs`` preference samples whose prompts are exactly ``prompt_len`` tokens (media + chat template + text)
    and whose chosen / rejected / gt responses are exactly ``response_len`` labelled tokens (each sample also
    names its clip's length, ``clip_seconds``)."""
    g = torch.Generator().manual_seed(settings.seed)
    words = filler_words(processor.tokenizer)
    responses = {name: words_text(words, settings.response_len - 1, g) for name in ("chosen", "rejected", "gt")}

    def encode(clip, extra_words: int) -> dict[str, Any]:
        prompt = processor.settings.prompt + ("" if extra_words == 0 else " " + words_text(words, extra_words, g))
        return processor.encode_preference(clip, prompt, responses)

    probe = encode(synthetic_clip(1, settings.side, g), 0)
    text = probe["chosen"]["response_start"] - media_tokens(probe, processor)
    vision = processor.settings.vision
    merged = (settings.side // (vision.patch_size * vision.merge_size)) ** 2  # merged patches per temporal grid
    per_second = merged * FPS / vision.temporal_patch_size + 2  # + 2 audio windows of 0.5 s
    seconds = max(1, int((settings.prompt_len - text - 8) // per_second))
    samples = []
    for _ in range(settings.pairs):
        clip = synthetic_clip(seconds, settings.side, g)
        sample, extra = encode(clip, 0), 0
        for _attempt in range(4):  # a word can merge with the prompt's last one; converges in 1-2 rounds
            missing = settings.prompt_len - sample["chosen"]["response_start"]
            if missing == 0:
                break
            extra += missing
            if extra < 0:
                raise ValueError(f"--prompt-len {settings.prompt_len} is shorter than the chat template and a "
                                 f"{seconds} s clip ({sample['chosen']['response_start']} tokens)")
            sample = encode(clip, extra)
        if sample["chosen"]["response_start"] != settings.prompt_len:
            raise RuntimeError(f"could not build a prompt of exactly {settings.prompt_len} tokens")
        for name in ("chosen", "rejected", "gt"):
            labelled = int((sample[name]["labels"] != -100).sum())
            if labelled != settings.response_len:
                raise RuntimeError(f"{name} has {labelled} labelled tokens, not {settings.response_len}")
        samples.append({**sample, "clip_seconds": seconds})
    return samples


def trl_texts(tokenizer, settings: Settings) -> dict[str, str]:
    """Prompt of prompt_len tokens; chosen / rejected of response_len - 1 tokens, TRL appends the end token."""
    g = torch.Generator().manual_seed(settings.seed + 1)
    words = filler_words(tokenizer)
    return {"prompt": words_text(words, settings.prompt_len, g),
            "chosen": " " + words_text(words, settings.response_len - 1, g),
            "rejected": " " + words_text(words, settings.response_len - 1, g)}


# A base directory kept between runs (--base-cache) is built for prompts up to this many tokens, so that one
# build serves 1k, 4k and 16k (RoPE has no position table: the setting only bounds the sequence length).
CACHED_BASE_POSITIONS = 2 * 16384


def base_dir(settings: Settings, directory: Path) -> Path:
    """The random base of ``settings`` in ``directory``: built there, or reused when an earlier run built the same
    model (sizes, seed, vocabulary; recorded in bench_base.json) for prompts at least this long."""
    model = {"model": settings.model, "seed": settings.seed, "vocab": settings.vocab, "dtype": str(settings.dtype)}
    record = directory / "bench_base.json"
    if record.exists():
        built = json.loads(record.read_text())
        if built.pop("positions") >= 2 * settings.prompt_len and built == model:
            return directory
    positions = max(CACHED_BASE_POSITIONS, 2 * settings.prompt_len)
    build_base(replace(settings, prompt_len=positions // 2), directory)
    record.write_text(json.dumps({**model, "positions": positions}))
    return directory


def prepare(settings: Settings, workdir: Path, base_cache: Path | None = None) -> dict[str, Any]:
    """Write the base (or link the one in ``base_cache``), the collated batch and TRL's texts under ``workdir``;
    return the prompt's token counts."""
    from src.models.processor import AVProcessor

    if base_cache is None:
        base = build_base(settings, workdir / "base")
    else:
        base = workdir / "base"
        base.symlink_to(base_dir(settings, base_cache).resolve(), target_is_directory=True)
    processor = AVProcessor.from_pretrained(base)
    batch, info = preference_batch(processor, settings)
    torch.save(batch, workdir / "batch.pt")
    (workdir / "trl_texts.json").write_text(json.dumps(trl_texts(processor.tokenizer, settings)))
    return info


# -- memory and load --------------------------------------------------------------------------------------------------
def proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of what runs between ``start`` and ``stop``, above what was held at ``start`` (MB).

    CPU: the kernel's resident high-water mark (VmHWM), reset at ``start`` by writing 5 to /proc/self/clear_refs,
    minus the resident set at ``start``. Where the reset is refused, ru_maxrss (whole-process peak) is used and
    ``reset`` is False. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. With ``cap`` (in the
    benchmark's child processes), ``start`` on CPU also caps the address space (``cap_address_space``) for what
    follows: the steps, not the imports and builds before them."""

    def __init__(self, device: str, cap: bool = False, limit_gb: float | None = None):
        self.cuda, self.cap, self.limit_gb = device == "cuda", cap, limit_gb

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        self.cap_gb = cap_address_space(self.limit_gb) if self.cap else None
        self.base = proc_status_mb("VmRSS") or 0.0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False

    def stop(self) -> dict[str, float | bool]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {"peak_mem_mb": round(peak - self.base, 1), "peak_allocated_mb": round(peak, 1),
                    "baseline_mb": round(self.base, 1)}
        hwm = proc_status_mb("VmHWM") if self.reset else None
        peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"peak_mem_mb": round(peak - self.base, 1), "peak_rss_mb": round(peak, 1),
                "baseline_rss_mb": round(self.base, 1), "peak_reset": hwm is not None, "mem_cap_gb": self.cap_gb}


def cap_address_space(limit_gb: float | None) -> float | None:
    """Cap this process's address space at what it maps now + ``limit_gb`` (default: available memory - 1 GiB), so
    that an oversized allocation raises instead of waking the OOM killer. Returns the cap's headroom in GB."""
    if limit_gb is None:
        available = None
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) / 2**20
        except OSError:
            return None
        if available is None:
            return None
        limit_gb = max(1.0, available - 1.0)
    mapped = proc_status_mb("VmSize")
    if mapped is None:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int((mapped / 1024 + limit_gb) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    return round(limit_gb, 1)


def is_oom(error: BaseException) -> bool:
    """An allocation failure: torch's CPU / CUDA allocators, Python's, or a library mapped in past the cap."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or (isinstance(error, (RuntimeError, OSError, ImportError)) and any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory",
                            "failed to map segment")))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_summary(times: list[float], settings: Settings) -> dict[str, Any]:
    timed = times[settings.warmup:]
    median = statistics.median(timed)
    return {"pairs_per_s": round(settings.pairs / median, 4), "step_s_median": round(median, 3),
            "step_s": [round(t, 3) for t in times], "warmup_steps": settings.warmup}


# -- our paths: DPOModule, plain or packed ---------------------------------------------------------------------------
def supports_packed() -> bool:
    from src.lit.dpo import DPOModule

    return "packed" in inspect.signature(DPOModule.__init__).parameters


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def frozen_media_parts(settings: Settings) -> dict[str, bool]:
    """DPOModule's media-cache settings for the parts whose encoders do not train under --trainable (with the merger
    trainable the video part keeps the frozen tower's output, src.models.media_cache.video_stage)."""
    parts = set(settings.parts)
    return {"cache_video_tokens": "vision" not in parts, "cache_audio_states": "whisper" not in parts}


def build_module(settings: Settings, workdir: Path, packed: bool, media_cache: bool = False):
    """DPOModule on the base, configured as Lightning would (configure_model), moved to the device; no Trainer:
    the benchmark calls preference_forward + loss_and_stats itself."""
    from src.lit.dpo import DPOModule
    from src.models.lora import LoraSettings
    from src.models.reference import ReferenceSnapshot

    options = {"packed": packed} if supports_packed() else {}
    if packed:
        options.update(prefix_sharing=settings.prefix_sharing, pack_tokens=settings.pack_tokens)
    if settings.llm_attention:
        options["llm_attention"] = settings.llm_attention
    if settings.compile_decoder:
        options["compile_decoder"] = True
    if media_cache:
        options.update(frozen_media_parts(settings))
    torch.manual_seed(settings.seed)
    module = DPOModule(str(workdir / "base"), beta=BETA, gt_weight=GT_WEIGHT, trainable=settings.parts,
                       lora=LoraSettings(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, targets=LORA_TARGETS), lr=LR,
                       activation_checkpointing=settings.checkpointing, **options)
    module.configure_model()
    if settings.device != "cpu":
        module.to(settings.device)
        # the round-start snapshot was taken on CPU; the reference must swap in tensors on the model's device
        module.reference_snapshot = ReferenceSnapshot.take(module.model)
    return module


def run_ours(path: str, settings: Settings, workdir: Path, cap_memory: bool = False) -> dict[str, Any]:
    from src.lit.sft import OptimSettings, adamw

    packed = path.startswith("fast")
    if packed and not supports_packed():
        return {"skipped": "DPOModule has no `packed` setting yet (the prefix-shared path is not in src/lit/dpo.py)"}
    module = build_module(settings, workdir, packed, media_cache=path == "fast_rollout_media")
    batch = to_device(torch.load(workdir / "batch.pt", weights_only=False), settings.device)
    if path == "fast_rollout_media":  # the rollout's media keys: its pass below stores the frozen encoders' outputs
        keys = [f"bench-clip-{i}" for i in range(settings.pairs)]
        batch["video_keys"], batch["audio_keys"] = keys, keys
    if path in ROLLOUT_PATHS:  # the rollout's values: the round-start model's log-probs, computed once here
        with torch.no_grad():
            out = module.preference_forward(batch)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = out["ref_chosen"].float(), out["ref_rejected"].float()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = adamw(params, LR, OptimSettings())
    info: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params)}
    if packed and getattr(module, "prefix_sharing", "mask") == "cache":
        from src.models.packing import prefix_batch

        prefix = prefix_batch(batch, module.response_blocks(batch), module.processor.pad_token_id)
        info["prefix_sharing"] = "cache"
        info["prompt_rows"], info["prompt_length"] = map(int, prefix.prompt_ids.shape)
        info["response_rows"], info["response_length"] = map(int, prefix.response_ids.shape)
    elif packed:
        rows = module.pack(batch, module.response_blocks(batch)).input_ids
        info["prefix_sharing"] = module.prefix_sharing
        info["packed_rows"], info["packed_length"] = int(rows.shape[0]), int(rows.shape[1])

    def step() -> float:  # the phases are labelled for --profile's tables
        optimizer.zero_grad(set_to_none=True)
        with record_function("step: forward + loss"):
            loss, _ = module.loss_and_stats(module.preference_forward(batch))
        with record_function("step: backward"):
            loss.backward()
        with record_function("step: clip + AdamW"):
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
        return float(loss.detach())

    memory = PeakMemory(settings.device, cap_memory, settings.mem_limit_gb)
    memory.start()
    times, losses = [], []
    total = settings.warmup + settings.steps
    for i in range(total):
        sync(settings.device)
        start = time.perf_counter()
        losses.append(step())
        sync(settings.device)
        times.append(time.perf_counter() - start)
        # progress on stderr: the parent reports it when the path runs past --timeout (a first step that compiles)
        print(f"{path}: step {i + 1}/{total} {times[-1]:.3f} s", file=sys.stderr, flush=True)
    if module.media_cache is not None:
        info["media_cache"] = module.media_cache.stats()
    result = {**timed_summary(times, settings), **memory.stop(), "loss_first_step": round(losses[0], 6), **info}
    if settings.profile:
        profile_step(step, path, settings)
    return result


def profile_step(step, path: str, settings: Settings) -> None:
    """One more (untimed) step under torch.profiler: its operators by total and by self device time (CPU time on
    CPU), written to <--profile>/<path>_<prompt_len>.txt, to see where a path's step goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if settings.device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(settings.device)
    averages = prof.key_averages()
    unit = "cuda" if settings.device == "cuda" else "cpu"
    tables = [f"== {path}, prompt {settings.prompt_len}, {settings.pairs} pair(s), sorted by {key}\n"
              + averages.table(sort_by=key, row_limit=rows, max_name_column_width=90)
              for key, rows in ((f"{unit}_time_total", 45), (f"self_{unit}_time_total", 30))]
    out = Path(settings.profile)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{path}_{settings.prompt_len}.txt").write_text("\n\n".join(tables))


# -- TRL ------------------------------------------------------------------------------------------------------------
def causal_lm_from(av_model, dtype: torch.dtype):
    """The AV model's LLM as a Qwen2ForCausalLM: same sizes, its weights copied in (decoder, final norm, LM head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = av_model.config.qwen_config.text_config
    tied = bool(av_model.config.qwen_config.tie_word_embeddings)
    config = Qwen2Config(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                         intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                         num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                         hidden_act=text.hidden_act, max_position_embeddings=text.max_position_embeddings,
                         rms_norm_eps=text.rms_norm_eps, attention_dropout=0.0, tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]},
                         bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    # Built on the meta device and given copies of the weights: a random init of a 7B on CPU takes minutes.
    with torch.device("meta"):
        model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    state = {"model." + k: v.detach().to(dtype, copy=True) for k, v in av_model.llm.state_dict().items()}
    state["lm_head.weight"] = av_model.lm_head.weight.detach().to(dtype, copy=True)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"LLM weights do not map onto Qwen2ForCausalLM: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its inv_freq buffer, off the meta device
    if tied:
        model.tie_weights()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"Qwen2ForCausalLM tensors left on the meta device: {left[:5]}")
    return model


def step_timer(device: str):
    """A TrainerCallback recording each optimizer step's wall time and the logged losses. Trainer fetches and
    collates the batch before on_step_begin and logs after on_step_end, so neither is timed."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.start = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def run_trl(settings: Settings, workdir: Path, cap_memory: bool = False, precompute_ref: bool = False
            ) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from src.models.build import load_base

    av_model, processor = load_base(workdir / "base")
    full = "llm" in settings.parts
    model = causal_lm_from(av_model, settings.dtype)
    ref_model = causal_lm_from(av_model, settings.dtype) if full else None
    del av_model
    texts = json.loads((workdir / "trl_texts.json").read_text())
    steps = settings.warmup + settings.steps
    dataset = Dataset.from_dict({k: [v] * (settings.pairs * steps) for k, v in texts.items()})
    args = DPOConfig(output_dir=str(workdir / "trl-out"), per_device_train_batch_size=settings.pairs,
                     gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                     optim="adamw_torch", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, beta=BETA,
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, GT_WEIGHT], max_length=None,
                     precompute_ref_log_probs=precompute_ref, gradient_checkpointing=settings.checkpointing,
                     bf16=settings.device == "cuda", use_cpu=settings.device == "cpu", report_to="none",
                     save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                     seed=settings.seed)
    peft_config = None if full else LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                               target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
    timer = step_timer(settings.device)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                         processing_class=processor.tokenizer, peft_config=peft_config, callbacks=[timer])
    first = trainer.train_dataset[0]
    lengths = {"prompt": len(first["prompt_ids"]), "chosen": len(first["chosen_ids"]),
               "rejected": len(first["rejected_ids"])}
    if lengths != {"prompt": settings.prompt_len, "chosen": settings.response_len,
                   "rejected": settings.response_len}:
        raise RuntimeError(f"TRL tokenised the texts to {lengths}, not the benchmark's lengths")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    memory = PeakMemory(settings.device, cap_memory, settings.mem_limit_gb)
    memory.start()
    trainer.train()
    result = {**timed_summary(timer.times, settings), **memory.stop(),
              "loss_first_step": round(timer.losses[0], 6) if timer.losses else None, "trainable_params": trainable,
              "trl_version": trl.__version__, "rows": 2 * settings.pairs,
              "length": settings.prompt_len + settings.response_len,
              "reference": ("precomputed before training (precompute_ref_log_probs)" if precompute_ref
                            else "separate reference model" if full else "LoRA adapter disabled")}
    return result


# -- one path in a child process --------------------------------------------------------------------------------------
def run_path(path: str, settings: Settings, workdir: Path, cap_memory: bool = False) -> dict[str, Any]:
    """One path's figures, in this process; an out-of-memory error becomes {"oom": true}. ``cap_memory``: cap
    this process's address space before the steps (PeakMemory), as the benchmark's child processes do."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        if path.startswith("trl"):
            result = run_trl(settings, workdir, cap_memory, precompute_ref=path == "trl_precomputed_ref")
        else:
            result = run_ours(path, settings, workdir, cap_memory)
    except Exception as error:  # noqa: BLE001 - any failure is reported, an OOM as such
        if not is_oom(error):
            raise
        return {"oom": True, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    return result if "skipped" in result else {"oom": False, **result}


def child_main(args: argparse.Namespace) -> None:
    """One path in this process. BENCH_TRACEBACK_AFTER=SECONDS (with BENCH_TRACEBACK_FILE=PATH, else stderr): every
    thread's stack is written that long after the child starts, to see where a path that runs past --timeout is."""
    if os.environ.get("BENCH_TRACEBACK_AFTER"):
        target = os.environ.get("BENCH_TRACEBACK_FILE")
        faulthandler.dump_traceback_later(float(os.environ["BENCH_TRACEBACK_AFTER"]),
                                          file=open(target, "a") if target else sys.stderr)
    settings = Settings(**json.loads(Path(args.child_settings).read_text()))
    result = run_path(args.child, settings, Path(args.workdir), cap_memory=True)
    Path(args.child_result).write_text(json.dumps(result))


def python_for(path: str) -> tuple[str | None, str | None]:
    """The interpreter that runs ``path`` (TRL: this one if it has trl, else .venv-bench's), or why none."""
    if not path.startswith("trl"):
        return sys.executable, None
    try:
        import trl  # noqa: F401

        return sys.executable, None
    except ImportError:
        if BENCH_VENV_PYTHON.exists():
            return str(BENCH_VENV_PYTHON), None
        return None, "trl is not installed here and .venv-bench is missing: run `make bench-venv`"


# glibc raises its mmap threshold to the size of each large block it frees (up to 32 MiB), after which tensors
# of that size come from the heap, whose freed blocks stay resident and fragment: at 4k the resident set then holds
# ~1 GB of freed memory and grows over the first steps (bench/RESULTS.md). A fixed threshold (glibc's default
# value, made static) keeps every tensor over 128 KiB in its own mapping, unmapped when freed, so the resident set
# follows the live tensors, as torch.cuda.max_memory_allocated does on CUDA. It also costs a page fault per fresh
# page (TRL's step is 30-40% slower with it), so it is used in an untimed run of its own, the same for every path.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def spawn(path: str, settings: Settings, workdir: Path, timeout: float | None) -> dict[str, Any]:
    """The timed run of ``path``; on CPU with ``memory="live"`` a second run (1 warm-up + 1 step, fixed mmap
    threshold) gives peak_mem_mb, and the timed run's resident-set peak is kept as peak_rss_glibc_mb."""
    result = run_child(path, settings, workdir, timeout, memory_run=False)
    if settings.device != "cpu" or settings.memory != "live" or "pairs_per_s" not in result:
        return result
    live = run_child(path, replace(settings, warmup=1, steps=1), workdir, timeout, memory_run=True)
    result["peak_rss_glibc_mb"] = result.pop("peak_mem_mb")
    result["peak_mem_mb"] = live.get("peak_mem_mb")
    result["memory_run"] = {k: live[k] for k in ("peak_mem_mb", "peak_rss_mb", "baseline_rss_mb", "oom", "error")
                            if k in live}
    return result


def run_child(path: str, settings: Settings, workdir: Path, timeout: float | None, memory_run: bool
              ) -> dict[str, Any]:
    python, why = python_for(path)
    if python is None:
        return {"skipped": why}
    settings_file, result_file = workdir / f"{path}.settings.json", workdir / f"{path}.result.json"
    settings_file.write_text(json.dumps(asdict(settings)))
    result_file.unlink(missing_ok=True)
    command = [python, str(Path(__file__).resolve()), "--child", path, "--workdir", str(workdir),
               "--child-settings", str(settings_file), "--child-result", str(result_file)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DISABLE_MLFLOW_INTEGRATION": "1",
           **(FIXED_MMAP_THRESHOLD if memory_run else {})}
    busy, own, wall = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:  # its stderr so far is bytes, whatever text= says
        progress = (stopped.stderr or b"").decode(errors="replace").strip().splitlines()[-5:]
        return {"timeout": True, "error": f"ran past --timeout {timeout} s", "last_stderr": progress}
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime - own.ru_utime) + (after.ru_stime - own.ru_stime)
    end_busy = busy_cpu_seconds()
    other = None if busy is None or end_busy is None else max(0.0, (end_busy - busy - child_cpu) / wall)
    if done.returncode != 0 or not result_file.exists():
        killed = done.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
        return {"oom": killed, "error": ("killed by SIGKILL (the kernel's OOM killer?)" if killed else
                                         f"exit {done.returncode}: " + done.stderr.strip()[-1500:])}
    result = json.loads(result_file.read_text())
    result["path_wall_s"] = round(wall, 1)
    result["other_load_cores"] = None if other is None else round(other, 2)
    return result


# -- report -----------------------------------------------------------------------------------------------------------
def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if not (a.get(key) and b.get(key)) or a.get("oom") or b.get("oom"):
        return None
    return round(a[key] / b[key], 3)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out = {}
    for fast in ("fast", *ROLLOUT_PATHS):
        for other in ("plain", "trl", "trl_precomputed_ref"):
            if fast in results and other in results:
                keys = ["pairs_per_s", "peak_mem_mb"] + [k for k in ("peak_rss_glibc_mb",) if k in results[fast]]
                out[f"{fast}/{other}"] = {key: ratio(results[fast], results[other], key) for key in keys}
    if set(ROLLOUT_PATHS) <= set(results):  # what the rollout's encoder outputs save the step
        out["fast_rollout_media/fast_rollout_ref"] = {key: ratio(results["fast_rollout_media"],
                                                                 results["fast_rollout_ref"], key)
                                                      for key in ("pairs_per_s", "peak_mem_mb")}
    return out


def machine(settings: Settings) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": settings.threads or torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["memory_gb"] = round(int(total.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"gDPO step: prompt {s['prompt_len']} tokens ({s['media_tokens']} media), responses {s['response_len']}"
             f" x 3 (TRL: x 2), {s['pairs']} pairs/step, model {s['model']}, trainable {s['trainable']}, "
             f"{s['device']} {s['dtype']}, {s['steps']} timed steps after {s['warmup']} warm-up",
             f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
             f"{report['machine']['torch']}", "",
             f"{'path':<18}{'pairs/s':>10}{'step s':>10}{'peak MB':>11}{'glibc MB':>10}{'loss@1':>10}"
             f"{'other load':>12}"]
    for path in PATHS:
        r = report.get(path)
        if r is None:
            continue
        if "skipped" in r or r.get("oom") or "error" in r:
            why = r.get("skipped") or ("out of memory" if r.get("oom") else "") or r.get("error", "")
            lines.append(f"{path:<18}{why}")
            continue
        glibc = r.get("peak_rss_glibc_mb")
        lines.append(f"{path:<18}{r['pairs_per_s']:>10.4g}{r['step_s_median']:>10.3f}"
                     f"{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else float('nan'):>11,.0f}"
                     f"{glibc if glibc is not None else float('nan'):>10,.0f}"
                     f"{r['loss_first_step'] if r['loss_first_step'] is not None else float('nan'):>10.4f}"
                     f"{r.get('other_load_cores') if r.get('other_load_cores') is not None else float('nan'):>12.2f}")
    lines.append("")
    for name, r in report["ratios"].items():
        speed = "n/a" if r["pairs_per_s"] is None else f"{r['pairs_per_s']:.2f}x"
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.2f}x"
        glibc = "" if r.get("peak_rss_glibc_mb") is None else f"   (glibc-tuned resident set {r['peak_rss_glibc_mb']:.2f}x)"
        lines.append(f"{name:<24} pairs/s {speed:>8}   peak memory {mem:>8}{glibc}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=4096, help="prompt tokens, e.g. 1024, 4096, 16384")
    parser.add_argument("--response-len", type=int, default=256, help="tokens of each response, end token included")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODELS), default="tiny-wide")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    parser.add_argument("--trainable", default="lora", help="DPOModule parts: lora | lora,aligner,merger | llm")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="activation checkpointing on every path (default: on for --model 7b, else off)")
    parser.add_argument("--frame-side", type=int, default=None, help="frame side in px (multiple of 28)")
    parser.add_argument("--vocab", type=int, default=None, help="LLM vocabulary rows (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per path (default: torch's own)")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="CPU: address-space headroom per path (default: available memory - 1 GiB)")
    parser.add_argument("--memory", choices=["live", "rss"], default="live",
                        help="CPU peak_mem_mb: live (a second, untimed run per path with a fixed mmap threshold, "
                             "so the resident set follows the live tensors) or rss (the timed run's resident set)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix-sharing", choices=["cache", "mask", "split"], default="split",
                        help="the fast paths' DPOModule prefix_sharing (split, the default: one packed row per pair, "
                             "SDPA with the shared prompt causal and a mask for the rest; cache: the prompt's KV "
                             "cache; mask: those rows under one prefix-sharing mask)")
    parser.add_argument("--llm-attention", choices=["sdpa", "eager", "flex_attention"], default=None,
                        help="our paths' DPOModule llm_attention (default: the base's, sdpa)")
    parser.add_argument("--pack-tokens", type=int, default=None,
                        help="with --prefix-sharing mask: DPOModule pack_tokens, the token budget of one packed row "
                             "(default: one row per pair)")
    parser.add_argument("--compile-decoder", action="store_true",
                        help="our paths' DPOModule compile_decoder (torch.compile of each decoder layer; the "
                             "compile falls in the warm-up steps); with --prefix-sharing split or mask")
    parser.add_argument("--profile", default=None,
                        help="folder: one more untimed step of each of our paths (not TRL) under torch.profiler, "
                             "its tables written there")
    parser.add_argument("--base-cache", type=Path, default=None,
                        help="directory holding (or to receive) the random base, kept for later runs (the 7B's "
                             "takes a minute to build and write); default: built afresh in a temporary directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--child-settings", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--paths takes names from {PATHS}, got {args.paths!r}")
    args.paths = paths
    if args.model == "7b" and args.device != "cuda":
        parser.error("--model 7b is for a GPU (--device cuda)")
    if args.device == "cuda" and not args.child and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.frame_side is not None and args.frame_side % 28:
        parser.error("--frame-side must be a multiple of 28 (patch 14 x merge 2)")
    if args.compile_decoder and args.prefix_sharing == "cache":
        parser.error("--compile-decoder needs --prefix-sharing split or mask (the cache form would compile a graph "
                     "per layer)")
    if min(args.prompt_len, args.response_len, args.pairs, args.steps) < 1 or args.warmup < 0:
        parser.error("--prompt-len, --response-len, --pairs and --steps must be >= 1, --warmup >= 0")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    values = {f.name: getattr(args, f.name) for f in fields(Settings)}
    if values["checkpointing"] is None:  # a 7B's activations at 4k+ tokens x 3 responses do not fit 80 GB without it
        values["checkpointing"] = args.model == "7b"
    return Settings(**values)


def benchmark(settings: Settings, paths: list[str], timeout: float | None = None,
              base_cache: Path | None = None) -> dict[str, Any]:
    """Prepare the shared inputs once, run each path in its own subprocess, assemble the report."""
    with tempfile.TemporaryDirectory(prefix="dpo-step-") as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        prompt = prepare(settings, workdir, base_cache)
        prepare_s = time.perf_counter() - start
        results = {path: spawn(path, settings, workdir, timeout) for path in paths}
    sizes = MODELS[settings.model]
    report: dict[str, Any] = dict(results)
    report["ratios"] = ratios(results)
    report["machine"] = machine(settings)
    report["settings"] = {**asdict(settings), **prompt, "dtype": str(settings.dtype).removeprefix("torch."),
                          "model_sizes": sizes or "src.models.build.TINY", "beta": BETA, "gt_weight": GT_WEIGHT,
                          "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS), "dropout": 0.0},
                          "max_grad_norm": MAX_GRAD_NORM, "lr": LR, "paths": paths,
                          "packed_available": supports_packed(), "prepare_s": round(prepare_s, 1)}
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    report = benchmark(settings_from(args), args.paths, args.timeout, args.base_cache)
    print(json.dumps(report) if args.json else table(report))


if __name__ == "__main__":
    main()

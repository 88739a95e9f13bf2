"""AVProcessor: (clip or row, prompt, optional target) -> model inputs, and samples -> a padded batch.

It owns everything between the media file and the model: frame sampling (interval, min/max frames, pixel
budget), Qwen2.5-VL's patch layout and normalisation, Whisper log-mel chunks and the count of real 0.5 s audio
windows, the chat template, the token layout of the media span and its 3-D positions, and the label mask (only the
response is learned). Its settings are saved next to the model (av_processor.json) and restored with it, so a
checkpoint always decodes its inputs the way it was trained.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from src.data.manifest import PreferenceRow
from src.data.clip_cache import ClipCache, load_clip_cached, media_file_key
from src.data.media import AVClip, FrameSampling
from src.losses.logprobs import IGNORE_INDEX
from src.models.audio import AudioSettings, log_mel_chunks, num_windows
from src.models.media_cache import FrozenMediaCache
from src.models.layout import AVLayout, VideoGrid, sequence_positions, span_token_types
from src.models.tokenizer import DEFAULT_SYSTEM, chat_ids, chat_response_ids, special_ids

PROCESSOR_FILE = "av_processor.json"
RESPONSES = ("chosen", "rejected", "gt")  # the sequences of a preference sample, in batch block order
DEFAULT_PROMPT = "Describe this video in detail: what is seen and what is heard, in the order it happens."
# OpenAI CLIP statistics, as Qwen2.5-VL's image processor uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSettings:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class ProcessorSettings:
    sampling: FrameSampling = field(default_factory=FrameSampling)
    audio: AudioSettings = field(default_factory=AudioSettings)
    vision: VisionSettings = field(default_factory=VisionSettings)
    prompt: str = DEFAULT_PROMPT
    system: str | None = DEFAULT_SYSTEM

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessorSettings:
        vision = dict(data.get("vision", {}))
        for key in ("image_mean", "image_std"):
            if key in vision:
                vision[key] = tuple(vision[key])
        return cls(sampling=FrameSampling(**data.get("sampling", {})), audio=AudioSettings(**data.get("audio", {})),
                   vision=VisionSettings(**vision), prompt=data.get("prompt", DEFAULT_PROMPT),
                   system=data.get("system", DEFAULT_SYSTEM))


def patchify(frames: torch.Tensor, vision: VisionSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(t, 3, h, w) uint8 -> ((grid_t*grid_h*grid_w, 3*tp*p*p) float32 patches, (grid_t, grid_h, grid_w)).

    Qwen2.5-VL's layout: normalised with CLIP statistics, an odd frame count padded by repeating the last frame,
    patches ordered so that each 2x2 merge group is contiguous.
    """
    p, tp, m = vision.patch_size, vision.temporal_patch_size, vision.merge_size
    t, c, h, w = frames.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of {p * m}: decode with FrameSampling(multiple=28)")
    mean = torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.image_std).view(1, 3, 1, 1)
    x = (frames.float() / 255.0 - mean) / std
    if t % tp:
        x = torch.cat([x, x[-1:].expand(tp - t % tp, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


SEQUENCE_MEMO = 100_000  # token sequences an AVProcessor keeps (~5 KB each at the tiny default's lengths)


class AVProcessor:
    """Callable on a manifest row (for the streaming DataModule) or on a decoded clip (``encode``)."""

    def __init__(self, tokenizer, settings: ProcessorSettings | None = None):
        self.tokenizer = tokenizer
        self.settings = settings or ProcessorSettings()
        self.clip_cache: ClipCache | None = None
        # token sequences already built, by (layout, prompt, response): a clip's sequence is the same every epoch,
        # and building it (tokenizing, M-RoPE positions) was a third of a tiny SFT sample's processing time
        self._sequences: dict[tuple, dict[str, Any]] = {}
        # and their prompt sides, by (layout, prompt): one for all clips of one shape (``_build_sequence``)
        self._prompt_sides: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
        # a model's FrozenMediaCache (use_media_cache): rows get media keys, and a clip whose every part is stored
        # there is neither decoded nor featurised again; _layouts keeps what its sample needs besides the features
        self.media_cache: FrozenMediaCache | None = None
        self.media_keys = False
        self._layouts: dict[str, dict[str, Any]] = {}
        ids = special_ids(tokenizer)
        self.video_token_id, self.audio_token_id = ids["<|video_pad|>"], ids["<|audio_pad|>"]
        self.eos_token_id, self.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
        merge = self.settings.vision.patch_size * self.settings.vision.merge_size
        if self.settings.sampling.multiple % merge:
            raise ValueError(f"frame sides must be multiples of {merge} (patch x merge), "
                             f"sampling.multiple is {self.settings.sampling.multiple}")

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers build their own memos, not copies of ours, and get no media cache: a copy would never
        # see what the model stores later (they still key their rows, so the model's side of the cache works)
        return {**self.__dict__, "_sequences": {}, "_prompt_sides": {}, "_layouts": {}, "media_cache": None}

    def use_media_cache(self, cache: FrozenMediaCache | None) -> None:
        """Key every row's media and serve stored encoder outputs from ``cache`` (the model's; None: stop)."""
        self.media_cache, self.media_keys = cache, cache is not None
        self._layouts.clear()

    # -- media -------------------------------------------------------------------------------------------
    def video_inputs(self, frames: torch.Tensor, frame_times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       VideoGrid]:
        """Patches (n, d), grid_thw (3,) and the layout's VideoGrid (start time of each temporal grid)."""
        pixels, (gt, gh, gw) = patchify(frames, self.settings.vision)
        tp, m = self.settings.vision.temporal_patch_size, self.settings.vision.merge_size
        times = tuple(float(frame_times[min(g * tp, len(frame_times) - 1)]) for g in range(gt))
        return pixels, torch.tensor([gt, gh, gw]), VideoGrid(t=gt, h=gh // m, w=gw // m, times=times)

    def audio_inputs(self, audio: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(n,) 16 kHz mono -> Whisper log-mel chunks (c, n_mels, frames) and the number of real 0.5 s windows."""
        if audio.numel() == 0:
            raise ValueError("empty audio: pass None for a clip without audio")
        return log_mel_chunks(audio, self.settings.audio), num_windows(audio.numel(), self.settings.audio)

    # -- one sample --------------------------------------------------------------------------------------
    def encode(self, clip: AVClip | None, prompt: str | None = None, response: str | None = None) -> dict[str, Any]:
        """Model inputs of one sample. labels are -100 except the response and its end token."""
        sample, spans, span_ids = self._media(clip)
        sample.update(self._sequence(spans, span_ids, prompt, response))
        return sample

    def encode_preference(self, clip: AVClip | None, prompt: str | None,
                          responses: dict[str, str | None]) -> dict[str, Any]:
        """The media inputs once, and one sequence per named response (e.g. chosen, rejected, gt): under each name
        a dict of input_ids, labels, position_ids, rope_delta, response_start (None for a response that is None).
        Every sequence holds the same media span at the same place, so the encoders' features fit each of them."""
        return self._responses(*self._media(clip), prompt, responses)

    def _responses(self, sample: dict[str, Any], spans: list[AVLayout], span_ids: list[int], prompt: str | None,
                   responses: dict[str, str | None]) -> dict[str, Any]:
        for name, text in responses.items():
            sample[name] = None if text is None else self._sequence(spans, span_ids, prompt, text)
        return sample

    def _media(self, clip: AVClip | None) -> tuple[dict[str, Any], list[AVLayout], list[int]]:
        """Media inputs of one sample, its layout spans and the span's placeholder ids."""
        sample: dict[str, Any] = {"pixel_values_videos": None, "video_grid_thw": None, "input_features": None,
                                  "audio_windows": 0, "audio_chunks": 0}
        grid = None
        if clip is not None and clip.frames is not None:
            sample["pixel_values_videos"], sample["video_grid_thw"], grid = self.video_inputs(clip.frames,
                                                                                              clip.frame_times)
        if clip is not None and clip.audio is not None and clip.audio.numel():
            sample["input_features"], sample["audio_windows"] = self.audio_inputs(clip.audio)
            sample["audio_chunks"] = sample["input_features"].shape[0]
        spans = []
        span_ids: list[int] = []
        if grid is not None or sample["audio_windows"]:
            layout = AVLayout(video=grid, audio_windows=sample["audio_windows"],
                              audio_start=clip.audio_start if sample["audio_windows"] else 0.0)
            types = span_token_types(layout)
            span_ids = torch.where(types == 1, self.video_token_id, self.audio_token_id).tolist()
            spans.append(layout)
        return sample, spans, span_ids

    def _sequence(self, spans: list[AVLayout], span_ids: list[int], prompt: str | None,
                  response: str | None) -> dict[str, Any]:
        """The sequence's input_ids, labels, position_ids, rope_delta and response_start, built once per (layout,
        prompt, response) and copied out of the memo (at most SEQUENCE_MEMO of them are kept)."""
        key = (tuple(spans), prompt or self.settings.prompt, response)
        built = self._sequences.get(key)
        if built is None:
            built = self._build_sequence(spans, span_ids, prompt, response)
            if len(self._sequences) < SEQUENCE_MEMO:
                self._sequences[key] = built
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in built.items()}

    def _build_sequence(self, spans: list[AVLayout], span_ids: list[int], prompt: str | None,
                        response: str | None) -> dict[str, Any]:
        """The prompt side (``_prompt_side``) and the response after it: the response is tokenised on its own
        (``chat_response_ids``, as ``chat_ids`` does) and its positions continue the prompt's last text position on
        all three axes (text after the media counts up by one per token, ``sequence_positions``), so this equals
        building the whole sequence."""
        prompt_ids, prompt_positions, rope_delta = self._prompt_side(spans, span_ids, prompt or self.settings.prompt)
        response_start = len(prompt_ids)
        input_ids, positions = prompt_ids, prompt_positions
        if response is not None:
            tail = torch.tensor(chat_response_ids(self.tokenizer, response), dtype=torch.long)
            after = int(prompt_positions[0, -1]) + 1 + torch.arange(len(tail))
            input_ids = torch.cat([prompt_ids, tail])
            positions = torch.cat([prompt_positions, after.expand(3, -1)], dim=1)
        labels = input_ids.clone()
        labels[:response_start] = IGNORE_INDEX
        if response is None:
            labels[:] = IGNORE_INDEX
        return dict(input_ids=input_ids, labels=labels, position_ids=positions, rope_delta=rope_delta,
                    response_start=response_start)

    def _prompt_side(self, spans: list[AVLayout], span_ids: list[int], prompt: str) -> tuple[torch.Tensor,
                                                                                             torch.Tensor, int]:
        """input_ids, position_ids and rope delta of everything before the response (system turn, media span,
        prompt, assistant header): one per (layout, prompt), the same for every clip of a data set's shape."""
        key = (tuple(spans), prompt)
        side = self._prompt_sides.get(key)
        if side is None:
            ids, _, _ = chat_ids(self.tokenizer, prompt, system=self.settings.system, span=span_ids)
            input_ids = torch.tensor(ids, dtype=torch.long)
            positions, rope_delta = sequence_positions(input_ids, spans, video_token_id=self.video_token_id,
                                                       audio_token_id=self.audio_token_id)
            side = input_ids, positions, rope_delta
            if len(self._prompt_sides) < SEQUENCE_MEMO:
                self._prompt_sides[key] = side
        return side

    def load_clip(self, video: str | None, audio: str | None = None, *, use_audio: bool = True) -> AVClip:
        """Decode a clip with this processor's frame sampling and audio rate (BadSampleError on failure), through
        ``clip_cache`` when the DataModule set one."""
        return load_clip_cached(self.clip_cache, video, audio, sampling=self.settings.sampling, use_audio=use_audio,
                                sample_rate=self.settings.audio.sample_rate)

    def __call__(self, row) -> dict[str, Any]:
        """A manifest row -> decoded, encoded sample (runs in DataLoader workers; media errors propagate as
        BadSampleError for the stream to quarantine)."""
        if isinstance(row, PreferenceRow):
            responses = {name: getattr(row, name) for name in RESPONSES}
            sample = self._responses(*self._row_media(row), row.prompt, responses)
            sample["ref_chosen_logp"], sample["ref_rejected_logp"] = row.ref_chosen_logp, row.ref_rejected_logp
        else:
            sample, spans, span_ids = self._row_media(row)
            sample.update(self._sequence(spans, span_ids, row.prompt, getattr(row, "caption", None)))
        sample["id"] = row.id
        return sample

    def media_key(self, row) -> str | None:
        """The row's media key: its id and what a decode of its files with these settings returns
        (``clip_cache.media_file_key``); a rewritten file gets a new key. None when a file is missing (load_clip
        raises its well-described error)."""
        try:
            return f"{row.id}:" + media_file_key(row.video, row.audio, self.settings.sampling, row.use_audio,
                                                 self.settings.audio.sample_rate)
        except OSError:
            return None

    def _row_media(self, row) -> tuple[dict[str, Any], list[AVLayout], list[int]]:
        """``_media`` of the row's clip. With media keys, the sample names its key ("media_key"); when the media
        cache holds every part of the clip under it, the clip is not loaded: the sample brings the stored outputs
        ("video_tokens", "audio_states") and the layout kept the first time, with no pixels or log-mel."""
        key = self.media_key(row) if self.media_keys else None
        kept = self._layouts.get(key) if key is not None else None
        if kept is not None and self.media_cache is not None and self.media_cache.holds(key, kept["parts"]):
            cache = self.media_cache
            sample = {"pixel_values_videos": None, "video_grid_thw": kept["video_grid_thw"], "input_features": None,
                      "audio_windows": kept["audio_windows"], "audio_chunks": kept["audio_chunks"],
                      "video_tokens": cache.get("video", key), "audio_states": cache.get("audio", key),
                      "media_key": key}
            return sample, kept["spans"], kept["span_ids"]
        sample, spans, span_ids = self._media(self.load_clip(row.video, row.audio, use_audio=row.use_audio))
        if key is not None:
            sample["media_key"] = key
            if self.media_cache is not None and len(self._layouts) < SEQUENCE_MEMO:
                parts = [part for part, present in (("video", sample["video_grid_thw"] is not None),
                                                    ("audio", sample["audio_windows"] > 0)) if present]
                self._layouts[key] = {"parts": parts, "video_grid_thw": sample["video_grid_thw"],
                                      "audio_windows": sample["audio_windows"], "audio_chunks": sample["audio_chunks"],
                                      "spans": spans, "span_ids": span_ids}
        return sample, spans, span_ids

    # -- batches -----------------------------------------------------------------------------------------
    def collate(self, samples: list[dict[str, Any]], padding_side: str = "right") -> dict[str, Any]:
        """Pad to the longest sample. Padding: pad id, label -100, attention 0, position 1 (never attended).
        Media tensors are concatenated in sample order, which is the order of their placeholders. Preference
        samples (from encode_preference) go to collate_preference."""
        if "chosen" in samples[0]:
            return self.collate_preference(samples, padding_side)
        batch = self._pad(samples, padding_side) | self._media_batch(samples)
        if "id" in samples[0]:
            batch["id"] = [s["id"] for s in samples]
        return batch

    def collate_preference(self, samples: list[dict[str, Any]], padding_side: str = "right") -> dict[str, Any]:
        """b preference samples -> one batch whose sequences are stacked in blocks of b, media once per sample.

        input_ids / labels / attention_mask (k*b, s), position_ids (3, k*b, s), rope_deltas (k*b,): block j holds
        response ``responses[j]`` of samples 0..b-1, in the order chosen, rejected, then gt when any sample has
        one (a sample without gt gets its prompt alone there, labels all -100, and has_gt False). The media
        tensors are those of the b samples once: AVLLM(..., media_repeats=k) reuses their features for every
        block. ref_chosen_logps / ref_rejected_logps (b,) float32: the rows' summed reference log-probs, NaN
        where a row has none."""
        names = [n for n in RESPONSES if n != "gt" or any(s.get("gt") is not None for s in samples)]
        sequences = [s[name] if s.get(name) is not None else self._prompt_only(s["chosen"])
                     for name in names for s in samples]
        batch = self._pad(sequences, padding_side) | self._media_batch(samples)
        batch["responses"] = names
        batch["has_gt"] = torch.tensor([s.get("gt") is not None for s in samples])
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            batch[key + "s"] = torch.tensor([math.nan if s.get(key) is None else s[key] for s in samples],
                                            dtype=torch.float32)
        if "id" in samples[0]:
            batch["id"] = [s["id"] for s in samples]
        return batch

    @staticmethod
    def _prompt_only(sequence: dict[str, Any]) -> dict[str, Any]:
        n = sequence["response_start"]
        return dict(input_ids=sequence["input_ids"][:n], labels=torch.full((n,), IGNORE_INDEX, dtype=torch.long),
                    position_ids=sequence["position_ids"][:, :n], rope_delta=sequence["rope_delta"],
                    response_start=n)

    def _pad(self, sequences: list[dict[str, Any]], padding_side: str) -> dict[str, Any]:
        length = max(s["input_ids"].numel() for s in sequences)
        b = len(sequences)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        position_ids = torch.ones((3, b, length), dtype=torch.long)
        for i, s in enumerate(sequences):
            n = s["input_ids"].numel()
            cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[i, cols], labels[i, cols], attention_mask[i, cols] = s["input_ids"], s["labels"], 1
            position_ids[:, i, cols] = s["position_ids"]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "position_ids": position_ids, "rope_deltas": torch.tensor([s["rope_delta"] for s in sequences])}

    @staticmethod
    def _media_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Each part's inputs concatenated over the samples that have it. Samples that bring stored encoder outputs
        instead (``_row_media``): "video_tokens" / "audio_states" list every video's / audio's output, None where
        its pixels / log-mel are in the concatenated inputs; "video_keys" / "audio_keys" list the media keys."""
        batch: dict[str, Any] = {}
        videos = [s for s in samples if s["video_grid_thw"] is not None]
        if videos:
            batch["video_grid_thw"] = torch.stack([s["video_grid_thw"] for s in videos])
            batch.update(_part_batch(videos, "video", "pixel_values_videos", "video_tokens"))
        audios = [s for s in samples if s["audio_windows"]]
        if audios:
            batch["audio_chunks"] = [s["audio_chunks"] for s in audios]
            batch["audio_windows"] = [s["audio_windows"] for s in audios]
            batch.update(_part_batch(audios, "audio", "input_features", "audio_states"))
        return batch

    # -- persistence -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / PROCESSOR_FILE).write_text(json.dumps(self.settings.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AVProcessor:
        directory = Path(directory)
        path = directory / PROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no processor settings (is {directory} a directory written by "
                                    "src.models.build?)")
        return cls(load_tokenizer(directory), ProcessorSettings.from_dict(json.loads(path.read_text())))


def _part_batch(samples: list[dict[str, Any]], part: str, inputs: str, outputs: str) -> dict[str, Any]:
    """One media part of a batch, over the samples that have it: their ``inputs`` concatenated; ``outputs`` (each
    sample's stored encoder output, None where its inputs are in the concatenation) when any sample brings one;
    ``<part>_keys`` when any sample has a media key."""
    batch: dict[str, Any] = {}
    given = [s[inputs] for s in samples if s[inputs] is not None]
    if given:
        batch[inputs] = torch.cat(given)
    if len(given) < len(samples):
        batch[outputs] = [s.get(outputs) for s in samples]
    keys = [s.get("media_key") for s in samples]
    if any(k is not None for k in keys):
        batch[f"{part}_keys"] = keys
    return batch


def load_tokenizer(directory: Path):
    """The tokenizer class named in tokenizer_config.json (a transformers class, never remote code). Not
    AutoTokenizer: it would read config.json first, whose model_type (av_llm) it does not know."""
    name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    tokenizer_class = getattr(transformers, name or "", None)
    if tokenizer_class is None:
        return transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    return tokenizer_class.from_pretrained(directory)

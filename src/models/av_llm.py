"""AVLLM: Qwen2.5-VL (vision tower + merger + LLM) and a Whisper encoder joined by the window Q-Former.

One class for every scale: a tiny base and a converted 7B base differ only in their configs and weights, and both
load from one HF-format directory with ``AVLLM.from_pretrained(dir)`` (no network, no remote code).

Forward: embed the text; put the merged visual features at the ``<|video_pad|>`` positions and the aligner's
window embeddings at the ``<|audio_pad|>`` positions (both in sequence order); run the LLM on ``inputs_embeds``
with the 3-D position ids the processor computed (src.models.layout). Transformers would silently fall back to
1-D positions if we passed embeddings without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, Qwen2_5_VLConfig, WhisperConfig
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from src.models.aligner import AlignerConfig, WindowQFormer, encoder_windows
from src.losses.logprobs import (head_token_logps, mean_response_ce, mean_response_ce_from_logps, response_positions,
                                 scatter_response_logps)
from src.models.audio import AudioSettings
from src.models.media_cache import gather_media
from src.models.patch_embed import use_linear_patch_embed
from src.models.vision_attention import use_grouped_window_attention
import src.models.eager_lowp  # noqa: F401  (registers the "eager_lowp" attention implementation)


@strict
class AVLLMConfig(PreTrainedConfig):
    """Every setting of the model: the Qwen2.5-VL and Whisper configs as they are, the aligner's, the audio
    front end's (it must match the Whisper encoder's fixed input length) and the audio placeholder id."""

    model_type = "av_llm"
    sub_configs_defaults = {"qwen_config": Qwen2_5_VLConfig, "whisper_config": WhisperConfig}

    qwen_config: dict | PreTrainedConfig | None = None
    whisper_config: dict | PreTrainedConfig | None = None
    aligner: dict | None = None
    audio: dict | None = None
    audio_token_id: int = -1
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # the Qwen sub-model owns tying (3B ties, 7B does not); the wrapper must not add its own
        self.tie_word_embeddings = False
        self.aligner = AlignerConfig.from_dict(self.aligner or {}).to_dict()
        self.audio = dict(vars(AudioSettings(**(self.audio or {}))))

    def validate_settings(self) -> None:
        audio = AudioSettings(**self.audio)
        expected = 2 * self.whisper_config.max_source_positions
        if audio.chunk_frames != expected:
            raise ValueError(f"audio chunk of {audio.chunk_seconds} s gives {audio.chunk_frames} mel frames, but the "
                             f"Whisper encoder takes exactly {expected} (max_source_positions x 2)")
        if audio.n_mels != self.whisper_config.num_mel_bins:
            raise ValueError(f"audio n_mels {audio.n_mels} != Whisper num_mel_bins {self.whisper_config.num_mel_bins}")
        if AlignerConfig.from_dict(self.aligner).frames_per_window != audio.frames_per_window:
            raise ValueError("aligner frames_per_window must equal the audio settings' frames_per_window")
        if self.audio_token_id < 0:
            raise ValueError("audio_token_id is not set: the tokenizer needs an <|audio_pad|> token")


@dataclass
class AVOutput:
    """loss: the SFT loss, mean over examples of each one's mean response-token CE (None without labels);
    logits (b, s, v) (None unless return_logits); hidden_states (b, s, d); cache for generation;
    token_logps (N,) float32: log-probs of ``logp_targets`` at ``logp_index`` (or, given labels and no index, of
    the labelled tokens at ``response_positions(labels)``), from the response-only head."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    cache: DynamicCache | None = None
    inputs_embeds: torch.Tensor | None = None  # (b, s, d) what the LLM read, media features scattered in
    token_logps: torch.Tensor | None = None


class AVLLM(PreTrainedModel):
    config: AVLLMConfig  # transformers 5 reads the config class from this annotation
    config_class = AVLLMConfig
    base_model_prefix = "av"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "WhisperEncoderLayer"]

    def __init__(self, config: AVLLMConfig):
        super().__init__(config)
        config.validate_settings()
        self.qwen = Qwen2_5_VLForConditionalGeneration._from_config(config.qwen_config)
        self.whisper = WhisperEncoder._from_config(config.whisper_config)
        self.aligner = WindowQFormer(AlignerConfig.from_dict(config.aligner), encoder_dim=config.whisper_config.d_model,
                                     llm_dim=config.qwen_config.text_config.hidden_size)
        self.audio_settings = AudioSettings(**config.audio)
        # src.models.media_cache.FrozenMediaCache when the trainer sets one: embed() stores and reads the frozen
        # encoders' outputs through it for media with keys (inside forward, so FSDP2 has gathered the root's
        # parameters)
        self.media_cache = None
        self.post_init()
        use_grouped_window_attention(self.visual.config)  # one SDPA call per window length, not per window
        use_linear_patch_embed(self.visual.patch_embed)  # the Conv3d as the matmul it is (14-56x faster on CPU)

    # -- parts -------------------------------------------------------------------------------------------
    @property
    def llm(self):
        """The decoder stack (Qwen2_5_VLTextModel): embeddings, layers, final norm."""
        return self.qwen.model.language_model

    @property
    def visual(self):
        return self.qwen.model.visual

    @property
    def lm_head(self) -> nn.Linear:
        return self.qwen.lm_head

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llm.embed_tokens

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, WindowQFormer):
            module.reset_parameters()
        elif not any(module is m for m in self.aligner.modules()):
            super()._init_weights(module)

    # -- encoders ----------------------------------------------------------------------------------------
    def video_embeddings(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> torch.Tensor:
        """(patches, c*tp*p*p) -> (tokens, d): merged visual tokens of every video, in order."""
        out = self.visual(pixel_values_videos.to(self.visual.dtype), grid_thw=video_grid_thw)
        return out.pooler_output

    def tower_states(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> torch.Tensor:
        """(patches, c*tp*p*p) -> (tokens, merge^2 * width): the vision tower's output before the merger, each
        visual token's group of patch states side by side, in token order: ``merge_tower_states`` of it is
        ``video_embeddings``. The tower runs through its own forward with the merger swapped for ``MergeGroups``
        (which only groups), so the window ordering the tower uses internally is undone as it undoes it."""
        merger = self.visual.merger
        self.visual.merger = MergeGroups(self.visual.config.spatial_merge_size ** 2)
        try:
            return self.visual(pixel_values_videos.to(self.visual.dtype), grid_thw=video_grid_thw).pooler_output
        finally:
            self.visual.merger = merger

    def merge_tower_states(self, states: torch.Tensor) -> torch.Tensor:
        """(tokens, merge^2 * width) tower states -> (tokens, d) merged visual tokens."""
        width = self.visual.config.hidden_size
        param = next(self.visual.merger.parameters())
        return self.visual.merger(states.to(param.device, param.dtype).reshape(-1, width))

    def audio_embeddings(self, input_features: torch.Tensor | None, audio_chunks: list[int],
                         audio_windows: list[int], audio_states: list[torch.Tensor | None] | None = None,
                         audio_keys: list[str | None] | None = None) -> torch.Tensor:
        """(chunks, n_mels, frames) -> (windows, d): one token per real 0.5 s window of every audio, in order.

        ``audio_chunks[i]`` Whisper chunks belong to audio i, of which the first ``audio_windows[i]`` windows are
        real; windows over the zero padding of the last chunk are dropped here. ``audio_states`` / ``audio_keys``:
        see ``encoder_states``.
        """
        states = self.encoder_states(input_features, audio_chunks, audio_states, audio_keys)
        fpw = self.audio_settings.frames_per_window
        param = next(self.aligner.parameters())
        windows = torch.cat([encoder_windows(f.to(param.device), n, fpw) for f, n in zip(states, audio_windows)])
        return self.aligner(windows.to(param.dtype))

    def encoder_states(self, input_features: torch.Tensor | None, audio_chunks: list[int],
                       audio_states: list[torch.Tensor | None] | None = None,
                       audio_keys: list[str | None] | None = None) -> list[torch.Tensor]:
        """Whisper's last hidden states (chunks, frames, d) of each audio. ``audio_states[i]``: audio i's states,
        given by the batch (``input_features`` then holds the chunks of the other audios only); ``audio_keys``:
        media keys under which ``media_cache`` stores and finds them."""
        n = len(audio_chunks)
        missing = [i for i in range(n) if audio_states is None or audio_states[i] is None]
        features = dict(zip(missing, torch.split(input_features, [audio_chunks[i] for i in missing]))) if missing \
            else {}

        def encode(todo: list[int]) -> list[torch.Tensor]:
            chunks = torch.cat([features[i] for i in todo]).to(self.whisper.dtype)
            return list(torch.split(self.whisper(chunks).last_hidden_state, [audio_chunks[i] for i in todo]))

        return self._gather("audio", audio_keys, audio_states, n, encode)

    def vision_tokens(self, pixel_values_videos: torch.Tensor | None, video_grid_thw: torch.Tensor,
                     video_tokens: list[torch.Tensor | None] | None = None,
                     video_keys: list[str | None] | None = None) -> list[torch.Tensor]:
        """The merged visual tokens (tokens, d) of each video. ``video_tokens[i]``: video i's tokens, given by the
        batch (``pixel_values_videos`` then holds the patches of the other videos only); ``video_keys``: media
        keys under which ``media_cache`` stores and finds them."""
        grids = video_grid_thw.view(-1, 3)
        sizes = [int(g.prod()) for g in grids]
        missing = [i for i in range(len(sizes)) if video_tokens is None or video_tokens[i] is None]
        pixels = dict(zip(missing, torch.split(pixel_values_videos, [sizes[i] for i in missing]))) if missing else {}
        merge = self.visual.config.spatial_merge_size
        cache = self.media_cache
        tower = cache is not None and cache.caches("video") and cache.video_stage(self) == "tower"

        def encode(todo: list[int]) -> list[torch.Tensor]:
            inputs = torch.cat([pixels[i] for i in todo]), grids[todo]
            if tower:  # the frozen tower's part only (no gradient to keep); the merger runs below
                with torch.no_grad():
                    out = self.tower_states(*inputs)
            else:
                out = self.video_embeddings(*inputs)
            return list(torch.split(out, [sizes[i] // merge ** 2 for i in todo]))

        features = self._gather("video", video_keys, video_tokens, len(sizes), encode)
        if not tower:
            return features
        device = next(self.visual.merger.parameters()).device
        merged = self.merge_tower_states(torch.cat([f.to(device) for f in features]))
        return list(torch.split(merged, [f.shape[0] for f in features]))

    def _gather(self, part: str, keys, given, count: int, encode) -> list[torch.Tensor]:
        if self.media_cache is None:
            return gather_media(None, keys, given, count, encode)[0]
        if self.media_cache.caches(part):
            self.media_cache.check_frozen(self)
        return self.media_cache.gather(part, keys, given, count, encode)

    def embed(self, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor | None = None,
              video_grid_thw: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
              audio_chunks: list[int] | None = None, audio_windows: list[int] | None = None,
              media_repeats: int = 1, video_keys: list[str | None] | None = None,
              video_tokens: list[torch.Tensor | None] | None = None, audio_keys: list[str | None] | None = None,
              audio_states: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """(b, s) ids -> (b, s, d) embeddings with the media features scattered in.

        ``media_repeats`` k: the rows are k blocks of b / k sequences, block j row i using sample i's media (e.g.
        the chosen, rejected and ground-truth responses of a preference batch). The encoders run once on the
        samples' media and their features fill every block. ``video_keys`` / ``audio_keys`` (one media key per
        video / audio): store and read the encoders' outputs through ``self.media_cache``
        (``media_cache.FrozenMediaCache``) when one is set; ``video_tokens`` / ``audio_states``: outputs the batch
        brings (from the processor's side of that cache), None for media it brings as pixels / log-mel."""
        embeds = self.get_input_embeddings()(input_ids)
        if video_grid_thw is not None and (pixel_values_videos is not None or video_tokens is not None):
            features = torch.cat([t.to(embeds.device) for t in self.vision_tokens(
                pixel_values_videos, video_grid_thw, video_tokens, video_keys)])
            embeds = self._scatter(embeds, input_ids, self.config.qwen_config.video_token_id,
                                   features.repeat(media_repeats, 1), "video")
        if audio_windows and sum(audio_windows) and (input_features is not None or audio_states is not None):
            features = self.audio_embeddings(input_features, audio_chunks, audio_windows, audio_states, audio_keys)
            embeds = self._scatter(embeds, input_ids, self.config.audio_token_id,
                                   features.repeat(media_repeats, 1), "audio")
        return embeds

    @staticmethod
    def _scatter(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor,
                 what: str) -> torch.Tensor:
        mask = input_ids == token_id
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(mask.sum())} {what} placeholder tokens but {features.shape[0]} {what} features: "
                             "the processor's layout and the model's encoders disagree")
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
                audio_chunks: list[int] | None = None, audio_windows: list[int] | None = None,
                inputs_embeds: torch.Tensor | None = None, cache: DynamicCache | None = None,
                use_cache: bool = False, return_logits: bool = True, media_repeats: int = 1,
                logp_index: torch.Tensor | None = None, logp_targets: torch.Tensor | None = None,
                logp_chunk_size: int | None = None, video_keys: list[str | None] | None = None,
                video_tokens: list[torch.Tensor | None] | None = None, audio_keys: list[str | None] | None = None,
                audio_states: list[torch.Tensor | None] | None = None, **_: object) -> AVOutput:
        """position_ids (3, b, s) from the processor; labels (b, s) are the input ids with -100 outside the
        response (shifted inside the loss); media_repeats and the media cache's arguments (video_keys, video_tokens,
        audio_keys, audio_states): see ``embed``.

        Training reads log-probs without (b, s, v) logits: ``logp_index`` (N,) flat indices into the b * s hidden
        positions and ``logp_targets`` (N,) the tokens they predict give ``token_logps`` (N,) through the chunked
        response-only head (src.losses.logprobs, ``logp_chunk_size`` rows of logits at a time). With labels and
        ``return_logits=False`` the loss comes from that head too; with ``return_logits=True`` (the default) it
        comes from the full logits, the dense oracle."""
        if position_ids is None or position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError("AVLLM needs 3-D position_ids (3, b, s) from the processor; 1-D positions would "
                             "silently drop the time axis of M-RoPE")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values_videos, video_grid_thw, input_features, audio_chunks,
                                       audio_windows, media_repeats, video_keys, video_tokens, audio_keys,
                                       audio_states)
        out = self.llm(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                       cache=cache, use_cache=use_cache)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden) if return_logits else None
        token_logps, loss = None, None
        if logp_index is not None:
            if logp_targets is None or logp_targets.shape != logp_index.shape:
                raise ValueError("logp_index needs logp_targets of the same (N,) shape")
            token_logps = self.head_token_logps(hidden, logp_index, logp_targets, logp_chunk_size)
        if labels is not None and logits is not None:
            loss = mean_response_ce(logits, labels)
        elif labels is not None:
            index, targets = response_positions(labels)
            label_logps = self.head_token_logps(hidden, index, targets, logp_chunk_size)
            loss = mean_response_ce_from_logps(*scatter_response_logps(label_logps, index, labels))
            token_logps = label_logps if token_logps is None else token_logps
        return AVOutput(loss=loss, logits=logits, hidden_states=hidden, cache=out.cache, inputs_embeds=inputs_embeds,
                        token_logps=token_logps)

    def head_token_logps(self, hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None) -> torch.Tensor:
        """hidden (b, s, d), index (N,) into its b * s positions, targets (N,) -> (N,) float32 log-probs, never
        more than a chunk of logits at a time. Call it inside ``forward``: under FSDP2 the head's weight (in the
        root unit) is whole only there."""
        return head_token_logps(self.lm_head, hidden.flatten(0, 1)[index], targets, chunk_size)


class MergeGroups(nn.Module):
    """Stands in for the vision merger in ``AVLLM.tower_states``: each visual token's ``unit`` patch states side by
    side, unchanged (the tower's forward then puts the groups back in token order, as it does the merger's
    outputs)."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, self.unit * hidden.shape[-1])


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_summary(model: AVLLM) -> dict[str, int]:
    """Parameters per part (the tied LM head counted once)."""
    parts = {"vision": model.visual, "llm": model.llm, "whisper": model.whisper, "aligner": model.aligner}
    out = {name: count_parameters(m) for name, m in parts.items()}
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        out["lm_head"] = model.lm_head.weight.numel()
    out["total"] = sum(out.values())
    return out


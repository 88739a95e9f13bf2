"""Outputs of frozen media encoders, computed once per clip and reused in later epochs.

When the vision path (tower + merger) or Whisper does not train (the embedded default's SFT: the tiny base's
encoders were pretrained when the base was built), a clip's video tokens and Whisper states are the same every
epoch, yet computing them, and decoding, patchifying and log-mel-ing the clip for them, was about a third of a tiny
SFT step on CPU. ``FrozenMediaCache`` keeps them on CPU, per part ("video": the merger's tokens, or the frozen
tower's output when the merger trains, as in the paper's SFT and DPO, ``video_stage``; "audio": Whisper's last
hidden states, chunks x frames x d), keyed by the sample's media key: its id and the content key of its media
files (paths, sizes, modification times and decode settings, ``clip_cache.media_file_key``), so a changed file is a
new key, a miss, never a stale hit. 8,000 SynthAV clips take 131 MB of video tokens and 410 MB of Whisper states.

In MrDPO (src.lit.dpo.DPOModule) the rollout's prompt pass meets each training video first, with the round-start
model's frozen encoders, so the DPO steps of the round and every later round read them (a 7B step at 4k tokens on
an H100: 1.33x, bench/RESULTS.md).

Under FSDP2 each rank keeps what it meets: one rank may hit where another computes, so the cached encoders get no
FSDP2 units of their own (src.models.sharding.shard_model's ``whole``) and FSDP2's record of forwards is dropped
before each training step (``forget_forward_order``), which keeps the ranks' collectives matched.

Two ends share it, in one process (a rank):
- the model (``AVLLM.embed`` with ``video_keys`` / ``audio_keys``) stores what it computes for keyed media and takes
  stored entries for keys it meets again (``gather``);
- the processor (``AVProcessor`` with ``media_cache`` set), once every part of a clip is stored, neither decodes nor
  featurises it: its sample brings the stored features and the layout it kept the first time.

DataLoader workers get no cache (each would hold a stale copy): with workers the processor does its full work and
the model still skips the encoders. Nothing is saved in checkpoints; a resumed run computes the features again the
first time it meets a clip (the same values, up to float summation order). Use it only with frozen encoders:
``check_frozen`` refuses a cached part with trainable parameters, whose outputs change every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

PARTS = ("video", "audio")
# media keys and stored encoder outputs a batch may bring (AVProcessor._media_batch), passed on to AVLLM.embed
MEDIA_OUTPUTS = ("video_keys", "video_tokens", "audio_keys", "audio_states")


def media_cache_for(video_tokens: bool, audio_states: bool, max_gb: float | None = None) -> FrozenMediaCache | None:
    """The cache a module's ``cache_video_tokens`` / ``cache_audio_states`` / ``media_cache_gb`` settings ask for
    (None when neither part is)."""
    parts = [part for part, on in (("video", video_tokens), ("audio", audio_states)) if on]
    return FrozenMediaCache(parts, max_gb) if parts else None


class FrozenMediaCache:
    """``max_gb``: the stored tensors' bound (None: none). Once an output does not fit, it is not stored (nothing is
    evicted): training visits its clips in cycles (epochs, MrDPO rounds), where evicting the oldest entry would
    evict each one just before its next use, while keeping the first ones gives a hit rate of about the bound
    over the data's size."""

    def __init__(self, parts: Sequence[str] = PARTS, max_gb: float | None = None):
        unknown = set(parts) - set(PARTS)
        if unknown or not parts:
            raise ValueError(f"FrozenMediaCache parts must be a non-empty subset of {PARTS}, got {list(parts)}")
        if max_gb is not None and max_gb <= 0:
            raise ValueError(f"max_gb must be > 0 or None, got {max_gb}")
        self.stores: dict[str, dict[str, torch.Tensor]] = {part: {} for part in parts}
        self.hits = dict.fromkeys(parts, 0)
        self.misses = dict.fromkeys(parts, 0)
        self.max_bytes = None if max_gb is None else int(max_gb * 2**30)
        self.bytes = 0
        self.refused = 0  # outputs not stored for the bound

    def admit(self, feature: torch.Tensor) -> bool:
        """Whether ``feature`` fits under the bound (and, if so, count it as stored)."""
        size = feature.numel() * feature.element_size()
        if self.max_bytes is not None and self.bytes + size > self.max_bytes:
            self.refused += 1
            return False
        self.bytes += size
        return True

    def counts(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) so far, per part."""
        return {part: (self.hits[part], self.misses[part]) for part in self.stores}

    def stats(self) -> dict[str, object]:
        return {"parts": list(self.stores), "hits": dict(self.hits), "misses": dict(self.misses),
                "entries": {part: len(store) for part, store in self.stores.items()},
                "gb": round(self.bytes / 2**30, 3), "refused": self.refused}

    def check_frozen(self, model) -> None:
        """Refuse a cached part whose stored stage trains: Whisper for "audio", the vision tower (everything of
        the vision path but its merger) for "video"."""
        encoders = {"video": ("vision tower", model.visual, "merger."),  # the merger may train: video_stage
                    "audio": ("Whisper encoder", model.whisper, None)}
        for part in self.stores:
            what, module, spared = encoders[part]
            trainable = [n for n, p in module.named_parameters()
                         if p.requires_grad and not (spared and n.startswith(spared))]
            if trainable:
                raise ValueError(f"the {part} cache needs a frozen {what}, but {len(trainable)} of its parameters "
                                 f"train (e.g. {trainable[0]}); leave it out of trainable or turn the cache off")

    @staticmethod
    def video_stage(model) -> str:
        """What the video part stores for ``model``: "tokens" (the merger's output) when the whole vision path is
        frozen, "tower" (the tower's output, ``AVLLM.tower_states``; the merger then runs every step on it) when the
        merger trains. One stage per process: trainability is set before training and the stores are not saved."""
        return "tower" if any(p.requires_grad for p in model.visual.merger.parameters()) else "tokens"

    def attach(self, model) -> None:
        """Make ``model.embed`` store and read through this cache (refused for a part whose encoder trains)."""
        self.check_frozen(model)
        model.media_cache = self

    def serve(self, processor) -> None:
        """Let ``processor`` (the DataModule's, in this process) serve clips this cache holds without decoding
        them; DataLoader workers' copies of it only key their rows."""
        if hasattr(processor, "use_media_cache"):
            processor.use_media_cache(self)

    def caches(self, part: str) -> bool:
        return part in self.stores

    def get(self, part: str, key: str | None) -> torch.Tensor | None:
        return self.stores[part].get(key) if key is not None and part in self.stores else None

    def holds(self, key: str, parts: Sequence[str]) -> bool:
        """Whether every one of ``parts`` is stored under ``key`` (False when one of them is not cached at all)."""
        return all(part in self.stores and key in self.stores[part] for part in parts)

    def gather(self, part: str, keys: Sequence[str | None] | None, given: Sequence[torch.Tensor | None] | None,
               count: int, encode: Callable[[list[int]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """``gather_media`` over this cache's ``part`` store (none when the part is not cached), counting hits
        (given or stored) and misses (computed)."""
        out, computed = gather_media(self.stores.get(part), keys, given, count, encode, self.admit)
        if part in self.stores:
            self.hits[part] += count - computed
            self.misses[part] += computed
        return out


def gather_media(store: dict[str, torch.Tensor] | None, keys: Sequence[str | None] | None,
                 given: Sequence[torch.Tensor | None] | None, count: int,
                 encode: Callable[[list[int]], list[torch.Tensor]],
                 admit: Callable[[torch.Tensor], bool] | None = None) -> tuple[list[torch.Tensor], int]:
    """The features of ``count`` items in order, and how many were computed: item i's ``given[i]`` (the batch
    brought it), else ``store[keys[i]]``, else computed by ``encode(indices)`` (one call for all of those) and
    stored when the item has a key, there is a store and ``admit`` (if given) takes it. Items of one key are
    computed once per call, store or not: the same media repeated in a batch (the rollout's K samples of a video)
    runs the encoder once."""
    out = list(given) if given is not None else [None] * count
    if len(out) != count or (keys is not None and len(keys) != count):
        raise ValueError(f"{count} media items, {len(out)} given features, {'no' if keys is None else len(keys)} keys")
    if store is not None and keys is not None:
        out = [store.get(k) if f is None and k is not None else f for f, k in zip(out, keys)]
    todo = [i for i in range(count) if out[i] is None]
    first: dict[str, int] = {}  # key -> the item computed for it
    unique = []
    for i in todo:
        key = keys[i] if keys is not None else None
        if key is None or key not in first:
            unique.append(i)
            if key is not None:
                first[key] = i
    if unique:
        for i, feature in zip(unique, encode(unique), strict=True):
            out[i] = feature
            if store is not None and keys is not None and keys[i] is not None and (admit is None or admit(feature)):
                store[keys[i]] = feature.detach().to("cpu", copy=True)
        for i in todo:
            if out[i] is None:
                out[i] = out[first[keys[i]]]
    return out, len(unique)

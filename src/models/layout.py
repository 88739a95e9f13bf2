"""Where audio and video tokens sit in the audio-visual span, and their 3-D M-RoPE position ids.

One `<|vision_start|> ... <|vision_end|>` span holds, for each temporal grid g of the video (2 frames after the
temporal patch), the grid's h*w visual tokens (row-major), then one token per 0.5 s audio window whose start lies
in g's time span. Both modalities run on one temporal clock of ``CLOCK_UNITS_PER_SECOND`` = 2 units per second, so
a grid and an audio window that start at the same instant share their temporal id.

Everything here is a pure function of ints, floats and LongTensors: no model, no tokenizer. The LLM is called
with inputs_embeds + these position_ids, because transformers silently falls back to 1-D positions when
position_ids are missing.

Position rules (a sequence of n tokens gives ids of shape (3, n): temporal, height, width):
- text token: (p, p, p), p counting on from the previous maximum + 1 (the first token gets 0);
- video token of grid g, row r, col c: (s + tid(g), s + r, s + c), s = the span's first position. Same as
  Qwen2.5-VL's get_rope_index for a video sampled from t = 0;
- audio window k: (s + tid_k, s + tid_k, s + tid_k). The paper leaves the audio token's spatial ids open; we
  treat it like a text token placed at its time: all three ids equal its temporal id (an alternative would be
  (tid, 0, 0), i.e. the top-left cell of a grid);
- text after a span starts at (max id over the span, all three axes) + 1, as in Qwen's reference code.
  transformers 5.x advances only by max(h, w) after a video, so it disagrees with us (and with the original
  Qwen2.5-VL) when the temporal ids outrun the spatial ones; tests/test_layout.py pins both facts.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

import torch

CLOCK_UNITS_PER_SECOND = 2
WINDOW_SECONDS = 0.5

VIDEO_TOKEN_TYPE = 1  # our codes for span_token_types; not transformers' mm_token_type_ids (where video is 2)
AUDIO_TOKEN_TYPE = 2

# Times come out of float arithmetic (e.g. 49 * 0.02 = 0.9800000000000001, 0.1 * 3 = 0.30000000000000004);
# a microsecond of slack makes an instant that is "exactly" on a clock tick land on it, without merging
# instants that really differ (frames and windows are >= 1 ms apart).
_TIME_EPS = 1e-6


def temporal_id(seconds: float) -> int:
    """Temporal id on the shared clock: floor(2 * seconds), robust to float error (0.99999999 s -> 2)."""
    return math.floor(CLOCK_UNITS_PER_SECOND * seconds + _TIME_EPS)


def grid_start_times(frame_times: Sequence[float], temporal_patch_size: int = 2) -> tuple[float, ...]:
    """Start time of each temporal grid: the time of its first frame (len(frame_times) // temporal_patch_size)."""
    if len(frame_times) == 0 or len(frame_times) % temporal_patch_size:
        raise ValueError(f"{len(frame_times)} frames do not split into grids of {temporal_patch_size} frames")
    return tuple(float(t) for t in frame_times[::temporal_patch_size])


@dataclass(frozen=True)
class VideoGrid:
    """The video's token grid as the LLM sees it.

    t: temporal grids (frames // temporal_patch_size, 2 frames each).
    h, w: LLM-token rows / cols per grid after the 2x2 merge (height // (patch 14 * merge 2)).
    times: start time (s, clip clock, >= 0) of each temporal grid, i.e. of its first frame; len t, increasing.
    """

    t: int
    h: int
    w: int
    times: tuple[float, ...]

    def __post_init__(self):
        if min(self.t, self.h, self.w) < 1:
            raise ValueError(f"VideoGrid needs t, h, w >= 1, got t={self.t} h={self.h} w={self.w}")
        if len(self.times) != self.t:
            raise ValueError(f"VideoGrid has t={self.t} grids but {len(self.times)} start times")
        if self.times[0] < 0:
            raise ValueError(f"VideoGrid times are on the clip clock (>= 0), got {self.times[0]}")
        if any(b <= a for a, b in zip(self.times, self.times[1:])):
            raise ValueError(f"VideoGrid times must increase strictly, got {self.times}")

    @property
    def tokens_per_grid(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class AVLayout:
    """One audio-visual span: an optional video grid and ``audio_windows`` real 0.5 s audio windows.

    Window k starts at audio_start + k * 0.5 s on the clip clock. Only windows of real audio count: the zero
    padding Whisper needs to fill its 30 s input gets no tokens. Audio-only and video-only are both valid; a
    layout with neither is an error, never an empty span.
    """

    video: VideoGrid | None
    audio_windows: int
    audio_start: float = 0.0

    def __post_init__(self):
        if self.audio_windows < 0:
            raise ValueError(f"audio_windows must be >= 0, got {self.audio_windows}")
        if self.audio_start < 0:
            raise ValueError(f"audio_start is on the clip clock (>= 0), got {self.audio_start}")
        if self.video is None and self.audio_windows == 0:
            raise ValueError("AVLayout has neither video nor audio windows")

    @property
    def n_tokens(self) -> int:
        video_tokens = self.video.t * self.video.tokens_per_grid if self.video is not None else 0
        return video_tokens + self.audio_windows

    def window_start(self, k: int) -> float:
        """Clip-clock start time (s) of audio window k."""
        return self.audio_start + k * WINDOW_SECONDS

    def segments(self) -> list[tuple[str, int, int]]:
        """The span in sequence order: ("video", grid_index, n_tokens) and ("audio", first_window, n_windows).

        A grid with no audio windows has no audio segment after it.
        """
        if self.video is None:
            return [("audio", 0, self.audio_windows)]
        out: list[tuple[str, int, int]] = []
        first = 0
        for g, count in enumerate(_windows_per_grid(self)):
            out.append(("video", g, self.video.tokens_per_grid))
            if count:
                out.append(("audio", first, count))
            first += count
        return out


def _grid_of_window(times: tuple[float, ...], start: float) -> int:
    """The grid an audio window starting at ``start`` follows: the last grid starting at or before it (else 0)."""
    return max(bisect.bisect_right(times, start + _TIME_EPS) - 1, 0)


def _windows_per_grid(layout: AVLayout) -> list[int]:
    """How many audio windows follow each grid (windows are in time order, so each grid's are contiguous)."""
    counts = [0] * layout.video.t
    for g in window_grid_assignment(layout):
        counts[g] += 1
    return counts


def window_grid_assignment(layout: AVLayout) -> list[int]:
    """For each audio window, the grid it sits after; -1 for every window of an audio-only layout."""
    if layout.video is None:
        return [-1] * layout.audio_windows
    return [_grid_of_window(layout.video.times, layout.window_start(k)) for k in range(layout.audio_windows)]


def span_token_types(layout: AVLayout) -> torch.Tensor:
    """(n,) LongTensor in span order: VIDEO_TOKEN_TYPE (1) per visual token, AUDIO_TOKEN_TYPE (2) per window."""
    parts = [
        torch.full((n,), VIDEO_TOKEN_TYPE if kind == "video" else AUDIO_TOKEN_TYPE, dtype=torch.long)
        for kind, _, n in layout.segments()
    ]
    return torch.cat(parts)


def _video_grid_positions(grid: VideoGrid, g: int) -> torch.Tensor:
    """(3, h*w): (tid(g), row, col) for grid g's tokens, row-major."""
    rows = torch.arange(grid.h).repeat_interleave(grid.w)
    cols = torch.arange(grid.w).repeat(grid.h)
    tids = torch.full_like(rows, temporal_id(grid.times[g]))
    return torch.stack([tids, rows, cols])


def _audio_positions(layout: AVLayout, first: int, count: int) -> torch.Tensor:
    """(3, count): (tid, tid, tid) for windows first .. first+count-1: a 1-D token at its time."""
    tids = torch.tensor([temporal_id(layout.window_start(k)) for k in range(first, first + count)], dtype=torch.long)
    return tids.expand(3, -1)


def span_positions(layout: AVLayout) -> torch.Tensor:
    """(3, n) LongTensor of (temporal, height, width) ids relative to the span's first position (offset 0).

    Video token (grid g, row r, col c) -> (tid(g), r, c); audio window k -> (tid_k, tid_k, tid_k), with
    tid(x) = floor(2 * start time of x). E.g. grids at 0 s and 1 s (h=1, w=2) and windows at 0, 0.5, 1, 1.5 s:
    [(0,0,0), (0,0,1), (0,0,0), (1,1,1), (2,0,0), (2,0,1), (2,2,2), (3,3,3)].
    """
    parts = []
    for kind, index, n in layout.segments():
        if kind == "video":
            parts.append(_video_grid_positions(layout.video, index))
        else:
            parts.append(_audio_positions(layout, index, n))
    return torch.cat(parts, dim=1)


def _placeholder_runs(is_placeholder: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True in a (L,) bool tensor."""
    edges = torch.nn.functional.pad(is_placeholder.long(), (1, 1)).diff()
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def _check_span(index: int, start: int, end: int, types: torch.Tensor, layout: AVLayout) -> None:
    """Raise ValueError unless the placeholders in [start, end) are exactly the layout's token types."""
    expected = span_token_types(layout)
    if end - start != len(expected):
        raise ValueError(
            f"span {index} (tokens {start}..{end - 1}) has {end - start} audio/video placeholders but its layout "
            f"needs {len(expected)} ({layout.segments()})"
        )
    wrong = (types[start:end].cpu() != expected).nonzero().flatten()
    if len(wrong):
        at = int(wrong[0])
        names = {VIDEO_TOKEN_TYPE: "video", AUDIO_TOKEN_TYPE: "audio"}
        raise ValueError(
            f"span {index}: token {start + at} holds the {names[int(types[start + at])]} placeholder where the "
            f"layout puts {names[int(expected[at])]} ({layout.segments()})"
        )


def sequence_positions(
    token_ids: torch.Tensor, spans: Sequence[AVLayout], *, video_token_id: int, audio_token_id: int
) -> tuple[torch.Tensor, int]:
    """3-D position ids of one unpadded sequence and its rope delta.

    token_ids: (L,). Each maximal run of video/audio placeholder ids is the next layout in ``spans``; its
    length and token types must match that layout exactly (ValueError naming the mismatch otherwise).
    Returns positions (3, L) long on token_ids' device, and rope_delta = max id + 1 - L: generation places
    new token i (0-based over the whole sequence) at i + rope_delta.
    """
    if token_ids.dim() != 1 or len(token_ids) == 0:
        raise ValueError(f"sequence_positions needs a non-empty (L,) sequence, got shape {tuple(token_ids.shape)}")
    types = (token_ids == video_token_id).long() * VIDEO_TOKEN_TYPE
    types += (token_ids == audio_token_id).long() * AUDIO_TOKEN_TYPE
    runs = _placeholder_runs(types != 0)
    if len(runs) != len(spans):
        raise ValueError(f"the sequence has {len(runs)} runs of audio/video placeholders but {len(spans)} layouts")

    positions = torch.empty(3, len(token_ids), dtype=torch.long)
    next_pos, cursor = 0, 0
    for index, ((start, end), layout) in enumerate(zip(runs, spans)):
        _check_span(index, start, end, types, layout)
        n_text = start - cursor
        positions[:, cursor:start] = torch.arange(next_pos, next_pos + n_text)
        span = span_positions(layout) + next_pos + n_text
        positions[:, start:end] = span
        next_pos, cursor = int(span.max()) + 1, end
    positions[:, cursor:] = torch.arange(next_pos, next_pos + len(token_ids) - cursor)
    return positions.to(token_ids.device), int(positions.max()) + 1 - len(token_ids)


def batch_positions(
    token_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    spans_per_row: Sequence[Sequence[AVLayout]],
    *,
    video_token_id: int,
    audio_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D position ids of a padded batch: (3, B, L) and rope deltas (B,).

    token_ids, attention_mask: (B, L); attention_mask 1 = real token, 0 = padding (left or right, any place);
    None = no padding. Each row's real tokens get exactly sequence_positions of that row without its padding,
    so padding never shifts a position. Padding positions are 1 (as in Qwen's reference code; any value works
    because those tokens are masked out). Row b's delta is relative to its number of real tokens.
    """
    if token_ids.dim() != 2:
        raise ValueError(f"batch_positions needs (B, L) token ids, got shape {tuple(token_ids.shape)}")
    if len(spans_per_row) != token_ids.shape[0]:
        raise ValueError(f"{token_ids.shape[0]} rows but layouts for {len(spans_per_row)}")
    positions = torch.ones(3, *token_ids.shape, dtype=torch.long, device=token_ids.device)
    deltas = torch.zeros(token_ids.shape[0], dtype=torch.long, device=token_ids.device)
    for b, spans in enumerate(spans_per_row):
        keep = torch.ones_like(token_ids[b], dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        try:
            row_positions, deltas[b] = sequence_positions(
                token_ids[b][keep], spans, video_token_id=video_token_id, audio_token_id=audio_token_id
            )
        except ValueError as err:
            raise ValueError(f"row {b}: {err}") from err
        positions[:, b, keep] = row_positions
    return positions, deltas

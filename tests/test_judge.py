"""Caption metric and the exact SynthAV judge, checked against counts worked out by hand."""

from __future__ import annotations

import math

import pytest

from src.data.synth import sample_scene
from src.judge import EventCounts, SynthJudge, deloop, rates, repetition_counts

GT = [
    "The red circle appears.",
    "A high beep sounds twice.",
    "The red circle turns blue as a low tone plays.",
    "The yellow square moves left.",
]
GT_CAPTION = " ".join(GT)


@pytest.fixture(scope="module")
def judge() -> SynthJudge:
    return SynthJudge()


def _counts(judge, caption: str, events=GT) -> tuple[int, int, int, int]:
    c = judge.score(caption, events)
    assert c.correct + c.missed + c.incorrect == c.n_gt == len(events)
    return c.correct, c.missed, c.incorrect, c.hallucination


def test_ground_truth_captions_score_zero_error(judge):
    counts = []
    for seed in range(300):
        scene = sample_scene(seed)
        c = judge.score(scene.caption(), scene.sentences())
        assert (c.correct, c.missed, c.incorrect, c.hallucination, c.repeated_sentences) == (c.n_gt, 0, 0, 0, 0)
        counts.append(c)
    r = rates(counts)
    assert r["eer"] == 0 and r["repetition"] == 0 and r["n_clips"] == 300


def test_changed_colour_is_one_incorrect(judge):
    caption = GT_CAPTION.replace("The red circle appears.", "The green circle appears.")
    assert _counts(judge, caption) == (3, 0, 1, 0)


@pytest.mark.parametrize("index, wrong", [
    (1, "A low beep sounds twice."),  # pitch
    (1, "A high beep sounds three times."),  # count
    (2, "The red circle turns blue as a high tone plays."),  # the sound of a tied event
    (2, "The red circle turns blue."),  # the tied sound left out
    (2, "The red circle turns green as a low tone plays."),  # new colour
    (3, "The yellow square moves right."),  # direction
])
def test_one_wrong_attribute_is_one_incorrect(judge, index, wrong):
    caption = " ".join(GT[:index] + [wrong] + GT[index + 1:])
    assert _counts(judge, caption) == (3, 0, 1, 0)
    assert judge.score_detail(caption, GT).incorrect == [(GT[index], wrong.rstrip("."))]


def test_removed_sentence_is_one_missed(judge):
    detail = judge.score_detail(" ".join(GT[:1] + GT[2:]), GT)
    assert _counts(judge, " ".join(GT[:1] + GT[2:])) == (3, 1, 0, 0)
    assert detail.missed == [GT[1]]


def test_added_valid_sentence_is_one_hallucination(judge):
    detail = judge.score_detail(GT_CAPTION + " A burst of noise plays.", GT)
    assert (detail.counts.correct, detail.counts.hallucination) == (4, 1)
    assert detail.hallucinated == ["A burst of noise plays"]


def test_free_text_is_one_hallucination(judge):
    assert _counts(judge, GT_CAPTION + " The weather is nice today.") == (4, 0, 0, 1)
    assert _counts(judge, "The weather is nice today. " + GT_CAPTION) == (4, 0, 0, 1)


def test_repeated_sentence_changes_no_event_count(judge):
    c = judge.score(" ".join(GT[:2] + GT[1:]), GT)  # GT[1] twice in a row
    assert (c.correct, c.missed, c.incorrect, c.hallucination) == (4, 0, 0, 0)
    assert (c.n_sentences, c.repeated_sentences) == (5, 1)
    assert rates([c])["repetition"] == pytest.approx(1 / 5)


def test_swapped_events_count_one_incorrect(judge):
    swapped = " ".join([GT[0], GT[2], GT[1], GT[3]])
    detail = judge.score_detail(swapped, GT)
    assert (detail.counts.correct, detail.counts.incorrect, detail.counts.missed) == (3, 1, 0)
    assert detail.counts.hallucination == 0


def test_reversed_caption_keeps_one_event_in_order(judge):
    """Reversed, the longest order-consistent subsequence holds one event: 1 correct, 3 incorrect."""
    assert _counts(judge, " ".join(reversed(GT))) == (1, 0, 3, 0)


def test_other_shape_is_a_miss_plus_a_hallucination(judge):
    caption = GT_CAPTION.replace("The yellow square", "The yellow triangle")
    assert _counts(judge, caption) == (3, 1, 0, 1)


def test_loop_is_delooped_for_events_but_visible_as_repetition(judge):
    caption = GT_CAPTION + (" " + GT[3]) * 20
    c = judge.score(caption, GT)
    assert (c.correct, c.missed, c.incorrect, c.hallucination) == (4, 0, 0, 0)
    assert (c.n_sentences, c.repeated_sentences) == (24, 20)


def test_parse_tolerance_in_captions(judge):
    caption = "the RED circle appears!  Then, a high beep sounds twice\nThen the red circle turns blue, as a low " \
              "tone plays. and then the yellow square   moves left"
    assert _counts(judge, caption) == (4, 0, 0, 0)


@pytest.mark.parametrize("caption", [
    "", "   ", "...", "🙂🙂🙂", "\x00\u200b", "as as as as", "The The The. the the", "Ünïcödé ✓. 日本語の文。",
    "The red circle appears" * 50, "." * 1000, "a" * 5000,
])
def test_any_text_is_judged_without_crashing(judge, caption):
    c = judge.score(caption, GT)
    assert c.correct + c.missed + c.incorrect == 4 and c.hallucination >= 0


def test_ground_truth_outside_the_grammar_is_an_error(judge):
    with pytest.raises(ValueError, match="outside the SynthAV grammar"):
        judge.score("The red circle appears.", ["The red circle appears.", "Something else happens."])


@pytest.mark.parametrize("text, expected", [
    ("A. B. B. B. B.", "A. B."),
    ("A. B. B. C.", "A. B. B. C."),  # two copies are not a loop
    ("x y x y x y z", "x y z"),
    ("The red circle moves left. The red circle moves left. The red circle moves left. Done.",
     "The red circle moves left. Done."),
    ("B.B.B.B.", "B."),
    ("1000000 apples", "1000000 apples"),  # digits inside a word are never collapsed
    ("", ""),
])
def test_deloop(text, expected):
    assert deloop(text) == expected


def test_repetition_counts_normalise_case_space_and_punctuation():
    assert repetition_counts("A high tone plays. a  HIGH tone plays! A low tone plays.") == (3, 1)
    assert repetition_counts("") == (0, 0)


def test_rates_are_micro_averaged_over_gt_events():
    """Two clips: n_gt 4 + 6 = 10 GT events; missed 1 + 2 = 3, incorrect 0 + 1 = 1, hallucination 2 + 3 = 5.
    miss 3/10 = 0.3, incorrect 1/10 = 0.1, hallucination 5/10 = 0.5, eer 0.3 + 0.1 + 0.5 = 0.9.
    Repetition: repeated 1 + 3 = 4 of 5 + 15 = 20 sentences -> 0.2. (A macro average would give
    miss (1/4 + 2/6)/2 = 0.2917, so the test tells the two apart.)"""
    counts = [
        EventCounts(n_gt=4, correct=3, missed=1, incorrect=0, hallucination=2, n_sentences=5, repeated_sentences=1),
        EventCounts(n_gt=6, correct=3, missed=2, incorrect=1, hallucination=3, n_sentences=15, repeated_sentences=3),
    ]
    r = rates(counts)
    assert set(r) == {"miss", "incorrect", "hallucination", "eer", "repetition", "n_clips"}
    assert r["miss"] == pytest.approx(0.3) and r["incorrect"] == pytest.approx(0.1)
    assert r["hallucination"] == pytest.approx(0.5) and r["eer"] == pytest.approx(0.9)
    assert r["repetition"] == pytest.approx(0.2) and r["n_clips"] == 2


def test_eer_can_exceed_one():
    """1 GT event, missed, plus 3 hallucinations: eer = (1 + 0 + 3) / 1 = 4."""
    r = rates([EventCounts(1, 0, 1, 0, 3, 3, 0)])
    assert r["eer"] == pytest.approx(4.0)


def test_rates_of_nothing_are_nan_not_zero():
    r = rates([])
    assert math.isnan(r["eer"]) and math.isnan(r["repetition"]) and r["n_clips"] == 0


def test_paired_eer_bootstrap_by_hand():
    """The change and its interval from the same draws recomputed by hand; identical runs give exactly 0; a change
    on most clips lies outside the interval's other side; clips that differ are refused."""
    import torch

    from src.judge.metric import paired_eer_bootstrap

    def c(n_gt, errors):
        return EventCounts(n_gt=n_gt, correct=n_gt - errors, missed=errors, incorrect=0, hallucination=0,
                           n_sentences=n_gt, repeated_sentences=0)

    gts = [4, 5, 3, 6, 4, 5, 4, 3]
    base = [c(n, e) for n, e in zip(gts, [2, 3, 1, 4, 2, 2, 3, 1])]
    other = [c(n, e) for n, e in zip(gts, [1, 3, 0, 2, 2, 1, 2, 1])]
    out = paired_eer_bootstrap(base, other, resamples=500, level=0.9, seed=7)
    assert out["eer_base"] == pytest.approx(18 / 34) and out["eer"] == pytest.approx(12 / 34)
    assert out["delta"] == pytest.approx(-6 / 34) and out["relative"] == pytest.approx(-6 / 18)
    draws = torch.randint(len(gts), (500, len(gts)), generator=torch.Generator().manual_seed(7)).tolist()
    deltas = sorted(sum(other[i].missed - base[i].missed for i in d) / sum(gts[i] for i in d) for d in draws)
    want = torch.quantile(torch.tensor(deltas, dtype=torch.float64), torch.tensor([0.05, 0.95], dtype=torch.float64))
    assert [out["low"], out["high"]] == pytest.approx(want.tolist(), abs=1e-12)
    assert out["high"] < 0 and out["p_worse"] == pytest.approx(sum(x >= 0 for x in deltas) / 500)
    same = paired_eer_bootstrap(base, base)
    assert (same["delta"], same["low"], same["high"], same["p_worse"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="different ground-truth event counts"):
        paired_eer_bootstrap(base, [c(n + 1, 0) for n in gts])
    with pytest.raises(ValueError, match="the same clips"):
        paired_eer_bootstrap(base, other[:-1])


"""The exact SynthAV judge: parse a caption with the SynthAV grammar and count events against the ground truth.

Rules, applied to one caption and its ground-truth event sentences (GT sentences must all parse, else ValueError):

1. Repetition is counted on the raw caption (``metric.repetition_counts``): a sentence that restates an earlier
   sentence exactly (case, spacing and punctuation aside) is a repeat.
2. The caption is de-looped (``metric.deloop``), split into sentences, and exact repeats are dropped: a repeat
   adds no event. Each remaining sentence is parsed with ``grammar.parse``; a sentence outside the grammar
   (free text, garbage, an empty clause with symbols) is one hallucination.
3. Identity: a visual event (tied or not) is identified by (kind, shape); a sound by its kind (tone, beep,
   noise). Every other field is an attribute: the colour, direction, new colour, pitch, beep count, and for a
   visual event its tied sound (present or absent, and which).
4. Ordered matching: among alignments that keep caption order and GT order (an order-consistent subsequence),
   take the one with the most exact matches (ties broken by the most same-identity pairs). Exact pairs in it
   are correct; same-identity pairs in it are incorrect (a wrong attribute).
5. The remaining caption events are paired with remaining GT events of the same identity (exact ones first,
   then in order): each such pair is incorrect, because it is out of temporal order or has a wrong attribute.
6. GT events left unpaired are missed; caption events left unpaired are hallucinations.

So correct + incorrect + missed == number of GT events, and a caption that is exactly the GT caption scores
EER 0. Swapping two events gives one correct and one incorrect (the longest order-consistent subsequence keeps
one of them).
"""

from __future__ import annotations

from collections.abc import Sequence

from src.data.synth import grammar
from src.data.synth.world import Event
from src.judge.base import Judge, ScoreDetail
from src.judge.metric import EventCounts, deloop, repetition_counts, unique_sentences

__all__ = ["ScoreDetail", "SynthJudge", "identity"]


def identity(event: Event) -> tuple:
    """What makes two events "the same event" with possibly wrong attributes."""
    if event.is_visual:
        return (event.kind, event.shape)
    return (event.kind,)


class SynthJudge(Judge):
    """Exact judge for SynthAV captions; stateless and deterministic (every pass gives the same answer)."""

    name = "synth"

    def score_detail(self, caption: str, events: Sequence[str], *, pass_index: int = 0) -> ScoreDetail:
        gt = [_parse_gt(s) for s in events]
        n_sentences, repeated = repetition_counts(caption)
        sentences, _ = unique_sentences(deloop(caption))
        parsed = [(s, grammar.parse(s)) for s in sentences]
        hallucinated = [s for s, ev in parsed if ev is None]
        pred_sentences = [s for s, ev in parsed if ev is not None]
        pred = [ev for _, ev in parsed if ev is not None]

        ordered = _ordered_alignment(gt, pred)
        leftover = _pair_leftovers(gt, pred, ordered)
        correct = [(i, j) for i, j in ordered if gt[i] == pred[j]]
        incorrect = [(i, j) for i, j in ordered if gt[i] != pred[j]] + leftover
        paired_gt = {i for i, _ in ordered + leftover}
        paired_pred = {j for _, j in ordered + leftover}

        return ScoreDetail(
            counts=EventCounts(
                n_gt=len(gt),
                correct=len(correct),
                missed=len(gt) - len(paired_gt),
                incorrect=len(incorrect),
                hallucination=len(hallucinated) + len(pred) - len(paired_pred),
                n_sentences=n_sentences,
                repeated_sentences=repeated,
            ),
            correct=[(events[i], pred_sentences[j]) for i, j in correct],
            incorrect=[(events[i], pred_sentences[j]) for i, j in sorted(incorrect)],
            missed=[events[i] for i in range(len(gt)) if i not in paired_gt],
            hallucinated=hallucinated + [pred_sentences[j] for j in range(len(pred)) if j not in paired_pred],
        )


def _parse_gt(sentence: str) -> Event:
    event = grammar.parse(sentence)
    if event is None:
        raise ValueError(f"ground-truth event outside the SynthAV grammar: {sentence!r}")
    return event


def _ordered_alignment(gt: list[Event], pred: list[Event]) -> list[tuple[int, int]]:
    """Order-preserving (gt index, pred index) pairs maximising exact matches first, same-identity pairs second.

    Weighted longest common subsequence: an exact pair weighs more than all same-identity pairs together could.
    O(len(gt) * len(pred)).
    """
    exact_weight = len(gt) + len(pred) + 1
    n, m = len(gt), len(pred)

    def weight(i: int, j: int) -> int:
        if gt[i] == pred[j]:
            return exact_weight
        return 1 if identity(gt[i]) == identity(pred[j]) else 0

    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            w = weight(i, j)
            best[i][j] = max(best[i + 1][j], best[i][j + 1], best[i + 1][j + 1] + w if w else 0)
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        w = weight(i, j)
        if w and best[i][j] == best[i + 1][j + 1] + w:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            i += 1
        else:
            j += 1
    return pairs


def _pair_leftovers(gt: list[Event], pred: list[Event], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pair unaligned caption events with unaligned GT events of the same identity, exact ones first."""
    taken_gt, taken_pred = {i for i, _ in taken}, {j for _, j in taken}
    free_gt = [i for i in range(len(gt)) if i not in taken_gt]
    free_pred = [j for j in range(len(pred)) if j not in taken_pred]
    pairs = []
    for same in (lambda a, b: a == b, lambda a, b: identity(a) == identity(b)):
        for j in list(free_pred):
            match = next((i for i in free_gt if same(gt[i], pred[j])), None)
            if match is not None:
                pairs.append((match, j))
                free_gt.remove(match)
                free_pred.remove(j)
    return pairs

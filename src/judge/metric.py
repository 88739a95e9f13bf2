"""Judge-agnostic caption metric (METHOD.md "Caption metric"): per-clip event counts and micro-averaged rates.

Every judge (the exact SynthAV parser, an LLM judge) fills one ``EventCounts`` per clip; ``rates`` sums them.
Rates use the total number of ground-truth events as denominator (micro-average), so
EER = miss + incorrect + hallucination can exceed 1. Repetition = repeated sentences / all sentences, counted
on the raw caption so that degenerate loops stay visible after ``deloop``.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MIN_LOOP_COPIES = 3
MAX_LOOP_UNIT = 256  # tokens; longer units are not loops a captioner falls into, and the scan stays cheap


@dataclass(frozen=True)
class EventCounts:
    """One caption judged against its ground truth. correct + missed + incorrect == n_gt;
    hallucination counts caption events beyond the ground truth; the last two count raw-caption sentences."""

    n_gt: int
    correct: int
    missed: int
    incorrect: int
    hallucination: int
    n_sentences: int
    repeated_sentences: int


_TOKEN_RE = re.compile(r"\w+\s*|[^\w\s]\s*")
_SENTENCE_SPLIT_RE = re.compile(r"[.!?\n]+")


def deloop(text: str, min_copies: int = MIN_LOOP_COPIES) -> str:
    """Collapse any run of >= ``min_copies`` consecutive copies of a token sequence to one copy.

    Tokens are words and single punctuation marks (whitespace ignored when comparing), so "A. B. B. B. B." ->
    "A. B." and a number such as "1000000" is never touched. Repeats until nothing changes, so loops of loops
    collapse too. O(n * MAX_LOOP_UNIT) token comparisons per pass on loop-free text.
    """
    lead = text[: len(text) - len(text.lstrip())]
    tokens = _TOKEN_RE.findall(text)
    while True:
        collapsed = _collapse_once(tokens, min_copies)
        if len(collapsed) == len(tokens):
            return lead + "".join(tokens)
        tokens = collapsed


def _collapse_once(tokens: list[str], min_copies: int) -> list[str]:
    keys = [t.strip() for t in tokens]
    where: dict[str, list[int]] = {}
    for j, key in enumerate(keys):
        where.setdefault(key, []).append(j)
    out, i, n = [], 0, len(tokens)
    while i < n:
        unit, copies = _loop_at(keys, where[keys[i]], i, min_copies)
        if copies:
            end = i + unit * copies
            kept = tokens[i:i + unit]
            # keep the spacing that followed the whole run, so the next sentence stays separated
            kept[-1] = kept[-1].rstrip() + tokens[end - 1][len(tokens[end - 1].rstrip()):]
            out.extend(kept)
            i = end
        else:
            out.append(tokens[i])
            i += 1
    return out


def _loop_at(keys: list[str], same: list[int], i: int, min_copies: int) -> tuple[int, int]:
    """(unit length, copies) of the shortest unit starting at ``i`` repeated >= min_copies times, else (0, 0).

    ``same`` lists the positions holding the same token as ``i``: a unit can only end where one starts.
    """
    limit = min(MAX_LOOP_UNIT, (len(keys) - i) // min_copies)
    for j in same[bisect.bisect_right(same, i):]:
        unit = j - i
        if unit > limit:
            break
        first = keys[i:j]
        copies = 1
        while keys[i + copies * unit:i + (copies + 1) * unit] == first:
            copies += 1
        if copies >= min_copies:
            return unit, copies
    return 0, 0


def split_sentences(text: str) -> list[str]:
    """Non-empty sentences, split at . ! ? and newlines, stripped (punctuation dropped)."""
    return [s.strip() for s in _SENTENCE_SPLIT_RE.split(text) if s.strip()]


def normalise_sentence(sentence: str) -> str:
    """Comparison key for repeats: lower case, Unicode punctuation as space, single spaces (symbols such as
    emoji are kept: they are content)."""
    chars = (" " if unicodedata.category(ch).startswith("P") else ch for ch in sentence.lower())
    return " ".join("".join(chars).split())


def unique_sentences(text: str) -> tuple[list[str], int]:
    """Sentences of ``text`` with exact repeats (after normalise_sentence) dropped, and how many were dropped.
    Sentences that normalise to nothing (bare punctuation) are neither kept nor counted."""
    seen, kept, repeated = set(), [], 0
    for sentence in split_sentences(text):
        key = normalise_sentence(sentence)
        if not key:
            continue
        if key in seen:
            repeated += 1
        else:
            seen.add(key)
            kept.append(sentence)
    return kept, repeated


def repetition_counts(text: str) -> tuple[int, int]:
    """(n_sentences, repeated_sentences) of a raw caption; a repeat restates an earlier sentence exactly."""
    kept, repeated = unique_sentences(text)
    return len(kept) + repeated, repeated


def _fraction(num: int, den: int) -> float:
    return num / den if den else float("nan")  # nan, not 0: an empty set has no error rate


def rates(counts: Iterable[EventCounts]) -> dict[str, float]:
    """Micro-averaged rates over clips: {"miss", "incorrect", "hallucination", "eer", "repetition", "n_clips"}.

    miss/incorrect/hallucination = summed count / summed n_gt; eer = their sum; repetition = summed
    repeated_sentences / summed n_sentences. A zero denominator gives nan.
    """
    counts = list(counts)
    n_gt = sum(c.n_gt for c in counts)
    out = {
        "miss": _fraction(sum(c.missed for c in counts), n_gt),
        "incorrect": _fraction(sum(c.incorrect for c in counts), n_gt),
        "hallucination": _fraction(sum(c.hallucination for c in counts), n_gt),
    }
    out["eer"] = out["miss"] + out["incorrect"] + out["hallucination"]
    out["repetition"] = _fraction(sum(c.repeated_sentences for c in counts), sum(c.n_sentences for c in counts))
    out["n_clips"] = len(counts)
    return out


def paired_eer_bootstrap(base: Sequence[EventCounts], other: Sequence[EventCounts], *, resamples: int = 2000,
                         level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """The EER change from ``base`` to ``other``, captions of the same clips in the same order, with a paired
    bootstrap interval: clips are drawn with replacement (the same draw for both runs, which keeps the
    per-clip pairing that makes small changes measurable) and each draw's micro-averaged EERs are recomputed.

    Returns {"eer_base", "eer", "delta", "low", "high", "relative", "relative_low", "relative_high", "p_worse"}: the
    change other - base, its percentile interval at ``level``, the same relative to base's EER, and the share of
    draws where other's EER is not lower (a one-sided bootstrap p-value for "other is better"). Only the clips
    vary; a training run's own randomness (seeds) is not in the interval."""
    import torch

    if len(base) != len(other) or not base:
        raise ValueError(f"paired bootstrap needs the same clips in both runs, got {len(base)} and {len(other)}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level} and {resamples}")

    def table(counts):
        return torch.tensor([[c.n_gt, c.missed + c.incorrect + c.hallucination] for c in counts], dtype=torch.float64)

    a, b = table(base), table(other)
    if not torch.equal(a[:, 0], b[:, 0]):
        raise ValueError("paired bootstrap: the runs' clips have different ground-truth event counts (not the same "
                         "clips in the same order)")
    draws = torch.randint(len(base), (resamples, len(base)), generator=torch.Generator().manual_seed(seed))
    n_gt = a[:, 0][draws].sum(1).clamp_min(1)
    eer_a, eer_b = a[:, 1][draws].sum(1) / n_gt, b[:, 1][draws].sum(1) / n_gt
    delta, relative = eer_b - eer_a, (eer_b - eer_a) / eer_a.clamp_min(1e-12)
    tail = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(delta, tail).tolist()
    rlo, rhi = torch.quantile(relative, tail).tolist()
    eer0 = float(a[:, 1].sum() / a[:, 0].sum().clamp_min(1))
    eer1 = float(b[:, 1].sum() / a[:, 0].sum().clamp_min(1))
    return {"eer_base": eer0, "eer": eer1, "delta": eer1 - eer0, "low": lo, "high": hi,
            "relative": (eer1 - eer0) / eer0 if eer0 else float("nan"), "relative_low": rlo, "relative_high": rhi,
            "p_worse": float((delta >= 0).double().mean())}


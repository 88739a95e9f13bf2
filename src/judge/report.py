"""Evaluation outputs people read: the rates table and the markdown report of one evaluation directory.

All rates are micro-averaged fractions of the ground-truth events (``metric.rates``); EER = miss + incorrect +
hallucination and can exceed 100%. Repetition is the share of raw-caption sentences that restate an earlier one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from src.judge.metric import EventCounts, paired_eer_bootstrap

RATE_COLUMNS = (("miss", "miss"), ("incorrect", "incorrect"), ("hallucination", "hallucination"), ("eer", "EER"),
                ("repetition", "repetition"))


def percent(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def rates_table(runs: Sequence[tuple[str, dict]], first_column: str = "run") -> str:
    """A markdown table, one row per (label, rates dict)."""
    header = [first_column] + [title for _, title in RATE_COLUMNS] + ["clips"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result in runs:
        cells = [label] + [percent(result.get(key)) for key, _ in RATE_COLUMNS] + [str(result.get("n_clips", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sample_error(sample: dict) -> float:
    c = sample["counts"]
    return (c["missed"] + c["incorrect"] + c["hallucination"]) / max(c["n_gt"], 1)


def _sample_block(sample: dict) -> str:
    c = sample["counts"]
    lines = [f"### {sample['id']}: {c['missed']} missed, {c['incorrect']} incorrect, {c['hallucination']} "
             f"hallucinated of {c['n_gt']} events ({sample.get('status', 'ok')})", "",
             "> " + " ".join(sample["caption"].split())[:1200], ""]
    for title, items in (("missed", sample.get("missed", [])), ("hallucinated", sample.get("hallucinated", []))):
        if items:
            lines.append(f"- {title}: " + "; ".join(items))
    if sample.get("incorrect"):
        lines.append("- incorrect: " + "; ".join(f"{gt} -> {said}" if said else gt
                                                 for gt, said in sample["incorrect"]))
    return "\n".join(lines)


def report_markdown(*, source: str, data: str, result: dict, judge: dict, passes: Sequence[dict], chosen_pass: int,
                    samples: Sequence[dict], stats: dict, worst: int = 5) -> str:
    """The report of one evaluation: rates, passes, how the judge's answers went, and the worst clips."""
    n_gt = sum(s["counts"]["n_gt"] for s in samples)
    statuses = Counter(s.get("status", "ok") for s in samples)
    judge_line = ", ".join(f"{k}={v}" for k, v in judge.items())
    parts = [
        f"# Caption evaluation: {source}", "",
        f"- data: `{data}` ({result['n_clips']} clips, {n_gt} ground-truth events)",
        f"- judge: {judge_line}",
        "- rates are fractions of the ground-truth events, micro-averaged over clips; EER = miss + incorrect + "
        "hallucination (can exceed 100%); repetition = repeated sentences / sentences of the raw captions", "",
        rates_table([(source, result)]), "",
    ]
    if len(passes) > 1:
        parts += [f"## Judging passes ({len(passes)}; reported: pass {chosen_pass + 1}, the median EER)", "",
                  rates_table([(f"pass {i + 1}" + (" (reported)" if i == chosen_pass else ""), p)
                               for i, p in enumerate(passes)], first_column="pass"), ""]
    parts += ["## Judge answers", "",
              f"- per clip: {statuses.get('ok', 0)} full answers, {statuses.get('fallback', 0)} counts-only "
              f"fallbacks, {statuses.get('failed', 0)} failures (all events counted as missed)"]
    if stats:
        parts.append("- " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in stats.items()))
    unfinished = sum(1 for s in samples if s.get("finished") is False)
    if unfinished:
        parts.append(f"- {unfinished} captions never emitted their end token (de-looped before judging)")
    ranked = sorted(samples, key=_sample_error, reverse=True)[:worst]
    if ranked:
        parts += ["", f"## The {len(ranked)} clips with the highest error", ""]
        parts += [_sample_block(s) + "\n" for s in ranked]
    return "\n".join(parts).rstrip() + "\n"


def load_result(directory: str | Path) -> dict:
    """results.json of an evaluation directory (eval.json, its older name, also read); ValueError naming the
    file when missing or malformed."""
    directory = Path(directory)
    for name in ("results.json", "eval.json"):
        path = directory / name
        if path.is_file():
            try:
                result = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
            missing = [key for key, _ in RATE_COLUMNS[:4] if not isinstance(result.get(key), (int, float))]
            if missing:
                raise ValueError(f"{path}: not an evaluation result (no numeric {', '.join(missing)})")
            return result
    raise ValueError(f"{directory}: no results.json (run python -m src.evaluate --out {directory} first)")


def load_clip_counts(directory: str | Path) -> dict[str, EventCounts]:
    """Per-clip event counts of an evaluation directory (its samples.jsonl: id -> EventCounts); ValueError naming
    the file (and line) when it is missing or a line is malformed."""
    path = Path(directory) / "samples.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no per-clip samples (an evaluation directory written by python -m src.evaluate)")
    out: dict[str, EventCounts] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
            out[sample["id"]] = EventCounts(**sample["counts"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a judged sample ({type(err).__name__}: {err})") from None
    return out


def paired_change(base: dict[str, EventCounts], other: dict[str, EventCounts], **bootstrap) -> dict | None:
    """``metric.paired_eer_bootstrap`` of two evaluations' per-clip counts (``load_clip_counts``), clips matched by
    id; None when they did not judge the same clips."""
    ids = sorted(base)
    if sorted(other) != ids:
        return None
    return paired_eer_bootstrap([base[i] for i in ids], [other[i] for i in ids], **bootstrap)


def eer_change_table(runs: Sequence[tuple[str, dict[str, EventCounts]]], *, resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> str:
    """A markdown table: each run's EER change against the first run, with a paired bootstrap interval over the
    clips (``metric.paired_eer_bootstrap``). Runs must hold the same clips; a run that does not is named as such."""
    (base_label, base), rest = runs[0], runs[1:]
    pct = int(round(100 * level))
    lines = [f"EER change against {base_label}: paired bootstrap over the {len(base)} clips ({resamples} draws; "
             "the interval covers clip sampling only, not a training run's own randomness)", "",
             f"| run | EER | change | {pct}% interval | relative | {pct}% interval | P(not lower) |",
             "|---|---|---|---|---|---|---|"]
    for label, counts in rest:
        b = paired_change(base, counts, resamples=resamples, level=level, seed=seed)
        if b is None:
            lines.append(f"| {label} | - | not the same clips as {base_label} | | | | |")
            continue
        lines.append(f"| {label} | {percent(b['eer'])} | {100 * b['delta']:+.1f} pt | [{100 * b['low']:+.1f}, "
                     f"{100 * b['high']:+.1f}] | {100 * b['relative']:+.1f}% | [{100 * b['relative_low']:+.1f}%, "
                     f"{100 * b['relative_high']:+.1f}%] | {b['p_worse']:.3f} |")
    return "\n".join(lines)


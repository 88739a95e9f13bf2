"""Evaluate captions against ground-truth events with a judge, and compare evaluations.

    python -m src.evaluate --ckpt checkpoints/sft/final --data data/synthav/test.jsonl [--judge synth|llm|hf]
        [--passes 7] [--out DIR] [--limit N] [--batch-size 32] [--max-new-tokens 96] [--num-beams 4]
        [--length-penalty 1.0]
    python -m src.evaluate --data TEST.jsonl --pred preds.jsonl --out DIR ...      # judge captions made elsewhere
    python -m src.evaluate ... --judge llm --judge-model gpt-4.1 [--base-url URL] [--api-key-env OPENAI_API_KEY]
        [--concurrency 8] [--judge-config judge.yaml] [--extract-events]
    python -m src.evaluate ... --judge hf --judge-path checkpoints/Qwen2.5-7B-Instruct [--judge-device cuda]
    python -m src.evaluate --compare DIR1 DIR2 ... [--labels A B ...] [--plot compare.png]

Captions every row of the manifest by beam search (4 beams by default, --num-beams 1: greedy; the caption CLI's
code) or reads them from --pred (JSON lines with "id" (or "video", as `python -m src.caption --manifest M --json`
prints it) and "caption", optionally "finished"), judges each caption against the row's ``events``
(--extract-events first asks the llm/hf judge for the events of rows that have none), prints the rates, and writes
to --out (default: the checkpoint directory):

    results.json        {"miss", "incorrect", "hallucination", "eer", "repetition", "n_clips", "judge"}
    eval.json           the same dict under the name earlier `make sft` runs wrote
    samples.jsonl       per clip: caption, counts, the judge's missed / incorrect / hallucinated lists, status
    judge.json          judge settings (never a key), the captions' decoding settings (none with --pred), rates of
                        every pass, the reported pass, answer statistics
    report.md           rates table, passes, judge answer statistics, the worst clips
    preds.jsonl         the judged captions (judge them again with --pred, without captioning)
    events.jsonl        with --extract-events: the manifest with its extracted events
    judge_cache.sqlite  llm / hf judges: every answer, so a re-run or a crashed run never asks twice

--compare prints the rates of finished evaluations side by side and, for two or more of the same clips, each one's EER
change against the first with a 95% paired bootstrap interval over the clips (the same clips drawn for both runs;
it says whether a change is larger than which clips happen to be in the test split, not whether another training run
would reproduce it).

Rates are micro-averaged fractions of the ground-truth events; EER = miss + incorrect + hallucination. With
--passes N the judge runs N independent passes and the pass with the median EER is reported (the authors' protocol,
N = 7; the lower median for even N). The llm judge's key is read from the environment variable named by
--api-key-env (or api_key_env in --judge-config); it is never written anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from src.data.errors import BadSampleError
from src.data.manifest import read_manifest, write_manifest
from src.judge.base import STATUSES, Judge, JudgeError
from src.judge.cache import CACHE_FILE
from src.judge.factory import JUDGE_NAMES, check_settings, make_judge
from src.judge.metric import rates
from src.judge.plot import default_label, plot_compare
from src.judge.report import eer_change_table, load_clip_counts, load_result, rates_table, report_markdown

RESULT_KEYS = ("miss", "incorrect", "hallucination", "eer", "repetition", "n_clips", "judge")
# How an evaluation split is captioned (here and in the MrDPO callback's per-round evaluation): beam search, 4 beams,
# finished captions ranked by mean log-prob. On the tiny SFT export it gave test EER 55.5% against greedy's 57.3% and
# val 53.4% against 56.9% (bench/RESULTS.md, "Decoding"), for 1-4 s more per 200 clips on the CPU.
EVAL_MAX_NEW_TOKENS, EVAL_NUM_BEAMS, EVAL_LENGTH_PENALTY = 96, 4, 1.0


def format_rates(result: dict) -> str:
    return (f"miss {result['miss']:.1%}  incorrect {result['incorrect']:.1%}  hallucination "
            f"{result['hallucination']:.1%}  EER {result['eer']:.1%}  repetition {result['repetition']:.1%}  "
            f"({result['n_clips']} clips)")


@dataclass
class Evaluation:
    """One judged set. ``result``: the reported pass's rates (RESULT_KEYS); ``passes``: every pass's rates;
    ``samples``: per-clip records of the reported pass; ``statuses``: ok / fallback / failed judgements over all
    passes; ``stats``: the judge's counters (requests sent, cache hits)."""

    result: dict
    passes: list[dict]
    chosen_pass: int
    samples: list[dict]
    judge: dict
    statuses: dict
    stats: dict


# ---------------------------------------------------------------------------------------------------- captions

@torch.no_grad()
def generate_captions(model, processor, rows: Sequence, manifest: str | os.PathLike, *, batch_size: int = 32,
                      max_new_tokens: int = EVAL_MAX_NEW_TOKENS, num_beams: int = EVAL_NUM_BEAMS,
                      length_penalty: float = EVAL_LENGTH_PENALTY) -> dict[str, dict]:
    """Greedy (``num_beams`` 1) or beam-search captions of ``rows``: id -> {"caption", "finished"}. Any unreadable
    clip is an error (an evaluation over a silently shrunken test set would not be comparable)."""
    from src.caption import caption_jobs, row_jobs
    from src.models.generate import GenerationSettings

    errors: list[str] = []
    jobs = row_jobs(processor, rows, None, errors)
    if errors:
        raise BadSampleError(manifest, f"{len(errors)} clips cannot be read: " + "; ".join(errors[:5]))
    settings = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty)
    return {result["key"]: {"caption": result["caption"], "finished": result["finished"]}
            for result in caption_jobs(model, processor, jobs, settings, batch_size=batch_size)}


def read_predictions(path: str | os.PathLike, rows: Sequence, *, all_ids: set[str] | None = None) -> dict[str, dict]:
    """Captions for ``rows`` from a JSONL file: id -> {"caption", "finished"}; ValueError listing every bad line as
    path:line (bad JSON, missing id or caption, duplicate or unknown id) and the rows left without a caption.
    ``all_ids``: the manifest's ids when ``rows`` is a --limit prefix (other manifest ids are then skipped)."""
    path = os.fspath(path)
    known = all_ids if all_ids is not None else {row.id for row in rows}
    wanted = {row.id for row in rows}
    preds, first_line, errors = {}, {}, []
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as err:
        raise ValueError(f"{path}: cannot read predictions: {err.strerror or err}") from None
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            errors.append(f"{path}:{lineno}: invalid JSON line ({err})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            continue
        key = obj.get("id", obj.get("video"))
        caption, finished = obj.get("caption"), obj.get("finished")
        if not isinstance(key, str) or not key:
            errors.append(f"{path}:{lineno}: needs a string 'id' (or 'video')")
        elif not isinstance(caption, str):
            errors.append(f"{path}:{lineno}: 'caption' must be a string, got {type(caption).__name__}")
        elif finished is not None and not isinstance(finished, bool):
            errors.append(f"{path}:{lineno}: 'finished' must be true or false")
        elif key in first_line:
            errors.append(f"{path}:{lineno}: duplicate id {key!r} (first on line {first_line[key]})")
        elif key not in known:
            errors.append(f"{path}:{lineno}: id {key!r} is not in the manifest")
        else:
            first_line[key] = lineno
            if key in wanted:
                preds[key] = {"caption": caption, "finished": finished}
    missing = [row.id for row in rows if row.id not in preds and row.id not in first_line]
    if missing:
        errors.append(f"{path}: no caption for {len(missing)} manifest rows: {', '.join(missing[:5])}"
                      + (" ..." if len(missing) > 5 else ""))
    if errors:
        raise ValueError("\n".join(errors[:20]) + (f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""))
    return preds


# ---------------------------------------------------------------------------------------------------- judging

def median_pass(pass_rates: Sequence[dict]) -> int:
    """Index of the pass with the median EER (the lower median for an even count; ties keep the earlier pass)."""
    order = sorted(range(len(pass_rates)), key=lambda i: (_sort_key(pass_rates[i]["eer"]), i))
    return order[(len(order) - 1) // 2]


def _sort_key(value: float) -> float:
    return math.inf if math.isnan(value) else value


def judge_captions(rows: Sequence, preds: dict[str, dict], judge: Judge, *, passes: int = 1,
                   progress: bool = False) -> Evaluation:
    """Judge every row's caption ``passes`` times; report the median-EER pass."""
    missing = [row.source for row in rows if not row.events]
    if missing:
        raise ValueError(f"{len(missing)} rows have no ground-truth events and cannot be judged (use "
                         f"--extract-events with an llm or hf judge): {', '.join(missing[:5])}")
    items = [(preds[row.id]["caption"], list(row.events)) for row in rows]
    details = [judge.judge_batch(items, pass_index=p, progress=progress) for p in range(passes)]
    pass_rates = [{**rates(d.counts for d in pass_details), "judge": judge.label} for pass_details in details]
    chosen = median_pass(pass_rates)
    samples = []
    for row, detail in zip(rows, details[chosen]):
        sample = {"id": row.id, "caption": preds[row.id]["caption"], "finished": preds[row.id]["finished"],
                  "counts": dataclasses.asdict(detail.counts), "missed": detail.missed,
                  "incorrect": detail.incorrect, "hallucinated": detail.hallucinated, "status": detail.status,
                  "attempts": detail.attempts}
        if detail.problems:
            sample["problems"] = detail.problems
        samples.append(sample)
    counted = Counter(d.status for pass_details in details for d in pass_details)
    statuses = {status: counted.get(status, 0) for status in STATUSES}
    result = {key: pass_rates[chosen][key] for key in RESULT_KEYS}
    return Evaluation(result, pass_rates, chosen, samples, judge.describe(), statuses, judge.stats())


def _write_text(path: Path, text: str) -> None:
    """Atomic: a reader never sees half a results file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def decoding_settings(max_new_tokens: int, num_beams: int, length_penalty: float) -> dict:
    """How captions were generated, as judge.json records it (the MrDPO callback compares it before reusing an
    evaluation)."""
    return {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "length_penalty": float(length_penalty)}


def write_outputs(out: str | os.PathLike, evaluation: Evaluation, *, source: str, data: str,
                  preds: dict[str, dict], decoding: dict | None = None) -> Path:
    """results.json, eval.json, samples.jsonl, judge.json, report.md and preds.jsonl in ``out``; ``decoding``
    (decoding_settings) when the captions were generated here."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.dumps(evaluation.result, indent=2) + "\n"
    _write_text(out / "results.json", results)
    _write_text(out / "eval.json", results)
    _write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in evaluation.samples))
    _write_text(out / "preds.jsonl", "".join(json.dumps({"id": key, **pred}, ensure_ascii=False) + "\n"
                                             for key, pred in preds.items()))
    judge_info = {"judge": evaluation.judge, "source": source, "data": data, "decoding": decoding,
                  "reported_pass": evaluation.chosen_pass, "passes": evaluation.passes,
                  "judgements": evaluation.statuses, "stats": evaluation.stats}
    _write_text(out / "judge.json", json.dumps(judge_info, indent=2) + "\n")
    _write_text(out / "report.md", report_markdown(
        source=source, data=data, result=evaluation.result, judge=evaluation.judge, passes=evaluation.passes,
        chosen_pass=evaluation.chosen_pass, samples=evaluation.samples, stats=evaluation.stats))
    return out


def _open_judge(judge: str | Judge, settings: dict | None, out: Path | None) -> tuple[Judge, bool]:
    if isinstance(judge, Judge):
        return judge, False
    settings = dict(settings or {})
    if judge != "synth" and "cache" not in settings:
        settings["cache"] = None if out is None else out / CACHE_FILE
    return make_judge(judge, **settings), True


def evaluate(model, processor, manifest: str | os.PathLike, *, judge: str | Judge = "synth",
             judge_settings: dict | None = None, passes: int = 1, batch_size: int = 32,
             max_new_tokens: int = EVAL_MAX_NEW_TOKENS, num_beams: int = EVAL_NUM_BEAMS,
             length_penalty: float = EVAL_LENGTH_PENALTY, limit: int | None = None,
             out: str | os.PathLike | None = None, preds: str | os.PathLike | None = None,
             extract_events: bool = False, progress: bool = False, source: str | None = None) -> dict:
    """Caption (or read ``preds``), judge and report; returns the reported pass's rates (RESULT_KEYS).

    ``judge``: a name for make_judge (with ``judge_settings``; llm/hf answers are cached in ``out``) or a Judge.
    Writes the files listed in the module docstring to ``out`` when given.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    out = None if out is None else Path(out)
    all_rows = read_manifest(manifest, "sft", check_media=preds is None)
    rows = all_rows[:limit]
    judge_obj, owned = _open_judge(judge, judge_settings, out)
    try:
        if extract_events and any(not row.events for row in rows):
            from src.judge.extract import add_events
            from src.judge.protocol import PromptJudge

            if not isinstance(judge_obj, PromptJudge):
                raise ValueError("--extract-events needs an llm or hf judge to read the ground-truth captions")
            rows = add_events(rows, judge_obj, progress=progress)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                write_manifest(out / "events.jsonl", rows)
        if preds is not None:
            captions = read_predictions(preds, rows, all_ids={row.id for row in all_rows})
        else:
            if model is None:
                raise ValueError("give a model (--ckpt) or predictions (--pred)")
            captions = generate_captions(model, processor, rows, manifest, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, num_beams=num_beams,
                                         length_penalty=length_penalty)
        evaluation = judge_captions(rows, captions, judge_obj, passes=passes, progress=progress)
    finally:
        if owned:
            judge_obj.close()
    if out is not None:
        write_outputs(out, evaluation, source=source or os.fspath(preds or "model"), data=os.fspath(manifest),
                      preds=captions, decoding=None if preds is not None else decoding_settings(
                          max_new_tokens, num_beams, length_penalty))
    return evaluation.result


# ---------------------------------------------------------------------------------------------------- compare

def compare(directories: Sequence[str], *, labels: Sequence[str] | None = None, plot: str | os.PathLike) -> str:
    """The rates table of evaluation directories (in order) and, for two or more, each one's EER change against the
    first with a paired bootstrap interval over the clips; writes the PNG ``plot`` and a .md of both beside it."""
    if labels is not None and len(labels) != len(directories):
        raise ValueError(f"--labels gives {len(labels)} names for {len(directories)} directories")
    names = labels or [default_label(d) for d in directories]
    runs = [(label, load_result(d)) for label, d in zip(names, directories)]
    table = rates_table(runs)
    if len(directories) > 1:
        table += "\n\n" + eer_change_table([(label, load_clip_counts(d)) for label, d in zip(names, directories)])
    path = plot_compare(runs, plot)
    path.with_suffix(".md").write_text(table + "\n")
    return table


# ---------------------------------------------------------------------------------------------------- CLI

# CLI flag -> judge setting (llm: LLMSettings, hf: HFSettings, both: ProtocolSettings)
_FLAG_SETTINGS = {"judge_model": "model", "base_url": "base_url", "api_key_env": "api_key_env",
                  "judge_path": "path", "judge_device": "device", "judge_dtype": "dtype",
                  "judge_max_tokens": "max_tokens", "timeout": "timeout", "max_retries": "max_retries",
                  "concurrency": "concurrency", "parse_retries": "parse_retries",
                  "retry_temperature": "retry_temperature", "on_failure": "on_failure"}


def read_judge_config(path: str | os.PathLike) -> dict:
    """Judge settings from a JSON or YAML mapping; errors name the file (and line, for syntax errors)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the judge config: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)  # YAML 1.1 reads JSON too
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else os.fspath(path)
        raise ValueError(f"{where}: invalid judge config: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"{path}: the judge config must be a mapping of setting names to values")
    return data


def judge_settings_from_args(args: argparse.Namespace) -> dict:
    settings = read_judge_config(args.judge_config) if args.judge_config else {}
    source = os.fspath(args.judge_config) if args.judge_config else "judge settings"
    check_settings(args.judge, settings, source)
    flags = {setting: getattr(args, flag) for flag, setting in _FLAG_SETTINGS.items()
             if getattr(args, flag) is not None}
    if args.judge == "synth" and flags:
        raise ValueError(f"the synth judge takes no settings (got --{next(iter(flags))}; for an LLM judge give "
                         f"--judge llm or --judge hf)")
    check_settings(args.judge, flags, "command line")
    return {**settings, **flags}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="model directory to caption with (not needed with --pred)")
    parser.add_argument("--data", help="SFT manifest whose rows carry ground-truth events")
    parser.add_argument("--pred", help="judge these captions (JSONL: id, caption) instead of captioning")
    parser.add_argument("--judge", default="synth", choices=JUDGE_NAMES)
    parser.add_argument("--passes", type=int, default=1, help="judging passes; the median-EER pass is reported")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint directory)")
    parser.add_argument("--extract-events", action="store_true",
                        help="ask the llm/hf judge for the events of rows that have none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS)
    parser.add_argument("--num-beams", type=int, default=EVAL_NUM_BEAMS,
                        help="beam search with this many beams (1: greedy)")
    parser.add_argument("--length-penalty", type=float, default=EVAL_LENGTH_PENALTY,
                        help="beam search: rank finished captions by summed log-prob / length ** this")
    parser.add_argument("--limit", type=int, default=None, help="the first N rows only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    judge = parser.add_argument_group("llm / hf judge settings (override --judge-config)")
    judge.add_argument("--judge-config", help="JSON or YAML mapping of judge settings")
    judge.add_argument("--judge-model", help="llm: model name at the endpoint")
    judge.add_argument("--base-url", help="llm: OpenAI-compatible base URL (default https://api.openai.com/v1)")
    judge.add_argument("--api-key-env", help="llm: NAME of the environment variable holding the key (\"\": none)")
    judge.add_argument("--judge-path", help="hf: local causal-LM directory")
    judge.add_argument("--judge-device", help="hf: device (default cuda if available)")
    judge.add_argument("--judge-dtype", help="hf: auto, float32, bfloat16 or float16")
    judge.add_argument("--judge-max-tokens", type=int, help="answer length cap")
    judge.add_argument("--timeout", type=float, help="llm: seconds per HTTP request")
    judge.add_argument("--max-retries", type=int, help="llm: retries on 429 / 5xx / timeouts")
    judge.add_argument("--concurrency", type=int, help="captions judged at once")
    judge.add_argument("--parse-retries", type=int, help="re-asks after an unusable answer")
    judge.add_argument("--retry-temperature", type=float, help="temperature of re-asks (default 0)")
    judge.add_argument("--on-failure", choices=("miss", "raise"), help="a caption no answer parses for")
    comp = parser.add_argument_group("comparing evaluations")
    comp.add_argument("--compare", nargs="+", metavar="DIR", help="evaluation directories, in plot order")
    comp.add_argument("--labels", nargs="+", help="names for the --compare directories")
    comp.add_argument("--plot", help="PNG to write (default: compare.png in --out, else in the current directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        if args.data or args.ckpt or args.pred:
            parser.error("--compare reads finished evaluations; it takes no --ckpt, --data or --pred")
        plot = args.plot or os.path.join(args.out or ".", "compare.png")
        try:
            table = compare(args.compare, labels=args.labels, plot=plot)
        except ValueError as err:  # a missing or malformed results.json: the message names it
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(table)
        print(f"wrote {plot} and {Path(plot).with_suffix('.md')}", file=sys.stderr)
        return 0
    if not args.data:
        parser.error("--data is required (or --compare)")
    if not args.ckpt and not args.pred:
        parser.error("give --ckpt to caption with, or --pred with captions")
    if args.ckpt and not Path(args.ckpt, "config.json").is_file():
        parser.error(f"--ckpt {args.ckpt}: not a model directory (no config.json; make sft writes "
                     f"checkpoints/sft/final)")
    if not args.out and not args.ckpt:
        parser.error("--out is required with --pred")
    if args.num_beams < 1:
        parser.error(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.passes < 1 or (args.passes > 1 and args.judge == "synth"):
        parser.error("--passes must be >= 1, and 1 for the synth judge (exact: every pass is the same)")
    if args.extract_events and args.judge == "synth":
        parser.error("--extract-events needs --judge llm or --judge hf")
    try:
        settings = judge_settings_from_args(args)
    except ValueError as err:
        parser.error(str(err))

    model = processor = None
    if not args.pred:
        from src.models.build import load_base

        model, processor = load_base(args.ckpt)
        model.to(args.device)
    out = args.out or args.ckpt
    try:
        result = evaluate(model, processor, args.data, judge=args.judge, judge_settings=settings,
                          passes=args.passes, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          num_beams=args.num_beams, length_penalty=args.length_penalty, limit=args.limit, out=out,
                          preds=args.pred, extract_events=args.extract_events,
                          progress=not args.quiet, source=args.ckpt or args.pred)
    except (ValueError, BadSampleError) as err:  # bad manifest / predictions / config / clips: names the file
        print(f"error: {err}", file=sys.stderr)
        return 2
    except JudgeError as err:  # endpoint down, key refused, bad judge model: answers so far stay cached
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(rates_table([(args.ckpt or args.pred, result)]))
    print(f"{args.ckpt or args.pred} on {args.data}: {format_rates(result)}  [judge {result['judge']}; {out}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Caption clips with a checkpoint: one caption per clip (or K samples), batched, with a KV cache.

    python -m src.caption --ckpt checkpoints/sft/final clip.mp4 [more.mp4 ...] [--prompt P] [--max-new-tokens N]
        [--sample --temperature T --top-p P --num-samples K | --num-beams N [--length-penalty L]]
        [--batch-size B] [--seed S] [--json]
    python -m src.caption --ckpt CKPT --manifest TRAIN.jsonl --write-manifest CAPTIONS.jsonl   # for rebirth tuning

With --manifest the clips are a manifest's rows (their prompts, audio files and use_audio honoured);
--write-manifest writes those rows back as an SFT manifest whose captions are the generated ones.

Plain output: ``path<TAB>caption`` per line (whitespace runs in the caption, newlines included, become one
space); --json (the caption as generated): one JSON object per caption with the sample index, its summed
log-prob under the model, its token count and whether it emitted the end token. A clip that cannot be read is
reported on stderr with its path and reason, the others are still captioned, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from src.data.errors import BadSampleError
from src.models.generate import GenerationSettings, generate


@dataclass
class CaptionJob:
    """One clip to caption: its key (path or id), prompt, and the encoded sample (from AVProcessor.encode)."""

    key: str
    sample: dict


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def caption_jobs(model, processor, jobs: Sequence[CaptionJob], settings: GenerationSettings, *, num_samples: int = 1,
                 batch_size: int = 8, generator: torch.Generator | None = None) -> Iterator[dict]:
    """Generate ``num_samples`` captions per job, ``batch_size`` sequences at a time; yields one dict per caption:
    {"key", "sample", "caption", "logp", "tokens", "finished"}."""
    model.eval()
    device = next(model.parameters()).device
    expanded = [(job, k) for job in jobs for k in range(num_samples)]
    for group in batches(expanded, batch_size):
        batch = processor.collate([job.sample for job, _ in group], padding_side="left")
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = generate(model, batch, settings, eos_token_id=processor.eos_token_id,
                       pad_token_id=processor.pad_token_id, generator=generator)
        for row, (job, k) in enumerate(group):
            ids = out.tokens[row, :out.lengths[row]].tolist()
            if out.finished[row]:
                ids = ids[:-1]  # the end token is not part of the text
            yield {"key": job.key, "sample": k, "caption": processor.tokenizer.decode(ids, skip_special_tokens=True),
                   "logp": float(out.logps[row]), "tokens": int(out.lengths[row]), "finished": bool(out.finished[row])}


def prompt_sample(processor, video: str | None, audio: str | None = None, *, use_audio: bool = True,
                  prompt: str | None = None) -> dict:
    """Decode a clip with the processor's settings and encode it as a prompt (no response) for generation."""
    return processor.encode(processor.load_clip(video, audio, use_audio=use_audio), prompt)


def clip_jobs(processor, paths: Iterable[str], prompt: str | None, errors: list[str]) -> list[CaptionJob]:
    """Decode and encode each clip; unreadable ones go to ``errors`` as "path: reason"."""
    jobs = []
    for path in paths:
        try:
            jobs.append(CaptionJob(path, prompt_sample(processor, path, prompt=prompt)))
        except BadSampleError as err:
            errors.append(str(err))
    return jobs


def row_jobs(processor, rows, prompt: str | None, errors: list[str]) -> list[CaptionJob]:
    """Manifest rows -> jobs keyed by row id; unreadable rows go to ``errors`` as "file:line: path: reason"."""
    jobs = []
    for row in rows:
        try:
            jobs.append(CaptionJob(row.id, prompt_sample(processor, row.video, row.audio, use_audio=row.use_audio,
                                                         prompt=prompt or row.prompt)))
        except BadSampleError as err:
            errors.append(f"{row.source}: {err}")
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model directory (src.models.build or a training export)")
    parser.add_argument("clips", nargs="*", help="video (or audio-only) files")
    parser.add_argument("--manifest", help="caption the rows of this manifest instead of (or besides) the clips")
    parser.add_argument("--write-manifest", help="write the rows with their generated captions (needs --manifest)")
    parser.add_argument("--prompt", default=None, help="default: the checkpoint's processor prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: rank finished captions by summed log-prob / length ** this")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of path<TAB>caption")
    args = parser.parse_args(argv)
    if args.num_samples > 1 and not args.sample:
        parser.error("--num-samples > 1 needs --sample (greedy decoding gives one caption)")
    if args.num_beams < 1 or (args.num_beams > 1 and args.sample):
        parser.error("--num-beams must be >= 1, and 1 with --sample (beam search does not sample)")
    if not args.clips and not args.manifest:
        parser.error("give clips or --manifest")
    if args.write_manifest and (not args.manifest or args.num_samples != 1):
        parser.error("--write-manifest needs --manifest and one sample per clip")

    from src.models.build import load_base  # heavy import after argument errors

    model, processor = load_base(args.ckpt)
    model.to(args.device)
    errors: list[str] = []
    jobs = clip_jobs(processor, args.clips, args.prompt, errors)
    rows = {}
    if args.manifest:
        from src.data.manifest import read_manifest

        rows = {row.id: row for row in read_manifest(args.manifest, "sft")}
        jobs += row_jobs(processor, rows.values(), args.prompt, errors)
    captions: dict[str, str] = {}
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
                                  length_penalty=args.length_penalty)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for result in caption_jobs(model, processor, jobs, settings, num_samples=args.num_samples,
                               batch_size=args.batch_size, generator=generator):
        captions[result["key"]] = result["caption"]
        if args.json:
            print(json.dumps({"video": result.pop("key"), **result}, ensure_ascii=False), flush=True)
        else:
            print(f"{result['key']}\t{' '.join(result['caption'].split())}", flush=True)
    if args.write_manifest:
        from src.data.manifest import write_manifest

        written = [dataclasses.replace(row, caption=captions[key]) for key, row in rows.items() if key in captions]
        write_manifest(args.write_manifest, written)
        print(f"wrote {len(written)} rows to {args.write_manifest}", file=sys.stderr)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Caption clips with a checkpoint: one caption per clip (or K samples), batched, with a KV cache.

    python -m src.caption --ckpt checkpoints/sft/final clip.mp4 [more.mp4 ...] [--prompt P] [--max-new-tokens N]
        [--sample --temperature T --top-p P --num-samples K] [--batch-size B] [--seed S] [--json]

Plain output: ``path<TAB>caption`` per line (whitespace runs in the caption, newlines included, become one
space); --json (the caption as generated): one JSON object per caption with the sample index, its summed
log-prob under the model, its token count and whether it emitted the end token. A clip that cannot be read is
reported on stderr with its path and reason, the others are still captioned, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from src.data.errors import BadSampleError
from src.data.media import load_clip
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


def clip_jobs(processor, paths: Iterable[str], prompt: str | None, errors: list[str]) -> list[CaptionJob]:
    """Decode and encode each clip; unreadable ones go to ``errors`` as "path: reason"."""
    jobs = []
    for path in paths:
        try:
            clip = load_clip(path, sampling=processor.settings.sampling,
                             sample_rate=processor.settings.audio.sample_rate)
        except BadSampleError as err:
            errors.append(str(err))
            continue
        jobs.append(CaptionJob(path, processor.encode(clip, prompt)))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="model directory (src.models.build or a training export)")
    parser.add_argument("clips", nargs="+", help="video (or audio-only) files")
    parser.add_argument("--prompt", default=None, help="default: the checkpoint's processor prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of path<TAB>caption")
    args = parser.parse_args(argv)
    if args.num_samples > 1 and not args.sample:
        parser.error("--num-samples > 1 needs --sample (greedy decoding gives one caption)")

    from src.models.build import load_base  # heavy import after argument errors

    model, processor = load_base(args.ckpt)
    model.to(args.device)
    errors: list[str] = []
    jobs = clip_jobs(processor, args.clips, args.prompt, errors)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for result in caption_jobs(model, processor, jobs, settings, num_samples=args.num_samples,
                               batch_size=args.batch_size, generator=generator):
        if args.json:
            print(json.dumps({"video": result.pop("key"), **result}, ensure_ascii=False), flush=True)
        else:
            print(f"{result['key']}\t{' '.join(result['caption'].split())}", flush=True)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny base: parameters per part, and forward / forward+backward tokens/s on CPU for batches of real SynthAV clips.

Builds the tiny base (src.models.build.build_tiny, float32, sdpa attention) and loads it back with load_base;
generates SynthAV clips (4 s, 56x56, 8 fps, 16 kHz AAC), decodes and encodes each with the base's AVProcessor
(frame every 0.25 s at 56x56, Whisper log-mel, chat template, caption as the response) and pads batches with its
collate. For batch sizes 1, 8 and 32 (the first clips of the set), times the whole model (vision tower, Whisper
encoder, aligner, LLM, LM head, loss on the labels):

- forward: eval mode, torch.no_grad();
- forward+backward: train mode, loss.backward(), grads cleared (set to None) before each step, no optimizer.

tokens = non-padding tokens of the batch (attention_mask.sum()). After warm-up steps, the median of the timed
repeats. Decoding and encoding are done once, before timing.

    python bench/model_forward.py [--clips 32] [--batch-sizes 1 8 32] [--warmup 3] [--repeats 10] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from src.data.manifest import read_manifest  # noqa: E402
from src.data.synth.generate import generate  # noqa: E402
from src.models.av_llm import parameter_summary  # noqa: E402
from src.models.build import build_tiny, load_base  # noqa: E402


def tokens_per_sample(samples: list[dict], processor) -> dict:
    """Visual, audio and text tokens of each sample (text: every other token, chat template included; response:
    the part of the text that is learned, the caption and its end token)."""
    counts = {"visual": [], "audio": [], "text": [], "response": [], "total": []}
    for s in samples:
        ids = s["input_ids"]
        visual = int((ids == processor.video_token_id).sum())
        audio = int((ids == processor.audio_token_id).sum())
        for key, n in (("visual", visual), ("audio", audio), ("text", ids.numel() - visual - audio),
                       ("response", int((s["labels"] != -100).sum())), ("total", ids.numel())):
            counts[key].append(n)
    return {key: {"mean": round(statistics.mean(v), 1), "min": min(v), "max": max(v)} for key, v in counts.items()}


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat); None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores kept busy by other processes while timing (machine busy time minus this process's CPU time): a
    shared machine's other jobs skew the figures, most of all with every core used by torch threads."""

    def __enter__(self):
        self.busy, self.own, self.wall = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy = busy_cpu_seconds()
        wall = time.perf_counter() - self.wall
        self.cores = None if busy is None else max(0.0, (busy - self.busy - (sum(os.times()[:2]) - self.own)) / wall)


def median_seconds(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, batch: dict, warmup: int, repeats: int) -> dict:
    tokens = int(batch["attention_mask"].sum())

    def forward():
        with torch.no_grad():
            model(**batch)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    model.eval()
    fwd = median_seconds(forward, warmup, repeats)
    model.train()
    fwd_bwd = median_seconds(forward_backward, warmup, repeats)
    model.zero_grad(set_to_none=True)
    model.eval()
    b, length = batch["input_ids"].shape
    return {"batch_size": b, "padded_length": length, "tokens": tokens,
            "padding_fraction": round(1 - tokens / (b * length), 3),
            "forward_ms": round(fwd * 1e3, 1), "forward_tokens_per_s": round(tokens / fwd),
            "forward_backward_ms": round(fwd_bwd * 1e3, 1), "forward_backward_tokens_per_s": round(tokens / fwd_bwd),
            "forward_backward_over_forward": round(fwd_bwd / fwd, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=32, help="SynthAV clips to generate (>= largest batch)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    if max(args.batch_sizes) > args.clips:
        parser.error(f"--clips {args.clips} is fewer than the largest batch size {max(args.batch_sizes)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        model, processor = load_base(build_tiny(tmp / "tiny-base"))
        build_s = time.perf_counter() - start
        generate(tmp / "synthav", {"train": args.clips}, seed=0, workers=1)
        rows = read_manifest(tmp / "synthav" / "train.jsonl")
        start = time.perf_counter()
        samples = [processor(row) for row in rows]
        encode_s = time.perf_counter() - start
    params = parameter_summary(model)
    per_sample = tokens_per_sample(samples, processor)
    with OtherLoad() as other:
        results = [measure(model, processor.collate(samples[:b]), args.warmup, args.repeats)
                   for b in args.batch_sizes]
    load = ("other processes' load while timing: unknown" if other.cores is None else
            f"other processes kept {other.cores:.2f} of {os.cpu_count()} cores busy while timing")

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch threads ({'--threads' if args.threads else 'torch default'})")
    if args.json:
        print(json.dumps({"machine": machine, "threads": torch.get_num_threads(), "other_load_cores":
                          None if other.cores is None else round(other.cores, 2), "dtype": str(model.dtype),
                          "build_and_load_s": round(build_s, 2),
                          "decode_and_encode_s_per_clip": round(encode_s / len(samples), 4), "parameters": params,
                          "tokens_per_sample": per_sample, "warmup": args.warmup, "repeats": args.repeats,
                          "results": results}, indent=2))
        return
    print(f"machine: {machine}; {model.dtype}; median of {args.repeats} after {args.warmup} warm-up; {load}\n")
    print("| part | parameters |")
    print("|---|---|")
    for name, n in params.items():
        print(f"| {name} | {n:,} |")
    print(f"\ntokens per SynthAV sample (mean, min-max over {len(samples)} clips): "
          + ", ".join(f"{k} {v['mean']} ({v['min']}-{v['max']})" for k, v in per_sample.items()))
    print("\n| batch | tokens | padding | forward ms | forward tokens/s | fwd+bwd ms | fwd+bwd tokens/s | "
          "fwd+bwd / fwd |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch_size']} | {r['tokens']:,} | {r['padding_fraction']:.1%} | {r['forward_ms']} | "
              f"{r['forward_tokens_per_s']:,} | {r['forward_backward_ms']} | "
              f"{r['forward_backward_tokens_per_s']:,} | {r['forward_backward_over_forward']}x |")


if __name__ == "__main__":
    main()

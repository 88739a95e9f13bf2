"""The rollout's files: per-rank shards, the progress log, what is already finished (resume), and the merge.

``OUT`` (a preference manifest) holds only the videos that gave a pair; videos whose pair was dropped and
unreadable ones would be redone on every restart if that were all. So every finished video also gets one line in
``OUT.progress`` (JSON lines: id, status, reason, its samples with caption, EER, log-prob), appended after its
pair. A video is finished when either file names it: a crash between the two appends loses nothing.
A crash in the middle of an append leaves a partial last line, which :func:`prepare` cuts off first.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping

from src.data.manifest import read_manifest, repair_partial_last_line, write_manifest
from src.data.streaming import position_rank

PROGRESS_SUFFIX = ".progress"


def progress_path(out: str | os.PathLike) -> str:
    return os.fspath(out) + PROGRESS_SUFFIX


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> str:
    """Where rank ``rank`` of ``world_size`` writes: ``OUT`` itself for one process, else ``OUT`` with
    ``.rank{r}of{w}`` before its extension (ranks never append to one file together)."""
    out = os.fspath(out)
    if world_size == 1:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}.rank{rank}of{world_size}{ext}"


def prepare(out: str | os.PathLike) -> set[str]:
    """Repair both files' last lines (when present) and return the ids of the videos already finished."""
    done: set[str] = set()
    if os.path.exists(out):
        repair_partial_last_line(out)
        rows = read_manifest(out, "preference", check_media=False, allow_empty=True)
        done.update(row.id for row in rows)
    progress = progress_path(out)
    if os.path.exists(progress):
        repair_partial_last_line(progress)
        done.update(record["id"] for record in read_progress(out))
    return done


def read_progress(out: str | os.PathLike) -> list[dict]:
    """Every record of ``OUT.progress`` (one per finished video), in the order written."""
    path = progress_path(out)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_progress(out: str | os.PathLike, records: Iterable[Mapping]) -> None:
    """Append records and fsync, like :func:`src.data.manifest.append_rows` does for the pairs."""
    text = "".join(json.dumps(dict(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records)
    if not text:
        return
    path = progress_path(out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def merge_shards(out: str | os.PathLike, world_size: int, *, interleave: int | None = None,
                 seed: int | None = None) -> int:
    """Write every rank's pairs into ``OUT`` as one manifest (atomically); return the pair count.

    Call it once, on one rank, after every rank's rollout has returned. With no pairs at all nothing is
    written and 0 is returned (an empty manifest cannot be read back as training data).

    ``interleave`` N (the training DataLoader's workers per rank, 0 and 1 alike): order the pairs so that each
    rank's training stream, read in file order (no shuffle buffer), gets the pairs its own rollout made.
    Position p goes to rank ``(p % (world_size * N)) // N`` (``src.data.streaming.position_rank``), so it is filled from
    that rank's shard; once a rank's pairs run out, its positions take the others' leftovers (the rank with the
    most left first). ``seed``: each shard is shuffled with it first (the stream does not shuffle then).
    """
    if world_size == 1 and interleave is None:
        return len(read_manifest(out, "preference", check_media=False, allow_empty=True)) if os.path.exists(out) else 0
    shards = []
    for rank in range(world_size):
        path = shard_path(out, rank, world_size)
        shards.append(read_manifest(path, "preference", check_media=False, allow_empty=True)
                      if os.path.exists(path) else [])
    if interleave is None:
        rows = [row for shard in shards for row in shard]
    else:
        rows = interleave_shards(shards, max(interleave, 1), seed)
    if rows:
        write_manifest(out, rows)
    return len(rows)


def interleave_shards(shards: list[list], workers: int, seed: int | None = None) -> list:
    """The rows of every rank's shard in one list whose position p holds a row of the rank whose training stream
    reads it (``streaming.position_rank``), as far as that rank's rows last (see ``merge_shards``)."""
    queues = [list(shard) for shard in shards]
    if seed is not None:
        for rank, queue in enumerate(queues):
            random.Random(seed * 1_000_003 + rank).shuffle(queue)
    queues = [queue[::-1] for queue in queues]  # pop() from the end = the front
    rows = []
    for p in range(sum(len(queue) for queue in queues)):
        rank = position_rank(p, len(queues), workers)
        if not queues[rank]:
            rank = max(range(len(queues)), key=lambda r: (len(queues[r]), -r))
        rows.append(queues[rank].pop())
    return rows

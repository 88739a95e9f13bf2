"""JSONL manifests: schemas, reading with line-exact validation, atomic writes and durable appends.

A manifest holds one kind of row (DESIGN section 5), one JSON object per line:

- SFT row: ``{"id", "video"?, "audio"?, "use_audio"? (default true), "prompt"?, "caption", "events"?}``
- preference row: ``{"id", "video"?, "audio"?, "use_audio"?, "prompt"?, "chosen", "rejected", "gt"?,
  "ref_chosen_logp"?, "ref_rejected_logp"?, "round"?, "events"?}``

Every row names a video, an audio file or both. ``audio`` is a separate audio file; without one, a row with
``use_audio`` true takes the audio track of its video. ``prompt`` absent (null) means the recipe's default prompt.
Any other key is kept, untouched, in ``row.extra`` (SynthAV rows carry ``timeline`` there). Relative media paths
resolve against the manifest's folder; rows hold absolute paths, and writers turn paths under the output
file's folder back into relative ones, so a data folder can be moved as a whole.

Every problem is reported as ``file:line: reason``, and a file's problems are all reported at once
(:class:`ManifestErrors`), so one pass over a broken manifest shows everything to fix.

Append-only files (rollout) are written with :func:`append_rows`, one fsync per call. A crash can leave an
incomplete last line: reading reports it as an error unless ``tolerate_partial_last_line=True``, and
:func:`repair_partial_last_line` cuts it off before appending resumes.

The official video-SALMONN 2 / 2+ training JSON is converted into manifests by :mod:`src.data.official`.

Command line::

    python -m src.data.manifest check FILE.jsonl [--kind sft|preference] [--no-media]
    python -m src.data.manifest import-official IN.json --sft OUT.jsonl --pref OUT_PREF.jsonl [--media-root DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

logger = logging.getLogger(__name__)

KINDS = ("sft", "preference")
MEDIA_FIELDS = ("video", "audio")
_COMMON_FIELDS = ("id", "video", "audio", "use_audio", "prompt")
_SFT_FIELDS = _COMMON_FIELDS + ("caption", "events")
_PREFERENCE_FIELDS = _COMMON_FIELDS + (
    "chosen", "rejected", "gt", "ref_chosen_logp", "ref_rejected_logp", "round", "events")
_FIELDS = {"sft": _SFT_FIELDS, "preference": _PREFERENCE_FIELDS}
_BOM = b"\xef\xbb\xbf"
# A CLI run over a badly broken file must stay readable; the exception still holds every error.
_MAX_ERRORS_SHOWN = 50


# ---------------------------------------------------------------------------------------------------- errors

class ManifestError(ValueError):
    """A manifest (or official JSON) problem at ``path:line``; ``line`` is 1-based, None for whole-file problems."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str):
        self.path = os.fspath(path)
        self.line = line
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.reason}"

    @property
    def errors(self) -> list[ManifestError]:
        """Every problem this exception stands for, so callers can always iterate (here: just itself)."""
        return [self]


class ManifestErrors(ManifestError):
    """Several problems in one file; ``errors`` holds each, ``str`` lists them one per line."""

    def __init__(self, errors: list[ManifestError]):
        if not errors:
            raise ValueError("ManifestErrors needs at least one error")
        self._errors = list(errors)
        first = self._errors[0]
        super().__init__(first.path, first.line, f"{len(self._errors)} errors")

    def __str__(self) -> str:
        shown = [str(err) for err in self._errors[:_MAX_ERRORS_SHOWN]]
        hidden = len(self._errors) - len(shown)
        if hidden:
            shown.append(f"{self.path}: ... and {hidden} more errors")
        return "\n".join(shown)

    @property
    def errors(self) -> list[ManifestError]:
        return list(self._errors)


def _raise_collected(errors: list[ManifestError]) -> None:
    """Raise nothing, the single error, or all of them together."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ManifestErrors(errors)


class _Invalid(Exception):
    """One row is wrong; the caller adds the file and line."""


# ---------------------------------------------------------------------------------------------------- rows

class ReadOnlyDict(dict):
    """A dict that refuses changes, so a frozen row cannot be altered through ``extra``.

    A dict subclass rather than ``MappingProxyType`` because rows must pickle (data-loader workers under
    spawn/forkserver) and ``json.dumps`` must accept ``extra`` as it is.
    """

    def _refuse(self, *args, **kwargs):
        raise TypeError("row.extra is read-only; build a new row with dataclasses.replace(row, extra=...)")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return (type(self), (dict(self),))


@dataclass(frozen=True)
class SFTRow:
    """One supervised sample. Media paths are absolute; ``source`` is ``"manifest_path:line"``."""

    id: str
    video: str | None
    audio: str | None
    use_audio: bool
    prompt: str | None
    caption: str
    events: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=ReadOnlyDict)
    source: str = ""

    def __post_init__(self):
        _freeze(self)


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair for (g)DPO. ``ref_*_logp`` are summed reference log-probs when precomputed."""

    id: str
    video: str | None
    audio: str | None
    use_audio: bool
    prompt: str | None
    chosen: str
    rejected: str
    gt: str | None = None
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
    round: int | None = None
    events: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=ReadOnlyDict)
    source: str = ""

    def __post_init__(self):
        _freeze(self)


Row = Union[SFTRow, PreferenceRow]


def _freeze(row: Row) -> None:
    """Make hand-built rows as immutable as parsed ones (events a tuple, extra read-only)."""
    if row.events is not None and not isinstance(row.events, tuple):
        object.__setattr__(row, "events", tuple(row.events))
    if not isinstance(row.extra, ReadOnlyDict):
        object.__setattr__(row, "extra", ReadOnlyDict(row.extra))


def row_kind(row: Row | Mapping) -> str:
    """``"sft"`` or ``"preference"``; a mapping with ``chosen`` or ``rejected`` is a preference row."""
    if isinstance(row, PreferenceRow):
        return "preference"
    if isinstance(row, SFTRow):
        return "sft"
    return "preference" if ("chosen" in row or "rejected" in row) else "sft"


# ---------------------------------------------------------------------------------------------------- field checks

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _required_text(obj: Mapping, key: str) -> str:
    if key not in obj:
        raise _Invalid(f"missing required field {key!r}")
    return _text(obj, key)


def _text(obj: Mapping, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _Invalid(f"{key!r} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise _Invalid(f"{key!r} is empty or whitespace only")
    return value


def _optional_text(obj: Mapping, key: str) -> str | None:
    # An empty prompt or gt would quietly mean something else than "absent": ask for null instead.
    return None if obj.get(key) is None else _text(obj, key)


def _optional_bool(obj: Mapping, key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise _Invalid(f"{key!r} must be true or false, got {_type_name(value)} {value!r}")
    return value


def _optional_events(obj: Mapping) -> tuple[str, ...] | None:
    value = obj.get("events")
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Invalid(f"'events' must be a list of strings, got {_type_name(value)}")
    for i, event in enumerate(value):
        if not isinstance(event, str) or not event.strip():
            raise _Invalid(f"'events'[{i}] must be a non-empty string, got {_type_name(event)} {event!r}")
    return tuple(value)


def _optional_logp(obj: Mapping, key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int subclass; true/false here is a bug upstream, not a log-prob.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"{key!r} must be a finite number, got {_type_name(value)} {value!r}")
    return float(value)


def _optional_round(obj: Mapping) -> int | None:
    value = obj.get("round")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(f"'round' must be a non-negative integer, got {_type_name(value)} {value!r}")
    return value


def _media_path(obj: Mapping, key: str, base_dir: str, check_media: bool) -> str | None:
    """The absolute path of ``obj[key]`` (relative paths are taken from ``base_dir``), or None."""
    if obj.get(key) is None:
        return None
    raw = _text(obj, key)
    # normpath, not realpath: keep the user's symlinked layout, which write_manifest relativises against.
    path = os.path.normpath(os.path.join(base_dir, raw))
    if check_media and not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "not found"
        raise _Invalid(f"{key} file {what}: {raw!r} (resolved to {path})")
    return path


# ---------------------------------------------------------------------------------------------------- parsing

def _parse_row(obj: Any, kind: str, base_dir: str, check_media: bool, source: str) -> Row:
    """Validate one decoded JSON value and build its row; raises _Invalid with the first problem."""
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a JSON object, got {_type_name(obj)}")
    if kind == "sft" and "caption" not in obj and ("chosen" in obj or "rejected" in obj):
        raise _Invalid("missing required field 'caption' (this looks like a preference row: use kind 'preference')")
    row_id = _required_text(obj, "id")
    video = _media_path(obj, "video", base_dir, check_media)
    audio = _media_path(obj, "audio", base_dir, check_media)
    use_audio = _optional_bool(obj, "use_audio", True)
    if video is None and audio is None:
        raise _Invalid("row has neither 'video' nor 'audio'")
    if video is None and not use_audio:
        raise _Invalid("'use_audio' is false and there is no video: the row has nothing to read")
    common = dict(id=row_id, video=video, audio=audio, use_audio=use_audio, prompt=_optional_text(obj, "prompt"),
                  events=_optional_events(obj), source=source,
                  extra={k: v for k, v in obj.items() if k not in _FIELDS[kind]})
    if kind == "sft":
        return SFTRow(caption=_required_text(obj, "caption"), **common)
    return PreferenceRow(**common, **_preference_fields(obj))


def _preference_fields(obj: Mapping) -> dict:
    chosen = _required_text(obj, "chosen")
    rejected = _required_text(obj, "rejected")
    # Texts that differ only in surrounding whitespace carry no preference signal, only tokenisation noise.
    if chosen.strip() == rejected.strip():
        raise _Invalid("'chosen' and 'rejected' are the same text")
    ref_chosen = _optional_logp(obj, "ref_chosen_logp")
    ref_rejected = _optional_logp(obj, "ref_rejected_logp")
    if (ref_chosen is None) != (ref_rejected is None):
        raise _Invalid("'ref_chosen_logp' and 'ref_rejected_logp' must be given together")
    return dict(chosen=chosen, rejected=rejected, gt=_optional_text(obj, "gt"), ref_chosen_logp=ref_chosen,
                ref_rejected_logp=ref_rejected, round=_optional_round(obj))


def _check_kind(path: str | os.PathLike, kind: str) -> None:
    if kind not in KINDS:
        raise ManifestError(path, None, f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")


def _open_checked(path: str | os.PathLike):
    """Open ``path`` for binary reading, turning the usual file-system failures into whole-file errors."""
    if os.path.isdir(path):
        raise ManifestError(path, None, "is a directory, not a manifest file")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ManifestError(path, None, "file not found") from None
    except OSError as err:
        raise ManifestError(path, None, f"cannot read: {err.strerror or err}") from None


def _decode_line(raw: bytes, lineno: int) -> str:
    if lineno == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Invalid(f"invalid UTF-8 at byte {err.start + 1} of the line") from None


def _json_object_lines(path: str | os.PathLike, errors: list[ManifestError],
                       tolerate_partial_last_line: bool) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, decoded JSON value)`` for each non-blank line; bad lines go to ``errors``.

    Only a line without a trailing newline can be one a writer was cut off in; such a line that does not
    decode is reported as incomplete, or dropped with a warning when ``tolerate_partial_last_line``.
    """
    with _open_checked(path) as f:
        # Binary iteration splits on b"\n" only: str.splitlines would also split inside JSON strings (U+2028).
        for lineno, raw in enumerate(f, start=1):
            complete = raw.endswith(b"\n")
            try:
                text = _decode_line(raw.rstrip(b"\r\n"), lineno)
                if not text.strip():
                    continue
                yield lineno, _loads(text)
            except _Invalid as err:
                if complete:
                    errors.append(ManifestError(path, lineno, str(err)))
                elif tolerate_partial_last_line:
                    logger.warning("%s:%d: dropped an incomplete last line (%s)", os.fspath(path), lineno, err)
                else:
                    errors.append(ManifestError(path, lineno, (
                        f"incomplete last line, no newline at the end of the file: a writer may have stopped "
                        f"mid-row ({err}); read with tolerate_partial_last_line=True or run "
                        f"repair_partial_last_line to drop it")))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _Invalid(f"invalid JSON: {err.msg} (column {err.colno})") from None


def read_manifest(path: str | os.PathLike, kind: str = "sft", *, check_media: bool = True,
                  tolerate_partial_last_line: bool = False, allow_empty: bool = False) -> list[Row]:
    """Read and validate a whole manifest; raise :class:`ManifestError` (or ManifestErrors) naming each bad line.

    Blank lines are skipped; a UTF-8 BOM is tolerated. ``check_media`` checks that every media file exists
    (decoding is left to the dataset). ``allow_empty`` accepts a file with no rows (a fresh append-only file).
    """
    _check_kind(path, kind)
    base_dir = os.path.dirname(os.path.abspath(path))
    errors: list[ManifestError] = []
    rows: list[Row] = []
    first_line_of: dict[str, int] = {}
    for lineno, obj in _json_object_lines(path, errors, tolerate_partial_last_line):
        try:
            row = _parse_row(obj, kind, base_dir, check_media, f"{os.fspath(path)}:{lineno}")
            if row.id in first_line_of:
                raise _Invalid(f"duplicate id {row.id!r} (first on line {first_line_of[row.id]})")
        except _Invalid as err:
            errors.append(ManifestError(path, lineno, str(err)))
            continue
        first_line_of[row.id] = lineno
        rows.append(row)
    _raise_collected(errors)
    if not rows and not allow_empty:
        raise ManifestError(path, None, "empty manifest: no rows")
    return rows


# ---------------------------------------------------------------------------------------------------- writing

def _relative_if_under(path: str, folder: str) -> str:
    """``path`` relative to ``folder`` when it lies inside it, else unchanged (absolute)."""
    if os.path.isabs(path) and os.path.commonpath([path, folder]) == folder:
        return os.path.relpath(path, folder)
    return path


def row_to_dict(row: Row, relative_to: str | os.PathLike | None = None) -> dict:
    """The JSON object of ``row`` in field order, None fields left out, ``extra`` keys last.

    With ``relative_to`` (a folder), media paths inside that folder are written relative to it.
    """
    kind = row_kind(row)
    out: dict[str, Any] = {}
    for name in _FIELDS[kind]:
        value = getattr(row, name)
        if value is None:
            continue
        if name in MEDIA_FIELDS and relative_to is not None:
            value = _relative_if_under(value, os.path.abspath(relative_to))
        out[name] = list(value) if name == "events" else value
    clashes = sorted(set(row.extra) & set(_FIELDS[kind]))
    if clashes:
        raise _Invalid(f"extra keys {clashes} clash with {kind} fields")
    out.update(row.extra)
    return out


def _serialise(rows: Iterable[Row | Mapping], path: str | os.PathLike) -> list[str]:
    """Validate every row and turn it into one JSON line; all problems are raised together."""
    folder = os.path.dirname(os.path.abspath(path))
    lines: list[str] = []
    errors: list[ManifestError] = []
    kinds: set[str] = set()
    seen: set[str] = set()
    for index, item in enumerate(rows, start=1):
        kind = row_kind(item)
        kinds.add(kind)
        try:
            obj = dict(item) if isinstance(item, Mapping) else row_to_dict(item)
            # Reparse so written rows obey exactly what read_manifest accepts (media may not exist yet).
            row = _parse_row(obj, kind, folder, False, f"{os.fspath(path)}:{index}")
            if row.id in seen:
                raise _Invalid(f"duplicate id {row.id!r}")
            seen.add(row.id)
            lines.append(_dumps(row_to_dict(row, folder)))
        except _Invalid as err:
            errors.append(ManifestError(path, None, f"row {index} to write: {err}"))
    if len(kinds) > 1:
        errors.append(ManifestError(path, None, "rows mix SFT and preference rows; a manifest holds one kind"))
    _raise_collected(errors)
    return lines


def _dumps(obj: dict) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:  # an extra value that is not JSON, or NaN/inf
        raise _Invalid(f"cannot be written as JSON: {err}") from None


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself durable; not every file system lets a folder be opened, hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(path: str | os.PathLike, rows: Iterable[Row | Mapping]) -> int:
    """Validate ``rows`` and write them to ``path`` atomically (temp file, fsync, rename); return the row count.

    Mapping rows may use paths relative to the output file's folder. Media paths under that folder are
    written relative to it, others absolute. Nothing is written when a row is invalid or there are no rows.
    """
    lines = _serialise(rows, path)
    if not lines:
        raise ManifestError(path, None, "no rows to write: an empty manifest cannot be read back")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)
    return len(lines)


def _last_line_start(f, size: int) -> int:
    """Byte offset just after the last newline of an open binary file (0 when it has none)."""
    pos = size
    while pos > 0:
        step = min(1 << 16, pos)
        pos -= step
        f.seek(pos)
        found = f.read(step).rfind(b"\n")
        if found >= 0:
            return pos + found + 1
    return 0


def _ends_mid_line(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        return f.read(1) != b"\n"


def append_rows(path: str | os.PathLike, rows: Iterable[Row | Mapping]) -> None:
    """Append validated rows to ``path`` (created if missing), then flush and fsync.

    Refuses to append after an incomplete last line, which would glue the new first row onto it: call
    :func:`repair_partial_last_line` first. Ids are not checked against rows already in the file;
    :func:`read_manifest` reports duplicates.
    """
    lines = _serialise(rows, path)
    if os.path.exists(path) and _ends_mid_line(path):
        raise ManifestError(path, None, "the file does not end with a newline (a partial last row?): "
                                        "run repair_partial_last_line before appending")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab") as f:
        f.write("".join(lines).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def repair_partial_last_line(path: str | os.PathLike) -> bool:
    """Make an append-only file safe to resume; return whether it changed.

    A last line without its newline is cut off when it is not a complete JSON value (a writer stopped
    mid-row), and completed with a newline when it is (a hand-written file). The cut is logged.
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        start = _last_line_start(f, size)
        if start == size:  # ends with a newline: nothing to repair
            return False
        f.seek(start)
        tail = f.read()
        try:
            json.loads(tail.decode("utf-8-sig" if start == 0 else "utf-8"))
            f.write(b"\n")
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("%s: cut an incomplete last line of %d bytes", os.fspath(path), size - start)
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    return True


# ---------------------------------------------------------------------------------------------------- CLI

def _check_command(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            rows = read_manifest(path, args.kind, check_media=not args.no_media)
        except ManifestError as err:
            print(err, file=sys.stderr)
            status = 1
            continue
        print(f"{path}: {len(rows)} rows OK")
    return status



def main(argv: list[str] | None = None) -> int:
    # Imported here, not at the top: src.data.official imports this module for its row checks and writers.
    from src.data.official import add_import_arguments, run_import

    parser = argparse.ArgumentParser(prog="python -m src.data.manifest", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate manifests; print every file:line error")
    check.add_argument("files", nargs="+", metavar="FILE.jsonl")
    check.add_argument("--kind", choices=KINDS, default="sft")
    check.add_argument("--no-media", action="store_true", help="do not check that media files exist")
    check.set_defaults(run=_check_command)
    imp = commands.add_parser("import-official", help="convert official video-SALMONN 2/2+ training JSON")
    add_import_arguments(imp)
    imp.set_defaults(run=run_import)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

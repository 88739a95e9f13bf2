"""Import the official video-SALMONN 2 / 2+ training JSON as an SFT and a preference manifest.

The format read by :func:`import_official` was checked against
bytedance/SALMONN ``video_SALMONN2_plus/scripts/example_{av,v,a,dpo}.json`` and ``scripts/example_{sft,dpo}.json``
and the loader ``video_SALMONN2_plus/qwenvl/data/dataset.py`` (bytedance/video-SALMONN-2). What they show:

- a JSON list (``.jsonl`` is also read) of entries ``{"video"?, "audio"?, "use_audio"?, "image"?,
  "conversations": [{"from", "value"}, ...]}``; turns may also be spelled ``{"role", "content"}``;
- the human turn holds the prompt with a ``<video>`` / ``<audio>`` / ``<image>`` placeholder (``"<video>\\nPrompt"``);
- 2+ SFT: a ``gpt`` turn is the caption. 2+ DPO: ``chosen`` and ``reject`` turns, and the ``gpt`` turn there
  is the ground-truth response. The first video-SALMONN 2 (LLaVA-based) DPO file instead has
  ``gpt`` = chosen, ``reject_gpt`` = rejected and ``gt`` = ground truth; both spellings are imported;
- the official loader takes the audio track of ``video`` only when ``use_audio`` is true (absent = video only),
  and always reads a separate ``audio`` file. The importer therefore writes ``use_audio`` explicitly: the
  entry's own value, else true exactly when a separate ``audio`` is given;
- the official loader resolves media paths against the working directory; here they resolve against
  ``media_root`` or, without it, the JSON file's folder. Entries have no ids: ``id`` is kept when present,
  else ``<json stem>-<index>``. Image entries, several videos per entry and multi-turn conversations are
  refused with an error rather than imported partly.

Rows are checked and written by :mod:`src.data.manifest`, exactly as a hand-written manifest would be.

Command line (``python -m src.data.manifest import-official`` takes the same arguments)::

    python -m src.data.official IN.json --sft OUT.jsonl --pref OUT_PREF.jsonl [--media-root DIR] [--no-media]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from src.data.manifest import (
    _FIELDS,
    ManifestError,
    Row,
    _Invalid,
    _json_object_lines,
    _open_checked,
    _parse_row,
    _raise_collected,
    _type_name,
    write_manifest,
)

_PLACEHOLDER = re.compile(r"\s*<(?:video|image|audio)>\s*")
_JSON_WS = re.compile(r"[ \t\n\r]*")
_TURN_ROLES = ("human", "gpt", "chosen", "reject", "reject_gpt", "gt")
_OFFICIAL_KEYS = ("id", "video", "audio", "use_audio", "conversations")


def strip_placeholders(text: str) -> str:
    """The human turn without ``<video>``/``<image>``/``<audio>``; a placeholder inside a line becomes a space."""
    def join(match: re.Match) -> str:
        return "\n" if "\n" in match.group(0) else " "
    return _PLACEHOLDER.sub(join, text).strip()


def _official_entries(json_path: str | os.PathLike, errors: list[ManifestError]) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(index, line, entry)`` from a JSON list or a JSONL file (the official loader reads both).

    Bad JSONL lines go to ``errors``; a syntax error in a JSON list ends the file, so it is raised.
    """
    if os.fspath(json_path).endswith(".jsonl"):
        yield from ((i, line, obj) for i, (line, obj) in enumerate(_json_object_lines(json_path, errors, False)))
        return
    with _open_checked(json_path) as f:
        try:
            text = f.read().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ManifestError(json_path, None, f"invalid UTF-8 at byte {err.start + 1}") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(json_path, err.lineno, f"invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(entries, list):
        raise ManifestError(json_path, None, f"expected a JSON list of entries, got {_type_name(entries)}")
    yield from zip(range(len(entries)), _entry_lines(text), entries)


def _entry_lines(text: str) -> Iterator[int]:
    """The line on which each element of a (valid) top-level JSON list starts."""
    decoder = json.JSONDecoder()
    pos = _JSON_WS.match(text, 0).end() + 1  # just after "["
    line, counted_to = 1, 0
    while True:
        pos = _JSON_WS.match(text, pos).end()
        if text.startswith("]", pos):
            return
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        yield line
        _, pos = decoder.raw_decode(text, pos)
        pos = _JSON_WS.match(text, pos).end()
        pos += text.startswith(",", pos)


def _turns(entry: Mapping) -> dict[str, str]:
    """The entry's turns by role, checking there is one prompt and one of each response role."""
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _Invalid("'conversations' must be a non-empty list of turns")
    turns: dict[str, str] = {}
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _Invalid(f"turn {i} is not an object")
        role, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if role not in _TURN_ROLES:
            raise _Invalid(f"turn {i} has role {role!r}; expected one of {', '.join(_TURN_ROLES)}")
        if not isinstance(value, str):
            raise _Invalid(f"turn {i} ({role}) value must be a string, got {_type_name(value)}")
        if role in turns:
            raise _Invalid(f"more than one {role!r} turn: multi-turn conversations are not supported")
        turns[role] = value
    if "human" not in turns:
        raise _Invalid("no 'human' turn (the prompt)")
    return turns


def _responses(turns: Mapping[str, str]) -> tuple[str, dict]:
    """Kind and response fields: 2+ (gpt = gt, chosen, reject) or first-generation (gpt, reject_gpt, gt)."""
    if "chosen" in turns or "reject" in turns:
        if not ("chosen" in turns and "reject" in turns):
            raise _Invalid("a preference entry needs both a 'chosen' and a 'reject' turn")
        return "preference", {"chosen": turns["chosen"], "rejected": turns["reject"], "gt": turns.get("gpt")}
    if "reject_gpt" in turns:
        if "gpt" not in turns:
            raise _Invalid("a 'reject_gpt' turn needs a 'gpt' turn (the chosen response)")
        return "preference", {"chosen": turns["gpt"], "rejected": turns["reject_gpt"], "gt": turns.get("gt")}
    if "gpt" not in turns:
        raise _Invalid("no response turn: expected 'gpt', or 'chosen' and 'reject'")
    return "sft", {"caption": turns["gpt"]}


def _single_media(entry: Mapping, key: str) -> Any:
    value = entry.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise _Invalid(f"{len(value)} {key} files in one entry: only one per entry is supported")
        value = value[0]
    return value


def _official_to_manifest(entry: Any, index: int, stem: str) -> tuple[str, dict]:
    """Kind and manifest object (paths as in the entry) of one official entry."""
    if not isinstance(entry, dict):
        raise _Invalid(f"expected an object, got {_type_name(entry)}")
    if "image" in entry:
        raise _Invalid("image entries are not supported (video and audio only)")
    turns = _turns(entry)
    kind, responses = _responses(turns)
    entry_id = entry.get("id", f"{stem}-{index}")
    if isinstance(entry_id, int) and not isinstance(entry_id, bool):
        entry_id = str(entry_id)
    audio = _single_media(entry, "audio")
    use_audio = entry.get("use_audio", audio is not None)
    if use_audio is False and audio is not None:
        raise _Invalid("'use_audio' is false but a separate 'audio' file is given (the official loader reads it)")
    # A prompt that was only a placeholder becomes null, i.e. the recipe's default prompt.
    prompt = strip_placeholders(turns["human"]) or None
    clashes = sorted(k for k in entry if k not in _OFFICIAL_KEYS and k in _FIELDS[kind])
    if clashes:
        raise _Invalid(f"entry keys {clashes} clash with manifest fields")
    extra = {k: v for k, v in entry.items() if k not in _OFFICIAL_KEYS}
    obj = {"id": entry_id, "video": _single_media(entry, "video"), "audio": audio, "use_audio": use_audio,
           "prompt": prompt, **responses, **extra}
    return kind, obj


def import_official(json_path: str | os.PathLike, out_sft: str | os.PathLike | None,
                    out_pref: str | os.PathLike | None, *, media_root: str | os.PathLike | None = None,
                    check_media: bool = True) -> tuple[int, int]:
    """Convert an official video-SALMONN 2/2+ training JSON into an SFT and a preference manifest.

    Returns ``(n_sft, n_pref)``. Every bad entry is reported (file, line, ``entry <index>``) and nothing is
    written then. A kind with rows but no output path is an error rather than a silent drop; a kind with no
    rows writes no file.
    """
    base_dir = os.path.abspath(media_root if media_root is not None else os.path.dirname(os.path.abspath(json_path)))
    stem = os.path.splitext(os.path.basename(json_path))[0]
    rows: dict[str, list[Row]] = {"sft": [], "preference": []}
    first_line_of: dict[tuple[str, str], int] = {}
    errors: list[ManifestError] = []
    for index, line, entry in _official_entries(json_path, errors):
        try:
            kind, obj = _official_to_manifest(entry, index, stem)
            row = _parse_row(obj, kind, base_dir, check_media, f"{os.fspath(json_path)}:{line}")
            if (kind, row.id) in first_line_of:
                raise _Invalid(f"duplicate id {row.id!r} (first on line {first_line_of[kind, row.id]})")
        except _Invalid as err:
            errors.append(ManifestError(json_path, line, f"entry {index}: {err}"))
            continue
        first_line_of[kind, row.id] = line
        rows[kind].append(row)
    for kind, out, option in (("sft", out_sft, "out_sft (--sft)"), ("preference", out_pref, "out_pref (--pref)")):
        if rows[kind] and out is None:
            errors.append(ManifestError(json_path, None, f"{len(rows[kind])} {kind} entries but no {option} given"))
    _raise_collected(errors)
    if not rows["sft"] and not rows["preference"]:
        raise ManifestError(json_path, None, "no entries")
    for kind, out in (("sft", out_sft), ("preference", out_pref)):
        if rows[kind]:
            write_manifest(out, rows[kind])
    return len(rows["sft"]), len(rows["preference"])


# ---------------------------------------------------------------------------------------------------- CLI

def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """The import command's arguments; shared with ``python -m src.data.manifest import-official``."""
    parser.add_argument("json", metavar="IN.json")
    parser.add_argument("--sft", help="output SFT manifest (.jsonl)")
    parser.add_argument("--pref", help="output preference manifest (.jsonl)")
    parser.add_argument("--media-root", help="folder that relative media paths start from (default: the JSON's)")
    parser.add_argument("--no-media", action="store_true", help="do not check that media files exist")


def run_import(args: argparse.Namespace) -> int:
    """Run the import for parsed :func:`add_import_arguments` arguments; print a summary, return the exit status."""
    try:
        n_sft, n_pref = import_official(args.json, args.sft, args.pref, media_root=args.media_root,
                                        check_media=not args.no_media)
    except ManifestError as err:
        print(err, file=sys.stderr)
        return 1
    for n, out, what in ((n_sft, args.sft, "SFT"), (n_pref, args.pref, "preference")):
        print(f"{args.json}: {n} {what} rows" + (f" -> {out}" if n else " (no file written)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.data.official", description=__doc__.split("\n")[0])
    add_import_arguments(parser)
    return run_import(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

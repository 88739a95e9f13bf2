"""Errors that mark one sample as bad without saying anything about the rest of the data.

The streaming dataset catches exactly these (never a bare Exception, which would hide bugs): the sample is
reported with its path and reason, counted, written to the quarantine list and skipped, or re-raised when
the run says ``on_bad_sample: raise``.
"""

from __future__ import annotations

import os


class BadSampleError(Exception):
    """One sample cannot be used. ``path`` names the offending file, ``reason`` says why in words."""

    def __init__(self, path: str | os.PathLike | None, reason: str | None = None):
        if reason is None:
            # One argument: a whole message. DataLoader re-raises a worker's exception as type(err)(message),
            # which keeps the type (and the path, inside the message) in the main process.
            path, reason = None, str(path)
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

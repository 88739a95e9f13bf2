"""Every module under src/ imports (a broken import or a missing dependency fails here, not mid-run)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import src


def all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(src.__path__, "src."))


def test_there_are_modules():
    assert {"src.data.media", "src.data.streaming", "src.judge.synth"} <= set(all_modules())


@pytest.mark.parametrize("name", all_modules())
def test_module_imports(name):
    importlib.import_module(name)

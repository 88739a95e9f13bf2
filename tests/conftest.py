"""Shared fixtures. Media is generated here, never downloaded; tests stay on CPU and offline."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores in CI: one torch thread per test process keeps DataLoader workers and spawned ranks from fighting.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """One random tiny base (src.models.build.build_tiny, a 300-caption tokenizer) for the whole session: tests
    load it and never write into it."""
    from src.models.build import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-base"), tokenizer_texts=300)


@pytest.fixture(scope="session")
def synthav(tmp_path_factory):
    """A small SynthAV set (8 train, 2 val, 2 test clips, seed 0): the folder, with {split}.jsonl inside."""
    from src.data.synth.generate import generate

    out = tmp_path_factory.mktemp("synthav")
    generate(out, {"train": 8, "val": 2, "test": 2}, seed=0, workers=1)
    return out

"""Pause points for the MrDPO kill test (tests/test_mrdpo.py), importable by a `python -m src.fit` subprocess.

A run started with MRDPO_PAUSE set stops at that point, writes the file named by MRDPO_PAUSE_MARKER and sleeps
until the test kills it with SIGKILL: the kill lands at a known place (no timing race) and is still a real kill
(no exception, no clean-up, nothing flushed). Without MRDPO_PAUSE these classes change nothing.

    MRDPO_PAUSE=rollout:R:N   in round R's rollout, when the judge is asked for its N-th batch (one batch per group
                              of videos: N - 1 groups are finished and written)
    MRDPO_PAUSE=step:S        after optimizer step S, before that step's checkpoint is written
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl

from src.callbacks.mrdpo import MultiRoundDPO

PAUSE, MARKER = "MRDPO_PAUSE", "MRDPO_PAUSE_MARKER"


def pause_point() -> tuple[str, list[int]] | None:
    value = os.environ.get(PAUSE)
    if not value:
        return None
    kind, *numbers = value.split(":")
    return kind, [int(n) for n in numbers]


def pause_here(where: str) -> None:
    Path(os.environ[MARKER]).write_text(where)
    while True:  # until SIGKILL
        time.sleep(1)


class PauseAtStep(pl.Callback):
    """Pauses after optimizer step S. Listed before the ModelCheckpoint callbacks (Lightning runs those last), so
    step S's checkpoint is never written."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        point = pause_point()
        if point is not None and point[0] == "step" and trainer.global_step == point[1][0]:
            pause_here(f"step {trainer.global_step}")


class PausingJudge:
    """A judge that pauses on its ``calls``-th ``score_batch``."""

    def __init__(self, judge, calls: int):
        self.judge, self.calls = judge, calls

    @property
    def label(self) -> str:
        return self.judge.label

    def score_batch(self, items, **kwargs):
        self.calls -= 1
        if self.calls == 0:
            pause_here("rollout")
        return self.judge.score_batch(items, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.judge.close()


class PausableMultiRoundDPO(MultiRoundDPO):
    """MultiRoundDPO whose rollout judge pauses where MRDPO_PAUSE=rollout:R:N says."""

    def build_judge(self, cache, *, purpose: str, index: int):
        judge = super().build_judge(cache, purpose=purpose, index=index)
        point = pause_point()
        if point is not None and point[0] == "rollout" and purpose == "rollout" and index == point[1][0]:
            return PausingJudge(judge, point[1][1])
        return judge

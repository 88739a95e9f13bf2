"""Caption judges and the judge-agnostic caption metric (METHOD.md "Caption metric").

``metric``: EventCounts, deloop, repetition counting and micro-averaged rates, shared by every judge.
``synth``: SynthJudge, the exact judge for SynthAV captions (parses them with the SynthAV grammar).
"""

from src.judge.metric import EventCounts, deloop, rates, repetition_counts
from src.judge.synth import ScoreDetail, SynthJudge

__all__ = ["EventCounts", "ScoreDetail", "SynthJudge", "deloop", "rates", "repetition_counts"]

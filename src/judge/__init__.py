"""Caption judges and the judge-agnostic caption metric (METHOD.md "Caption metric").

``metric``: EventCounts, deloop, repetition counting and micro-averaged rates, shared by every judge.
``base``: the Judge interface (score / score_detail / score_batch / judge_batch) and ScoreDetail.
``synth``: SynthJudge, the exact judge for SynthAV captions (parses them with the SynthAV grammar).
``protocol``: PromptJudge, the authors' LLM-judge protocol (retries, counts-only fallback, failure policy) over
a chat backend: ``llm`` (OpenAI-compatible HTTP endpoint) or ``hf`` (local Hugging Face causal LM).
``prompts`` / ``answers``: what the LLM judges are asked and how their answers are validated.
``cache``: SQLite answer cache; ``extract``: atomic events from ground-truth captions.
``report`` / ``plot``: the markdown report, rates tables and the comparison PNG.
``factory.make_judge(name, **settings)`` (or a typed ``JudgeConfig`` in a recipe) builds any of them.
"""

from src.judge.base import Judge, JudgeError, ScoreDetail
from src.judge.factory import JUDGE_NAMES, JudgeConfig, make_judge
from src.judge.metric import EventCounts, deloop, rates, repetition_counts
from src.judge.synth import SynthJudge

__all__ = ["EventCounts", "JUDGE_NAMES", "Judge", "JudgeConfig", "JudgeError", "ScoreDetail", "SynthJudge", "deloop",
           "make_judge", "rates", "repetition_counts"]

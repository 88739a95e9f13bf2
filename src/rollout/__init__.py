"""MrDPO rollout (METHOD.md "MrDPO", step 2; DESIGN section 4): sample K captions per training video from the
round-start model, judge them, keep (best, worst) pairs with their reference log-probs, append them to JSONL.

``rollout``: the whole loop (resumable, sharded by rank); ``pairs``: pair choice and per-sample seeds;
``files``: shard paths, the progress log, resume and merge; ``unshard``: whole weights under FSDP2.
Command line: ``python -m src.rollout --ckpt DIR --data MANIFEST --out pairs.jsonl``.
"""

from src.rollout.files import merge_shards, progress_path, read_progress, shard_path
from src.rollout.pairs import Candidate, PairChoice, choose_pair, response_ids, sample_seed
from src.rollout.rollout import RolloutSettings, RolloutStats, Scorer, rollout, teacher_forced_logps

__all__ = ["Candidate", "PairChoice", "RolloutSettings", "RolloutStats", "Scorer", "choose_pair", "merge_shards",
           "progress_path", "read_progress", "response_ids", "rollout", "sample_seed", "shard_path",
           "teacher_forced_logps"]

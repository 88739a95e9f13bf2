"""Preference losses over sequence log-probs, per example: sigmoid DPO, IPO, and gDPO (ground-truth guidance).

Inputs are (b,) SUMMED response log-probs (src.losses.logprobs.sequence_logps): ``policy_*`` under the model
being trained, ``ref_*`` under the reference (the round-start model). Every function returns (b,) values; the
caller averages and logs. With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):

- sigmoid DPO (Rafailov et al. 2023):   -log sigmoid(beta * h)
- IPO (Azar et al. 2023):               (h - 1 / (2 beta))^2, here on the same summed log-probs (TRL averages
  them per token for IPO; the rollout's reference log-probs are sums, so one convention serves both losses)
- gDPO (video-SALMONN 2):               preference loss + gt_weight * CE, where CE is each example's MEAN
  cross-entropy over its ground-truth caption's tokens (src.losses.logprobs.response_ce); gt_weight 0 = plain DPO
- rewards: beta * (policy - ref) per response; margins = chosen - rejected reward; accuracy = margin > 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

BETA = 0.1
GT_WEIGHT = 0.1


def logratio_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor) -> torch.Tensor:
    """(b,) h = (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl))."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """(b,) -log sigmoid(beta * h). h = 0 (policy == reference) gives log 2."""
    return -F.logsigmoid(beta * logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """(b,) (h - 1 / (2 beta))^2: regresses the log-ratio margin onto 1 / (2 beta) instead of pushing it to
    infinity. h = 0 gives 1 / (4 beta^2) (25 at beta 0.1)."""
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


PreferenceLoss = Callable[..., torch.Tensor]
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {"sigmoid": sigmoid_dpo_loss, "ipo": ipo_loss}


def gdpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, gt_ce: torch.Tensor, beta: float = BETA, gt_weight: float = GT_WEIGHT,
              preference: PreferenceLoss = sigmoid_dpo_loss) -> torch.Tensor:
    """(b,) preference loss + gt_weight * gt_ce, gt_ce (b,) the mean CE over each example's ground-truth tokens.

    The paper's L = -log sigmoid(beta * h) + lambda * CE(pi; y_gt | x) with lambda = gt_weight."""
    return preference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta) + gt_weight * gt_ce


def rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """(b,) implicit reward beta * (log pi(y) - log ref(y)); detached: it is a statistic, not a loss."""
    return (beta * (policy_logps - ref_logps)).detach()


def preference_stats(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float = BETA) -> dict[str, torch.Tensor]:
    """Per-example (b,) statistics under TRL's names: rewards/{chosen,rejected,margins,accuracies} and
    logps/{chosen,rejected} (the policy's summed log-probs). accuracies is 1.0 where the chosen reward is
    strictly higher (a tie counts as wrong)."""
    chosen, rejected = rewards(policy_chosen, ref_chosen, beta), rewards(policy_rejected, ref_rejected, beta)
    margins = chosen - rejected
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).float(), "logps/chosen": policy_chosen.detach(),
            "logps/rejected": policy_rejected.detach()}

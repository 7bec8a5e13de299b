"""vlalign.losses: the alignment math as pure functions of tensors (tensors in, tensors out).

Families and their registries:

* paired preference losses (``PREFERENCE_LOSSES``, ``LVLM_LOSSES``; ``fn(logps, *, beta, **hp)``
  on a :class:`PreferenceLogps`), their weighted combinations (:func:`combine_losses`), KTO;
* the Bradley-Terry reward-model loss (``REWARD_MODEL_LOSSES``);
* policy-gradient terms, KL estimators and controllers (``KL_ESTIMATORS``, ``KL_CONTROLLERS``)
  and aggregation (``AGGREGATIONS``, :func:`aggregate`);
* advantage estimators (``ADVANTAGE_ESTIMATORS``, ``TOKEN_ADVANTAGE_ESTIMATORS``).

Nothing here imports the rest of vlalign.
"""

from __future__ import annotations

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    TOKEN_ADVANTAGE_ESTIMATORS,
    dapo_group_filter,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    kl_penalized_token_rewards,
    masked_var,
    masked_whiten,
    overlong_reward_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
)
from .lvlm import (
    LVLM_LOSSES,
    ddpo_sequence_logps,
    ddpo_token_weights,
    differing_segments,
    hsa_dpo_loss,
    mdpo_loss,
    povid_loss,
)
from .policy import (
    AGGREGATIONS,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    entropy_bonus,
    entropy_from_logits,
    entropy_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_sum,
    ppo_clip_loss,
    value_loss,
)
from .preference import (
    LOSS_PRESETS,
    PREFERENCE_LOSSES,
    LossOutput,
    PreferenceLogps,
    UnpairedLogps,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    combine_losses,
    dpo_loss,
    hinge_loss,
    implicit_reward_metrics,
    ipo_loss,
    kto_loss,
    nll_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from .reward_model import REWARD_MODEL_LOSSES, bradley_terry_loss
from .rollout_correction import truncated_is_weights

ALL_PREFERENCE_LOSSES = {**PREFERENCE_LOSSES, **LVLM_LOSSES}
"""Every paired preference objective by name (text and LVLM), for :func:`combine_losses`."""

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "ALL_PREFERENCE_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "LOSS_PRESETS",
    "LVLM_LOSSES",
    "LossOutput",
    "PREFERENCE_LOSSES",
    "PreferenceLogps",
    "REWARD_MODEL_LOSSES",
    "TOKEN_ADVANTAGE_ESTIMATORS",
    "UnpairedLogps",
    "aggregate",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bradley_terry_loss",
    "combine_losses",
    "dapo_group_filter",
    "ddpo_sequence_logps",
    "ddpo_token_weights",
    "differing_segments",
    "discounted_returns",
    "dpo_loss",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "entropy_bonus",
    "entropy_loss",
    "gae",
    "grpo_advantages",
    "hinge_loss",
    "hsa_dpo_loss",
    "implicit_reward_metrics",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_token_rewards",
    "kto_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mdpo_loss",
    "nll_loss",
    "orpo_loss",
    "overlong_reward_penalty",
    "povid_loss",
    "ppo_clip_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "robust_dpo_loss",
    "simpo_loss",
    "truncated_is_weights",
    "value_loss",
]

"""vlalign.rewards: verifiable reward functions, their weighted combination, and scorer protocols.

* :mod:`.verifiable`: small pure functions ``(completion, sample) -> float`` (exact match,
  ``<answer>`` tags, think/answer format, count, colour, yes/no, box IoU, threshold
  score, overlong penalty) with guards against reward hacking; ``REWARD_FUNCTIONS`` names them.
  The registries :data:`~.verifiable.REWARD_FUNCTIONS` and :data:`~.verifiable.COLOUR_WORDS`
  are where a world plugs in its own (the shapes world: ``object_f1``, ``shapes_answer``, its
  colours; :mod:`vlalign.shapes.rewards`).
* :mod:`.guard`: every call guarded (exceptions, non-numbers, NaN and timeouts become a
  :class:`RewardError` naming the function and the sample), time limits;
* :mod:`.user`: user functions from ``file.py:function`` or ``package.module:function``, options bound;
* :mod:`.combine`: a rewards config (``{name: weight}``, options, a time limit) -> one
  :class:`CombinedReward` returning the total and each function's values; the
  :class:`BatchScorer` protocol a reward model implements;
* :mod:`.facts`: the fact-augmented input of a Fact-RLHF reward model;
* :mod:`.model`: a trained reward model as a :class:`BatchScorer` (imported on its own: it loads
  the model code).
"""

from __future__ import annotations

from .combine import (
    DRY_COMPLETION,
    BatchScorer,
    CombinedReward,
    RewardsConfig,
    RewardScores,
    build_reward,
    build_reward_from_config,
    dry_run,
)
from .facts import FACTS_TEMPLATE, fact_augmented_prompt, fact_augmented_sample, facts_text, register_fact_formatter
from .guard import RewardError, RewardTimeout, as_reward_value, call_reward, call_with_timeout
from .user import BatchedUserReward, RewardConfigError, RewardFunction, bind_options, is_batched, load_user_function
from .verifiable import (
    COLOUR_WORDS,
    REWARD_FUNCTIONS,
    answer_tag,
    box_iou,
    colour_match,
    count_match,
    exact_match,
    extract_answer,
    format_reward,
    iou,
    normalize_answer,
    overlong_penalty,
    parse_boxes,
    register_colour_words,
    register_reward,
    threshold_score,
    yes_no_match,
)

__all__ = [
    "DRY_COMPLETION",
    "BatchedUserReward",
    "dry_run",
    "is_batched",
    "COLOUR_WORDS",
    "FACTS_TEMPLATE",
    "REWARD_FUNCTIONS",
    "BatchScorer",
    "CombinedReward",
    "RewardConfigError",
    "RewardError",
    "RewardFunction",
    "RewardScores",
    "RewardTimeout",
    "RewardsConfig",
    "answer_tag",
    "as_reward_value",
    "bind_options",
    "box_iou",
    "build_reward",
    "build_reward_from_config",
    "call_reward",
    "call_with_timeout",
    "colour_match",
    "count_match",
    "exact_match",
    "extract_answer",
    "fact_augmented_prompt",
    "fact_augmented_sample",
    "facts_text",
    "format_reward",
    "iou",
    "load_user_function",
    "normalize_answer",
    "overlong_penalty",
    "parse_boxes",
    "register_colour_words",
    "register_fact_formatter",
    "register_reward",
    "threshold_score",
    "yes_no_match",
]

"""vlalign.rewards: verifiable reward functions, their weighted combination, and scorer protocols.

* :mod:`.verifiable`: small pure functions ``(completion, sample) -> float`` (exact match,
  ``<answer>`` tags, think/answer format, count, colour, yes/no, object F1, box IoU, threshold
  score, overlong penalty) with guards against reward hacking; ``REWARD_FUNCTIONS`` names them.
* :mod:`.combine`: a rewards config (``{name: weight}``, options, a time limit) -> one
  :class:`CombinedReward` returning the total and each function's values; user functions from
  ``file.py:function``; every call guarded (exceptions, non-numbers, NaN and timeouts become a
  :class:`RewardError` naming the function and the sample); the :class:`BatchScorer` protocol a
  reward model implements; the fact-augmented input of a Fact-RLHF reward model.
"""

from __future__ import annotations

from .combine import (
    FACTS_TEMPLATE,
    BatchScorer,
    CombinedReward,
    RewardConfigError,
    RewardError,
    RewardFunction,
    RewardsConfig,
    RewardScores,
    RewardTimeout,
    as_reward_value,
    bind_options,
    build_reward,
    build_reward_from_config,
    call_reward,
    call_with_timeout,
    fact_augmented_prompt,
    fact_augmented_sample,
    facts_text,
    load_user_function,
)
from .verifiable import (
    REWARD_FUNCTIONS,
    SHAPES_TASK_REWARDS,
    answer_tag,
    box_iou,
    colour_match,
    count_match,
    exact_match,
    extract_answer,
    format_reward,
    iou,
    normalize_answer,
    object_f1,
    overlong_penalty,
    parse_boxes,
    scene_object_box,
    shapes_answer,
    threshold_score,
    yes_no_match,
)

__all__ = [
    "FACTS_TEMPLATE",
    "REWARD_FUNCTIONS",
    "SHAPES_TASK_REWARDS",
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
    "object_f1",
    "overlong_penalty",
    "parse_boxes",
    "scene_object_box",
    "shapes_answer",
    "threshold_score",
    "yes_no_match",
]

"""The options of ``vlalign ppo`` (:mod:`vlalign.recipes.ppo`): its config, its defaults and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from vlalign.config import ConfigError, StrictFields
from vlalign.eval.suite import SuiteConfig
from vlalign.models.generate import GenerationSettings
from vlalign.recipes.common import DataConfig, ModelConfig
from vlalign.recipes.critic import CriticConfig
from vlalign.recipes.rl_common import PolicyUpdateConfig, require_reward_model
from vlalign.recipes.rollouts import check_rollout_engine
from vlalign.rewards import RewardsConfig
from vlalign.training import TrainConfig
from vlalign.training.options import check_options, validate_config


def _train_defaults() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/ppo",
        lr=1e-5,
        batch_size=8,
        max_steps=100,
        warmup_ratio=0.0,
        schedule="constant",
        log_every=5,
        save_every=50,
    )


def _data_defaults() -> DataConfig:
    return DataConfig(train="shapes:train_prompts.jsonl", eval="auto")


def _rollout_defaults() -> GenerationSettings:
    return GenerationSettings(n=1, temperature=1.0, max_new_tokens=48, batch_size=32)


def _update_defaults() -> PolicyUpdateConfig:
    return PolicyUpdateConfig(epochs=2, kl_coef=0.05, kl_in="reward", kl_estimator="k1")


def _rewards_defaults() -> RewardsConfig:
    return RewardsConfig(weights={"reward_model": 1.0})


def _eval_defaults() -> SuiteConfig:
    return SuiteConfig(parts=("heldout",), describe=100, questions_per_task=0, kl_prompts=48, max_new_tokens=48)


@dataclass
class PPOSettings(StrictFields):
    """GAE, KL control and reward shaping."""

    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    whiten_advantages: bool = True
    """Whiten the advantages over the step's global batch (mean 0, variance 1)."""
    kl_target: float = 0.0
    """Adaptive KL controller: target sequence KL (nats); 0 keeps β = update.kl_coef fixed."""
    kl_horizon: int = 10000
    """Adaptive KL controller: horizon in samples (Ziegler et al.)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a completion cut by rollout.max_new_tokens (0: off)."""
    tasks: list[str] = field(default_factory=list)
    """Train only on prompts whose meta task is one of these (e.g. [describe]); [] keeps every prompt."""

    def validate(self, prefix: str = "ppo") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(
            prefix,
            [
                ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
                ("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
                ("kl_target", self.kl_target >= 0, "must be >= 0 (0: fixed update.kl_coef)"),
                ("kl_horizon", self.kl_horizon > 0, "must be > 0"),
                ("missing_eos_penalty", self.missing_eos_penalty >= 0, "must be >= 0 (0: off)"),
            ],
            values=self,
        )


@dataclass
class Config(StrictFields):
    """Actor-critic PPO with a vision-language critic."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("reward_model",)
    """Options without a usable default (``--help`` marks them required): the default rewards name the
    reward model, so its folder must be given (or rewards.weights changed to verifiable rewards)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (usually a supervised fine-tuned model)."""
    data: DataConfig = field(default_factory=_data_defaults)
    """Prompts (with the ground truth that verifiable rewards or a fact-augmented reward model read).
    data.eval picks the held-out evaluation: auto (the eval suite when data.train is a shapes world,
    else none), '' (none), or a prompts file / shapes: to evaluate on."""
    train: TrainConfig = field(default_factory=_train_defaults)
    """The training loop (batch_size counts prompts; each brings rollout.n completions)."""
    rollout: GenerationSettings = field(default_factory=_rollout_defaults)
    """Sampling (temperature must be > 0)."""
    rewards: RewardsConfig = field(default_factory=_rewards_defaults)
    """Rewards and weights; 'reward_model' names the reward model of reward_model."""
    reward_model: str = ""
    """Folder of a reward model trained by `vlalign rm` (needed when rewards.weights names reward_model)."""
    reward_batch_size: int = 16
    """Prompts per reward-model forward."""
    update: PolicyUpdateConfig = field(default_factory=_update_defaults)
    """Clipped surrogate: epochs, minibatches, clip range, aggregation; kl_coef is β (initial β when adaptive)."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """The value function."""
    ppo: PPOSettings = field(default_factory=PPOSettings)
    """GAE, KL control, reward shaping, task filter."""
    eval: SuiteConfig = field(default_factory=_eval_defaults)
    """Held-out evaluation at the end (and every train.eval_every steps): CHAIR, task accuracy, KL from the
    start and the reward model's win rate over the starting model."""
    eval_tasks: list[str] = field(default_factory=lambda: ["describe"])
    """Held-out tasks evaluated ([] for no evaluation)."""
    log_completions: bool = True
    """Write every sampled completion with its score to <output_dir>/completions.jsonl (cut back to the
    checkpoint on resume)."""
    save: Literal["auto", "adapter", "merged", "full"] = "auto"
    """How the final policy is saved in <output_dir>/model (the value head beside it)."""


def check_config(cfg: Config) -> None:
    """Errors a run would otherwise meet late, named by their config keys (no model or data is read): the
    rules that span sections (each section's own are its ``validate``, called by :class:`~vlalign.training.Run`)."""
    validate_config(cfg, cfg.train)  # each section's own rules first (the reward model loads before Run)
    if cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0 for PPO (the policy must be sampled)")
    if cfg.rollout.n < 1:
        raise ConfigError(f"rollout.n (completions per prompt) must be >= 1, got {cfg.rollout.n}")
    if cfg.train.grad_accum % cfg.update.minibatches:
        raise ConfigError(
            f"update.minibatches ({cfg.update.minibatches}) must divide train.grad_accum ({cfg.train.grad_accum})"
        )
    try:
        require_reward_model(cfg.rewards, cfg.reward_model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.ppo.kl_target > 0 and cfg.update.kl_coef <= 0:
        raise ConfigError("ppo.kl_target > 0 adapts update.kl_coef: give it a positive starting value")
    check_rollout_engine(cfg.rollout, cfg.model)  # vLLM there?

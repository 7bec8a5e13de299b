"""The configuration of ``vlalign kto``: :class:`Config`, :class:`KTOLossConfig` and :func:`check_config`.

Kept apart from :mod:`vlalign.recipes.kto` (which re-exports every name here) so that the recipe's
phases and its options each fit one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from vlalign.config import ConfigError, StrictFields
from vlalign.eval.suite import SuiteConfig
from vlalign.recipes.common import DataConfig, ModelConfig
from vlalign.recipes.preference_common import ReferenceConfig
from vlalign.training import TrainConfig
from vlalign.training.options import check_options


def _kto_train_defaults() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/kto", lr=5e-5, batch_size=8, epochs=1.0, warmup_ratio=0.1, log_every=5, save_every=100
    )


def _kto_data_defaults() -> DataConfig:
    return DataConfig(train="", eval="")


@dataclass
class KTOLossConfig(StrictFields):
    """KTO's hyperparameters."""

    beta: float = 0.1
    """beta: the reward scale (how far from the reference the policy may move)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of desirable completions (KTO suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3])."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of undesirable completions."""
    kl_estimate: bool = True
    """Estimate the reference point z0 from mismatched pairs (one extra no-gradient policy forward); false: z0 = 0."""

    def validate(self, prefix: str = "loss") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(
            prefix,
            [
                ("beta", self.beta > 0, "must be > 0"),
                ("desirable_weight", self.desirable_weight > 0, "must be > 0"),
                ("undesirable_weight", self.undesirable_weight > 0, "must be > 0"),
            ],
            values=self,
        )


@dataclass
class Config(StrictFields):
    """KTO on unpaired desirable / undesirable completions."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("data.train",)
    """Options without a usable default (``--help`` marks them required)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (and, unless ref_model is set, the reference it starts from)."""
    ref_model: str = ""
    """A reference other than the starting policy (folder, hub name or tiny:<arch>:<size>); '' = the policy."""
    data: DataConfig = field(default_factory=_kto_data_defaults)
    """Unpaired data (prompt, images, completion, label), or preference data with from_pairs."""
    from_pairs: bool = False
    """Read preference pairs and split each into a desirable (chosen) and an undesirable (rejected) row."""
    loss: KTOLossConfig = field(default_factory=KTOLossConfig)
    """The objective."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """How reference log-probs are computed."""
    train: TrainConfig = field(default_factory=_kto_train_defaults)
    """The training loop."""
    logprob_mode: Literal["shared", "naive"] = "shared"
    """shared: each prompt and image encoded once for both of its completions; naive: one row per completion."""
    response_tokens: Literal["vlalign", "trl"] = "vlalign"
    """Which tokens count as a completion. vlalign: its text and the end-of-turn token (what generation
    produces); trl: everything the chat template writes after the prompt, as TRL's trainers score it
    (also the newline after the end of turn: Qwen, Gemma, Idefics3; the separator before the response:
    LLaVA, Idefics3, PaliGemma), for comparing log-probs, rewards and the reference point with TRL runs."""
    eval_suite: Literal["none", "end", "every"] = "none"
    """Run the evaluation suite at the end, or also every train.eval_every steps."""
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    """The evaluation suite (when eval_suite is not none)."""
    save: Literal["auto", "adapter", "merged", "full"] = "auto"
    """How <output_dir>/model is saved: auto (adapter with LoRA, else full), adapter, merged, full."""


def check_config(cfg: Config) -> None:
    """Errors a run would otherwise meet late, named by their config keys."""
    if not cfg.data.train:
        raise ConfigError(
            "data.train is required: unpaired rows (prompt, images, completion, label), or preference "
            "pairs with --from_pairs=true"
        )
    if cfg.loss.kl_estimate and cfg.train.batch_size < 2:
        raise ConfigError(
            "KTO's reference point pairs each prompt with another sample's completion of the same "
            "micro-batch: use train.batch_size >= 2 (or loss.kl_estimate=false)"
        )

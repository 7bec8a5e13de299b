"""The configuration of ``vlalign dpo``: :class:`Config`, :class:`LossConfig` and the loss terms they name.

Kept apart from :mod:`vlalign.recipes.dpo` (which re-exports every name here) so that the recipe's
phases and its options each fit one file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from vlalign.config import ConfigError, StrictFields, did_you_mean
from vlalign.data.pairs.corrupt import CorruptConfig
from vlalign.eval.suite import SuiteConfig
from vlalign.losses import ALL_PREFERENCE_LOSSES, LOSS_PRESETS
from vlalign.recipes.common import DataConfig, ModelConfig
from vlalign.recipes.iterative_dpo import OnlineConfig
from vlalign.recipes.preference_common import ReferenceConfig
from vlalign.training import TrainConfig
from vlalign.training.options import check_options

PRESETS: dict[str, dict[str, float]] = {**LOSS_PRESETS, "ha_dpo": {"sigmoid": 1.0, "nll": 1.0}}
"""Named weightings: MPO (0.8 DPO + 0.2 BCO + 1.0 SFT), RPO (DPO + NLL), HA-DPO (DPO + LM loss)."""

REFERENCE_FREE = frozenset({"simpo", "orpo", "nll"})
"""Terms that need no reference policy (a run made only of these builds none)."""


def _dpo_train_defaults() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/dpo", lr=5e-5, batch_size=8, epochs=1.0, warmup_ratio=0.1, log_every=5, save_every=100
    )


def _dpo_data_defaults() -> DataConfig:
    return DataConfig(train="", eval="")


@dataclass
class LossConfig(StrictFields):
    """Which preference objective, with which options."""

    weights: dict[str, float] = field(default_factory=lambda: {"sigmoid": 1.0})
    """Terms and weights, summed per pair: any of sigmoid (DPO), robust, hinge, ipo, bco_pair, apo_zero,
    apo_down, simpo, orpo, nll, mdpo, hsa_dpo, povid. Example: {sigmoid: 1.0, nll: 0.2}."""
    preset: str = ""
    """A named weighting that replaces weights: mpo, rpo, ha_dpo ('' to use weights)."""
    beta: float = 0.1
    """beta of every term (the KL strength of DPO; set options.simpo.beta for SimPO's 2.5)."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Other keyword arguments per term, e.g. {sigmoid: {label_smoothing: 0.1}, mdpo: {anchor_delta: 0.0},
    simpo: {beta: 2.5, gamma: 1.375}, povid: {negative_weights: [0.5, 0.5]}}."""
    ddpo_gamma: float = 0.0
    """RLHF-V dense weights: tokens of segments that differ between chosen and rejected weigh this
    much in the sequence log-probs (0 = off; RLHF-V uses 5)."""
    ddpo_normalize: bool = True
    """DDPO: divide the weighted sum by the sum of the weights (the paper's average)."""
    ddpo_min_match: int = 3
    """DDPO: shortest run of equal tokens that counts as a common segment."""
    severity_column: str = "severity"
    """hsa_dpo: the numeric column holding each rejected response's hallucination severity."""
    corruption: CorruptConfig = field(default_factory=CorruptConfig)
    """mdpo: how the corrupted image is made from the chosen one (rows with rejected_images use those)."""

    def validate(self, prefix: str = "loss") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(
            prefix,
            [
                ("beta", self.beta > 0 and math.isfinite(self.beta), "must be a finite number > 0"),
                ("ddpo_gamma", self.ddpo_gamma >= 0, "must be >= 0 (0 = off)"),
                ("ddpo_min_match", self.ddpo_min_match >= 1, "must be >= 1"),
            ],
            values=self,
        )


@dataclass
class Config(StrictFields):
    """Direct preference optimisation (and its variants) on preference pairs."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("data.train",)
    """Options without a usable default (``--help`` marks them required; online rounds make their own data)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (and, unless ref_model is set, the reference it starts from)."""
    ref_model: str = ""
    """A reference other than the starting policy (folder, hub name or tiny:<arch>:<size>); '' = the policy."""
    data: DataConfig = field(default_factory=_dpo_data_defaults)
    """Preference data: prompt, images, chosen, rejected (+ rejected_extra, severity, rejected_images)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """How reference log-probs are computed."""
    train: TrainConfig = field(default_factory=_dpo_train_defaults)
    """The training loop."""
    logprob_mode: Literal["shared", "naive"] = "shared"
    """shared: each prompt and image encoded once per pair (default); naive: one row per completion."""
    logprob_pack_length: int = 0
    """shared: pack consecutive prompts (each with its pair) into rows of at most this many tokens; 0: one per row."""
    response_tokens: Literal["vlalign", "trl"] = "vlalign"
    """Which tokens count as a response. vlalign: its text and the end-of-turn token (what generation
    produces); trl: everything the chat template writes after the prompt, as TRL's DPO trainer scores it
    (also the newline after the end of turn: Qwen, Gemma, Idefics3; the separator before the response:
    LLaVA, Idefics3, PaliGemma), for comparing sequence log-probs and rewards with TRL runs."""
    eval_suite: Literal["none", "end", "every"] = "none"
    """Run the evaluation suite (POPE, CHAIR, task accuracy) at the end, or also every train.eval_every steps."""
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    """The evaluation suite (when eval_suite is not none)."""
    save: Literal["auto", "adapter", "merged", "full"] = "auto"
    """How <output_dir>/model is saved: auto (adapter with LoRA, else full), adapter, merged, full."""
    online: OnlineConfig = field(default_factory=OnlineConfig)
    """Iterative (online) DPO: rounds of sample-and-rank from the current policy, then DPO (0 rounds = off)."""


def loss_weights(cfg: LossConfig) -> dict[str, float]:
    """The terms of the objective (preset resolved), checked against the registry."""
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"loss.preset {cfg.preset!r} is unknown; choose from {sorted(PRESETS)}")
        weights = dict(PRESETS[cfg.preset])
    else:
        weights = dict(cfg.weights)
    if not weights:
        raise ConfigError("loss.weights is empty; give at least one term, e.g. {sigmoid: 1.0}")
    unknown = [name for name in weights if name not in ALL_PREFERENCE_LOSSES]
    if unknown:
        hint = "".join(did_you_mean(n, ALL_PREFERENCE_LOSSES) for n in unknown)
        raise ConfigError(f"loss.weights: unknown term(s) {unknown}{hint} (known: {sorted(ALL_PREFERENCE_LOSSES)})")
    paired = [name for name in weights if name not in ("povid", "nll")]
    if "povid" in weights and paired:
        raise ConfigError(
            f"loss.weights: povid scores several rejected responses per pair and combines only with "
            f"nll, not with {paired}"
        )
    cfg.validate("loss")
    return weights

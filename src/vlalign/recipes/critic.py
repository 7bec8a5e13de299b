"""The value function of ``vlalign ppo``: its config section, how it is built and how it is saved.

The critic (``critic.shared``) is a value head on the policy's own backbone (one forward for
policy and value; the backbone learns from both losses), or a separate backbone with its own
head, initialised from ``critic.name_or_path`` ('' = the policy's starting model; a ``vlalign rm``
folder gives its backbone and its reward head, as InstructGPT initialises the value function
from the reward model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlalign.config import StrictFields
from vlalign.models.heads import INFO_FILE, CriticModel, load_reward_model, new_head, save_head, split_state
from vlalign.models.load import LoraSpec, apply_lora, load_model_and_processor, same_tokenizer, save_model_and_processor
from vlalign.models.tiny import resolve_model
from vlalign.recipes.common import ModelConfig, load_policy, trained_weights_dtype
from vlalign.training import Run
from vlalign.training.checkpoints import full_state_dict, is_sharded
from vlalign.training.options import check_options


@dataclass
class CriticConfig(StrictFields):
    """The value function."""

    shared: bool = True
    """A value head on the policy's backbone (one forward for both), or a separate critic model."""
    name_or_path: str = ""
    """Separate critic: its starting model ('' = the policy's); a `vlalign rm` folder gives its backbone and head."""
    use_lora: bool = False
    """Separate critic: train LoRA adapters (model.lora's settings) instead of every weight."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_clip: float = 0.2
    """Clip range of the value loss around the rollout's values (0: unclipped)."""
    lr: float = 0.0
    """Learning rate of the critic (value head, or separate critic); 0 uses train.lr."""
    head_dropout: float = 0.0
    """Dropout on the value head's input."""

    def validate(self, prefix: str = "critic") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(
            prefix,
            [
                ("vf_coef", self.vf_coef >= 0, "must be >= 0"),
                ("value_clip", self.value_clip >= 0, "must be >= 0 (0: unclipped)"),
                ("lr", self.lr >= 0, "must be >= 0 (0: train.lr)"),
                ("head_dropout", 0 <= self.head_dropout < 1, "must be in [0, 1)"),
            ],
            values=self,
        )


def build_critic(cfg: CriticConfig, model: ModelConfig, policy: nn.Module, processor: Any, *, seed: int) -> nn.Module:
    """The value head on ``policy`` (shared critic) or a :class:`CriticModel` (separate critic), its head
    initialised from ``seed`` unless it comes from a reward model."""
    if cfg.shared:
        return new_head(policy, dropout=cfg.head_dropout, seed=seed)
    source = cfg.name_or_path
    lora = model.lora if cfg.use_lora else None
    if source and (Path(source) / INFO_FILE).is_file():
        rm, critic_processor, _ = load_reward_model(
            source,
            device=model.device,
            trainable=True,
            dtype=trained_weights_dtype(model.dtype, lora=lora is not None),
        )
        backbone, head = rm.backbone, rm.head
        if lora is not None:
            backbone = apply_lora(backbone, lora)
        head.requires_grad_(True)
    else:
        backbone, critic_processor = (
            load_policy(model, lora=cfg.use_lora) if not source else _load_backbone(source, model, lora)
        )
        head = new_head(backbone, dropout=cfg.head_dropout, seed=seed)
    if not same_tokenizer(processor, critic_processor):
        raise ValueError(
            f"critic.name_or_path {source!r} has another tokenizer than the policy; the critic reads the "
            "policy's tokens, so it must share the policy's tokenizer"
        )
    return CriticModel(backbone, head)


def _load_backbone(source: str, model: ModelConfig, lora: LoraSpec | None) -> tuple[nn.Module, Any]:
    return load_model_and_processor(
        resolve_model(source),
        device=model.device,
        dtype=trained_weights_dtype(model.dtype, lora=lora is not None),
        attn_implementation=model.attn_implementation or None,
        lora=lora,
    )


def save_critic(run: Run, critic: nn.Module, processor: Any, policy_dir: Path | None) -> None:
    """The value head beside the saved policy (``value_head.safetensors`` in ``policy_dir``), or a separate
    critic in ``<run_dir>/critic`` with its head (main process; a sharded critic is first gathered whole
    by every process)."""
    critic = run.accelerator.unwrap_model(critic)
    state = full_state_dict(critic) if is_sharded(critic) else None
    if run.accelerator.is_main_process:
        if isinstance(critic, CriticModel):
            folder = run.run_dir / "critic"
            if state is None:
                save_model_and_processor(critic.backbone, processor, folder)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                critic.backbone.save_pretrained(folder, state_dict=split_state(state, "backbone"))
                processor.save_pretrained(folder)
            head_state = None if state is None else split_state(state, "head")
            save_head(critic.head, folder / "value_head.safetensors", state=head_state)
        else:
            assert policy_dir is not None
            save_head(critic, policy_dir / "value_head.safetensors", state=state)
    run.accelerator.wait_for_everyone()

"""``vlalign rm``: a Bradley-Terry reward model on a vision-language backbone.

The model is the backbone (any image-text-to-text model, full fine-tuning or LoRA) with a scalar
head read at each completion's last token (:class:`vlalign.models.heads.RewardModel`). Each pair's
prompt and image go through the backbone once for both completions (prefix sharing). The loss is
Bradley-Terry (:func:`vlalign.losses.bradley_terry_loss`): −log σ(R(x, y_w) − R(x, y_l) − m) plus
an optional centring term, averaged over the pairs of the global batch (the pair count is summed
over micro-batches and processes first, so accumulation and data parallelism give the gradient
of one big batch).

Held-out pairwise accuracy (:func:`pairwise_accuracy`, ties count one half) is reported overall,
per pair ``source`` (``inject-add``, ``inject-count``... from ``vlalign pairs``) and per task, with the
held-out loss and mean margin. After training the rewards of the held-out responses set the
saved normalisation (mean 0, standard deviation 1), so that a PPO reward is on a known scale.

Fact-augmented reward model (Fact-RLHF, LLaVA-RLHF arXiv 2309.14525): ``facts_column`` names a
dataset column of ground-truth context (``objects`` or ``scene_objects`` in the shapes world)
that is written before the question of every prompt, in training and whenever the saved model
scores (the column is recorded in the model folder).

Examples::

    vlalign pairs --method=inject --data=shapes:train.jsonl --out=data/pairs/train.jsonl
    vlalign pairs --method=inject --data=shapes:validation.jsonl --out=data/pairs/validation.jsonl
    vlalign rm --model.name_or_path=runs/sft/model --data.train=data/pairs/train.jsonl \\
               --data.eval=data/pairs/validation.jsonl --train.output_dir=runs/rm
    vlalign rm ... --facts_column=objects          # the fact-augmented variant
    vlalign rm --train.output_dir=runs/rm --resume  # continue an interrupted run exactly

The saved model (``<output_dir>/model``) is reopened with
:func:`vlalign.rewards.model.load_reward_scorer` (scoring) or
:func:`vlalign.models.heads.load_reward_model`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from vlalign.config import ConfigError, StrictFields
from vlalign.data.collate import (
    EncodedPrompts,
    check_lengths,
    check_some_fit,
    encode_completions,
    encode_prompts,
    end_of_turn_ids,
    pad_token_id_of,
)
from vlalign.data.schema import PreferenceSample
from vlalign.losses import bradley_terry_loss
from vlalign.models.heads import RewardModel, RewardModelInfo, hidden_size_of, new_head, save_reward_model
from vlalign.models.moe import RouterCapture, StepRouterLoss
from vlalign.models.reference import eval_mode
from vlalign.recipes.common import DataConfig, ModelConfig, guard_distributed, load_policy, load_split
from vlalign.recipes.result import RunResult, run_result
from vlalign.rewards.model import prepare_samples
from vlalign.training import (
    BatchPlan,
    Run,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    check_finite,
    global_count,
    micro_step_context,
    total_steps,
    zero_loss,
)
from vlalign.training.checkpoints import full_state_dict, is_sharded
from vlalign.training.distributed import backward
from vlalign.training.options import check_options


def _rm_train_defaults() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/rm", lr=3e-4, batch_size=16, epochs=2.0, warmup_ratio=0.05, log_every=10, save_every=100
    )


def _rm_data_defaults() -> DataConfig:
    return DataConfig(train="data/pairs/train.jsonl", eval="data/pairs/validation.jsonl")


@dataclass
class LossConfig(StrictFields):
    """The Bradley-Terry objective."""

    center_coef: float = 0.01
    """Weight of the term that keeps rewards centred (0: off)."""
    center_mode: Literal["squared", "abs_mean"] = "squared"
    """squared: (R_w + R_l)² per pair (TRL, Eisenstein et al.); abs_mean: |batch mean of R_w + R_l| (LLaVA-RLHF)."""
    margin_column: str = ""
    """A numeric column giving each pair's required margin m (Llama 2); '' for none."""

    def validate(self, prefix: str = "loss") -> None:
        """Refuse unusable values (called by :class:`~vlalign.training.Run` before the model loads)."""
        check_options(prefix, [("center_coef", self.center_coef >= 0, "must be >= 0 (0: off)")], values=self)


@dataclass
class Config(StrictFields):
    """Bradley-Terry reward-model training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone (a fine-tuned policy is the usual start)."""
    data: DataConfig = field(default_factory=_rm_data_defaults)
    """Preference pairs (columns prompt, chosen, rejected, images), e.g. written by `vlalign pairs`."""
    train: TrainConfig = field(default_factory=_rm_train_defaults)
    """The training loop."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The Bradley-Terry objective."""
    heldout_fraction: float = 0.1
    """When data.eval is '': hold out this share of the training images (all their pairs) for evaluation."""
    facts_column: str = ""
    """Fact-augmented reward model: the column of ground-truth context put in every prompt ('' for none)."""
    facts_template: str = ""
    """How the facts are written before the question ('' for the default 'Facts about the image: {facts}')."""
    head_dropout: float = 0.0
    """Dropout on the head's input during training."""
    normalise: bool = True
    """Save an offset and scale that give the held-out responses' rewards mean 0 and std 1."""
    save: Literal["auto", "adapter", "merged", "full"] = "auto"
    """How the backbone is saved in <output_dir>/model: auto (adapter with LoRA, else full), adapter, merged, full."""


# ----------------------------------------------------------------------------- the math


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Share of pairs whose chosen reward is higher: mean of 1 (R_w > R_l), 1/2 (equal), 0 (lower).

    ``chosen``, ``rejected``: ``(B,)``. Ties count one half, as in the win rate, so that a reward
    model that gives every response the same score measures 0.5, not 0.
    """
    if chosen.shape != rejected.shape or chosen.ndim != 1 or chosen.numel() == 0:
        raise ValueError(f"need two non-empty (B,) tensors, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    wins = (chosen > rejected).to(torch.float64) + 0.5 * (chosen == rejected).to(torch.float64)
    return wins.mean()


def pair_margins(samples: Sequence[PreferenceSample], column: str) -> Tensor | None:
    """The per-pair margins of ``meta[column]`` ``(B,)``, or None when no column is set."""
    if not column:
        return None
    values = []
    for s in samples:
        value = (s.meta or {}).get(column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"sample {s.id!r}: loss.margin_column {column!r} is {value!r}, not a finite number")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- the phases


@dataclass
class PairBatch:
    """A micro-batch of pairs laid out for one forward: prompt i carries [chosen_i, rejected_i]."""

    prompts: EncodedPrompts
    completions: list[list[list[int]]]
    samples: list[PreferenceSample]
    dropped_ids: list[str]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(len(p) + sum(len(c) for c in group) for p, group in zip(self.prompts.input_ids, self.completions))


class PairEncoder:
    """Preference samples -> :class:`PairBatch` (one processor call; over-long pairs dropped or refused)."""

    def __init__(
        self,
        processor: Any,
        info: RewardModelInfo,
        *,
        max_length: int | None,
        on_overflow: Literal["drop", "raise"] = "drop",
    ) -> None:
        self.processor = processor
        self.info = info
        self.max_length = max_length
        self.on_overflow: Literal["drop", "raise"] = on_overflow
        self.eot_ids = end_of_turn_ids(processor)
        self.pad_token_id = pad_token_id_of(processor)
        self.num_dropped = 0

    def __call__(self, samples: Sequence[PreferenceSample]) -> PairBatch:
        prompts = encode_prompts(self.processor, prepare_samples(samples, self.info))
        texts = [[s.chosen, s.rejected] for s in samples]
        completions = encode_completions(self.processor, texts, eot_ids=self.eot_ids)
        keep, dropped = check_lengths(prompts, completions, max_length=self.max_length, on_overflow=self.on_overflow)
        self.num_dropped += len(dropped)
        if len(keep) < len(samples):
            prompts = prompts.select(keep)
            completions = [completions[i] for i in keep]
        return PairBatch(prompts, completions, [samples[i] for i in keep], dropped)


def pair_rewards(model: torch.nn.Module, batch: PairBatch, *, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Rewards of the chosen and rejected completions, ``(B,)`` each, from one forward."""
    rewards = model(batch.prompts, batch.completions, pad_token_id=pad_token_id).reshape(-1, 2)  # (B, 2)
    return rewards[:, 0], rewards[:, 1]


def rm_step(
    run: Run, model: torch.nn.Module, batches: Sequence[PairBatch], cfg: Config, *, pad_token_id: int
) -> dict[str, Tensor]:
    """Forward and backward over the micro-batches of one optimiser step; returns its metrics."""
    total_pairs = global_count(run, sum(len(b) for b in batches)).clamp(min=1.0)
    loss_sum = torch.zeros((), device=run.device)
    sums: dict[str, Tensor] = {}
    routed = StepRouterLoss(model, run.device)  # MoE: the router loss, its pair-weighted mean logged
    for i, batch in enumerate(batches):
        with micro_step_context(run, model, i == len(batches) - 1), run.accelerator.autocast():
            if len(batch) == 0:  # every pair dropped as over-long: keep processes in step
                loss = zero_loss(model)
            else:
                with RouterCapture(model) as routers:
                    chosen, rejected = pair_rewards(model, batch, pad_token_id=pad_token_id)
                margin = pair_margins(batch.samples, cfg.loss.margin_column)
                out = bradley_terry_loss(
                    chosen, rejected, margin=margin, center_coef=cfg.loss.center_coef, center_mode=cfg.loss.center_mode
                )
                loss = out.losses.sum() / total_pairs * run.num_processes  # DDP averages gradients over processes
                share = len(batch) / total_pairs * run.num_processes
                loss = routed.add(loss, routers.result(), weight=share)
                loss_sum = loss_sum + out.losses.sum().detach()
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() * len(batch)
            backward(run, model, loss)
    metrics = {"train/loss": run.accelerator.reduce(loss_sum, "sum") / total_pairs}
    metrics.update(routed.metrics(lambda t: run.accelerator.reduce(t, "sum")))
    metrics.update({k: run.accelerator.reduce(v.to(run.device), "sum") / total_pairs for k, v in sums.items()})
    return metrics


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module, encoder: PairEncoder, samples: Sequence[PreferenceSample], *, batch_size: int
) -> tuple[Tensor, Tensor, list[PreferenceSample]]:
    """Chosen and rejected rewards ``(N,)`` of ``samples`` (over-long pairs skipped) and the pairs scored."""
    chosen, rejected, kept = [], [], []
    with eval_mode(model):
        for lo in range(0, len(samples), batch_size):
            batch = encoder(samples[lo : lo + batch_size])
            if len(batch):
                c, r = pair_rewards(model, batch, pad_token_id=encoder.pad_token_id)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
                kept += batch.samples
    if not kept:
        raise ValueError("no held-out pair fits data.max_length; raise it")
    return torch.cat(chosen), torch.cat(rejected), kept


def heldout_metrics(chosen: Tensor, rejected: Tensor, samples: Sequence[PreferenceSample]) -> dict[str, float]:
    """``eval/accuracy`` (overall, per pair ``source`` and per ``task``: ``eval/accuracy/task/<task>``),
    ``eval/loss`` and ``eval/margin`` of scored pairs."""
    out = {
        "eval/accuracy": float(pairwise_accuracy(chosen, rejected)),
        "eval/loss": float(bradley_terry_loss(chosen.double(), rejected.double()).losses.mean()),
        "eval/margin": float((chosen - rejected).double().mean()),
        "eval/pairs": float(len(samples)),
    }
    for column, prefix in (("source", ""), ("task", "task/")):
        values = [str((s.meta or {}).get(column, "")) for s in samples]
        for value in sorted(set(values) - {""}):
            idx = torch.tensor([i for i, v in enumerate(values) if v == value])
            out[f"eval/accuracy/{prefix}{value}"] = float(pairwise_accuracy(chosen[idx], rejected[idx]))
            out[f"eval/pairs/{prefix}{value}"] = float(len(idx))
    return out


def split_heldout(samples: list[PreferenceSample], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a ``fraction`` of the distinct images, with all of their pairs, held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1) when data.eval is '', got {fraction}")
    keys = sorted({_image_key(s) for s in samples})
    if len(keys) < 2:
        raise ValueError("the training pairs show fewer than two distinct images; give a held-out file in data.eval")
    random.Random(f"rm-heldout/{seed}").shuffle(keys)
    held = set(keys[: max(1, round(fraction * len(keys)))])
    return [s for s in samples if _image_key(s) not in held], [s for s in samples if _image_key(s) in held]


def _image_key(sample: PreferenceSample) -> str:
    meta = sample.meta or {}
    if meta.get("scene_id"):
        return str(meta["scene_id"])
    return "|".join(str(im) if isinstance(im, str) else f"<{id(im)}>" for im in sample.images) or sample.id


# ----------------------------------------------------------------------------- the loop


def _load_data(cfg: Config) -> tuple[list[PreferenceSample], list[PreferenceSample]]:
    numbers = [cfg.loss.margin_column] if cfg.loss.margin_column else []  # checked per row at load time
    train = load_split(cfg.data.train, "preference", cfg.data, numeric_columns=numbers)
    if cfg.data.eval:
        eval_set = load_split(
            cfg.data.eval, "preference", cfg.data, limit=cfg.data.eval_limit or None, numeric_columns=numbers
        )
        return train, eval_set
    train, held = split_heldout(train, cfg.heldout_fraction, cfg.train.seed)
    return train, held[: cfg.data.eval_limit] if cfg.data.eval_limit else held


def _normalisation(chosen: Tensor, rejected: Tensor) -> tuple[float, float]:
    scores = torch.cat([chosen, rejected]).double()
    std = float(scores.std(correction=0)) if scores.numel() > 1 else 1.0
    return float(scores.mean()), std if std > 1e-6 else 1.0


def check_config(cfg: Config) -> None:
    """Errors a run would otherwise meet late, named by their config keys (no model or data is read)."""
    if not cfg.data.eval and not 0.0 < cfg.heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1) when data.eval is '', got {cfg.heldout_fraction}")


def run(cfg: Config) -> RunResult:
    """Train the reward model, measure held-out accuracy, save it; returns the run's folder, model and numbers."""
    check_config(cfg)
    run = Run(cfg.train, config=cfg, desc="rm")
    backbone, processor = load_policy(guard_distributed(run, cfg.model, micro_batches_per_step=cfg.train.grad_accum))
    model = RewardModel(backbone, new_head(backbone, dropout=cfg.head_dropout, seed=cfg.train.seed))
    info = RewardModelInfo(
        hidden_size=hidden_size_of(backbone), facts_column=cfg.facts_column, facts_template=cfg.facts_template
    )
    train_set, eval_set = _load_data(cfg)
    encoder = PairEncoder(processor, info, max_length=cfg.data.max_length, on_overflow=cfg.data.on_overlong)
    check_some_fit(encoder, train_set, max_length=cfg.data.max_length)  # stop before training on nothing
    plan = BatchPlan(len(train_set), cfg.train.batch_size, cfg.train.grad_accum, run.num_processes, cfg.train.seed)
    steps = total_steps(cfg.train, plan)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    modules, optimizer = run.prepare({"reward_model": model}, optimizer, scheduler, total=steps, processor=processor)
    model = modules["reward_model"]
    model.train()
    run.print(f"rm: {len(train_set)} training pairs, {len(eval_set)} held out, {steps} steps of {plan.global_batch}")

    for step in range(run.start_step, steps):
        t_start = time.perf_counter()
        batches = [encoder([train_set[i] for i in mb]) for mb in plan.micro_batches(step, run.process_index)]
        metrics = rm_step(run, model, batches, cfg, pad_token_id=encoder.pad_token_id)
        check_finite(
            metrics["train/loss"],
            step=step + 1,
            sample_ids=[s.id for b in batches for s in b.samples],
            run_dir=run.run_dir,
        )
        metrics["train/grad_norm"] = run.clip_and_step(model.parameters(), optimizer, scheduler)
        metrics["data/dropped_overlong"] = encoder.num_dropped
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and eval_set:
            c, r, kept = score_pairs(model, encoder, eval_set, batch_size=cfg.train.batch_size)
            metrics["eval/accuracy"] = float(pairwise_accuracy(c, r))
        metrics["perf/step_s"] = time.perf_counter() - t_start
        run.end_step(done, metrics, samples=sum(len(b) for b in batches), tokens=sum(b.num_tokens for b in batches))

    final: dict[str, Any] = {}
    if eval_set:
        chosen, rejected, kept = score_pairs(model, encoder, eval_set, batch_size=cfg.train.batch_size)
        final = heldout_metrics(chosen, rejected, kept)
        info.heldout_accuracy = final["eval/accuracy"]
        if cfg.normalise:
            info.offset, info.scale = _normalisation(chosen, rejected)
        run.log(steps, final)
        per_source = ", ".join(
            f"{k[len('eval/accuracy/') :]} {v:.3f}" for k, v in final.items() if k.startswith("eval/accuracy/")
        )
        run.print(
            f"held-out pairwise accuracy {final['eval/accuracy']:.4f} ({per_source}); loss {final['eval/loss']:.4f}"
        )
    info.extra = {"train": cfg.data.train, "eval": cfg.data.eval, "steps": steps, "base": cfg.model.name_or_path}
    unwrapped = run.accelerator.unwrap_model(model)
    state = full_state_dict(unwrapped) if is_sharded(unwrapped) else None  # every process gathers
    if run.accelerator.is_main_process:
        out = save_reward_model(unwrapped, processor, run.run_dir / "model", info, mode=cfg.save, state=state)
        run.print(f"saved the reward model to {out}")
    run.accelerator.wait_for_everyone()
    run.finish()
    return run_result(run.run_dir, final, run.run_dir / "model")

"""``vlalign sft``: supervised fine-tuning on (prompt, images, completion) data.

The loss is the negative log-likelihood of the completion tokens (and the end-of-turn token),
averaged over every completion token of the global batch: the token count is summed over
micro-batches and processes before any backward pass, so gradient accumulation and data
parallelism give exactly the gradient of one big batch.

Examples::

    vlalign sft                                    # the demo model on the embedded shapes world
    vlalign sft --model.name_or_path=Qwen/Qwen2-VL-2B-Instruct --model.use_lora \\
                --data.train=my_sft.jsonl --data.eval=my_sft_val.jsonl --train.output_dir=runs/my-sft
    vlalign sft --train.output_dir=runs/sft --resume   # continue an interrupted run exactly
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from vlalign.config import StrictFields
from vlalign.data.collate import IGNORE_INDEX, SequenceBatch, SupervisedCollator, check_some_fit
from vlalign.models.moe import RouterCapture, StepRouterLoss
from vlalign.recipes.common import DataConfig, ModelConfig, guard_distributed, load_policy, load_split, save_final_model
from vlalign.recipes.result import RunResult, run_result
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
from vlalign.training.distributed import backward


def _sft_train_defaults() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/sft", lr=1e-3, batch_size=16, epochs=3.0, warmup_ratio=0.05, log_every=10, save_every=100
    )


def _sft_data_defaults() -> DataConfig:
    return DataConfig(train="shapes:train_sft.jsonl")


@dataclass
class Config(StrictFields):
    """Supervised fine-tuning."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    data: DataConfig = field(default_factory=_sft_data_defaults)
    """Supervised data: columns prompt/completion (or messages) and images (default: the shapes world's
    descriptions and per-scene question conversations)."""
    train: TrainConfig = field(default_factory=_sft_train_defaults)
    """The training loop."""
    save: Literal["auto", "adapter", "merged", "full"] = "auto"
    """How the final model is saved in <output_dir>/model: auto (adapter with LoRA, else full), adapter, merged, full."""


# ----------------------------------------------------------------------------- the phases


def token_nll_sum(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Sum over completion tokens of -log p(token | prefix) for one batch."""
    logits = model(**batch.model_inputs()).logits  # (R, T, V)
    labels = batch.labels[:, 1:]  # (R, T-1): token t+1 is predicted at position t
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def sft_step(run: Run, model: torch.nn.Module, batches: Sequence[SequenceBatch]) -> dict[str, torch.Tensor]:
    """Forward and backward over the micro-batches of one optimiser step; returns its metrics."""
    tokens = sum(int(b.completion_mask.sum()) for b in batches)
    total_tokens = global_count(run, tokens).clamp(min=1.0)
    total_nll = torch.zeros((), device=run.device)
    routed = StepRouterLoss(model, run.device)  # MoE: the router loss, its token-weighted mean logged
    for i, batch in enumerate(batches):
        with micro_step_context(run, model, i == len(batches) - 1), run.accelerator.autocast():
            if len(batch) == 0:  # every sample dropped as over-long: keep processes in step
                loss = zero_loss(model)
            else:
                with RouterCapture(model) as routers:
                    nll = token_nll_sum(model, batch)
                # DDP averages gradients over processes, hence the factor num_processes.
                loss = nll / total_tokens * run.num_processes
                share = batch.completion_mask.sum() / total_tokens * run.num_processes
                loss = routed.add(loss, routers.result(), weight=share)
                total_nll = total_nll + nll.detach()
            backward(run, model, loss)
    metrics = {"train/loss": run.accelerator.reduce(total_nll, "sum") / total_tokens, "train/tokens": total_tokens}
    return {**metrics, **routed.metrics(lambda t: run.accelerator.reduce(t, "sum"))}


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, samples: list, collator: SupervisedCollator, *, batch_size: int, device
) -> float:
    """Mean completion-token NLL over held-out samples."""
    model.eval()
    nll, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collator(samples[start : start + batch_size]).to(device)
        if len(batch):
            nll += float(token_nll_sum(model, batch))
            tokens += int(batch.completion_mask.sum())
    model.train()
    return nll / max(tokens, 1)


# ----------------------------------------------------------------------------- the loop


def run(cfg: Config) -> RunResult:
    """Fine-tune, evaluate the held-out loss, save the model; returns the run's folder, model and numbers."""
    run = Run(cfg.train, config=cfg, desc="sft")
    model, processor = load_policy(guard_distributed(run, cfg.model, micro_batches_per_step=cfg.train.grad_accum))
    train_set = load_split(cfg.data.train, "supervised", cfg.data)
    eval_set = load_split(cfg.data.eval, "supervised", cfg.data, limit=cfg.data.eval_limit or None)
    collator = SupervisedCollator(processor, max_length=cfg.data.max_length, on_overflow=cfg.data.on_overlong)
    check_some_fit(collator, train_set, max_length=cfg.data.max_length)  # stop before training on nothing
    plan = BatchPlan(len(train_set), cfg.train.batch_size, cfg.train.grad_accum, run.num_processes, cfg.train.seed)
    steps = total_steps(cfg.train, plan)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    modules, optimizer = run.prepare({"model": model}, optimizer, scheduler, total=steps, processor=processor)
    model = modules["model"]
    model.train()
    run.print(f"sft: {len(train_set)} training samples, {steps} steps of {plan.global_batch} samples")

    for step in range(run.start_step, steps):
        t_start = time.perf_counter()
        batches = [
            collator([train_set[i] for i in mb]).to(run.device) for mb in plan.micro_batches(step, run.process_index)
        ]
        metrics = sft_step(run, model, batches)
        check_finite(
            metrics["train/loss"],
            step=step + 1,
            sample_ids=[s for b in batches for s in b.sample_ids],
            run_dir=run.run_dir,
        )
        grad_norm = run.clip_and_step(model.parameters(), optimizer, scheduler)
        metrics["train/grad_norm"] = grad_norm
        metrics["data/dropped_overlong"] = collator.num_dropped
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and eval_set:
            metrics["eval/loss"] = heldout_loss(
                model, eval_set, collator, batch_size=cfg.train.batch_size, device=run.device
            )
        metrics["perf/step_s"] = time.perf_counter() - t_start
        run.end_step(
            done,
            metrics,
            samples=sum(len(b) for b in batches),
            tokens=sum(int(b.attention_mask.sum()) for b in batches),
        )

    final: dict[str, float] = {}
    if eval_set:
        final["eval/loss"] = heldout_loss(model, eval_set, collator, batch_size=cfg.train.batch_size, device=run.device)
        run.log(steps, final)
        run.print(f"held-out loss: {final['eval/loss']:.4f}")
    model_path = save_final_model(run, model, processor, cfg.save)
    run.finish()
    return run_result(run.run_dir, final, model_path)

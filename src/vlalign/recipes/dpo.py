"""``vlalign dpo``: direct preference optimisation and its relatives on (prompt, images, chosen, rejected).

One optimiser step runs these phases, each a function below::

    batch      PairEncoder: one processor call for the micro-batch's prompts (and, for mDPO, the
               same prompts with corrupted images), completions tokenized once, over-long pairs
               dropped (counted) or refused
    policy     preference_logprobs: ONE forward per micro-batch; each prompt and image is encoded
               once and carries [chosen, rejected_1..K] (and the chosen under the corrupted image)
    reference  the same layout under the reference (frozen copy, adapter-disabled, on-disk cache)
    loss       combine_losses over the configured terms (vlalign.losses registries), per pair;
               summed and divided by the number of pairs of the whole step over all processes
    update     clip, AdamW, schedule (vlalign.training.Run)

Loss selection is configuration (``loss.weights``), never a branch in the loop: any name of
``vlalign.losses.ALL_PREFERENCE_LOSSES`` (sigmoid, robust, hinge, ipo, bco_pair, apo_zero, apo_down,
simpo, orpo, nll, mdpo, hsa_dpo, povid) with a weight, or a ``loss.preset`` (mpo, rpo, ha_dpo). The LVLM
objectives plug in through the data they need: ``mdpo`` makes the corrupted image of each chosen
one on the fly (``loss.corruption``, deterministic per sample) or takes a row's
``rejected_images``; ``hsa_dpo`` reads severities from ``loss.severity_column``; ``povid`` scores
``rejected_extra`` as further negatives; ``loss.ddpo_gamma > 0`` turns on RLHF-V's dense token
weights (segments that differ between chosen and rejected weigh gamma).

Examples::

    vlalign pairs --method=inject --out=data/pairs/inject.jsonl
    vlalign dpo --model.name_or_path=runs/sft/model --data.train=data/pairs/inject.jsonl
    vlalign dpo --loss.weights='{mdpo: 1.0}' --loss.corruption.method=mask        # mDPO
    vlalign dpo --loss.preset=mpo --model.use_lora=true                            # MPO, LoRA
    vlalign dpo --ref-model runs/other/model ...                                   # another reference
    vlalign dpo --online.rounds=3 --online.prompts=shapes:train_prompts.jsonl      # iterative DPO
    accelerate launch --config_file examples/accelerate/ddp_gpu.yaml --num_processes 2 -m vlalign.cli dpo --config ...
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlalign.config import ConfigError
from vlalign.data.collate import check_some_fit, pad_token_id_of
from vlalign.data.pairs.corrupt import CorruptConfig as CorruptConfig  # re-exported (dpo.CorruptConfig)
from vlalign.data.schema import PreferenceSample
from vlalign.losses import (
    ALL_PREFERENCE_LOSSES,
    LossOutput,
    PreferenceLogps,
    combine_losses,
    implicit_reward_metrics,
)
from vlalign.models.moe import add_router_aux_loss
from vlalign.models.preference_batch import PreferenceLogprobs, preference_logprobs
from vlalign.models.reference import PrecomputedReference, ReferencePolicy
from vlalign.recipes.common import guard_distributed, load_policy, save_final_model
from vlalign.recipes.dpo_config import PRESETS as PRESETS  # re-exported: dpo.Config, dpo.LossConfig, ...
from vlalign.recipes.dpo_config import REFERENCE_FREE, Config, LossConfig, loss_weights
from vlalign.recipes.dpo_pairs import PairBatch, PairEncoder, ddpo_sums, precompute_reference
from vlalign.recipes.iterative_dpo import run_rounds
from vlalign.recipes.preference_common import (
    MetricSums,
    build_reference,
    chunks,
    evaluation,
    load_pairs_split,
    process_shard,
    reference_module,
)
from vlalign.recipes.result import RunResult, run_result
from vlalign.training import (
    BatchPlan,
    Run,
    build_optimizer,
    build_scheduler,
    check_finite,
    global_count,
    micro_step_context,
    total_steps,
    zero_loss,
)
from vlalign.training.distributed import backward
from vlalign.training.options import validate_config

# ----------------------------------------------------------------------------- phase: batch


def make_encoder(processor: Any, cfg: Config, weights: dict[str, float], *, content_keys: bool) -> PairEncoder:
    """The pair encoder that the configured objective needs."""
    return PairEncoder(
        processor,
        max_length=cfg.data.max_length,
        on_overflow=cfg.data.on_overlong,
        corruption=cfg.loss.corruption if "mdpo" in weights else None,
        extra_rejected="povid" in weights,
        severity_column=cfg.loss.severity_column if "hsa_dpo" in weights else None,
        ddpo_min_match=cfg.loss.ddpo_min_match if cfg.loss.ddpo_gamma > 0 else None,
        content_keys=content_keys,
        response_tokens=cfg.response_tokens,
    )


# ----------------------------------------------------------------------------- phases: log-probs and loss


def policy_logprobs(model: nn.Module, pb: PairBatch, *, mode: str, pad_token_id: int, **kw: Any) -> PreferenceLogprobs:
    """Per-sequence policy log-probs of the micro-batch (one forward; gradients flow)."""
    return preference_logprobs(model, pb.batch, mode=mode, pad_token_id=pad_token_id, **kw)


def reference_logprobs(
    reference: ReferencePolicy, pb: PairBatch, *, pack_length: int | None = None
) -> PreferenceLogprobs:
    """The same under the reference (no gradient; possibly read from the cache), in the policy's layout
    (``pack_length``: several prompts per row, as ``logprob_pack_length`` asks)."""
    result = reference.logprobs(pb.batch.prompts, pb.batch.completions, sample_keys=pb.keys, pack_length=pack_length)
    return pb.batch.split(result)


def preference_record(
    policy: PreferenceLogprobs, ref: PreferenceLogprobs | None, pb: PairBatch, cfg: LossConfig
) -> PreferenceLogps:
    """The :class:`PreferenceLogps` the losses take (DDPO weights applied when configured)."""

    def sums(lp: PreferenceLogprobs) -> tuple[Tensor, Tensor, Tensor | None]:
        if cfg.ddpo_gamma > 0:
            return ddpo_sums(lp, pb, gamma=cfg.ddpo_gamma, normalize=cfg.ddpo_normalize)
        return lp.chosen_logps, lp.rejected_logps, lp.corrupted_chosen_logps

    chosen, rejected, corrupted = sums(policy)
    ref_chosen = ref_rejected = ref_corrupted = None
    if ref is not None:
        device = chosen.device
        ref_chosen, ref_rejected, ref_corrupted = (t.to(device) if t is not None else None for t in sums(ref))
    return PreferenceLogps(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_lengths=policy.chosen_lengths,
        rejected_lengths=policy.rejected_lengths,
        corrupted_chosen_logps=corrupted,
        ref_corrupted_chosen_logps=ref_corrupted,
    )


def pair_losses(logps: PreferenceLogps, pb: PairBatch, cfg: LossConfig, weights: dict[str, float]) -> LossOutput:
    """Per-pair losses ``(B,)`` of the weighted objective, and its metrics (DPO rewards always included
    when a reference is there, so every objective reports the same ``rewards/*``)."""
    options = {name: dict(opts) for name, opts in cfg.options.items()}
    if "hsa_dpo" in weights:
        assert pb.severity is not None
        options.setdefault("hsa_dpo", {})["severity"] = pb.severity.to(logps.chosen_logps.device)
    out = combine_losses(logps, weights=weights, beta=cfg.beta, options=options, registry=ALL_PREFERENCE_LOSSES)
    metrics = dict(out.metrics)
    if "rewards/margin" not in metrics and logps.has_reference:
        assert logps.ref_chosen_logps is not None and logps.ref_rejected_logps is not None
        metrics.update(
            implicit_reward_metrics(
                cfg.beta * (logps.chosen_logps - logps.ref_chosen_logps),
                cfg.beta * (logps.rejected_logps - logps.ref_rejected_logps),
                logps,
            )
        )
    metrics.setdefault("logps/chosen", logps.chosen_logps.detach().mean())
    metrics.setdefault("logps/rejected", logps.rejected_logps.detach().mean())
    return LossOutput(out.losses, metrics)


@dataclass
class StepSettings:
    """What the step needs besides the model and data (built once from the config)."""

    loss: LossConfig
    weights: dict[str, float]
    mode: str
    pad_token_id: int
    pack_length: int = 0


def micro_batch_loss(
    model: nn.Module, reference: ReferencePolicy | None, pb: PairBatch, s: StepSettings
) -> tuple[LossOutput, Any]:
    """Policy log-probs -> reference log-probs -> per-pair losses for one micro-batch (and the policy's log-probs)."""
    policy = policy_logprobs(model, pb, mode=s.mode, pad_token_id=s.pad_token_id, pack_length=s.pack_length or None)
    ref = reference_logprobs(reference, pb, pack_length=s.pack_length or None) if reference is not None else None
    out = pair_losses(preference_record(policy, ref, pb, s.loss), pb, s.loss, s.weights)
    return out._replace(losses=add_router_aux_loss(out.losses, policy.tokens, out.metrics)), policy.tokens  # MoE


def dpo_step(
    run: Run, model: nn.Module, reference: ReferencePolicy | None, batches: Sequence[PairBatch], s: StepSettings
) -> tuple[dict[str, Tensor], int]:
    """Forward and backward over the micro-batches of one optimiser step; returns global metrics and
    the tokens this process ran through the policy.

    Each pair's loss is divided by the number of pairs of the whole step over every process
    (counted before any backward), times the number of processes (DDP averages gradients), so any
    split into processes and micro-batches gives the gradient of one big batch.
    """
    total = global_count(run, sum(len(b) for b in batches)).clamp(min=1.0)
    sums = MetricSums(run.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    tokens = slots = 0
    for i, pb in enumerate(batches):
        with micro_step_context(run, model, i == len(batches) - 1), run.accelerator.autocast():
            if len(pb) == 0:  # every pair dropped as over-long: keep processes in step
                loss = zero_loss(model)
            else:
                out, lp = micro_batch_loss(model, reference, pb, s)
                loss = out.losses.sum() / total * run.num_processes
                loss_sum = loss_sum + out.losses.detach().double().sum()
                sums.add(out.metrics, len(pb))
                tokens, slots = tokens + lp.num_tokens, slots + lp.num_slots
            backward(run, model, loss)
    metrics = {"train/loss": run.accelerator.reduce(loss_sum, reduction="sum") / total.double(), "train/pairs": total}
    metrics.update(sums.means(run, total))
    metrics["perf/useful_token_fraction"] = torch.tensor(tokens / max(slots, 1))  # this process's tokens / slots
    return metrics, tokens


@torch.no_grad()
def heldout_metrics(
    run: Run,
    model: nn.Module,
    reference: ReferencePolicy | None,
    encoder: PairEncoder,
    samples: Sequence[PreferenceSample],
    s: StepSettings,
    *,
    batch_size: int,
) -> dict[str, float]:
    """``eval/loss`` and ``eval/rewards/...`` over the held-out pairs (split across processes)."""
    inner = run.accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    sums = MetricSums(run.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    count = 0
    for chunk in chunks(process_shard(samples, run), batch_size):
        pb = encoder(chunk, count=False)
        if len(pb):
            out, _ = micro_batch_loss(inner, reference, pb, s)
            loss_sum += out.losses.double().sum()
            sums.add(out.metrics, len(pb))
            count += len(pb)
    inner.train(was_training)
    total = global_count(run, count).clamp(min=1.0)
    metrics = {"loss": run.accelerator.reduce(loss_sum, reduction="sum") / total.double(), **sums.means(run, total)}
    return {f"eval/{k}": float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- set-up


def load_pair_splits(
    cfg: Config, weights: dict[str, float]
) -> tuple[list[PreferenceSample], dict[str, int], list[PreferenceSample]]:
    """The training pairs, the rows skipped per reason, and the held-out pairs ([] without data.eval).
    The numeric columns a configured term reads (hsa_dpo's severity) are checked row by row at load time."""
    options: dict[str, Any] = {
        "image_conditioned_ok": "mdpo" in weights,
        "numeric_columns": [cfg.loss.severity_column] if "hsa_dpo" in weights else [],
    }
    train_set, skipped = load_pairs_split(cfg.data.train, cfg.data, **options)
    limit = cfg.data.eval_limit or None
    eval_set = load_pairs_split(cfg.data.eval, cfg.data, limit=limit, **options)[0] if cfg.data.eval else []
    return train_set, skipped, eval_set


def dpo_reference(
    run: Run, cfg: Config, weights: dict[str, float], model: nn.Module, processor: Any, pad_token_id: int, n: int = 0
) -> ReferencePolicy | None:
    """The reference policy of the objective (None when every term is reference-free), built from the
    starting weights before any checkpoint is restored."""
    if all(name in REFERENCE_FREE for name in weights):
        return None
    return build_reference(
        cfg.reference,
        model,
        processor,
        model_cfg=cfg.model,
        ref_model=cfg.ref_model,
        run=run,
        mode=cfg.logprob_mode,
        pad_token_id=pad_token_id,
        num_samples=n,
    )


# ----------------------------------------------------------------------------- the loop


def check_config(cfg: Config) -> None:
    """Errors a run would otherwise meet late, named by their config keys (no model or data is read); each
    section's own rules first (online rounds load a model before :class:`Run` would check them)."""
    validate_config(cfg, cfg.train)
    if not cfg.data.train and cfg.online.rounds == 0:  # online rounds make their own pairs
        raise ConfigError(
            "data.train is required: a preference file (build one with `vlalign pairs "
            "--method=inject --out=data/pairs/inject.jsonl`, then --data.train=data/pairs/inject.jsonl)"
        )
    loss_weights(cfg.loss)


def run(cfg: Config) -> RunResult:
    """Train (offline, or ``online.rounds`` rounds of iterative DPO: the last round's numbers, ``online/*``
    counts, the final model in ``<output_dir>/model``); returns the run's folder, model and numbers."""
    if cfg.online.rounds > 0:
        check_config(cfg)
        final = run_rounds(cfg, lambda round_cfg: dict(train(round_cfg)))
        return run_result(cfg.train.output_dir, final)
    return train(cfg)


def train(cfg: Config) -> RunResult:
    """Offline DPO on ``data.train``; evaluates, saves ``<output_dir>/model``, returns the run's result."""
    check_config(cfg)
    weights = loss_weights(cfg.loss)
    run = Run(cfg.train, config=cfg, desc="dpo")
    model, processor = load_policy(guard_distributed(run, cfg.model, micro_batches_per_step=cfg.train.grad_accum))
    train_set, skipped, eval_set = load_pair_splits(cfg, weights)
    settings = StepSettings(cfg.loss, weights, cfg.logprob_mode, pad_token_id_of(processor), cfg.logprob_pack_length)
    reference = dpo_reference(run, cfg, weights, model, processor, settings.pad_token_id, len(train_set))
    encoder = make_encoder(processor, cfg, weights, content_keys=isinstance(reference, PrecomputedReference))
    check_some_fit(encoder, train_set, max_length=cfg.data.max_length)  # before the reference runs
    if reference is not None:
        precompute_reference(run, reference, encoder, [*train_set, *eval_set], batch_size=cfg.train.batch_size)
    plan = BatchPlan(len(train_set), cfg.train.batch_size, cfg.train.grad_accum, run.num_processes, cfg.train.seed)
    steps = total_steps(cfg.train, plan)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    modules, optimizer = run.prepare({"model": model}, optimizer, scheduler, total=steps, processor=processor)
    model = modules["model"]
    model.train()
    run.print(
        f"dpo: {len(train_set)} pairs ({sum(skipped.values())} skipped), {steps} steps of {plan.global_batch}, "
        f"loss {weights}, reference {type(reference).__name__ if reference else 'none'}"
    )

    def evaluate_now(step: int | None) -> dict[str, float]:
        heldout = lambda: heldout_metrics(
            run, model, reference, encoder, eval_set, settings, batch_size=cfg.train.batch_size
        )
        return evaluation(
            run,
            model,
            processor,
            heldout=heldout if eval_set else None,
            suite=cfg.suite,
            eval_suite=cfg.eval_suite,
            reference=reference_module(reference) if reference is not None else None,
            progress=cfg.train.progress,
            step=step,
        )

    for step in range(run.start_step, steps):
        t_start = time.perf_counter()
        batches = [encoder([train_set[i] for i in mb]) for mb in plan.micro_batches(step, run.process_index)]
        metrics, tokens = dpo_step(run, model, reference, batches, settings)
        check_finite(
            metrics["train/loss"],
            step=step + 1,
            sample_ids=[i for b in batches for i in b.sample_ids],
            run_dir=run.run_dir,
        )
        metrics["train/grad_norm"] = run.clip_and_step(model.parameters(), optimizer, scheduler)
        metrics["data/dropped_overlong"] = encoder.num_dropped
        if reference is not None:
            metrics["reference/forwards"] = reference.num_forwards
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < steps:
            metrics.update(evaluate_now(done))
        metrics["perf/step_s"] = time.perf_counter() - t_start
        run.end_step(done, metrics, samples=sum(len(b) for b in batches), tokens=tokens)

    final: dict[str, Any] = {
        "data/skipped_pairs": float(sum(skipped.values())),
        "data/train_pairs": float(len(train_set)),
    }
    final.update(evaluate_now(None))
    run.log(steps, final)
    model_path = save_final_model(run, model, processor, cfg.save)
    run.finish()
    return run_result(run.run_dir, final, model_path)

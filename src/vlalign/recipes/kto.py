"""``vlalign kto``: KTO on unpaired completions, each labelled desirable or undesirable.

KTO (Ethayarajh et al., arXiv 2402.01306) needs no pairs: a desirable completion's implicit
reward r = log pi(y|x) - log pi_ref(y|x) is pushed above a reference point z0, an undesirable
one's below it. z0 estimates KL(pi || pi_ref) from mismatched (prompt, completion) pairs: in each
micro-batch, prompt i is paired with the completion of sample i+1, as TRL does. z0 is one number
for the whole optimiser step, averaged over every micro-batch and process before any loss is
formed, so data parallelism and gradient accumulation leave it unchanged.

One optimiser step, in phases::

    batch       UnpairedEncoder: one processor call; prompt i carries [own completion, completion i+1]
    reference   reference log-probs of both completions of every prompt (one forward, no gradient)
    kl          policy log-probs of the mismatched completions (no gradient) -> global z0
    policy      policy log-probs of the own completions (gradients flow)
    loss        kto_loss per completion, divided by the step's global number of completions
    update      clip, AdamW, schedule

Data: rows with ``prompt``, ``images``, ``completion`` and a boolean ``label`` (TRL's unpaired
layout), or a preference dataset with ``from_pairs: true`` (each pair gives its chosen as a
desirable and its rejected as an undesirable completion). The options are in
:mod:`vlalign.recipes.kto_config` (re-exported here: ``kto.Config``, ``kto.KTOLossConfig``);
``response_tokens`` picks which tokens count as a completion (vlalign's or TRL's, as ``vlalign dpo``).

Examples::

    vlalign kto --model.name_or_path=runs/sft/model --data.train=data/kto.jsonl
    vlalign kto --from_pairs=true --data.train=data/pairs/inject.jsonl --loss.undesirable_weight=1.2
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlalign.data.collate import (
    EncodedPrompts,
    check_lengths,
    check_some_fit,
    encode_completions,
    encode_prompts,
    end_of_turn_ids,
    pad_token_id_of,
)
from vlalign.data.schema import UnpairedSample
from vlalign.losses import UnpairedLogps, kto_loss
from vlalign.models.fingerprints import sample_content_hash
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.moe import StepRouterLoss, add_router_aux_loss
from vlalign.models.reference import PrecomputedReference, ReferencePolicy
from vlalign.recipes.common import guard_distributed, load_policy, load_split, save_final_model
from vlalign.recipes.kto_config import Config, check_config
from vlalign.recipes.kto_config import KTOLossConfig as KTOLossConfig  # re-exported: kto.Config, kto.KTOLossConfig
from vlalign.recipes.preference_common import (
    build_reference,
    chunks,
    evaluation,
    load_pairs_split,
    process_shard,
    reference_module,
    response_affixes_of,
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

# ----------------------------------------------------------------------------- data and phase: batch


def unpair(pairs: Sequence[Any]) -> list[UnpairedSample]:
    """Each preference pair as two unpaired samples: ``<id>/chosen`` (desirable), ``<id>/rejected`` (not)."""
    out: list[UnpairedSample] = []
    for p in pairs:
        out.append(UnpairedSample(f"{p.id}/chosen", list(p.images), p.prompt, p.chosen, True, dict(p.meta)))
        out.append(UnpairedSample(f"{p.id}/rejected", list(p.images), p.prompt, p.rejected, False, dict(p.meta)))
    return out


def load_unpaired(path: str, cfg: Config, *, limit: int | None = None) -> list[UnpairedSample]:
    if not path:
        return []
    if cfg.from_pairs:
        return unpair(load_pairs_split(path, cfg.data, image_conditioned_ok=False, limit=limit)[0])
    return load_split(path, "unpaired", cfg.data, limit=limit)


@dataclass
class UnpairedBatch:
    """A micro-batch laid out for one forward: prompt i carries [its completion, the completion of i+1]."""

    prompts: EncodedPrompts
    completions: list[list[list[int]]]
    samples: list[UnpairedSample]
    desirable: Tensor  # (B,) bool
    dropped_ids: list[str]
    keys: list[str] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def sample_ids(self) -> list[str]:
        return [s.id for s in self.samples]


class UnpairedEncoder:
    """``UnpairedSample`` list -> :class:`UnpairedBatch` (one processor call; over-long samples dropped
    and counted, or refused). The mismatched completion is chosen among the kept samples.
    ``response_tokens="trl"`` scores what TRL scores: everything the chat template writes after the
    prompt (the separator before the completion, the completion, the end of turn and the whitespace
    after it), the own and the mismatched completions alike (``response_affixes_of``)."""

    def __init__(
        self,
        processor: Any,
        *,
        max_length: int | None,
        on_overflow: Literal["drop", "raise"] = "drop",
        content_keys: bool = False,
        response_tokens: Literal["vlalign", "trl"] = "vlalign",
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.on_overflow: Literal["drop", "raise"] = on_overflow
        self.content_keys = content_keys
        self.eot_ids = end_of_turn_ids(processor)
        self.affixes = response_affixes_of(processor, response_tokens)
        self.num_dropped = 0

    def __call__(self, samples: Sequence[UnpairedSample], *, count: bool = True) -> UnpairedBatch:
        prompts = encode_prompts(self.processor, samples)  # the micro-batch's one processor call
        texts = [[s.completion] for s in samples]
        own = encode_completions(self.processor, texts, eot_ids=self.eot_ids, affixes=self.affixes)
        n = len(samples)
        longest = [[max(own[i][0], own[(i + 1) % n][0], key=len)] for i in range(n)]  # either may be scored here
        keep, dropped = check_lengths(prompts, longest, max_length=self.max_length, on_overflow=self.on_overflow)
        if count:
            self.num_dropped += len(dropped)
        kept = [samples[i] for i in keep]
        comps = [[own[i][0], own[keep[(j + 1) % len(keep)]][0]] for j, i in enumerate(keep)]
        keys = [sample_content_hash(s.prompt, s.images) for s in kept] if self.content_keys else None
        return UnpairedBatch(
            prompts.select(keep), comps, kept, torch.tensor([s.label for s in kept], dtype=torch.bool), dropped, keys
        )


# ----------------------------------------------------------------------------- phases


@dataclass
class KTOSums:
    """Per-step sums (this process) that become global KTO metrics."""

    loss: Tensor
    reward_desirable: Tensor
    reward_undesirable: Tensor
    logp_desirable: Tensor
    logp_undesirable: Tensor
    n_desirable: Tensor
    n_undesirable: Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> KTOSums:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(7)))

    def add(self, losses: Tensor, rewards: Tensor, logps: Tensor, desirable: Tensor) -> None:
        d = desirable.to(rewards.device)
        self.loss += losses.detach().double().sum()
        self.reward_desirable += rewards[d].double().sum()
        self.reward_undesirable += rewards[~d].double().sum()
        self.logp_desirable += logps[d].detach().double().sum()
        self.logp_undesirable += logps[~d].detach().double().sum()
        self.n_desirable += d.sum()
        self.n_undesirable += (~d).sum()

    def metrics(self, run: Run) -> dict[str, Tensor]:
        g = {k: run.accelerator.reduce(v, reduction="sum") for k, v in vars(self).items()}
        nd, nu = g["n_desirable"].clamp(min=1), g["n_undesirable"].clamp(min=1)
        out = {
            "train/loss": g["loss"] / (g["n_desirable"] + g["n_undesirable"]).clamp(min=1),
            "rewards/chosen": g["reward_desirable"] / nd,
            "rewards/rejected": g["reward_undesirable"] / nu,
            "logps/chosen": g["logp_desirable"] / nd,
            "logps/rejected": g["logp_undesirable"] / nu,
            "count/desirable": g["n_desirable"],
            "count/undesirable": g["n_undesirable"],
        }
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def reference_phase(reference: ReferencePolicy, ub: UnpairedBatch) -> tuple[Tensor, Tensor]:
    """Reference log-probs of the own and the mismatched completions, ``(B,)`` each (one forward)."""
    sums = reference.logprobs(ub.prompts, ub.completions, sample_keys=ub.keys).sums.reshape(-1, 2)  # (B, 2)
    return sums[:, 0], sums[:, 1]


@torch.no_grad()
def kl_phase(model: nn.Module, ub: UnpairedBatch, *, mode: str, pad_token_id: int) -> Tensor:
    """Policy log-probs of the mismatched completions, ``(B,)``, without gradient."""
    mismatched = [[group[1]] for group in ub.completions]
    return completion_logprobs(model, ub.prompts, mismatched, mode=mode, pad_token_id=pad_token_id).sums


def reference_point(run: Run, kl_terms: Sequence[Tensor]) -> Tensor:
    """z0 = max(0, mean over the step's mismatched pairs, all processes, of log pi - log pi_ref)."""
    local = sum((t.double().sum() for t in kl_terms), torch.zeros((), dtype=torch.float64, device=run.device))
    count = global_count(run, sum(int(t.numel()) for t in kl_terms)).clamp(min=1.0)
    return (run.accelerator.reduce(local.to(run.device), reduction="sum") / count.double()).clamp(min=0.0)


def _kto_terms(cfg: Config, sums: Tensor, ref_sums: Tensor, desirable: Tensor, z0: Tensor) -> tuple[UnpairedLogps, Any]:
    """The KTO loss of a micro-batch (training and held-out evaluation alike): the policy's summed
    log-probs against the reference's, with the configured weights and reference point ``z0``."""
    logps = UnpairedLogps(sums, ref_sums.to(sums.device), desirable.to(sums.device))
    out = kto_loss(
        logps,
        beta=cfg.loss.beta,
        desirable_weight=cfg.loss.desirable_weight,
        undesirable_weight=cfg.loss.undesirable_weight,
        reference_point=z0.to(sums.dtype),
    )
    return logps, out


def kto_step(
    run: Run,
    model: nn.Module,
    reference: ReferencePolicy,
    batches: Sequence[UnpairedBatch],
    cfg: Config,
    pad_token_id: int,
) -> tuple[dict[str, Tensor], int]:
    """One optimiser step's forwards and backwards; returns global metrics and the policy tokens run here."""
    total = global_count(run, sum(len(b) for b in batches)).clamp(min=1.0)
    refs = [reference_phase(reference, b) if len(b) else None for b in batches]
    inner = run.accelerator.unwrap_model(model)
    kl_terms = [
        kl_phase(inner, b, mode=cfg.logprob_mode, pad_token_id=pad_token_id) - r[1].to(run.device)
        for b, r in zip(batches, refs)
        if r is not None and cfg.loss.kl_estimate
    ]
    z0 = reference_point(run, kl_terms) if cfg.loss.kl_estimate else torch.zeros((), device=run.device)
    sums, tokens = KTOSums.zeros(run.device), 0
    routed = StepRouterLoss(model, run.device)  # MoE: the router loss, its completion-weighted mean logged
    for i, (ub, ref) in enumerate(zip(batches, refs)):
        with micro_step_context(run, model, i == len(batches) - 1), run.accelerator.autocast():
            if ref is None:  # every sample dropped as over-long: keep processes in step
                loss = zero_loss(model)
            else:
                own = completion_logprobs(
                    model,
                    ub.prompts,
                    [[g[0]] for g in ub.completions],
                    mode=cfg.logprob_mode,
                    pad_token_id=pad_token_id,
                )
                logps, out = _kto_terms(cfg, own.sums, ref[0], ub.desirable, z0)
                loss = out.losses.sum() / total * run.num_processes
                loss = routed.add(
                    loss, own, weight=len(ub) / total * run.num_processes
                )  # MoE: coef * aux per completion
                losses = add_router_aux_loss(out.losses, own)  # train/loss counts the router loss, as the loss does
                sums.add(losses, (cfg.loss.beta * (logps.logps - logps.ref_logps)).detach(), own.sums, ub.desirable)
                tokens += own.num_tokens
            backward(run, model, loss)
    metrics = {**sums.metrics(run), **routed.metrics(lambda t: run.accelerator.reduce(t, "sum"))}
    metrics["kl/reference_point"] = z0.detach()
    return metrics, tokens


@torch.no_grad()
def heldout_metrics(
    run: Run,
    model: nn.Module,
    reference: ReferencePolicy,
    encoder: UnpairedEncoder,
    samples: Sequence[UnpairedSample],
    cfg: Config,
    pad_token_id: int,
) -> dict[str, float]:
    """``eval/loss``, ``eval/rewards/...`` and ``eval/kl/reference_point`` over the held-out split."""
    inner = run.accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    batches = [encoder(c, count=False) for c in chunks(process_shard(samples, run), cfg.train.batch_size)]
    batches = [b for b in batches if len(b)]
    refs = [reference_phase(reference, b) for b in batches]
    kl_terms = [
        kl_phase(inner, b, mode=cfg.logprob_mode, pad_token_id=pad_token_id) - r[1].to(run.device)
        for b, r in zip(batches, refs)
    ]
    z0 = reference_point(run, kl_terms) if cfg.loss.kl_estimate else torch.zeros((), device=run.device)
    sums = KTOSums.zeros(run.device)
    for ub, ref in zip(batches, refs):
        own = completion_logprobs(
            inner, ub.prompts, [[g[0]] for g in ub.completions], mode=cfg.logprob_mode, pad_token_id=pad_token_id
        )
        logps, out = _kto_terms(cfg, own.sums, ref[0], ub.desirable, z0)
        sums.add(out.losses, cfg.loss.beta * (logps.logps - logps.ref_logps), own.sums, ub.desirable)
    inner.train(was_training)
    metrics = {("loss" if k == "train/loss" else k): float(v) for k, v in sums.metrics(run).items()}
    metrics["kl/reference_point"] = float(z0)
    return {f"eval/{k}": v for k, v in metrics.items()}


def precompute_reference(
    run: Run,
    reference: ReferencePolicy,
    encoder: UnpairedEncoder,
    samples: Sequence[UnpairedSample],
    *,
    batch_size: int,
) -> None:
    """Warm the reference cache (main process) for the batches' own completions; the mismatched ones
    depend on the batch composition and are computed (and cached) as they come."""
    if not isinstance(reference, PrecomputedReference):
        return
    if run.accelerator.is_main_process:
        with run.accelerator.autocast():  # the precision the training steps compute in
            for chunk in chunks(samples, batch_size):
                ub = encoder(chunk, count=False)
                if len(ub):
                    reference.logprobs(ub.prompts, [[g[0]] for g in ub.completions], sample_keys=ub.keys)
    run.accelerator.wait_for_everyone()
    reference.reload()  # re-read what the main process wrote


# ----------------------------------------------------------------------------- the loop


def run(cfg: Config) -> RunResult:
    """Train with KTO, evaluate, save ``<output_dir>/model``; returns the run's folder, model and numbers."""
    check_config(cfg)
    run = Run(cfg.train, config=cfg, desc="kto")
    model, processor = load_policy(guard_distributed(run, cfg.model, micro_batches_per_step=cfg.train.grad_accum))
    train_set = load_unpaired(cfg.data.train, cfg)
    eval_set = load_unpaired(cfg.data.eval, cfg, limit=cfg.data.eval_limit or None)
    pad = pad_token_id_of(processor)
    reference = build_reference(
        cfg.reference,
        model,
        processor,
        model_cfg=cfg.model,
        ref_model=cfg.ref_model,
        run=run,
        mode=cfg.logprob_mode,
        pad_token_id=pad,
    )
    encoder = UnpairedEncoder(
        processor,
        max_length=cfg.data.max_length,
        on_overflow=cfg.data.on_overlong,
        content_keys=isinstance(reference, PrecomputedReference),
        response_tokens=cfg.response_tokens,
    )
    check_some_fit(encoder, train_set, max_length=cfg.data.max_length)  # before the reference runs
    precompute_reference(run, reference, encoder, [*train_set, *eval_set], batch_size=cfg.train.batch_size)
    plan = BatchPlan(len(train_set), cfg.train.batch_size, cfg.train.grad_accum, run.num_processes, cfg.train.seed)
    steps = total_steps(cfg.train, plan)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    modules, optimizer = run.prepare({"model": model}, optimizer, scheduler, total=steps, processor=processor)
    model = modules["model"]
    model.train()
    n_good = sum(s.label for s in train_set)
    run.print(f"kto: {len(train_set)} completions ({n_good} desirable), {steps} steps of {plan.global_batch}")

    def evaluate_now(step: int | None) -> dict[str, float]:
        heldout = lambda: heldout_metrics(run, model, reference, encoder, eval_set, cfg, pad)
        return evaluation(
            run,
            model,
            processor,
            heldout=heldout if eval_set else None,
            suite=cfg.suite,
            eval_suite=cfg.eval_suite,
            reference=reference_module(reference),
            progress=cfg.train.progress,
            step=step,
        )

    for step in range(run.start_step, steps):
        t_start = time.perf_counter()
        batches = [encoder([train_set[i] for i in mb]) for mb in plan.micro_batches(step, run.process_index)]
        metrics, tokens = kto_step(run, model, reference, batches, cfg, pad)
        check_finite(
            metrics["train/loss"],
            step=step + 1,
            sample_ids=[i for b in batches for i in b.sample_ids],
            run_dir=run.run_dir,
        )
        metrics["train/grad_norm"] = run.clip_and_step(model.parameters(), optimizer, scheduler)
        metrics["data/dropped_overlong"] = encoder.num_dropped
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < steps:
            metrics.update(evaluate_now(done))
        metrics["perf/step_s"] = time.perf_counter() - t_start
        run.end_step(done, metrics, samples=sum(len(b) for b in batches), tokens=tokens)

    final: dict[str, Any] = {"data/train_completions": float(len(train_set))}
    final.update(evaluate_now(None))
    run.log(steps, final)
    model_path = save_final_model(run, model, processor, cfg.save)
    run.finish()
    return run_result(run.run_dir, final, model_path)

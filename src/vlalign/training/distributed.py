"""What keeps the processes of a data-parallel run in step, shared by every recipe's loop.

* :func:`check_supported` refuses set-ups the written-out loops do not support (today: several
  backward passes per optimiser step under DeepSpeed, which steps its engine at each one);
* :func:`global_count` sums a count over processes before any backward pass, so that every
  per-example mean divides by the count of the whole optimiser step;
* :func:`micro_step_context` skips the gradient all-reduce before the last micro-batch of a step;
* :func:`zero_loss` lets a process with nothing to train on (every sample dropped, every group
  filtered out) still join the gradient all-reduce that the others wait for;
* :func:`mean_over_processes` averages metrics that processes may hold under different keys;
* :func:`whole_weights` holds a sharded policy's weights whole on every process for a decode loop
  (FSDP2 or DeepSpeed ZeRO-3), so that processes generating different numbers of tokens never
  wait for each other's parameter gathers;
* :func:`sharding_of` says whether the run shards the policy's parameters (FSDP, ZeRO-3);
* :func:`fsdp2_on_cpu` and :func:`shard_on_cpu`: the opt-in (``VLALIGN_FSDP2_CPU=1``) that shards
  the trained modules with torch's ``fully_shard`` on CPU processes (gloo), where accelerate
  applies no FSDP; for testing FSDP2 without GPUs;
* :func:`backward` is the recipes' backward pass: under DDP it joins the vision tower and projector
  to every process's graph (:func:`vision_touch`), so a step where one process holds text-only
  samples and another images does not break the gradient all-reduce (under FSDP2:
  :mod:`vlalign.training.sharded_vision`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType, gather_object
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from vlalign.config import ConfigError
from vlalign.models.load import ModelLoadError, find_parts

if TYPE_CHECKING:
    from vlalign.training.run import Run


def check_supported(run: Run, *, micro_batches_per_step: int, hint: str = "train.grad_accum=1") -> None:
    """Refuse several backward passes per optimiser step under DeepSpeed.

    accelerate steps a DeepSpeed engine at every ``backward`` call, so the loop's own gradient
    accumulation (``micro_batches_per_step`` backwards per optimiser step) would step it too often:
    accumulate with more processes or a larger batch instead. ``hint`` names the setting to change.
    """
    if run.accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if micro_batches_per_step > 1:
        raise ConfigError(
            f"under DeepSpeed use {hint} (one micro-batch per optimiser step; raise train.batch_size or "
            "the number of processes instead), and set gradient_clipping in the DeepSpeed config"
        )
    fill_deepspeed_batch(run.accelerator.state.deepspeed_plugin, run.cfg.batch_size)


def fill_deepspeed_batch(plugin: Any, batch_size: int) -> None:
    """Give DeepSpeed the micro-batch size it cannot infer: accelerate reads an ``auto``
    ``train_micro_batch_size_per_gpu`` from the data loaders passed to ``prepare``, and the
    recipes pass none (their batch plan owns the data order), so ``prepare`` would refuse. A value
    set in the DeepSpeed config is kept."""
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = batch_size


def global_count(run: Run, local: int) -> Tensor:
    """``local`` summed over processes (a float tensor on the run's device)."""
    return run.accelerator.reduce(torch.tensor(float(local), device=run.device), reduction="sum")


def micro_step_context(run: Run, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """No gradient all-reduce before the last micro-batch of an optimiser step."""
    return contextlib.nullcontext() if last else run.accelerator.no_sync(model)


def zero_loss(model: nn.Module) -> Tensor:
    """A loss of exactly 0 touching every trainable parameter (a process with nothing to train on
    still joins DDP's gradient all-reduce)."""
    return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)  # type: ignore[return-value]


def union_of_keys(run: Run, keys: list[str]) -> list[str]:
    """The sorted union of every process's ``keys`` (each process must join the same all-reduces)."""
    if run.num_processes == 1:
        return sorted(keys)
    return sorted({k for ks in gather_object([sorted(keys)]) for k in ks})


def mean_over_processes(run: Run, metrics: dict[str, Any]) -> dict[str, float]:
    """Every metric averaged over the processes that have it (one all-reduce; processes may hold
    different keys, e.g. one whose groups were all filtered out)."""
    keys = sorted(metrics)
    if run.num_processes == 1:
        return {k: float(metrics[k]) for k in keys}
    keys = union_of_keys(run, keys)
    local = torch.tensor(
        [[float(metrics[k]), 1.0] if k in metrics else [0.0, 0.0] for k in keys], dtype=torch.float64, device=run.device
    ).reshape(-1, 2)
    total = run.accelerator.reduce(local, "sum")
    return {k: v / max(n, 1.0) for k, (v, n) in zip(keys, total.tolist())}


def vision_touch(model: nn.Module) -> Tensor:
    """``0 * sum`` of every trainable parameter of the vision tower and projector(s): exactly zero,
    but their gradients exist (zeros) even when the batch held no image.

    DDP all-reduces gradients bucket by bucket, every bucket once all its parameters have a
    gradient: a process whose micro-batch is text-only never runs the vision tower, its vision
    buckets never become ready, and the processes' all-reduces stop matching (gloo: "Received data
    size doesn't match expected size"; NCCL: a hang). With this term added to the loss the text-only
    process contributes zero gradients, which is what it holds: the averaged gradient is the
    one-process gradient on the global batch, unchanged. Sharded parameters (FSDP2's DTensors) are
    skipped: FSDP gathers a module's weights in its forward, so there every process must run the
    vision tower itself (:func:`vlalign.training.sharded_vision.vision_parity`).
    """
    try:
        parts = find_parts(model)
    except ModelLoadError:  # not an image-text model (no language model found): nothing to join
        return torch.zeros(())
    prefixes = [p for p in (parts.vision, *parts.projectors) if p]
    terms = [
        p.sum() * 0.0
        for n, p in model.named_parameters()
        if p.requires_grad and not isinstance(p, DTensor) and any(n == q or n.startswith(q + ".") for q in prefixes)
    ]
    return sum(terms, torch.zeros((), device=terms[0].device)) if terms else torch.zeros(())


def backward(run: Run, model: nn.Module, loss: Tensor) -> None:
    """``run.accelerator.backward(loss)``; under DDP (``model`` wrapped in
    ``DistributedDataParallel``) with :func:`vision_touch` of the unwrapped model added first."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        loss = loss + vision_touch(run.accelerator.unwrap_model(model)).to(loss.device, loss.dtype)
    run.accelerator.backward(loss)


def sharding_of(run: Run) -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` when the run shards the policy's parameters across
    processes (a forward then gathers them: every process must run it), None otherwise (DDP, ZeRO-1/2)."""
    kind = run.accelerator.distributed_type
    if kind == DistributedType.FSDP or fsdp2_on_cpu(run.accelerator):
        return "FSDP"
    if kind == DistributedType.DEEPSPEED and getattr(run.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
        return "DeepSpeed ZeRO-3"
    return None


FSDP2_CPU = "VLALIGN_FSDP2_CPU"
"""Environment variable: ``1`` shards the trained modules with torch's ``fully_shard`` on CPU
processes (gloo), as accelerate does on GPUs under ``fsdp_version: 2``; for testing FSDP2 without
GPUs. An environment variable, not a config field: like ``ACCELERATE_USE_FSDP`` it says how the
processes are launched, not what is trained, so it stays out of ``run.json`` and the config."""


def fsdp2_on_cpu(accelerator: Any) -> bool:
    """Whether ``VLALIGN_FSDP2_CPU=1`` asks for ``fully_shard`` and the run has several CPU
    processes (accelerate's MULTI_CPU, where it would otherwise wrap the model in DDP)."""
    return os.environ.get(FSDP2_CPU, "") == "1" and accelerator.distributed_type == DistributedType.MULTI_CPU


def shard_on_cpu(accelerator: Any, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer):
    """``fully_shard`` each module's layers (the classes named in any ``_no_split_modules`` inside
    it, innermost first), then the module itself; point the optimiser at the new (DTensor)
    parameters; prepare both without a DDP wrapper. Returns the modules (same keys) and optimiser.
    The optimiser must be fresh (no state yet): its parameter groups are re-pointed by name."""
    before = {id(p): (key, n) for key, m in modules.items() for n, p in m.named_parameters()}
    for module in modules.values():
        layers = {c for m in module.modules() for c in (getattr(m, "_no_split_modules", None) or [])}
        for sub in reversed(list(module.modules())):
            if sub is not module and type(sub).__name__ in layers and not isinstance(sub, FSDPModule):
                fully_shard(sub)  # a layer already sharded through another module (PPO's shared critic) is kept
        fully_shard(module)
    after = {(key, n): p for key, m in modules.items() for n, p in m.named_parameters()}
    for group in optimizer.param_groups:
        group["params"] = [after[before[id(p)]] for p in group["params"]]
    wrapped = {key: accelerator.prepare_model(m, evaluation_mode=True) for key, m in modules.items()}
    return wrapped, accelerator.prepare_optimizer(optimizer)


@contextlib.contextmanager
def whole_weights(model: nn.Module) -> Iterator[None]:
    """Every parameter of a sharded ``model`` whole on this process for the block: a decode loop.

    A sharded forward gathers each layer's weights from every process (an all-gather per layer).
    Processes whose completions stop after different numbers of tokens (or that hold different
    numbers of prompts, or text-only prompts that skip the vision tower) would then wait on gathers
    that the others never join: a hang. Inside this block the weights are gathered once, up front,
    and every forward is local. Costs one whole copy of the weights per process while the block
    runs. Every process must enter it (the gather is a collective).

    * FSDP2 (``fully_shard``; accelerate's FSDP with ``fsdp_version: 2``): each FSDP module is
      unsharded and kept so (``set_reshard_after_forward(False)``), then resharded on exit and set
      back to resharding after forward (vlalign's configs use ``fsdp_reshard_after_forward: true``);
    * DeepSpeed ZeRO-3 (parameters carrying ``ds_id``): ``deepspeed.zero.GatheredParameters``;
    * otherwise (one process, DDP, ZeRO-1/2): nothing to do.
    """
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    zero3 = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if fsdp:
        for module in fsdp:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield
        finally:
            for module in fsdp:
                module.reshard()
                module.set_reshard_after_forward(True, recurse=False)
    elif zero3:
        import deepspeed  # optional: only reached under DeepSpeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield
    else:
        yield

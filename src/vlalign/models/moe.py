"""Mixture-of-experts routers: the load-balancing auxiliary loss a model's config asks for.

A Hugging Face MoE model whose text config sets ``output_router_logits=True`` adds
``router_aux_loss_coef * aux_loss`` to its language-modelling loss, where ``aux_loss`` is the
Switch Transformer load-balancing loss of every router's logits (``load_balancing_loss_func`` in
the model's own module) over the tokens its 2-D ``attention_mask`` marks real. It only does so
when ``labels`` are given, and it computes ``aux_loss`` with the forward's ``attention_mask``,
which breaks on the inputs the engine gives it (a 4-D block mask in the packed layout; a 2-D mask
longer than the new tokens in a cached forward: the prompt cache, a decoding step).

So the engine asks the model for no router logits (:func:`router_logits_off`) and records them
itself: :class:`RouterCapture` hooks the router modules the model declares (its
``_can_record_outputs["router_logits"]``, the very recorder ``output_router_logits`` uses) and
keeps each router's logits ``(tokens, experts)`` of each forward, with the forward's real tokens;
:func:`router_aux_loss` then applies the model's own ``load_balancing_loss_func`` to them, the
forwards of one engine call (the prompt pass and the completion pass of the cache path) joined as
one set of tokens. On a forward with a 2-D mask this is exactly the model's ``aux_loss``
(``tests/recipes/test_moe_aux.py``).

:func:`add_router_aux_loss` is what every recipe calls on its loss: ``loss + coef * aux_loss``
(a no-op for dense models), weighted by the micro-batch's share of the optimiser step, with the
unweighted aux loss written to the step's metrics (``train/router_aux_loss``).
:class:`StepRouterLoss` does the same over a step's micro-batches and logs their weighted mean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from vlalign.models.arch import text_config, unwrap

ROUTER_METRIC = "train/router_aux_loss"
"""Metric name of the (unweighted) router auxiliary loss in a step's metrics."""


def _language_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model (PEFT / data-parallel wrappers removed; a reward model's backbone)."""
    inner = unwrap(model)
    if hasattr(inner, "config"):
        return inner
    return next((unwrap(m) for m in inner.modules() if hasattr(m, "config")), inner)


def router_aux_coef(model: nn.Module) -> float | None:
    """``router_aux_loss_coef`` when the model's config asks for the router loss (``output_router_logits``), else None."""
    inner = _language_model(model)
    if not hasattr(inner, "config"):
        return None
    text = text_config(inner)
    if not getattr(text, "output_router_logits", False):
        return None
    coef = getattr(text, "router_aux_loss_coef", None)
    return float(coef) if coef is not None else None


def router_logits_off(model: nn.Module) -> dict[str, Any]:
    """Forward keyword arguments that stop the model computing its own aux loss (``{}`` for dense models)."""
    return {"output_router_logits": False} if getattr(text_config(model), "output_router_logits", False) else {}


def _router_class(model: nn.Module) -> tuple[type[nn.Module], int] | None:
    """The router module class the model records router logits from, and the index of the logits in its output."""
    for module in _language_model(model).modules():
        recorder = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is None:
            continue
        if isinstance(recorder, type):
            return recorder, 0
        target = getattr(recorder, "target_class", None)
        if isinstance(target, type):
            return target, int(getattr(recorder, "index", 0) or 0)
    return None


@dataclass
class _Forward:
    """One recorded forward: each router layer's logits ``(tokens, experts)`` and its real tokens."""

    logits: list[Tensor]
    mask: Tensor | None
    """The forward's ``(rows, T)`` 2-D attention mask cut to its own T tokens, or None until a
    capture's ``default_mask`` fills it in (a forward that took a 4-D block mask)."""


_ACTIVE: dict[int, list[RouterCapture]] = {}
"""The captures active on each model (by ``id`` of its Hugging Face module), outermost first."""


class RouterCapture:
    """Records each forward's router logits and real-token mask while active; a no-op for dense models.

    ``forwards[f]`` is the f-th forward of the model run under the capture (:class:`_Forward`):
    the per-layer router logits ``(tokens, experts)`` and the forward's ``(rows, T)`` 2-D attention
    mask cut to its own T tokens (a cached forward's mask also covers the cache), or None when the
    forward took another kind of mask (the packed layout's 4-D block mask).

    Captures nest: a recipe's capture around a call that captures again inside (the reward model's
    forward runs :func:`~vlalign.models.logprobs.completion_logprobs`, which knows the packed
    layout's real tokens) records the same forwards, and the masks the inner capture's
    ``default_mask`` fills in serve the outer one too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.active = router_aux_coef(model) is not None
        self.forwards: list[_Forward] = []
        self._handles: list[Any] = []
        self._key: int | None = None

    def __enter__(self) -> RouterCapture:
        found = _router_class(self.model) if self.active else None
        if found is None:
            self.active = False
            return self
        inner = _language_model(self.model)
        self._key = id(inner)
        stack = _ACTIVE.setdefault(self._key, [])
        stack.append(self)
        if len(stack) > 1:
            return self  # the outermost capture's hooks record for every capture of this model
        cls, index = found

        def start(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            tokens = ids.shape[1] if isinstance(ids, Tensor) else kwargs["inputs_embeds"].shape[1]
            mask = kwargs.get("attention_mask")
            two_d = isinstance(mask, Tensor) and mask.ndim == 2
            forward = _Forward([], mask[:, -tokens:] if two_d else None)
            for capture in stack:
                capture.forwards.append(forward)

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            value = output[index] if isinstance(output, (tuple, list)) else output
            if stack and stack[0].forwards:
                stack[0].forwards[-1].logits.append(value.reshape(-1, value.shape[-1]))

        self._handles = [inner.register_forward_pre_hook(start, with_kwargs=True)]
        self._handles += [m.register_forward_hook(keep) for m in inner.modules() if isinstance(m, cls)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._key is not None:
            stack = _ACTIVE.get(self._key, [])
            if self in stack:
                stack.remove(self)
            if not stack:
                _ACTIVE.pop(self._key, None)
            self._key = None

    def result(self, default_mask: Tensor | None = None) -> RouterLoss:
        """The recorded forwards' :class:`RouterLoss` (see :meth:`aux_loss`)."""
        return RouterLoss(self.aux_loss(default_mask), router_aux_coef(self.model) if self.active else None)

    def aux_loss(self, default_mask: Tensor | None = None) -> Tensor | None:
        """The model's load-balancing loss over every recorded forward (None when inactive).

        ``default_mask`` ``(rows, T)``: the real tokens of a forward recorded without a 2-D mask.
        """
        if not self.active or not self.forwards:
            return None
        for forward in self.forwards:
            if forward.mask is None:
                if default_mask is None:
                    raise ValueError("a forward without a 2-D attention mask needs default_mask")
                forward.mask = default_mask  # an enclosing capture of the same forward reads it too
        return router_aux_loss(self.model, [tuple(f.logits) for f in self.forwards], [f.mask for f in self.forwards])


def layout_tokens(layout: Any) -> Tensor:
    """``(rows, T)`` long: the real tokens of a layout's rows (each row right-padded after its last completion)."""
    rows, width = layout.input_ids.shape
    last = layout.last.reshape(-1)
    length = torch.zeros(rows, dtype=torch.long, device=last.device)
    length = length.scatter_reduce(0, last // width, last % width + 1, reduce="amax")
    return (torch.arange(width, device=last.device)[None, :] < length[:, None]).long()


def router_aux_loss(model: nn.Module, logits: list[tuple[Tensor, ...]], masks: list[Tensor]) -> Tensor | None:
    """The model's load-balancing loss over forwards ``logits`` whose real tokens are ``masks``.

    ``masks[f]`` is forward f's token mask, any shape with as many entries as its router logits
    have rows (a forward's ``(rows, T)`` tokens, 1 = real). The forwards are joined into one set of
    tokens per layer, as if they had been one forward. None when nothing was recorded.
    """
    if not logits or not logits[0]:
        return None
    layers = len(logits[0])
    joined = tuple(torch.cat([forward[layer] for forward in logits], dim=0) for layer in range(layers))
    device = joined[0].device
    mask = torch.cat([m.reshape(-1).to(device) for m in masks]).long()
    if mask.numel() != joined[0].shape[0]:
        raise ValueError(f"router logits cover {joined[0].shape[0]} tokens but the masks {mask.numel()}")
    inner = _language_model(model)
    loss_fn = sys.modules[type(inner).__module__].load_balancing_loss_func
    text = text_config(inner)
    return loss_fn(joined, text.num_experts, text.num_experts_per_tok, mask[None, :])


@dataclass(frozen=True)
class RouterLoss:
    """A forward's router loss as a recipe adds it (what :class:`~vlalign.models.logprobs.CompletionLogprobs` also carries)."""

    router_aux_loss: Tensor | None
    """The load-balancing loss (unweighted, with gradients); None for dense models or when not asked for."""
    router_aux_coef: float | None
    """``router_aux_loss_coef`` of the model's config (None when it asks for no router loss)."""


class HasRouterLoss(Protocol):
    router_aux_loss: Tensor | None
    router_aux_coef: float | None


def add_router_aux_loss(
    loss: Tensor, scored: HasRouterLoss, metrics: MutableMapping[str, Any] | None = None, *, weight: Any = 1.0
) -> Tensor:
    """``loss + weight * coef * aux_loss``: the router loss the model's config asks for; ``loss`` when none.

    ``scored``: the policy's :class:`~vlalign.models.logprobs.CompletionLogprobs` (or a
    :class:`RouterLoss`). ``weight``: the micro-batch's share of the optimiser step, so that the
    step adds ``coef *`` the mean aux loss of its micro-batches whatever the split (a per-example
    ``loss`` that the recipe sums and divides by the step's count needs none: the aux loss is added
    to every example). The unweighted aux loss goes to ``metrics[ROUTER_METRIC]``.
    """
    aux, coef = scored.router_aux_loss, scored.router_aux_coef
    if aux is None or coef is None:
        return loss
    if metrics is not None:
        metrics[ROUTER_METRIC] = aux.detach()
    return loss + (weight * coef) * aux.to(loss.device)


class StepRouterLoss:
    """The router loss of one optimiser step: added to each micro-batch's loss, logged once for the step.

    ``add(loss, scored, weight=share)`` is :func:`add_router_aux_loss` (``loss + share * coef * aux``)
    that also keeps ``share * aux`` and ``share``; ``metrics(reduce)`` gives ``train/router_aux_loss``
    as the mean of the step's micro-batches' aux losses weighted by their shares, over every process
    (``reduce``: a sum over processes, e.g. ``lambda t: accelerator.reduce(t, "sum")``)::

        metric = sum_i share_i * aux_i / sum_i share_i

    ``share`` is the micro-batch's part of the step as its loss counts it (SFT: completion tokens;
    reward model: pairs), so the step added ``coef * metric * sum_i share_i`` to its loss.
    A dense model, or a config that asks for no router loss, gives ``{}`` and adds nothing.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        self.active = router_aux_coef(model) is not None
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)  # [sum share * aux, sum share]

    def add(self, loss: Tensor, scored: HasRouterLoss, *, weight: Any = 1.0) -> Tensor:
        """``loss`` with the micro-batch's router loss added (:func:`add_router_aux_loss`); records it."""
        aux = scored.router_aux_loss
        if aux is not None and scored.router_aux_coef is not None:
            share = torch.as_tensor(weight, dtype=torch.float64).detach().to(self._sums.device)
            self._sums = self._sums + torch.stack([share * aux.detach().to(self._sums), share])
        return add_router_aux_loss(loss, scored, weight=weight)

    def metrics(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """``{ROUTER_METRIC: weighted mean}`` over the step (every process calls it: ``reduce`` is collective)."""
        if not self.active:
            return {}
        sums = reduce(self._sums) if reduce is not None else self._sums
        if float(sums[1]) <= 0:
            return {}
        return {ROUTER_METRIC: (sums[0] / sums[1]).float()}

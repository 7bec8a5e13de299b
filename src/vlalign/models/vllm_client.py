"""Server mode, the trainer's side: :class:`ServerEngine` generates through a ``vlalign rollout-server``.

``rollout.engine: vllm`` with ``rollout.vllm_server: http://host:port``: the trainer keeps no vLLM
(none needs to be installed where it runs); a :class:`ServerEngine` has the interface of
:class:`~vlalign.models.vllm_engine.VLLMEngine` (``generate``, ``sync``, ``load_weights``,
``close``) and talks to the server (:mod:`vlalign.models.rollout_server`) over HTTP with the
standard library. The requests are built, and the answers checked and arranged, by the same
functions as in-process (:func:`~vlalign.models.vllm_requests.generate_through`), so the trainer sees
what a colocated engine would give it.

Weights: after every change of the policy (an optimiser step, a loaded checkpoint) the policy's
weights, LoRA merged and renamed for vLLM (as in-process), are pushed before the next rollout, in
memory (no file), as safetensors parts of about ``chunk_bytes`` each, whole layers per part
(:func:`weight_parts`), each tagged with a version number that the server checks on every
``/generate``. With several trainer processes the main process pushes, the others wait at a barrier.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor, nn

from vlalign.data.collate import PromptLike
from vlalign.models.vllm_engine import check_server, merged_weights, vllm_weight_name, weights_version
from vlalign.models.vllm_requests import EngineGenerations, PromptOutput, RequestBatch, VLLMError, policy_generations

CHUNK_BYTES = 256 << 20
"""Bytes of weights per ``/update_weights`` request (a layer bigger than this goes alone)."""


def layer_of(name: str) -> str:
    """The group a weight is sent with: the name up to its first number (``model.layers.3``: a decoder
    layer, whose q/k/v and gate/up vLLM stacks into one tensor), else its module (weight and bias
    together). vLLM processes a layer once all its weights arrived, so no group is ever split."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name.rpartition(".")[0]


def _groups(weights: Iterable[tuple[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """Consecutive weights of one :func:`layer_of` group (a module's parameters are consecutive in
    ``named_parameters``), on the CPU."""
    group: dict[str, Tensor] = {}
    key = None
    for name, tensor in weights:
        if group and layer_of(name) != key:
            yield group
            group = {}
        key = layer_of(name)
        group[name] = tensor.detach().to("cpu").contiguous()
    if group:
        yield group


def weight_parts(weights: Iterable[tuple[str, Tensor]], chunk_bytes: int) -> Iterator[dict[str, Tensor]]:
    """``weights`` (in the model's order) cut into parts of at most ``chunk_bytes`` at group boundaries
    (:func:`layer_of`; a group bigger than ``chunk_bytes`` is a part of its own); tensors on the CPU."""
    part: dict[str, Tensor] = {}
    size = 0
    for group in _groups(weights):
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if part and size + nbytes > chunk_bytes:
            yield part
            part, size = {}, 0
        part.update(group)
        size += nbytes
    if part:
        yield part


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ServerEngine:
    """A rollout server at ``url`` serving ``model_path`` (checked at start), used like a VLLMEngine."""

    def __init__(
        self,
        url: str,
        model_path: str | Path,
        processor: Any,
        *,
        timeout: float = 3600.0,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        check_server(url, model_path)
        self.url = url.rstrip("/").removesuffix("/v1")
        self.processor = processor
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.model_type = json.loads((Path(model_path) / "config.json").read_text())["model_type"]
        self.version = 0
        self.synced: tuple[int, int] | None = None

    def _request(self, endpoint: str, data: bytes, content_type: str) -> dict[str, Any]:
        """POST ``data`` to ``endpoint`` (with its query); the JSON answer, or :class:`VLLMError` naming
        the URL and the endpoint with the server's message."""
        req = urllib.request.Request(f"{self.url}{endpoint}", data=data, headers={"Content-Type": content_type})
        where = f"rollout.vllm_server={self.url}: POST {endpoint.split('?')[0]}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read().decode())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code} {exc.reason}"
            raise VLLMError(f"{where} failed: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise VLLMError(f"{where} failed: {getattr(exc, 'reason', exc)} (is the server still running?)") from None

    # -- weights

    def load_weights(self, model: nn.Module) -> None:
        """Push the policy's current weights (LoRA merged, vLLM's names) as the next version."""
        rank, world = _rank_and_world()
        self.version += 1
        if rank == 0:
            weights = ((vllm_weight_name(self.model_type, n), t) for n, t in merged_weights(model))
            parts = weight_parts(weights, self.chunk_bytes)
            part = next(parts, None)
            index = 0
            while part is not None:
                following = next(parts, None)
                last = int(following is None)
                query = f"/update_weights?version={self.version}&part={index}&last={last}"
                self._request(query, save(part), "application/octet-stream")
                part, index = following, index + 1
        if world > 1:
            torch.distributed.barrier()  # the others generate once the server holds the new weights
        self.synced = weights_version(model)

    def sync(self, model: nn.Module) -> None:
        """:meth:`load_weights` when the policy changed since the last push."""
        if self.synced != weights_version(model):
            self.load_weights(model)

    # -- generation

    def run_batch(self, batch: RequestBatch) -> list[PromptOutput]:
        body = json.dumps({"weights_version": self.version, "batch": batch.to_json()}).encode()
        answer = self._request("/generate", body, "application/json")
        return [PromptOutput.from_json(o) for o in answer["outputs"]]

    def generate(self, model: nn.Module, samples: Sequence[PromptLike], **kwargs: Any) -> EngineGenerations:
        """As :meth:`VLLMEngine.generate <vlalign.models.vllm_engine.VLLMEngine.generate>`, on the server."""
        start = time.perf_counter()
        result = policy_generations(self, model, samples, **kwargs)
        result.seconds = time.perf_counter() - start  # the push included, as in-process
        return result

    def close(self) -> None:
        """Nothing to free here: the server keeps running for the next run (``POST /close`` stops it)."""


__all__ = ["CHUNK_BYTES", "ServerEngine", "layer_of", "weight_parts"]

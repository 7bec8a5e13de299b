"""vLLM as the rollout engine (``rollout.engine: vllm``): generation in vLLM, training in the policy.

The engine lives in the trainer's process ("colocated", as verl's and TRL's colocate modes): one
:class:`VLLMEngine` per process, built from the policy's model folder at start-up and handed the
policy's weights after every update (:meth:`VLLMEngine.load_weights`: an in-memory iterator of
``(name, tensor)``, LoRA merged, no file written; :meth:`VLLMEngine.generate` does it itself when the
policy's parameters changed since the last load), then its prefix and encoder caches are reset
(stale KV from the old weights would otherwise be reused). On a GPU the engine can sleep during the
update (``rollout.vllm_sleep``: weights and KV cache freed, woken for the next rollout); vLLM's
CPU build has no sleep mode. On devices of its own, the same engine serves trainers over HTTP
(``vlalign rollout-server``: :mod:`vlalign.models.rollout_server`, the trainer's side
:mod:`vlalign.models.vllm_client`); the requests are built and the answers read by the functions of
:mod:`vlalign.models.vllm_requests` in both cases.

What the engine returns is what :func:`vlalign.models.generate.generate` returns
(:class:`EngineGenerations`: the prompts' one processor call, the generated token ids with the
stop token, stop flags, texts) plus vLLM's log-probability of every sampled token (at the sampling
temperature, after top-k / top-p: ``logprobs_mode="processed_logprobs"``), which the truncated
importance-sampling correction uses (:func:`vlalign.losses.truncated_is_weights`). The trainer
scores the token ids with its own shared-prefix forward, as with the ``hf`` engine.

Prompts reach vLLM as the rendered chat text and the images (vLLM runs the processor itself); the
token ids it makes of them are checked against ours, so the engine and the trainer condition on the
same prompt. Sampling: every completion is its own request seeded by
:func:`~vlalign.models.generate.stream_seed` ``(seed, sample id, k)``, so completions do not depend on
the batch and a resumed run samples the same ones (vLLM's own random stream, not the ``hf`` engine's:
sampled completions differ between the engines; greedy ones are equal).

vLLM is optional and imported inside the functions that need it. :func:`check_vllm` fails at
start-up with one line (:class:`VLLMError`) when vLLM is not installed or cannot load the model.
"""

from __future__ import annotations

import gc
import json
import os
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlalign.data.collate import PromptLike
from vlalign.models.generate import GenerationSettings
from vlalign.models.vllm_requests import (
    EngineGenerations,
    PromptOutput,
    RequestBatch,
    VLLMError,
    policy_generations,
)

SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3")
"""``model_type`` values vLLM loads and the equivalence tests cover (tests/vllm_rollout)."""

NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")
"""Gemma3 in vLLM looks these up as single tokens (its image placeholder is built from them)."""

EXPORT_DIR = "vllm-export"
"""Sub-folder of a model folder holding its vLLM-ready copy (renamed weight keys), when one is needed."""


# ----------------------------------------------------------------------------- start-up checks


def _config(model_path: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_path) / "config.json").read_text())


def unsupported_reason(model_path: str | Path) -> str | None:
    """Why vLLM cannot load the model folder here, or None when it can."""
    cfg = _config(model_path)
    kind = cfg.get("model_type", "?")
    if kind == "gemma3":
        tok = json.loads((Path(model_path) / "tokenizer.json").read_text()).get("model", {}).get("vocab", {})
        missing = [repr(s) for s in NEWLINES if s.replace("\n", "Ċ") not in tok and s not in tok]
        if missing:
            return f"vLLM's Gemma3 needs single tokens for {', '.join(missing)}, which this tokenizer lacks"
    if kind not in SUPPORTED and kind != "gemma3":
        return f"model_type {kind!r} is not one vlalign runs in vLLM (supported: {', '.join(SUPPORTED)})"
    if kind in ("qwen2_vl", "qwen2_5_vl") and cfg.get("vision_config", {}).get("spatial_merge_size", 2) < 2:
        return "vLLM's Qwen2-VL ignores spatial_merge_size 1 (tiny:*:small); use a model with merge 2 (tiny, bench)"
    return None


def check_vllm(model_path: str | Path, option: str = "rollout.engine") -> None:
    """Raise :class:`VLLMError` (one line: what to do) unless vLLM is importable and can load the model;
    ``option`` names the setting that asked for vLLM (``engine`` for ``vlalign eval`` ...)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise VLLMError(
            f"{option}=vllm needs vLLM ({exc.__class__.__name__}: {exc}); install it (GPU: pip install "
            f"vllm; CPU test environment: make test-vllm) or set {option}=hf"
        ) from None
    reason = unsupported_reason(model_path)
    if reason:
        raise VLLMError(f"{option}=vllm cannot load {model_path}: {reason}; set {option}=hf")


def served_models(url: str, *, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The models a vLLM OpenAI-compatible server at ``url`` serves (its ``GET /v1/models``), or
    :class:`VLLMError` (one line naming ``url``) when it cannot be reached or answers something else."""
    endpoint = url.rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as response:
            body = json.loads(response.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise VLLMError(
            f"rollout.vllm_server={url} is not reachable ({endpoint}: {reason}); start it (vlalign rollout-server "
            "--model=<folder>; vLLM's own api_server lacks its /generate) or leave rollout.vllm_server empty"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise VLLMError(f"rollout.vllm_server={url}: {endpoint} did not answer as a vLLM server (no model list)")
    return [m for m in body["data"] if isinstance(m, dict)]


def _same_model(served: dict[str, Any], model_path: Path) -> bool:
    for name in (served.get("id"), served.get("root")):
        if isinstance(name, str) and name:
            if name == str(model_path) or (Path(name).exists() and Path(name).resolve() == model_path.resolve()):
                return True
    return False


def check_server(url: str, model_path: str | Path, *, timeout: float = 5.0) -> None:
    """Start-up check of server mode: the server at ``url`` answers and serves ``model_path`` (the
    policy's folder, or its vLLM-ready copy: a served model's ``id`` or ``root`` names it); else
    :class:`VLLMError`, one line naming the URL and what it serves."""
    wanted = Path(model_path)
    served = served_models(url, timeout=timeout)
    accepted = (wanted, wanted / EXPORT_DIR)
    if not any(_same_model(m, p) for m in served for p in accepted):
        names = ", ".join(str(m.get("root") or m.get("id")) for m in served) or "nothing"
        raise VLLMError(
            f"rollout.vllm_server={url} serves {names}, not the policy {wanted}; start it with --model {wanted}"
        )


# ----------------------------------------------------------------------------- weight names


def vllm_weight_name(model_type: str, name: str) -> str:
    """The checkpoint name vLLM's ``load_weights`` expects for the policy's weight ``name``.

    LLaVA: transformers 5 keeps the CLIP tower's modules directly under ``vision_tower``; vLLM's
    CLIP has them under ``vision_tower.vision_model``. Every other supported model: unchanged.
    """
    if model_type == "llava":
        for prefix in ("model.vision_tower.", "vision_tower."):
            if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                return prefix + "vision_model." + name[len(prefix) :]
    return name


def vllm_model_folder(model_path: str | Path) -> Path:
    """``model_path`` itself when vLLM reads it as saved, else its vLLM-ready copy (written once, under
    :data:`EXPORT_DIR`: weights with :func:`vllm_weight_name` keys, the other files linked)."""
    src = Path(model_path)
    kind = _config(src).get("model_type", "")
    weights = sorted(src.glob("*.safetensors"))
    if kind != "llava" or not weights:
        return src
    out = src / EXPORT_DIR
    if (out / "config.json").exists():
        return out
    tmp = src / f".{EXPORT_DIR}.{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            (tmp / item.name).symlink_to(item.resolve())
    for path in weights:
        tensors = {vllm_weight_name(kind, k): v for k, v in load_file(path).items()}
        save_file(tensors, tmp / path.name, metadata={"format": "pt"})
    tmp.rename(out) if not out.exists() else None
    return out


def merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights as a plain model's names and values, LoRA merged (W + scale * B A, computed
    out of place: the policy is untouched). PEFT's ``base_model.model.`` / ``.base_layer`` wrappers
    are removed; a ``modules_to_save`` copy replaces its original."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = {n: m for n, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    for name, param in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        value = param.detach()
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer"):
            layer = lora.get(owner[: -len(".base_layer")])
            if layer is not None and leaf == "weight" and not getattr(layer, "merged", False):
                for adapter in layer.active_adapters:
                    if adapter in getattr(layer, "lora_A", {}):
                        value = value + layer.get_delta_weight(adapter).to(value.dtype)
            name = name.replace(".base_layer", "")
        yield name.replace(".modules_to_save.default", ""), value


def weights_version(model: nn.Module) -> tuple[int, int]:
    """Changes whenever a parameter of ``model`` is changed in place (torch's per-tensor version
    counters only grow) or the parameters are replaced."""
    params = list(model.parameters())
    return sum(id(p) for p in params), sum(p._version for p in params)


# ----------------------------------------------------------------------------- the engine


OPEN: weakref.WeakSet[VLLMEngine] = weakref.WeakSet()
"""The engines of this process not closed yet (:func:`close_engines`)."""


def close_engines() -> None:
    """Close every open engine of this process (a recipe calls this before its run ends)."""
    for engine in list(OPEN):
        engine.close()


@dataclass
class VLLMOptions:
    """How the vLLM engine is built (the recipe fills this from ``rollout.vllm_*``)."""

    gpu_memory_utilization: float = 0.3
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    sleep: bool = False
    cpu_kv_cache_gb: int = 1
    prefix_caching: bool = True


def options_of(settings: GenerationSettings) -> VLLMOptions:
    """The engine options a :class:`~vlalign.models.generate.GenerationSettings` holds (``vllm_*``)."""
    return VLLMOptions(
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        max_model_len=settings.vllm_max_model_len,
        tensor_parallel_size=settings.vllm_tensor_parallel,
        sleep=settings.vllm_sleep,
    )


def generate_once(
    model_path: str | Path, model: nn.Module, processor: Any, samples: Sequence[PromptLike], **kwargs: Any
) -> EngineGenerations:
    """One generation by a vLLM engine started for it and closed after (iterative DPO's sampling of a
    saved policy); ``kwargs``: ``options`` (:class:`VLLMOptions`) and those of :meth:`VLLMEngine.generate`."""
    options = kwargs.pop("options", VLLMOptions())
    engine = VLLMEngine(model_path, processor, dtype=next(model.parameters()).dtype, options=options)
    try:
        return engine.generate(model, samples, **kwargs)
    finally:
        engine.close()


class VLLMEngine:
    """A vLLM ``LLM`` in this process for one model folder (see the module doc)."""

    def __init__(self, model_path: str | Path, processor: Any, *, dtype: torch.dtype, options: VLLMOptions) -> None:
        check_vllm(model_path)
        # in-process engine core (weights can be handed over as tensors); CPU build: bounded KV cache
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gb))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        self.model_type = _config(model_path)["model_type"]
        self.processor = processor
        self.options = options
        self.llm = LLM(
            model=str(vllm_model_folder(model_path)),
            dtype=str(dtype).removeprefix("torch."),
            seed=0,
            max_model_len=options.max_model_len,
            gpu_memory_utilization=options.gpu_memory_utilization,
            tensor_parallel_size=options.tensor_parallel_size,
            enable_sleep_mode=options.sleep,
            enforce_eager=not torch.cuda.is_available(),
            enable_prefix_caching=options.prefix_caching,
            logprobs_mode="processed_logprobs",
            limit_mm_per_prompt={"image": 4},
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self._allowed_ids: dict[tuple[int, ...], list[int]] = {}
        self.asleep = False
        self.synced: tuple[int, int] | None = None
        OPEN.add(self)

    def close(self) -> None:
        """Shut the engine down (its memory and the torch.distributed state vLLM set up in this process).
        Call before anything else tears that state down (the run's end does): afterwards vLLM could
        neither shut down cleanly nor start another engine in this process."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            OPEN.discard(self)
            gc.collect()

    # -- weights

    def load_weights(self, model: nn.Module) -> None:
        """Hand the policy's current weights to the engine (in memory, LoRA merged), then drop the
        prefix and encoder caches computed with the old weights."""
        self.load_tensors((vllm_weight_name(self.model_type, n), t) for n, t in merged_weights(model))
        self.synced = weights_version(model)

    def load_tensors(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load ``(name, tensor)`` pairs, vLLM's names (all of the model or whole layers of it: vLLM
        processes a layer once all its weights arrived), then drop the prefix and encoder caches."""
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    def sync(self, model: nn.Module) -> None:
        """:meth:`load_weights` when the policy changed since the last load (an optimiser step, a loaded
        checkpoint: every in-place change of a parameter bumps its version counter)."""
        if self.synced != weights_version(model):
            self.load_weights(model)

    def sleep(self) -> None:
        """Free the engine's weights and KV cache during the update (GPU with ``rollout.vllm_sleep``)."""
        if self.options.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # -- generation

    def _allowed(self, banned: Sequence[int]) -> list[int]:
        key = tuple(sorted(set(banned)))
        if key not in self._allowed_ids:
            skip = set(key)
            self._allowed_ids[key] = [i for i in range(self.vocab_size) if i not in skip]
        return self._allowed_ids[key]

    def run_batch(self, batch: RequestBatch) -> list[PromptOutput]:
        """Generate the completion requests of ``batch`` (the model's current weights; the rollout
        server calls this for its clients), one :class:`PromptOutput` per prompt."""
        from vllm import SamplingParams

        self.wake_up()
        requests, params = [], []
        allowed = self._allowed(batch.banned_ids)
        for text, images, seeds in zip(batch.prompts, batch.images, batch.seeds):
            prompt: dict[str, Any] = {"prompt": text}
            if images:
                prompt["multi_modal_data"] = {"image": list(images)}
            for seed in seeds:
                requests.append(prompt)
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=batch.temperature,
                        top_p=batch.top_p,
                        top_k=batch.top_k,
                        max_tokens=batch.max_new_tokens,
                        seed=seed,
                        stop_token_ids=batch.stop_ids,
                        logprobs=0,
                        allowed_token_ids=allowed,
                        detokenize=False,
                    )
                )
        outputs = iter(self.llm.generate(requests, params, use_tqdm=False))
        answers = []
        for seeds in batch.seeds:
            group = [next(outputs) for _ in seeds]
            done = [o.outputs[0] for o in group]
            answers.append(
                PromptOutput(
                    prompt_ids=list(group[0].prompt_token_ids),
                    token_ids=[list(c.token_ids) for c in done],
                    logps=[[d[t].logprob for t, d in zip(c.token_ids, c.logprobs)] for c in done],
                    stopped=[c.finish_reason == "stop" for c in done],
                )
            )
        return answers

    def generate(self, model: nn.Module, samples: Sequence[PromptLike], **kwargs: Any) -> EngineGenerations:
        """``n`` completions per sample (greedy when ``temperature == 0``: decoded once, repeated), as
        :func:`vlalign.models.generate.generate` with ``keep_prompts=True``; ``kwargs``: those of
        :func:`~vlalign.models.vllm_requests.generate_through` (n, temperature, top_p, top_k,
        max_new_tokens, seed, batch_size). ``model`` is the policy: its weights are loaded first if
        they changed since the engine last took them (:meth:`sync`)."""
        start = time.perf_counter()
        result = policy_generations(self, model, samples, **kwargs)
        self.sleep()  # until the next rollout (rollout.vllm_sleep, GPU)
        result.seconds = time.perf_counter() - start
        return result


__all__ = [
    "EngineGenerations",
    "SUPPORTED",
    "VLLMEngine",
    "VLLMError",
    "VLLMOptions",
    "check_server",
    "check_vllm",
    "close_engines",
    "generate_once",
    "options_of",
    "served_models",
    "merged_weights",
    "unsupported_reason",
    "vllm_model_folder",
    "vllm_weight_name",
]

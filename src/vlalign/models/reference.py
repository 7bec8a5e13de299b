"""Reference policies: a frozen copy, the adapter-disabled model, or log-probs precomputed on disk.

DPO-family losses and the KL terms of PPO / GRPO need log-probs of the same completions under a
fixed reference policy. Three strategies share one interface, :class:`ReferencePolicy`
(``logprobs(prompts, completions, sample_keys=None) -> CompletionLogprobs``, detached), chosen by
name with :func:`make_reference`:

``"copy"`` (:class:`FrozenCopyReference`)
    A deep copy of the model, frozen and in eval mode. Costs one model's memory.
``"adapter"`` (:class:`AdapterDisabledReference`)
    The policy itself with its LoRA adapter switched off (PEFT's ``disable_adapter()``); no second
    copy in memory. Only for PEFT models.
``"precomputed"`` (:class:`PrecomputedReference`)
    Log-probs computed once (before training, :meth:`PrecomputedReference.precompute`) and cached
    on disk, keyed by the reference model's fingerprint (:func:`model_fingerprint`), each sample's
    content hash, images included (:func:`prompt_content_hash`), the temperature and the completion's
    tokens. Later runs read them and run no reference forward at all; a changed image gives a new
    key and a changed model a new fingerprint, so stale entries are never used. After
    precomputing, :meth:`~PrecomputedReference.release_source` frees the source model (a frozen
    copy); a later miss is then an error naming the sample instead of a silent recomputation
    under a model that has moved.

Every strategy computes with :func:`vlalign.models.logprobs.completion_logprobs` under
``torch.no_grad()`` with the model in eval mode (no dropout), in the same ``mode`` as the policy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from vlalign.data.collate import IGNORE_INDEX, EncodedPrompts
from vlalign.models.arch import unwrap_parallel
from vlalign.models.fingerprints import model_fingerprint, prompt_content_hash
from vlalign.models.logprobs import CompletionLogprobs, Mode, completion_logprobs
from vlalign.models.packing import Completions

ReferenceName = Literal["copy", "adapter", "precomputed"]
CACHE_FORMAT = 1


# ------------------------------------------------------------------------------- the interface


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block, each restored to its own previous mode after."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in states:
            module.training = training


class ReferencePolicy(ABC):
    """Log-probs of completions under a fixed reference policy (detached: no gradient)."""

    name: ClassVar[str]
    num_forwards: int
    """Reference forwards run so far (the cache counts as none)."""

    @abstractmethod
    def logprobs(
        self,
        prompts: EncodedPrompts,
        completions: Completions,
        *,
        sample_keys: Sequence[str] | None = None,
        temperature: float = 1.0,
        pack_length: int | None = None,
    ) -> CompletionLogprobs:
        """Per-token reference log-probs of ``completions[i][j]`` given prompt ``i`` (flat order).
        ``pack_length``: several prompts per row of at most that many tokens (``completion_logprobs``'s
        packing: the same log-probs in fewer slots; None: one prompt per row)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the reference model's weights (the precomputed cache's key)."""


class _ModelReference(ReferencePolicy):
    """Shared by the strategies that run a model."""

    def __init__(self, model: nn.Module, *, mode: Mode = "shared", pad_token_id: int = 0) -> None:
        self.model = model
        self.mode: Mode = mode
        self.pad_token_id = pad_token_id
        self.num_forwards = 0
        self._fingerprint: str | None = None

    @contextmanager
    def _context(self) -> Iterator[None]:
        yield

    def logprobs(
        self,
        prompts: EncodedPrompts,
        completions: Completions,
        *,
        sample_keys: Sequence[str] | None = None,
        temperature: float = 1.0,
        pack_length: int | None = None,
    ) -> CompletionLogprobs:
        with torch.no_grad(), self._context(), eval_mode(self.model):
            result = completion_logprobs(
                self.model,
                prompts,
                completions,
                mode=self.mode,
                temperature=temperature,
                pad_token_id=self.pad_token_id,
                pack_length=pack_length,
            )
        self.num_forwards += 1
        return result.detach()


class FrozenCopyReference(_ModelReference):
    """A frozen deep copy of the model (taken at construction: build it before training starts)."""

    name = "copy"

    def __init__(self, model: nn.Module, *, mode: Mode = "shared", pad_token_id: int = 0) -> None:
        frozen = copy.deepcopy(unwrap_parallel(model))
        frozen.requires_grad_(False)
        frozen.eval()
        super().__init__(frozen, mode=mode, pad_token_id=pad_token_id)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint


class AdapterDisabledReference(_ModelReference):
    """The policy with its LoRA adapter disabled: the base model, without a second copy."""

    name = "adapter"

    def __init__(self, model: nn.Module, *, mode: Mode = "shared", pad_token_id: int = 0) -> None:
        if not hasattr(unwrap_parallel(model), "disable_adapter"):
            raise ValueError(
                f"the 'adapter' reference needs a PEFT (LoRA) model, got {type(model).__name__}; use the 'copy' "
                "reference for full fine-tuning, or 'precomputed' to avoid keeping a copy in memory"
            )
        super().__init__(model, mode=mode, pad_token_id=pad_token_id)

    @contextmanager
    def _context(self) -> Iterator[None]:
        with unwrap_parallel(self.model).disable_adapter():
            yield

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(unwrap_parallel(self.model), base_only=True)
        return self._fingerprint


class StartingPolicyReference(_ModelReference):
    """The policy itself, scored before it trains: what a frozen copy computes, without the copy.

    Only as the source of a :class:`PrecomputedReference` filled before the first optimiser step
    and released after (its fingerprint is taken here, from the starting weights): for a policy
    whose frozen copy would not fit in memory.
    """

    name = "policy"

    def __init__(self, model: nn.Module, *, mode: Mode = "shared", pad_token_id: int = 0) -> None:
        super().__init__(model, mode=mode, pad_token_id=pad_token_id)
        self._fingerprint = model_fingerprint(unwrap_parallel(model))

    def fingerprint(self) -> str:
        assert self._fingerprint is not None
        return self._fingerprint


# ------------------------------------------------------------------------------------- cache


class ReferenceCacheMiss(KeyError):
    """Reference log-probs are not in the cache and no source model is left to compute them."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PrecomputedReference(ReferencePolicy):
    """Reference log-probs from an on-disk cache, computed by ``source`` on a miss.

    The cache lives in ``cache_dir / <fingerprint>`` as shard files (one per computing call), each
    holding entry keys, lengths and the per-token log-probs (float32). Entries are keyed by
    (sample key, temperature, completion tokens); the folder by the source's fingerprint, so a
    changed model never reads another model's entries.
    """

    name = "precomputed"

    def __init__(
        self,
        source: ReferencePolicy | None,
        cache_dir: str | os.PathLike,
        *,
        fingerprint: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if source is None and fingerprint is None:
            raise ValueError("PrecomputedReference needs a source model or an explicit fingerprint")
        self.source = source
        self._fingerprint = fingerprint or source.fingerprint()  # type: ignore[union-attr]
        self.folder = Path(cache_dir) / self._fingerprint
        self.device = torch.device(device) if device is not None else _source_device(source)
        self.num_forwards = 0
        self.num_hits = 0
        self.num_computed = 0
        self._entries: dict[str, Tensor] | None = None

    def fingerprint(self) -> str:
        return self._fingerprint

    def release_source(self) -> None:
        """Drop the source model (free a frozen copy); later misses raise :class:`ReferenceCacheMiss`."""
        self.source = None

    def reload(self) -> None:
        """Forget the entries read so far: the next lookup reads the cache folder again (call it on
        every process after another process, e.g. the main one, has written new shards)."""
        self._entries = None

    # ---- storage

    def _load(self) -> dict[str, Tensor]:
        if self._entries is None:
            self._entries = {}
            for shard in sorted(self.folder.glob("shard-*.pt")):
                data = torch.load(shard, weights_only=True)
                for key, part in zip(data["keys"], torch.split(data["values"], data["lengths"].tolist())):
                    self._entries[key] = part
        return self._entries

    def _store(self, new: dict[str, Tensor]) -> None:
        if not new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps({"fingerprint": self._fingerprint, "format": CACHE_FORMAT}) + "\n")
        keys = list(new)
        data = {
            "keys": keys,
            "lengths": torch.tensor([new[k].numel() for k in keys], dtype=torch.long),
            "values": torch.cat([new[k] for k in keys]),
        }
        final = self.folder / f"shard-{time.time_ns()}-{os.getpid()}.pt"
        tmp = final.with_suffix(".tmp")
        torch.save(data, tmp)
        os.replace(tmp, final)
        self._load().update(new)

    @staticmethod
    def entry_key(sample_key: str, tokens: Sequence[int], temperature: float) -> str:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"{sample_key}|{float(temperature)!r}|".encode())
        digest.update(torch.tensor(list(tokens), dtype=torch.long).numpy().tobytes())
        return digest.hexdigest()

    # ---- lookups

    def logprobs(
        self,
        prompts: EncodedPrompts,
        completions: Completions,
        *,
        sample_keys: Sequence[str] | None = None,
        temperature: float = 1.0,
        pack_length: int | None = None,
    ) -> CompletionLogprobs:
        if sample_keys is None:
            sample_keys = [prompt_content_hash(prompts, i) for i in range(len(prompts))]
        if len(sample_keys) != len(prompts):
            raise ValueError(f"{len(sample_keys)} sample keys for {len(prompts)} prompts")
        keys = [[self.entry_key(sample_keys[i], c, temperature) for c in group] for i, group in enumerate(completions)]
        entries = self._load()
        missing = [
            (i, j)
            for i, group in enumerate(keys)
            for j, k in enumerate(group)
            if k not in entries or entries[k].numel() != len(completions[i][j])
        ]
        computed = self._compute(prompts, completions, keys, missing, temperature, pack_length) if missing else 0
        self.num_hits += sum(len(g) for g in keys) - len(missing)
        return self._assemble(completions, keys, computed)

    def _compute(
        self,
        prompts: EncodedPrompts,
        completions: Completions,
        keys: list[list[str]],
        missing: list[tuple[int, int]],
        temperature: float,
        pack_length: int | None = None,
    ) -> int:
        if self.source is None:
            i, j = missing[0]
            raise ReferenceCacheMiss(
                f"reference log-probs of sample {prompts.sample_ids[i]!r} (completion {j}) are not in the cache at "
                f"{self.folder} and the source model was released; run precompute() over the whole dataset before "
                "releasing the source (or keep it)"
            )
        need = sorted({i for i, _ in missing})
        wanted = {i: [j for ii, j in missing if ii == i] for i in need}
        result = self.source.logprobs(
            prompts.select(need),
            [[completions[i][j] for j in wanted[i]] for i in need],
            temperature=temperature,
            pack_length=pack_length,
        )
        self.num_forwards += 1
        new: dict[str, Tensor] = {}
        r = 0
        for i in need:
            for j in wanted[i]:
                new[keys[i][j]] = result.logps[r, : len(completions[i][j])].detach().float().cpu().clone()
                r += 1
        self._store(new)
        self.num_computed += len(new)
        return result.num_tokens

    def _assemble(self, completions: Completions, keys: list[list[str]], num_tokens: int) -> CompletionLogprobs:
        entries = self._load()
        flat = [(i, j) for i, group in enumerate(completions) for j in range(len(group))]
        width = max((len(completions[i][j]) for i, j in flat), default=0)
        logps = torch.zeros((len(flat), width), dtype=torch.float32)
        mask = torch.zeros((len(flat), width), dtype=torch.bool)
        token_ids = torch.full((len(flat), width), IGNORE_INDEX, dtype=torch.long)
        for r, (i, j) in enumerate(flat):
            n = len(completions[i][j])
            logps[r, :n] = entries[keys[i][j]]
            mask[r, :n] = True
            token_ids[r, :n] = torch.tensor(list(completions[i][j]), dtype=torch.long)
        out = CompletionLogprobs(
            logps=logps,
            mask=mask,
            token_ids=token_ids,
            row_prompt=torch.tensor([i for i, _ in flat], dtype=torch.long),
            row_completion=torch.tensor([j for _, j in flat], dtype=torch.long),
            mode="cache",
            num_tokens=num_tokens,
            num_slots=0,
        )
        return out.to(self.device)

    def precompute(
        self,
        batches: Iterable[tuple[EncodedPrompts, Completions] | tuple[EncodedPrompts, Completions, Sequence[str]]],
        *,
        temperature: float = 1.0,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, int]:
        """Fill the cache for every batch (prompts, completions[, sample keys]); returns hit / computed counts."""
        hits, computed = self.num_hits, self.num_computed
        for n, batch in enumerate(batches):
            prompts, completions = batch[0], batch[1]
            keys = batch[2] if len(batch) > 2 else None  # type: ignore[misc]
            self.logprobs(prompts, completions, sample_keys=keys, temperature=temperature)
            if progress is not None:
                progress(n + 1)
        return {"hits": self.num_hits - hits, "computed": self.num_computed - computed}


def _source_device(source: ReferencePolicy | None) -> torch.device:
    model = getattr(source, "model", None)
    if isinstance(model, nn.Module):
        return next(model.parameters()).device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ factory


REFERENCE_STRATEGIES: dict[str, type[ReferencePolicy]] = {
    "copy": FrozenCopyReference,
    "adapter": AdapterDisabledReference,
    "precomputed": PrecomputedReference,
}


def make_reference(
    name: ReferenceName,
    model: nn.Module,
    *,
    cache_dir: str | os.PathLike | None = None,
    mode: Mode = "shared",
    pad_token_id: int = 0,
    copy_policy: bool = True,
) -> ReferencePolicy:
    """The reference strategy ``name`` for the policy ``model`` (build it before training starts).

    ``"precomputed"`` computes misses with the adapter-disabled model for a PEFT model, with a
    frozen copy otherwise (free it with ``release_source()`` once :meth:`~PrecomputedReference.precompute`
    has run), or, with ``copy_policy=False``, with the policy itself (:class:`StartingPolicyReference`:
    no copy in memory; fill the cache and release the source before the first optimiser step),
    and needs ``cache_dir``.
    """
    if name == "copy":
        return FrozenCopyReference(model, mode=mode, pad_token_id=pad_token_id)
    if name == "adapter":
        return AdapterDisabledReference(model, mode=mode, pad_token_id=pad_token_id)
    if name == "precomputed":
        if cache_dir is None:
            raise ValueError("the 'precomputed' reference needs cache_dir (a folder for the cached log-probs)")
        peft = hasattr(unwrap_parallel(model), "disable_adapter")
        kind = AdapterDisabledReference if peft else FrozenCopyReference if copy_policy else StartingPolicyReference
        source: ReferencePolicy = kind(model, mode=mode, pad_token_id=pad_token_id)
        return PrecomputedReference(source, cache_dir)
    raise ValueError(f"unknown reference strategy {name!r}; choose one of {sorted(REFERENCE_STRATEGIES)}")

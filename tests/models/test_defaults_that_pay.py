"""The defaults of issue 23 that depend on the run: the LM-head path and the reference strategy.

``logits_mode="auto"`` (the default of :func:`~vlalign.models.logprobs.completion_logprobs`) is
the chunked head from :data:`~vlalign.models.head_logprobs.CHUNKED_MIN_VOCAB` vocabulary rows up
and the full logits below; ``reference.strategy=auto`` caches the reference log-probs when the
planned run passes over its data more than once (each sample's reference forward then runs once
instead of once per pass).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from torch import nn

from vlalign.models import logprobs as engine
from vlalign.models.head_logprobs import CHUNKED_MIN_VOCAB
from vlalign.models.logprobs import resolve_logits_mode
from vlalign.recipes.preference_common import planned_passes, resolved_strategy


class _Head(nn.Module):
    """Just enough of a model for the head-size rule: ``get_output_embeddings`` and a config."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="fake", vocab_size=rows)
        self.head = nn.Linear(2, rows, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_auto_logits_mode_follows_the_vocabulary_size(caplog, monkeypatch):
    monkeypatch.setattr(engine, "_logged", set())  # the module logs each decision once per process
    with caplog.at_level(logging.INFO, logger="vlalign.models.logprobs"):
        assert resolve_logits_mode(_Head(CHUNKED_MIN_VOCAB), "auto") == "chunked"
        assert resolve_logits_mode(_Head(CHUNKED_MIN_VOCAB - 1), "auto") == "full"
    assert resolve_logits_mode(_Head(10), "chunked") == "chunked"  # an explicit mode stays
    assert resolve_logits_mode(_Head(10**6), "full") == "full"
    assert f"logits_mode='auto' -> 'chunked' ({CHUNKED_MIN_VOCAB:,} rows" in caplog.text


def test_tiny_models_keep_the_full_logits(tiny_model, shape_images):
    """The tiny test models (~1k rows) resolve to the full path, so every exact-zero test stays on it."""
    model, _ = tiny_model("qwen2_vl")
    assert resolve_logits_mode(model, "auto") == "full"


def test_planned_passes():
    """max_steps x batch x grad_accum x processes / samples; epochs when max_steps is 0."""
    train = SimpleNamespace(max_steps=4, batch_size=4, grad_accum=1, epochs=1.0)
    assert planned_passes(train, 4) == 4.0
    assert planned_passes(train, 8, num_processes=2) == 4.0
    assert planned_passes(train, 0) == 0.0
    assert planned_passes(SimpleNamespace(max_steps=0, batch_size=4, grad_accum=1, epochs=3.0), 100) == 3.0


@pytest.mark.parametrize(
    "passes,lora,ref_model,expected",
    [
        (1.0, False, "", "copy"),
        (1.0, True, "", "adapter"),
        (1.5, False, "", "precomputed"),
        (1.5, True, "", "precomputed"),
        (3.0, False, "other", "precomputed"),
        (0.0, True, "", "adapter"),  # 0: the recipe cannot cache every log-prob it needs (KTO)
    ],
)
def test_auto_reference_strategy_caches_when_it_pays(passes, lora, ref_model, expected):
    assert resolved_strategy("auto", lora=lora, ref_model=ref_model, passes=passes) == expected
    assert resolved_strategy("copy", lora=lora, ref_model=ref_model, passes=passes) == "copy"

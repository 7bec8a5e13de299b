"""Fixtures of the vLLM tests (run in the vLLM environment: ``make test-vllm``; skipped elsewhere).

``vllm_engine(arch)``: one :class:`~vlalign.models.vllm_engine.VLLMEngine` per architecture for the
whole session (building one takes 10-40 s on this CPU), over the session's tiny model folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vlalign.data.schema import PromptSample, user_prompt

QUESTIONS = ("Describe the image.", "How many squares are there?", "What colour is the circle?", "Is there a star?")


@pytest.fixture(scope="session")
def vllm_engine(
    tiny_model_dir: Callable[..., Path], tiny_processor: Callable[[str], Any]
) -> Iterator[Callable[[str], Any]]:
    from vlalign.models.vllm_engine import VLLMEngine, VLLMOptions

    engines: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in engines:
            engines[arch] = VLLMEngine(
                tiny_model_dir(arch),
                tiny_processor(arch),
                dtype=torch.float32,
                options=VLLMOptions(max_model_len=512),
            )
        return engines[arch]

    yield get
    from vlalign.models.vllm_engine import close_engines

    close_engines()


@pytest.fixture
def vllm_prompts(shape_images: list) -> list[PromptSample]:
    """Four prompts, one per shape image."""
    return [PromptSample(f"v{i}", [shape_images[i]], user_prompt(q)) for i, q in enumerate(QUESTIONS)]

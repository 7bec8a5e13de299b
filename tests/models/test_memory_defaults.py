"""The defaults that weigh memory: ``logits_mode="auto"`` per device and the reference copy that must fit.

Both decisions are pure functions of sizes (:func:`~vlalign.models.head_logprobs.auto_logits_mode`,
:func:`~vlalign.models.memory.reference_copy_problem`), so every case is worked by hand here,
CUDA's included, without a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from vlalign.data.collate import encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.models import logprobs as engine
from vlalign.models.head_logprobs import (
    CHUNKED_MIN_VOCAB,
    FULL_LOGITS_MAX_SHARE,
    auto_logits_mode,
    full_logits_bytes,
)
from vlalign.models.memory import (
    parameter_bytes,
    reference_copy_problem,
    system_available_bytes,
    training_state_bytes,
)
from vlalign.models.reference import FrozenCopyReference, StartingPolicyReference, make_reference

GIB = 2**30
QWEN = 151_936


def test_full_logits_bytes_by_hand():
    """Per (position, row): two copies in the head's dtype + 12 float32 bytes.

    bf16: 2 x 2 + 12 = 16 B; float32: 2 x 4 + 12 = 20 B. 1,000 positions x 151,936 rows in bf16:
    151,936,000 x 16 = 2,430,976,000 B; in float32 x 20 = 3,038,720,000 B.
    """
    assert FULL_LOGITS_MAX_SHARE == 0.25
    assert full_logits_bytes(1000, QWEN, torch.bfloat16) == 2_430_976_000
    assert full_logits_bytes(1000, QWEN, torch.float16) == 2_430_976_000
    assert full_logits_bytes(1000, QWEN, torch.float32) == 3_038_720_000
    assert full_logits_bytes(0, QWEN, torch.float32) == 0


@pytest.mark.parametrize(
    "device,vocab,positions,dtype,free,expected",
    [
        # off CUDA: the vocabulary alone decides, whatever the positions and the free memory
        ("cpu", QWEN, 1, torch.float32, None, "chunked"),
        ("cpu", CHUNKED_MIN_VOCAB, 10**6, torch.float32, 10**15, "chunked"),
        ("cpu", CHUNKED_MIN_VOCAB - 1, 10**6, torch.float32, 1, "full"),
        ("mps", QWEN, 1, torch.float32, None, "chunked"),
        # CUDA, GRPO 2 x 8 on bench-vocab: 498 positions x 151,936 x 16 B = 1,210,626,048 B (1.13 GiB),
        # far under a quarter of an H100's 78 GiB (19.5 GiB): the full logits (faster on a GPU)
        ("cuda", QWEN, 498, torch.bfloat16, 78 * GIB, "full"),
        # CUDA, 8 completions of 1,024 tokens: 8,192 x 151,936 x 16 = 19,914,555,392 B (18.55 GiB):
        # over a quarter of 40 GiB (10 GiB) -> chunked; within a quarter of 80 GiB (20 GiB) -> full
        ("cuda", QWEN, 8192, torch.bfloat16, 40 * GIB, "chunked"),
        ("cuda", QWEN, 8192, torch.bfloat16, 80 * GIB, "full"),
        # CUDA ignores the vocabulary threshold: LLaVA's 32,000 rows, 65,536 positions in bf16 =
        # 33,554,432,000 B (31.25 GiB) > 70 GiB / 4 (17.5 GiB) -> chunked
        ("cuda", 32_000, 65_536, torch.bfloat16, 70 * GIB, "chunked"),
        # the boundary: 1 position x 1 row in float32 = 20 B; a quarter of 80 B is 20 B -> full, of 79 B -> chunked
        ("cuda", 1, 1, torch.float32, 80, "full"),
        ("cuda", 1, 1, torch.float32, 79, "chunked"),
        # CUDA with the free memory unknown: the rule off CUDA
        ("cuda", QWEN, 1, torch.bfloat16, None, "chunked"),
        ("cuda", 1000, 10**6, torch.bfloat16, None, "full"),
    ],
)
def test_auto_logits_mode_by_hand(device, vocab, positions, dtype, free, expected):
    chosen, why = auto_logits_mode(device, vocab, positions, dtype, free)
    assert chosen == expected, why


def test_auto_logits_mode_says_the_sizes():
    _, cpu = auto_logits_mode("cpu", QWEN, 498, torch.float32, None)
    assert cpu == "151,936 rows, chunked from 32,768 rows on cpu"
    _, full = auto_logits_mode("cuda", QWEN, 498, torch.bfloat16, 78 * GIB)
    assert full == "full logits 1.13 GiB (498 positions x 151,936 rows in bfloat16) within 25% of 78.00 GiB free"
    _, chunked = auto_logits_mode("cuda", QWEN, 8192, torch.bfloat16, 40 * GIB)
    assert chunked == "full logits 18.55 GiB (8,192 positions x 151,936 rows in bfloat16) over 25% of 40.00 GiB free"


class _Head(nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.head = nn.Linear(2, rows, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_resolve_logs_each_path_once_with_its_reason(caplog, monkeypatch):
    """On a CPU the positions do not matter; each path chosen is logged once, with its reason."""
    monkeypatch.setattr(engine, "_logged", set())
    with caplog.at_level(logging.INFO, logger="vlalign.models.logprobs"):
        for positions in (1, 10**6):
            assert engine.resolve_logits_mode(_Head(CHUNKED_MIN_VOCAB), "auto", positions) == "chunked"
        assert engine.resolve_logits_mode(_Head(CHUNKED_MIN_VOCAB + 1), "auto", 3) == "chunked"
        assert engine.resolve_logits_mode(_Head(10), "auto", 3) == "full"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "LM head: logits_mode='auto' -> 'chunked' (32,768 rows, chunked from 32,768 rows on cpu)",
        "LM head: logits_mode='auto' -> 'full' (10 rows, chunked from 32,768 rows on cpu)",
    ]


def test_reference_copy_problem_by_hand():
    """A 7B bf16 policy: copy 14 GB, training state 3 x 14 = 42 GB (gradient + AdamW's two moments).

    With 60 GB free: 14 + 42 = 56 <= 60, fits. With 50 GB: 56 > 50, does not. Unknown: no problem.
    """
    copy, state = 14 * 10**9, 42 * 10**9
    assert reference_copy_problem(copy, state, 60 * 10**9) is None
    assert reference_copy_problem(copy, state, 56 * 10**9) is None  # exactly enough
    assert reference_copy_problem(copy, state, None) is None
    assert reference_copy_problem(copy, state, 50 * 10**9, "cuda:0") == (
        "a reference copy (14.00 GB) and the policy's gradients and optimiser state (42.00 GB) need "
        "56.00 GB, more than the 50.00 GB free on cuda:0"
    )


def test_parameter_and_training_state_bytes_by_hand():
    """Embedding 10 x 4 tied to a 4 -> 10 head (40 floats once), a frozen 4 x 4 layer (16 floats), in float32.

    Parameters: (40 + 16) x 4 B = 224 B; trainable 40 x 4 = 160 B; training state 3 x 160 = 480 B.
    In bf16: 112 B and 240 B.
    """
    emb, frozen = nn.Embedding(10, 4), nn.Linear(4, 4, bias=False)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    frozen.requires_grad_(False)
    model = nn.ModuleList([emb, frozen, head])
    assert parameter_bytes(model) == 224
    assert parameter_bytes(model, trainable_only=True) == 160
    assert training_state_bytes(model) == 480
    model.to(torch.bfloat16)
    assert (parameter_bytes(model), training_state_bytes(model)) == (112, 240)


def test_system_available_bytes_reads_memavailable(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n")
    assert system_available_bytes(meminfo) == 8_000_000 * 1024
    assert system_available_bytes(tmp_path / "missing") is None
    meminfo.write_text("MemTotal:       16000000 kB\n")
    assert system_available_bytes(meminfo) is None


def test_precomputed_without_a_copy_scores_like_the_copy(tiny_model, shape_images, tmp_path):
    """``copy_policy=False`` scores the cache with the policy itself: same fingerprint (same cache
    folder), bit-identical log-probs, and no second model in memory."""
    model, processor = tiny_model("qwen2_vl")
    pad = pad_token_id_of(processor)
    samples = [PromptSample(id="s0", images=[shape_images[0]], prompt=user_prompt("Is there a red circle?"))]
    prompts, completions = encode_prompts(processor, samples), encode_completions(processor, [["Yes.", "No."]])
    copied = make_reference("precomputed", model, cache_dir=tmp_path / "a", pad_token_id=pad)
    own = make_reference("precomputed", model, cache_dir=tmp_path / "b", pad_token_id=pad, copy_policy=False)
    assert isinstance(copied.source, FrozenCopyReference) and isinstance(own.source, StartingPolicyReference)
    assert own.source.model is model and own.fingerprint() == copied.fingerprint()
    model.train()
    a = copied.logprobs(prompts, completions, sample_keys=["s0"])
    b = own.logprobs(prompts, completions, sample_keys=["s0"])
    assert model.training  # scored in eval mode, then restored
    torch.testing.assert_close(b.logps, a.logps, atol=0, rtol=0)

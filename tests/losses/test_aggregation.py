"""Tests of the four aggregation modes and of their data-parallel / gradient-accumulation decomposition.

Which modes decompose (shown below):
* with the *global* normaliser passed (num_tokens for token-mean, num_sequences for the seq-* modes),
  every mode is a sum of per-shard terms: Σ_shards aggregate(shard) equals the whole-batch value,
  for any shard sizes, and so do the gradients;
* with each shard's *local* normaliser, averaging the shard values (what DDP's gradient averaging
  does) equals the whole-batch value for the three seq-* modes when the shards hold equally many
  sequences, but not for token-mean (shards hold different token counts), and not for the seq-*
  modes with unequal shard sizes.
"""

from __future__ import annotations

import pytest
import torch

from vlalign.losses import AGGREGATIONS, aggregate, masked_mean

F64 = torch.float64
MODES = sorted(AGGREGATIONS)
SEQ_MODES = [m for m in MODES if m.startswith("seq-")]
MAX_LEN = 16


def test_hand_values() -> None:
    """values [[1, 2, 3], [4, ·, ·]] (· padded, holding 100):
    token-mean (1+2+3+4)/4 = 2.5; seq-mean-token-mean (2 + 4)/2 = 3; seq-mean-token-sum (6 + 4)/2 = 5;
    seq-mean-token-sum-norm with L_max = 4: 5/4 = 1.25."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = {
        "token-mean": 2.5,
        "seq-mean-token-mean": 3.0,
        "seq-mean-token-sum": 5.0,
        "seq-mean-token-sum-norm": 1.25,
    }
    for mode, value in expected.items():
        assert aggregate(values, mask, mode=mode, max_length=4).item() == value


def test_empty_sequences_are_not_counted_and_errors() -> None:
    """A row without tokens adds nothing and is not a sequence: [[2, 4], [·, ·]] ⇒ seq-mean-token-mean 3.
    An all-padding batch gives 0, not nan."""
    values = torch.tensor([[2.0, 4.0], [7.0, 7.0]], dtype=F64)
    mask = torch.tensor([[True, True], [False, False]])
    assert aggregate(values, mask, mode="seq-mean-token-mean").item() == 3.0
    assert aggregate(values, torch.zeros_like(mask), mode="token-mean").item() == 0.0
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="max_length"):
        aggregate(values, mask, mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(values, mask, mode="token-sum")


def batch(seed: int = 0, size: int = 8, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-token values and right-padded masks with lengths 1..length, plus nan on padding."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(size, length, generator=gen, dtype=F64)
    lengths = torch.randint(1, length + 1, (size,), generator=gen)
    lengths[0], lengths[1] = 1, length  # make token counts differ between the halves
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return torch.where(mask, values, float("nan")), mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [[4, 4], [2, 2, 2, 2], [3, 5], [1, 7]])
def test_global_normalisers_decompose_every_mode(mode: str, splits: list[int]) -> None:
    """Σ over shards (DP ranks or accumulation micro-batches) with global counts = whole batch,
    for values and for gradients."""
    values, mask = batch()
    whole_in = values.clone().requires_grad_(True)
    whole = aggregate(whole_in, mask, mode=mode, max_length=MAX_LEN)
    whole.backward()
    num_tokens = mask.sum()
    num_sequences = mask.any(-1).sum()
    parts_in = values.clone().requires_grad_(True)
    total = sum(
        aggregate(v, m, mode=mode, max_length=MAX_LEN, num_tokens=num_tokens, num_sequences=num_sequences)
        for v, m in zip(parts_in.split(splits), mask.split(splits))
    )
    total.backward()
    torch.testing.assert_close(total.detach(), whole.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(parts_in.grad, whole_in.grad, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("mode", SEQ_MODES)
def test_local_normalisers_average_for_seq_modes_with_equal_shards(mode: str) -> None:
    """Mean over equal shards of each shard's own seq-mean = the whole-batch seq-mean (2 ranks, and
    4 accumulation steps)."""
    values, mask = batch(seed=1)
    whole = aggregate(values, mask, mode=mode, max_length=MAX_LEN)
    for splits in ([4, 4], [2, 2, 2, 2]):
        shards = zip(values.split(splits), mask.split(splits))
        parts = [aggregate(v, m, mode=mode, max_length=MAX_LEN) for v, m in shards]
        torch.testing.assert_close(torch.stack(parts).mean(), whole, rtol=1e-14, atol=1e-15)


def test_local_normalisers_cannot_reproduce_token_mean_or_unequal_shards() -> None:
    """token-mean: averaging per-shard token means weights tokens of the shorter shard more, so it is
    not the whole-batch value; seq-* modes also fail when shards hold 3 and 5 sequences."""
    values, mask = batch(seed=2)
    assert mask[:4].sum() != mask[4:].sum()
    whole = aggregate(values, mask, mode="token-mean")
    shards = zip(values.split(4), mask.split(4))
    averaged = torch.stack([aggregate(v, m, mode="token-mean") for v, m in shards]).mean()
    assert not torch.isclose(averaged, whole, rtol=1e-6)
    for mode in SEQ_MODES:
        whole = aggregate(values, mask, mode=mode, max_length=MAX_LEN)
        shards = zip(values.split([3, 5]), mask.split([3, 5]))
        parts = [aggregate(v, m, mode=mode, max_length=MAX_LEN) for v, m in shards]
        assert not torch.isclose(torch.stack(parts).mean(), whole, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_padding_placement_and_width_do_not_matter(mode: str) -> None:
    """The same tokens with padding spread randomly through a wider row give the same value
    (seq-mean-token-sum-norm uses the constant max_length, not the row width)."""
    values, mask = batch(seed=3)
    gen = torch.Generator().manual_seed(7)
    wide_values = torch.full((8, 15), float("inf"), dtype=F64)
    wide_mask = torch.zeros(8, 15, dtype=torch.bool)
    for i in range(8):
        n = int(mask[i].sum())
        slots = torch.randperm(15, generator=gen)[:n].sort().values
        wide_values[i, slots] = values[i, :n]
        wide_mask[i, slots] = True
    torch.testing.assert_close(
        aggregate(wide_values, wide_mask, mode=mode, max_length=MAX_LEN),
        aggregate(values, mask, mode=mode, max_length=MAX_LEN),
        rtol=1e-14,
        atol=1e-15,
    )

"""DPO's reference pass runs in the policy's layout: with ``logprob_pack_length`` the reference packs
its prompts into rows as the policy does (one row instead of one per prompt), with the same log-probs."""

from __future__ import annotations

import torch
from test_dpo import pair_file  # noqa: F401 (the fixture)

from vlalign.data.collate import pad_token_id_of
from vlalign.data.io import load_samples
from vlalign.models.load import load_model_and_processor
from vlalign.models.reference import FrozenCopyReference
from vlalign.recipes import dpo


def test_the_reference_pass_packs_like_the_policy(tiny_model_dir, pair_file):  # noqa: F811
    """Four pairs: unpacked, the reference's forward sees 4 rows (one prompt and its pair each);
    with a pack length over the whole micro-batch, 1 row. Per-token log-probs equal within float
    rounding of the other layout (1e-5, as the policy's packed == unpacked tests)."""
    model, processor = load_model_and_processor(tiny_model_dir("qwen2_vl"), device="cpu", dtype="float32")
    pb = dpo.PairEncoder(processor, max_length=None)(load_samples(pair_file, "preference", limit=4))
    reference = FrozenCopyReference(model, pad_token_id=pad_token_id_of(processor))
    rows: list[int] = []
    reference.model.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    plain = dpo.reference_logprobs(reference, pb)
    packed = dpo.reference_logprobs(reference, pb, pack_length=100_000)
    assert rows == [4, 1]
    assert torch.equal(packed.tokens.mask, plain.tokens.mask)
    torch.testing.assert_close(packed.tokens.logps, plain.tokens.logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.chosen_logps, plain.chosen_logps, rtol=0, atol=1e-4)  # sums of ~30 tokens

"""The shared-prefix log-prob engine: exact against the naive rows and the model's own forward.

Exactness is checked three ways: shared versus naive per-token log-probs and parameter gradients
of a DPO loss (k = 2) and a GRPO loss (k = 8), on ragged prompts (1 or 2 images, questions of
different lengths) and ragged completions, with LoRA on and off and gradient checkpointing on and
off, for every tiny architecture; naive versus ``log_softmax`` of the model's full logits (an
independent reference: no ``logits_to_keep``, no gather indices); and the completion tokens the
engine scores versus the labels of :func:`~vlalign.data.collate.build_rows`.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from vlalign.data.collate import IGNORE_INDEX, build_rows, encode_completions, encode_prompts, pad_token_id_of
from vlalign.data.schema import DataError, PromptSample, user_prompt
from vlalign.losses import dpo_loss, ppo_clip_loss
from vlalign.losses.advantages import grpo_advantages
from vlalign.losses.preference import PreferenceLogps
from vlalign.models import arch as support
from vlalign.models import logprobs as engine
from vlalign.models.arch import sharing_unsupported
from vlalign.models.load import LoraSpec
from vlalign.models.logprobs import completion_logprobs
from vlalign.models.packing import block_attention_mask, concat_prompts, mrope_positions, naive_layout, packed_layout
from vlalign.models.preference_batch import preference_batch, preference_logprobs
from vlalign.models.tiny import ARCHITECTURES

SHARED = tuple(a for a in ARCHITECTURES if a in support.ARCHITECTURES)
"""Tiny architectures the packed layout is verified on (a tiny arch's name is its ``model_type``)."""
UNSHARED = tuple(a for a in ARCHITECTURES if a not in support.ARCHITECTURES)
"""Tiny architectures scored the naive way, with a reason."""

TOL = 1e-5
QUESTIONS = ["Is there a red circle?", "Describe every shape in the image, from left to right, with its colour."]
PAIRS = [["Yes.", "No, there is a blue square."], ["A red disc and a green triangle.", "Nothing."]]
GROUP = [
    "Yes",
    "No",
    "A red disc.",
    "Two shapes: a disc and a square.",
    "3",
    "The square is blue and small.",
    "I see a triangle",
    "There is a yellow bar at the bottom of the image.",
]


def _prompts(processor, images, n_images=(1, 2)):
    samples = [
        PromptSample(
            id=f"p{i}", images=[images[(i + j) % 4] for j in range(n)], prompt=user_prompt(QUESTIONS[i % 2], n)
        )
        for i, n in enumerate(n_images)
    ]
    return encode_prompts(processor, samples)


def _full_forward_logps(model, prompts, completions, pad):
    """Independent reference: the model's full logits on naive rows, log_softmax, labels shifted by one."""
    batch = build_rows(prompts, completions, pad_token_id=pad)
    logits = model(**batch.model_inputs()).logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    token = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    width = int(batch.completion_lengths.max())
    out = torch.zeros((len(batch), width))
    for r in range(len(batch)):
        values = token[r][labels[r] != IGNORE_INDEX]
        out[r, : values.numel()] = values
    return out, batch


def _dpo(result):
    sums = result.by_prompt(result.sums)  # (B, 2)
    ref = torch.tensor([-3.0, -5.0])[: sums.shape[0]]
    logps = PreferenceLogps(
        chosen_logps=sums[:, 0], rejected_logps=sums[:, 1], ref_chosen_logps=ref, ref_rejected_logps=ref - 1.0
    )
    return dpo_loss(logps, beta=0.5).losses.mean()


def _grpo(result):
    rewards = torch.arange(len(result), dtype=torch.float32) % 3
    adv = grpo_advantages(rewards, group_size=8)
    old = result.logps.detach() + 0.01 * torch.linspace(-1, 1, result.logps.numel()).reshape(result.logps.shape)
    out = ppo_clip_loss(result.logps, old, adv, result.mask)
    return out.losses.sum() / result.mask.sum()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, prompts, completions, mode, loss_fn, pad):
    model.zero_grad(set_to_none=True)
    result = completion_logprobs(model, prompts, completions, mode=mode, pad_token_id=pad)
    loss_fn(result).backward()
    return result, _grads(model)


def _assert_same(shared, naive):
    assert shared.mode == "shared" and naive.mode == "naive"
    torch.testing.assert_close(shared.logps, naive.logps, atol=TOL, rtol=0)
    assert torch.equal(shared.mask, naive.mask) and torch.equal(shared.token_ids, naive.token_ids)
    assert torch.equal(shared.row_prompt, naive.row_prompt) and torch.equal(shared.row_completion, naive.row_completion)


def _assert_same_grads(g_shared, g_naive, *, expect_vision: bool):
    assert g_shared.keys() == g_naive.keys() and g_shared
    if expect_vision:  # the vision tower is reached
        assert any(part in n for n in g_shared for part in (".visual.", ".vision_tower.", ".vision_model.")), sorted(
            g_shared
        )[:5]
    worst = max((g_shared[n] - g_naive[n]).abs().max().item() for n in g_shared)
    assert worst <= TOL, worst
    assert any(g.abs().max() > 1e-4 for g in g_shared.values())  # the loss really reaches the weights


def _perturb_lora(model, seed=0):
    """LoRA's B starts at zero (adapter = identity); give it values so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", SHARED)
@pytest.mark.parametrize(
    "lora,checkpointing",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["full", "lora", "full-gc", "lora-gc"],
)
def test_shared_equals_naive_logps_and_gradients(arch, lora, checkpointing, tiny_model, shape_images):
    """k = 2 (DPO loss) and k = 8 (GRPO loss), prompts with 1 and 2 images and different questions,
    ragged completions: per-token log-probs and every parameter gradient agree within 1e-5."""
    if checkpointing and support.ARCHITECTURES[arch].cache_sharing:
        pytest.skip("checkpointed layers drop the cache: naive, as tests/models/test_prefix_cache.py pins")
    spec = LoraSpec(r=4, alpha=8.0, dropout=0.0, freeze_vision=False) if lora else None
    model, processor = tiny_model(arch, lora=spec, gradient_checkpointing=checkpointing)
    if lora:
        _perturb_lora(model)
    model.train()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    assert prompts.lengths[0] != prompts.lengths[1]
    for groups, loss_fn in ((PAIRS, _dpo), ([GROUP, GROUP[::-1]], _grpo)):
        completions = encode_completions(processor, groups)
        shared, g_shared = _run(model, prompts, completions, "shared", loss_fn, pad)
        naive, g_naive = _run(model, prompts, completions, "naive", loss_fn, pad)
        _assert_same(shared, naive)
        _assert_same_grads(g_shared, g_naive, expect_vision=True)
        assert shared.num_tokens < naive.num_tokens


@pytest.mark.parametrize("arch", SHARED)
def test_eager_attention_and_the_model_own_logits(arch, tiny_model, shape_images):
    """Eager attention (additive float mask); naive and shared both equal log_softmax of the
    model's full logits; the scored tokens equal the labels of the naive rows; entropies at
    temperature 0.7 equal the reference formula; hidden states are what the LM head sees."""
    model, processor = tiny_model(arch, attn_implementation="eager")
    model.eval()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, [GROUP[:3], GROUP[3:8]])
    with torch.no_grad():
        reference, batch = _full_forward_logps(model, prompts, completions, pad)
        shared = completion_logprobs(
            model, prompts, completions, pad_token_id=pad, temperature=0.7, return_entropy=True, return_hidden=True
        )
        naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
        cold = completion_logprobs(model, prompts, completions, pad_token_id=pad)
    _assert_same(cold, naive)
    torch.testing.assert_close(naive.logps, reference, atol=TOL, rtol=0)
    labels = batch.labels[batch.completion_mask]
    assert torch.equal(shared.token_ids[shared.mask], labels)
    assert bool((shared.token_ids[~shared.mask] == IGNORE_INDEX).all())
    # temperature and entropy from the LM head applied to the returned hidden states
    logits = model.get_output_embeddings()(shared.hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:  # Gemma2 (PaliGemma 2) soft-caps the head's output: cap * tanh(logits / cap)
        logits = cap * torch.tanh(logits / cap)
    logits = logits / 0.7
    logp = F.log_softmax(logits, -1)
    ref_tok = logp.gather(-1, shared.token_ids.clamp(min=0)[..., None]).squeeze(-1) * shared.mask
    ref_ent = -(logp.exp() * logp).sum(-1) * shared.mask
    torch.testing.assert_close(shared.logps, ref_tok, atol=TOL, rtol=0)
    torch.testing.assert_close(shared.entropy, ref_ent, atol=TOL, rtol=0)
    assert not torch.allclose(shared.logps, cold.logps, atol=1e-3)
    # the reward-head state: hidden state of the last completion token in the naive row
    with torch.no_grad():
        states = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[-1]
    last = states[torch.arange(len(batch)), batch.prompt_lengths + batch.completion_lengths - 1]
    torch.testing.assert_close(shared.last_hidden, last, atol=TOL, rtol=0)


def test_mrope_and_bidirectional_rules_matter(tiny_model, shape_images, monkeypatch):
    """The two architecture rules are needed: without Qwen's 3-row positions or Gemma3's
    bidirectional image blocks, shared log-probs drift from the naive ones by far more than 1e-5."""
    for arch in ("qwen2_vl", "gemma3"):
        model, processor = tiny_model(arch)
        model.eval()
        pad = pad_token_id_of(processor)
        prompts = _prompts(processor, shape_images)
        completions = encode_completions(processor, PAIRS)
        with torch.no_grad():
            naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
            monkeypatch.setitem(support.ARCHITECTURES, arch, support.ArchSupport(dict_masks=True))
            wrong = completion_logprobs(model, prompts, completions, pad_token_id=pad)
        monkeypatch.undo()
        assert (wrong.logps - naive.logps).abs().max() > 1e-3, arch


def test_sliding_window_layers_get_their_own_mask(tiny_model_dir, shape_images):
    """Gemma3 with a sliding window (6) shorter than the prompts: sliding layers get a window
    mask measured in logical positions; shared equals naive (the model's own window mask)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tiny_model_dir("gemma3")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.text_config.sliding_window = 6
    model.eval()
    processor = AutoProcessor.from_pretrained(folder)
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, [GROUP[:3], GROUP[5:8]])
    with torch.no_grad():
        shared = completion_logprobs(model, prompts, completions, pad_token_id=pad)
        naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
        model.config.text_config.sliding_window = 4096
        unwindowed = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
    _assert_same(shared, naive)
    assert (unwindowed.logps - naive.logps).abs().max() > 1e-3  # the window changes the result


@pytest.mark.parametrize("arch", UNSHARED)
def test_unshared_architectures_fall_back_with_a_reason(arch, tiny_model, shape_images):
    """An architecture the packed layout is not verified on is scored the naive way (one row per
    completion), says why, and its log-probs equal log_softmax of the model's own full logits."""
    model, processor = tiny_model(arch)
    model.eval()
    reason = sharing_unsupported(model)
    assert reason is not None and repr(arch) in reason and "naive" in reason
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, PAIRS)
    with torch.no_grad():
        reference, _ = _full_forward_logps(model, prompts, completions, pad)
        scored = completion_logprobs(model, prompts, completions, pad_token_id=pad)
    assert scored.mode == "naive"
    torch.testing.assert_close(scored.logps, reference, atol=TOL, rtol=0)


def test_fallback_to_naive_is_logged_once(tiny_model, shape_images, monkeypatch, caplog):
    model, processor = tiny_model("llava")
    monkeypatch.delitem(support.ARCHITECTURES, "llava")
    monkeypatch.setattr(engine, "_logged", set())
    reason = sharing_unsupported(model)
    assert reason is not None and "'llava'" in reason and "naive" in reason
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, PAIRS)
    with caplog.at_level(logging.WARNING, logger="vlalign.models.logprobs"), torch.no_grad():
        first = completion_logprobs(model, prompts, completions)
        second = completion_logprobs(model, prompts, completions)
    assert first.mode == second.mode == "naive"
    assert [r.getMessage() for r in caplog.records] == [reason]
    torch.testing.assert_close(first.logps, second.logps, atol=0, rtol=0)


@pytest.mark.slow
def test_flex_attention_block_mask_forward(tiny_model, shape_images):
    """FlexAttention's BlockMask (the GPU path; forward only on CPU) gives the naive log-probs.

    Slow (about 25 s): on CPU, transformers compiles flex attention with inductor."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    model, processor = tiny_model("llava", attn_implementation="flex_attention")
    assert support.attention_implementation(model) == "flex_attention"
    model.eval()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, PAIRS)
    with torch.no_grad():
        shared = completion_logprobs(model, prompts, completions, pad_token_id=pad)
        model.set_attn_implementation("sdpa")
        naive = completion_logprobs(model, prompts, completions, mode="naive", pad_token_id=pad)
    _assert_same(shared, naive)


# ------------------------------------------------------------------------------------ layout


def test_packed_layout_by_hand():
    """Prompt [5, 6, 7] with completions [8, 9] and [10]; prompt [11, 12] with [13, 14, 15].

    Row 0 = [5 6 7 | 8 9 | 10], segments 0 0 0 1 1 2, positions 0 1 2 3 4 3.
    Row 1 = [11 12 | 13 14 15 | pad], segments 0 0 1 1 1 -1, positions 0 1 2 3 4 0.
    Kept logits start at the last prompt token: row 0 keeps 2..4 (width 3 = max(3, 3)); row 1 1..3.
    Token 8 and token 10 are both predicted by position 2 (kept index 0); 9 by position 3.
    """
    from vlalign.data.collate import EncodedPrompts

    prompts = EncodedPrompts(
        sample_ids=["a", "b"],
        input_ids=[[5, 6, 7], [11, 12]],
        token_fields={},
        vision={},
        vision_rows={},
        num_images=[0, 0],
        image_token_count=[0, 0],
    )
    packed = packed_layout(prompts, [[[8, 9], [10]], [[13, 14, 15]]], pad_token_id=0)
    lay = packed.layout
    assert lay.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0]]
    assert packed.segments.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, -1]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 4, 0]]
    assert lay.keep.tolist() == [[2, 3, 4], [1, 2, 3]]
    assert lay.source.tolist() == [[0, 1, 0], [0, 0, 0], [3, 4, 5]]
    # flat indices (row * 6 + position); padding entries point at the last prompt token
    assert lay.predictor.tolist() == [[2, 3, 2], [2, 2, 2], [7, 8, 9]]
    assert lay.target.tolist() == [[3, 4, 2], [5, 2, 2], [8, 9, 10]]
    assert lay.last.tolist() == [4, 5, 10]
    assert lay.mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert lay.num_tokens == 11
    visible = block_attention_mask(packed.segments)[:, 0].int().tolist()
    assert visible[0] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ]
    assert visible[1][5] == [0, 0, 0, 0, 0, 1]  # padding sees only itself
    batch = build_rows(prompts, [[[8, 9], [10]], [[13, 14, 15]]], pad_token_id=0)
    naive = naive_layout(batch)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 0], [11, 12, 13, 14, 15]]
    assert naive.keep.tolist() == [[2, 3, 4], [2, 3, 4], [1, 2, 3]]
    assert naive.source.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_mrope_positions_restart_after_the_prompt():
    """A prompt whose 3-row positions end at max 6 (an image made rows differ): completions of 2
    and 1 tokens continue at 7, 8 and 7 on all three rows."""
    from vlalign.data.collate import EncodedPrompts

    prompts = EncodedPrompts(
        sample_ids=["a"],
        input_ids=[[1, 2, 3, 4]],
        token_fields={},
        vision={},
        vision_rows={},
        num_images=[0],
        image_token_count=[0],
    )
    packed = packed_layout(prompts, [[[8, 9], [10]]], pad_token_id=0)
    prompt_pos = torch.tensor([[0, 1, 1, 6], [0, 1, 2, 6], [0, 2, 1, 6]])
    out = mrope_positions([prompt_pos], packed)
    assert out[:, 0].tolist() == [[0, 1, 1, 6, 7, 8, 7], [0, 1, 2, 6, 7, 8, 7], [0, 2, 1, 6, 7, 8, 7]]


def test_flex_mask_mod_matches_dense_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from vlalign.models.packing import flex_mask_mod

    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 2, 2, 3, -1, -1, -1]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 4, 5, 6], [0, 1, 2, 2, 3, 2, 0, 0, 0]])
    blocks = torch.tensor([[-1, 0, 0, -1, -1, -1, -1, -1, -1], [-1] * 9])
    for window in (None, 3):
        dense = block_attention_mask(segments, positions=positions, blocks=blocks, sliding_window=window)
        mod = flex_mask_mod(segments, positions=positions, blocks=blocks, sliding_window=window)
        assert torch.equal(flex.create_mask(mod, 2, 1, 9, 9, device="cpu"), dense)


# ---------------------------------------------------------------------------- bad samples


def test_misaligned_image_tokens_and_overlong_prompts_raise(tiny_model, shape_images):
    model, processor = tiny_model("qwen2_vl")
    pad = pad_token_id_of(processor)
    # a literal image token in the text: the collator's error (never a shifted image)
    bad = PromptSample(id="literal", images=[shape_images[0]], prompt=user_prompt("Is there <|image_pad|> here?"))
    with pytest.raises(DataError, match="literal"):
        encode_prompts(processor, [bad])
    prompts = _prompts(processor, shape_images)
    completions = encode_completions(processor, PAIRS)
    # one prompt losing an image token (the batch total would still be caught by the model,
    # but a per-prompt shift would not): named before any forward
    tampered = concat_prompts(prompts.select([0]), prompts.select([1]))
    ids = list(tampered.input_ids[0])
    ids.remove(model.config.image_token_id)
    tampered.input_ids[0] = ids
    with pytest.raises(DataError, match="'p0'.*image tokens"):
        completion_logprobs(model, tampered, completions, pad_token_id=pad)
    # a prompt alone longer than max_length
    limit = prompts.lengths[1] - 1
    with pytest.raises(DataError, match="'p1': its prompt alone has"):
        completion_logprobs(model, prompts, completions, pad_token_id=pad, max_length=limit)
    with pytest.raises(DataError, match="completion 0 is empty"):
        completion_logprobs(model, prompts, [[[], [1]], [[1], [2]]], pad_token_id=pad)


def test_uniform_image_tokens_checked_for_fixed_size_architectures(tiny_model, shape_images):
    model, processor = tiny_model("llava")
    prompts = _prompts(processor, shape_images, n_images=(1, 1))
    image_id = model.config.image_token_id
    prompts.input_ids[1].remove(image_id)
    with pytest.raises(DataError, match="image tokens per image differ.*'p0': 4 for 1, 'p1': 3 for 1"):
        completion_logprobs(
            model, prompts, encode_completions(processor, PAIRS), pad_token_id=pad_token_id_of(processor)
        )


# ------------------------------------------------------------------------------ preferences


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_preference_batch_pairs_negatives_and_corrupted_images(arch, tiny_model, shape_images):
    """Pairs, 1 + 2 negatives (POVID) and the chosen completion under a corrupted image (mDPO),
    all in one shared forward, equal separate naive computations of each piece."""
    model, processor = tiny_model(arch)
    model.eval()
    pad = pad_token_id_of(processor)
    prompts = _prompts(processor, shape_images, n_images=(1, 2))
    corrupted = _prompts(processor, shape_images[::-1], n_images=(1, 2))
    chosen = encode_completions(processor, [["Yes."], ["A red disc."]])
    rejected = encode_completions(processor, [["No, a blue square.", "A bar."], ["Nothing.", "Three triangles."]])
    with torch.no_grad():
        batch = preference_batch(prompts, [c[0] for c in chosen], rejected, corrupted_prompts=corrupted)
        out = preference_logprobs(model, batch, pad_token_id=pad)
        pair = preference_logprobs(
            model, preference_batch(prompts, [c[0] for c in chosen], [r[0] for r in rejected]), pad_token_id=pad
        )
        sep = completion_logprobs(
            model, prompts, [chosen[i] + rejected[i] for i in range(2)], mode="naive", pad_token_id=pad
        )
        cor = completion_logprobs(model, corrupted, chosen, mode="naive", pad_token_id=pad)
    sums = sep.by_prompt(sep.sums)  # (2, 3): chosen, rejected 1, rejected 2
    assert out.rejected_logps.shape == (2, 2) and pair.rejected_logps.shape == (2,)
    torch.testing.assert_close(out.chosen_logps, sums[:, 0], atol=TOL, rtol=0)
    torch.testing.assert_close(out.rejected_logps, sums[:, 1:], atol=TOL, rtol=0)
    torch.testing.assert_close(pair.rejected_logps, sums[:, 1], atol=TOL, rtol=0)
    torch.testing.assert_close(out.corrupted_chosen_logps, cor.sums, atol=TOL, rtol=0)
    assert out.chosen_lengths.tolist() == [len(c[0]) for c in chosen]
    assert out.rejected_lengths.tolist() == [[len(r) for r in group] for group in rejected]
    assert torch.equal(
        out.tokens.token_ids[out.chosen_rows][out.tokens.mask[out.chosen_rows]],
        torch.tensor([t for c in chosen for t in c[0]]),
    )
    assert (out.corrupted_chosen_logps - out.chosen_logps).abs().max() > 1e-4  # the image matters

"""``dpo.response_tokens=trl``: a pair's scored tokens are TRL's, and the log-probs move by exactly the extra tokens.

TRL's DPO trainer renders the prompt (with the generation prompt) and prompt + response (without
it) through the chat template and scores the tokens of what the second adds to the first. With
``response_tokens="trl"`` the :class:`~vlalign.recipes.dpo_pairs.PairEncoder` must produce those
tokens; the test derives them independently, from the two renderings, and checks that the
processor's tokens of the full rendering are vlalign's prompt followed by them (so the scored
tokens are the tokens after the prompt in the full rendering).

On Qwen2-VL and Gemma3 nothing precedes the response and TRL adds what the template writes after
the end-of-turn token (one ``\\n``): vlalign's tokens are a prefix of TRL's and, the model being
causal, the per-token log-probs of that prefix are the same, so the summed log-prob under TRL's
convention is vlalign's plus the log-prob of the extra token(s). That log-prob is read here from a
plain forward of the model over the processor's encoding of the full rendering (the last
positions' ``log_softmax``), independent of vlalign's engine. On LLaVA and Idefics3 the template's
space before the response merges into its first token (PaliGemma: a newline), so only the tokens
are compared there.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vlalign.config import ConfigError, load_config
from vlalign.data.chat import _add_special_tokens, pad_token_id_of, render_prompt, tokenizer_of
from vlalign.data.collate import end_of_turn_ids
from vlalign.data.schema import PreferenceSample
from vlalign.models.preference_batch import preference_logprobs
from vlalign.recipes import dpo
from vlalign.recipes.dpo_pairs import PairEncoder
from vlalign.training.metrics import read_metrics

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
CHOSEN, REJECTED = "A red disc.", "A blue square."


def _full_text(processor, response: str) -> str:
    reply = [{"role": "assistant", "content": [{"type": "text", "text": response}]}]
    return processor.apply_chat_template(PROMPT + reply, add_generation_prompt=False, tokenize=False)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "gemma3", "idefics3", "paligemma"])
def test_trl_response_tokens_are_what_follows_the_prompt(arch, tiny_model, shape_images):
    model, processor = tiny_model(arch)
    model.eval()
    tok = tokenizer_of(processor)
    sample = PreferenceSample("p0", [shape_images[0]], PROMPT, CHOSEN, REJECTED)
    ours = PairEncoder(processor, max_length=None)([sample])
    trl = PairEncoder(processor, max_length=None, response_tokens="trl")([sample])
    prompt_text = render_prompt(processor, PROMPT)
    prompt_ids = trl.batch.prompts.input_ids[0]
    assert ours.batch.prompts.input_ids[0] == prompt_ids  # the option changes only the responses
    for k, response in enumerate((CHOSEN, REJECTED)):
        full = _full_text(processor, response)
        assert full.startswith(prompt_text)
        expected = tok(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]  # TRL's response tokens
        assert trl.batch.completions[0][k] == expected
        rendered = processor(
            text=[full], images=[shape_images[0]], add_special_tokens=_add_special_tokens(processor, [prompt_text])
        )["input_ids"][0]
        if arch == "paligemma":  # its processor ends every text with "\n": the prompt's is the template's
            # separator, so the processed full rendering has one "\n" there and one after <eos>, while TRL
            # (the prompt through the processor, the suffix through the tokenizer) scores a second "\n"
            newline = tok("\n", add_special_tokens=False)["input_ids"]
            assert expected[:1] == newline and list(rendered) == prompt_ids + expected[1:] + newline
        else:
            assert list(rendered) == prompt_ids + expected  # ... i.e. the full rendering's tokens after the prompt
        default = tok(response, add_special_tokens=False)["input_ids"] + end_of_turn_ids(processor)
        assert ours.batch.completions[0][k] == default  # the default is unchanged
    if arch in ("llava", "idefics3", "paligemma"):  # a separator before the response changes its first token(s)
        assert trl.batch.completions[0][0][: len(ours.batch.completions[0][0])] != ours.batch.completions[0][0]
        return
    chosen_ours, chosen_trl = ours.batch.completions[0][0], trl.batch.completions[0][0]
    extra = len(chosen_trl) - len(chosen_ours)
    assert extra == 1 and chosen_trl[:-1] == chosen_ours and tok.decode(chosen_trl[-1:]) == "\n"
    with torch.no_grad():
        lp_ours = preference_logprobs(model, ours.batch, mode="shared", pad_token_id=pad_token_id_of(processor))
        lp_trl = preference_logprobs(model, trl.batch, mode="shared", pad_token_id=pad_token_id_of(processor))
        inputs = processor(
            text=[_full_text(processor, CHOSEN)],
            images=[shape_images[0]],
            return_tensors="pt",
            add_special_tokens=_add_special_tokens(processor, [prompt_text]),
        )
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    extra_logp = torch.log_softmax(logits[-extra - 1 : -1], dim=-1).gather(1, ids[-extra:, None]).sum()
    diff = lp_trl.chosen_logps[0] - lp_ours.chosen_logps[0]
    assert abs(diff.item() - extra_logp.item()) < 1e-5, (diff.item(), extra_logp.item())
    assert extra_logp.item() < -1e-3  # a real difference, not a token the tiny model is sure of
    assert lp_trl.chosen_lengths[0] == lp_ours.chosen_lengths[0] + 1


def test_unknown_response_tokens_are_refused(tiny_processor):
    with pytest.raises(ValueError, match="response_tokens must be 'vlalign' or 'trl'"):
        PairEncoder(tiny_processor("qwen2_vl"), max_length=None, response_tokens="sft")  # type: ignore[arg-type]


def test_a_dpo_step_runs_with_trl_response_tokens(tiny_model_dir, shape_images, tmp_path: Path):
    """One DPO step on two pairs with TRL's convention: the policy starts as its reference, so the
    loss is ln 2 exactly (zero margin), and the logged chosen log-prob is a finite negative sum."""
    from vlalign.data.io import write_samples

    images = []
    for k, im in enumerate(shape_images[:2]):
        images.append(tmp_path / f"im{k}.png")
        im.save(images[-1])
    rows = [PreferenceSample(f"p{k}", [str(images[k])], PROMPT, CHOSEN, REJECTED) for k in range(2)]
    write_samples(rows, tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    args = [
        f"--model.name_or_path={tiny_model_dir('qwen2_vl')}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={tmp_path / 'pairs.jsonl'}",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        "--train.batch_size=2",
        "--train.max_steps=1",
        "--train.save_every=0",
        "--response_tokens=trl",
    ]
    cfg = load_config(dpo.Config, None, args)
    assert cfg.response_tokens == "trl"
    dpo.run(cfg)
    recs = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(recs) == 1 and abs(recs[0]["train/loss"] - math.log(2)) < 1e-6
    assert recs[0]["logps/chosen"] < 0


def test_response_tokens_is_validated():
    with pytest.raises(ConfigError, match="response_tokens: 'hf' is not one of 'vlalign', 'trl'"):
        load_config(dpo.Config, None, ["--data.train=x.jsonl", "--response_tokens=hf"])

"""``kto.response_tokens=trl``: a completion's scored tokens are TRL's, and the log-probs move by exactly the extra tokens.

TRL's trainers render the prompt (with the generation prompt) and prompt + completion (without
it) through the chat template and score the tokens of what the second adds to the first. With
``response_tokens="trl"`` the :class:`~vlalign.recipes.kto.UnpairedEncoder` must produce those
tokens, for each sample's own completion and for the mismatched one (the next sample's) that the
reference point z0 scores. The test derives them independently, from the two renderings, and
checks that the processor's tokens of the full rendering are vlalign's prompt followed by them.

On Qwen2-VL and Gemma3 nothing precedes the completion and TRL adds what the template writes after
the end-of-turn token (one ``\\n``): vlalign's tokens are a prefix of TRL's, so (the model being
causal) the summed log-prob under TRL's convention is vlalign's plus the log-prob of that newline,
read here from a plain forward of the model over the processor's encoding of the full rendering
(independent of vlalign's engine). The end-to-end step checks the same difference in the logged
``logps/chosen`` of a ``vlalign kto`` step.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vlalign.config import ConfigError, load_config
from vlalign.data.chat import _add_special_tokens, pad_token_id_of, render_prompt, tokenizer_of
from vlalign.data.collate import end_of_turn_ids
from vlalign.data.schema import PreferenceSample, UnpairedSample
from vlalign.models.logprobs import completion_logprobs
from vlalign.recipes import kto
from vlalign.training.metrics import read_metrics

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
GOOD, BAD = "A red disc.", "A blue square."


def _full_text(processor, response: str) -> str:
    reply = [{"role": "assistant", "content": [{"type": "text", "text": response}]}]
    return processor.apply_chat_template(PROMPT + reply, add_generation_prompt=False, tokenize=False)


def _samples(images) -> list[UnpairedSample]:
    return [
        UnpairedSample("u0", [images[0]], PROMPT, GOOD, True, {}),
        UnpairedSample("u1", [images[1]], PROMPT, BAD, False, {}),
    ]


def _newline_logp(model, processor, image, response: str) -> float:
    """log p(last token | everything before it) of the processor's encoding of prompt + response (a plain forward)."""
    prompt_text = render_prompt(processor, PROMPT)
    inputs = processor(
        text=[_full_text(processor, response)],
        images=[image],
        return_tensors="pt",
        add_special_tokens=_add_special_tokens(processor, [prompt_text]),
    )
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    return float(torch.log_softmax(logits[-2], dim=-1)[ids[-1]])


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "gemma3", "idefics3", "paligemma"])
def test_trl_completion_tokens_are_what_follows_the_prompt(arch, tiny_processor, shape_images):
    processor = tiny_processor(arch)
    tok = tokenizer_of(processor)
    samples = _samples(shape_images)
    ours = kto.UnpairedEncoder(processor, max_length=None)(samples)
    trl = kto.UnpairedEncoder(processor, max_length=None, response_tokens="trl")(samples)
    assert ours.prompts.input_ids == trl.prompts.input_ids  # the option changes only the completions
    prompt_text = render_prompt(processor, PROMPT)
    expected = []
    for i, s in enumerate(samples):
        full = _full_text(processor, s.completion)
        assert full.startswith(prompt_text)
        expected.append(tok(full[len(prompt_text) :], add_special_tokens=False)["input_ids"])  # TRL's tokens
        rendered = processor(
            text=[full], images=[s.images[0]], add_special_tokens=_add_special_tokens(processor, [prompt_text])
        )["input_ids"][0]
        if arch == "paligemma":  # its processor ends every text with "\n" (see test_dpo_response_tokens)
            newline = tok("\n", add_special_tokens=False)["input_ids"]
            assert list(rendered) == trl.prompts.input_ids[i] + expected[i][1:] + newline
        else:
            assert list(rendered) == trl.prompts.input_ids[i] + expected[i]  # the full rendering after the prompt
        default = tok(s.completion, add_special_tokens=False)["input_ids"] + end_of_turn_ids(processor)
        assert ours.completions[i][0] == default  # the default is unchanged
    # each prompt carries [its own completion, the next sample's] under either convention
    assert trl.completions == [[expected[0], expected[1]], [expected[1], expected[0]]]
    assert trl.completions != ours.completions


@pytest.mark.parametrize("arch", ["qwen2_vl", "gemma3"])
def test_trl_log_probs_add_the_newline_after_the_end_of_turn(arch, tiny_model, shape_images):
    """Own and mismatched completions alike: TRL's sum = vlalign's + log p(newline | full rendering)."""
    model, processor = tiny_model(arch)
    model.eval()
    samples = _samples(shape_images)
    pad = pad_token_id_of(processor)
    ours = kto.UnpairedEncoder(processor, max_length=None)(samples)
    trl = kto.UnpairedEncoder(processor, max_length=None, response_tokens="trl")(samples)
    with torch.no_grad():
        lp_ours = completion_logprobs(model, ours.prompts, ours.completions, pad_token_id=pad)
        lp_trl = completion_logprobs(model, trl.prompts, trl.completions, pad_token_id=pad)
    assert lp_trl.lengths.tolist() == [n + 1 for n in lp_ours.lengths.tolist()]
    # flat order: prompt 0's [own, mismatched], prompt 1's [own, mismatched]
    for row, (i, response) in enumerate([(0, GOOD), (0, BAD), (1, BAD), (1, GOOD)]):
        extra = _newline_logp(model, processor, shape_images[i], response)
        assert extra < -1e-3  # a real difference, not a token the tiny model is sure of
        diff = float(lp_trl.sums[row] - lp_ours.sums[row])
        assert abs(diff - extra) < 1e-5, (row, diff, extra)


def _kto_step(model_dir: Path, data: Path, out: Path, response_tokens: str) -> dict:
    args = [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={data}",
        "--from_pairs=true",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        "--train.batch_size=2",
        "--train.max_steps=1",
        "--train.save_every=0",
        f"--response_tokens={response_tokens}",
    ]
    cfg = load_config(kto.Config, None, args)
    assert cfg.response_tokens == response_tokens
    kto.run(cfg)
    (rec,) = [r for r in read_metrics(out) if "train/loss" in r]
    return rec


def test_a_kto_step_runs_with_trl_response_tokens(tiny_model_dir, tiny_model, shape_images, tmp_path: Path):
    """One KTO step on one pair split into a desirable and an undesirable completion, under each
    convention. The policy starts as its reference, so every reward and z0 are 0 and the loss is
    0.5 per completion exactly; the logged ``logps/chosen`` (the desirable completion's summed
    log-prob, taken before the update) differs between the two runs by the newline's log-prob."""
    from vlalign.data.io import write_samples

    image = tmp_path / "im0.png"
    shape_images[0].save(image)
    write_samples([PreferenceSample("p0", [str(image)], PROMPT, GOOD, BAD)], tmp_path / "pairs.jsonl")
    model_dir = tiny_model_dir("qwen2_vl")
    recs = {rt: _kto_step(model_dir, tmp_path / "pairs.jsonl", tmp_path / rt, rt) for rt in ("vlalign", "trl")}
    for rec in recs.values():
        assert abs(rec["train/loss"] - 0.5) < 1e-6 and rec["rewards/margin"] == 0.0
        assert rec["count/desirable"] == rec["count/undesirable"] == 1 and math.isfinite(rec["kl/reference_point"])
    model, processor = tiny_model("qwen2_vl")
    model.eval()
    from PIL import Image

    extra = _newline_logp(model, processor, Image.open(image).convert("RGB"), GOOD)
    diff = recs["trl"]["logps/chosen"] - recs["vlalign"]["logps/chosen"]
    assert abs(diff - extra) < 1e-5, (diff, extra)


def test_unknown_response_tokens_are_refused(tiny_processor):
    with pytest.raises(ValueError, match="response_tokens must be 'vlalign' or 'trl'"):
        kto.UnpairedEncoder(tiny_processor("qwen2_vl"), max_length=None, response_tokens="sft")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="response_tokens: 'hf' is not one of 'vlalign', 'trl'"):
        load_config(kto.Config, None, ["--data.train=x.jsonl", "--response_tokens=hf"])

"""Which tokens count as the response: vlalign's convention against TRL's, per architecture.

vlalign scores a response as its text followed by the end-of-turn token(s) the chat template
writes after an assistant message, with the whitespace after them stripped
(:func:`~vlalign.data.chat.end_of_turn_text`): generation stops at the end-of-turn token, so
nothing after it is ever sampled. TRL's DPO trainer renders the prompt with the generation
prompt and the prompt plus the response without it, and scores everything after the prompt:
the response, the end-of-turn token AND what the template writes after it (Qwen's ``\\n``), and
the separator some templates write between the generation prompt and the response (LLaVA's space,
PaliGemma's newline), which vlalign leaves out (completions are tokenized alone).
``end_of_turn_ids(processor, convention="trl")`` adds the tokens after the end of turn; the
leading separator is not added (a completion tokenized with it merges it into its first token). The test derives TRL's suffix independently, from the
two renderings, and checks both conventions against it on every tiny architecture.
"""

from __future__ import annotations

import pytest

from vlalign.data.chat import end_of_turn_ids, end_of_turn_text, tokenizer_of
from vlalign.models.tiny import ARCHITECTURES

EXPECTED_VLALIGN = {"qwen2_vl": "<|im_end|>", "gemma3": "<end_of_turn>", "idefics3": "<end_of_utterance>"}
"""End-of-turn text of a few architectures (vlalign's convention), by hand from their templates."""


def _trl_suffix(processor, response: str) -> str:
    """TRL's rule: render prompt (with the generation prompt) and prompt + response, keep what follows the prompt."""
    user = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    reply = [{"role": "assistant", "content": [{"type": "text", "text": response}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(user + reply, add_generation_prompt=False, tokenize=False)
    assert full.startswith(prompt)
    return full[len(prompt) :]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_response_tokens_vlalign_and_trl(arch, tiny_processor):
    processor = tiny_processor(arch)
    suffix = _trl_suffix(processor, "Yes.")
    ours, theirs = end_of_turn_text(processor), end_of_turn_text(processor, convention="trl")
    lead, rest = suffix.split("Yes.", 1)
    assert rest == theirs  # TRL scores the response and everything the template writes after it ...
    assert lead.strip() == ""  # ... and the separator some templates write before it (LLaVA's " ")
    assert theirs.strip() == ours or not theirs.strip()  # the same end-of-turn token(s), ...
    assert ours == ours.strip()  # ... vlalign without the whitespace after them
    if arch in EXPECTED_VLALIGN:
        assert ours == EXPECTED_VLALIGN[arch]
    tok = tokenizer_of(processor)
    ids, trl_ids = end_of_turn_ids(processor), end_of_turn_ids(processor, convention="trl")
    if theirs.strip():
        assert trl_ids[: len(ids)] == ids
        extra = tok(theirs[len(ours) :], add_special_tokens=False)["input_ids"] if theirs != ours else []
        assert trl_ids == ids + extra
    if arch == "qwen2_vl":  # the 6.2-nat difference: one more scored token per response, "\n"
        assert theirs == "<|im_end|>\n" and len(trl_ids) == len(ids) + 1
        assert tok.decode(trl_ids[-1:]) == "\n"


def test_unknown_convention_is_refused(tiny_processor):
    with pytest.raises(ValueError, match="convention must be 'vlalign' or 'trl'"):
        end_of_turn_text(tiny_processor("qwen2_vl"), convention="sft")

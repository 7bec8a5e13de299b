"""What vlalign needs of a model is checked when it is loaded, not found missing inside a step.

Each case saves a working tiny model, takes one piece away, and expects ``ModelLoadError`` at
:func:`~vlalign.models.load.load_model_and_processor` naming that piece. Without the check: no chat
template fails in the first collate (``apply_chat_template``), a config whose image token is not
the processor's fails in the first forward ("Image features and image tokens do not match").
"""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest

from vlalign.models.load import ModelLoadError, load_model_and_processor, missing_pieces


@pytest.fixture
def folder(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llava"), out)
    return out


def test_a_folder_without_a_chat_template_is_refused_at_load(folder):
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match=re.escape(repr(str(folder))) + r".*lacks a chat template"):
        load_model_and_processor(folder, device="cpu", dtype="float32")


def test_a_config_whose_image_token_is_not_the_processors_is_refused_at_load(folder):
    config = json.loads((folder / "config.json").read_text())
    key = "image_token_index" if "image_token_index" in config else "image_token_id"
    right = config[key]
    config[key] = right + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=rf"image token: the model's config says {right + 1}, the processor \[{right}\]"
    ):
        load_model_and_processor(folder, device="cpu", dtype="float32")


def test_the_untouched_folder_loads(folder):
    model, processor = load_model_and_processor(folder, device="cpu", dtype="float32")
    assert missing_pieces(model, processor) == []


def test_every_missing_piece_is_named_at_once():
    """A processor with no pad or eos token, no chat template and no image token: three reasons."""
    tokenizer = SimpleNamespace(pad_token_id=None, eos_token_id=None, chat_template=None)
    processor = SimpleNamespace(tokenizer=tokenizer, chat_template=None)
    model = SimpleNamespace(config=SimpleNamespace(image_token_id=5))
    missing = missing_pieces(model, processor)
    assert len(missing) == 3
    assert missing[0].startswith("a pad or eos token") and missing[1].startswith("a chat template")
    assert missing[2].startswith("an image token in the processor")

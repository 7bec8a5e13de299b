"""The shapes world plugs in through registries: the layers below the recipes never load it.

The static import contracts (``lint-imports``, ``[tool.importlinter]`` in ``pyproject.toml``) see
``import`` statements; these tests check the same rule at run time, in a fresh interpreter, where
an ``importlib`` call would show too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vlalign.data.annotations import annotations_of
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.data.sources import registered_sources
from vlalign.models.tiny_tokenizer import corpus_sentences
from vlalign.rewards.facts import facts_text
from vlalign.rewards.verifiable import COLOUR_WORDS, REWARD_FUNCTIONS
from vlalign.shapes.world import tokenizer_corpus

BELOW_THE_RECIPES = [
    "vlalign.data.annotations",
    "vlalign.data.io",
    "vlalign.data.pairs.inject",
    "vlalign.data.pairs.rank",
    "vlalign.data.pairs.corrupt",
    "vlalign.eval.suite",
    "vlalign.eval.scorers",
    "vlalign.rewards",
    "vlalign.rewards.model",
    "vlalign.models.tiny",
    "vlalign.training",
    "vlalign.losses",
]


def test_layers_below_the_recipes_do_not_load_the_shapes_world() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {BELOW_THE_RECIPES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vlalign.shapes'))))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_importing_the_shapes_world_fills_the_registries() -> None:
    # tests/conftest.py imports vlalign.shapes, as recipes and commands do
    assert "shapes:" in registered_sources()
    assert {"object_f1", "shapes_answer"} <= set(REWARD_FUNCTIONS)
    assert COLOUR_WORDS["grey"] == "gray" and COLOUR_WORDS["red"] == "red"
    assert corpus_sentences("shapes") == tokenizer_corpus()
    objects = [{"shape": "circle", "colour": "red"}, {"shape": "circle", "colour": "red"}]
    sample = PromptSample("s", [], user_prompt("?"), {"objects": ["red circle"], "scene_objects": objects})
    assert annotations_of(sample).counts == {"red circle": 2}
    assert facts_text(sample, "scene_objects") == "The image shows two red circles."

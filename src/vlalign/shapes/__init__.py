"""The shapes world: vlalign's embedded default (world, rendering, tasks, vocabulary, its rewards).

Nothing below the recipes imports this package: the world plugs itself into the layers below
through their registries, when it is imported (:func:`plug_in`). Recipes and commands import it.

==========================================  =====================================================
registry                                    what the shapes world registers
==========================================  =====================================================
:mod:`vlalign.data.sources`                 ``shapes:`` -> :func:`~.embedded.resolve_data` (the
                                            demo's world, written once into the cache)
:mod:`vlalign.data.annotations`             the count reader of ``scene_objects``
:mod:`vlalign.data.pairs.inject`            its canonical captions (injection rewrites them
                                            canonically)
:mod:`vlalign.models.tiny_tokenizer`        the ``shapes`` corpus the tiny models' tokenizers
                                            learn (:func:`~.world.tokenizer_corpus`)
:mod:`vlalign.rewards.verifiable`           the rewards ``object_f1`` and ``shapes_answer``, and
                                            its colour words (``colour_match``)
:mod:`vlalign.rewards.facts`                ``scene_objects`` as a caption, the facts of a
                                            fact-augmented reward model
==========================================  =====================================================
"""

from __future__ import annotations

from vlalign.data.annotations import register_count_reader
from vlalign.data.pairs.inject import register_caption_style
from vlalign.data.sources import register_source
from vlalign.models.tiny_tokenizer import register_corpus
from vlalign.rewards.facts import register_fact_formatter
from vlalign.rewards.verifiable import register_colour_words, register_reward
from vlalign.shapes.embedded import SHAPES_PREFIX, resolve_data
from vlalign.shapes.rewards import colour_words, object_f1, scene_caption, scene_counts, shapes_answer
from vlalign.shapes.vocabulary import caption_from_counts
from vlalign.shapes.world import tokenizer_corpus


def plug_in() -> None:
    """Register the shapes world in the registries of the layers below (idempotent)."""
    register_source(SHAPES_PREFIX, resolve_data)
    register_count_reader("scene_objects", scene_counts)
    register_caption_style("shapes", caption_from_counts)
    register_corpus("shapes", tokenizer_corpus)
    register_reward("object_f1", object_f1)
    register_reward("shapes_answer", shapes_answer)
    register_colour_words(colour_words())
    register_fact_formatter("shapes", scene_caption, accepts="a list of scene objects")


plug_in()

"""Published hallucination benchmarks read from their own files and scored as their own scripts score them.

- :mod:`~vlalign.eval.benchmarks.pope`: POPE (AoiDragon/POPE ``evaluate.py``);
- :mod:`~vlalign.eval.benchmarks.chair_coco`: CHAIR on MSCOCO val2014 (LisaAnne/Hallucination
  ``utils/chair.py``; recall as in shikiw/OPERA), in ``official`` and ``clean`` modes;
- :mod:`~vlalign.eval.benchmarks.amber`: AMBER (junyangwang0410/AMBER ``inference.py``).

Every reader checks its file first and raises :class:`BenchmarkFileError` naming the file, the
line and the column (field) of the first problem. The synonym and word lists the metrics need are
shipped in ``data/`` (see ``data/README.md`` for their sources); the benchmarks' question,
annotation and image files are the user's.
"""

from vlalign.eval.benchmarks._io import BenchmarkFileError
from vlalign.eval.benchmarks.amber import (
    AmberAnnotation,
    AmberDiscriminative,
    AmberGenerative,
    AmberQuery,
    amber_discriminative_metrics,
    amber_generative_metrics,
    amber_nouns,
    read_amber_annotations,
    read_amber_queries,
    read_amber_responses,
)
from vlalign.eval.benchmarks.chair_coco import (
    CHAIR_PROMPT,
    CaptionRecord,
    ChairScore,
    CocoChair,
    Mention,
    read_coco_captions,
    read_coco_instances,
    sample_coco_image_ids,
)
from vlalign.eval.benchmarks.pope import (
    POPE_MODES,
    PopeMetrics,
    PopeQuestion,
    average_pope,
    check_pope_images,
    count_disagreements,
    format_pope_table,
    missing_pope_images,
    pope_answer_official,
    pope_file_name,
    pope_metrics,
    read_pope_answers,
    read_pope_file,
)

__all__ = [
    "CHAIR_PROMPT",
    "POPE_MODES",
    "AmberAnnotation",
    "AmberDiscriminative",
    "AmberGenerative",
    "AmberQuery",
    "BenchmarkFileError",
    "CaptionRecord",
    "ChairScore",
    "CocoChair",
    "Mention",
    "PopeMetrics",
    "PopeQuestion",
    "amber_discriminative_metrics",
    "amber_generative_metrics",
    "amber_nouns",
    "average_pope",
    "check_pope_images",
    "count_disagreements",
    "format_pope_table",
    "missing_pope_images",
    "pope_answer_official",
    "pope_file_name",
    "pope_metrics",
    "read_amber_annotations",
    "read_amber_queries",
    "read_amber_responses",
    "read_coco_captions",
    "read_coco_instances",
    "read_pope_answers",
    "read_pope_file",
    "sample_coco_image_ids",
]

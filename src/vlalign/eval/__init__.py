"""vlalign.eval: hallucination and task metrics, and the evaluation suite.

* :mod:`.parsing`: POPE answer reading (pure text; object mentions and annotations are
  :mod:`vlalign.data.annotations`);
* :mod:`.pope`: accuracy, precision, recall, F1 and yes-ratio of yes/no answers;
* :mod:`.chair`: CHAIR_i, CHAIR_s and object recall of descriptions;
* :mod:`.tasks`: accuracy of short answers (counting, colour, existence, exact answers);
* :mod:`.policy`: KL from a reference policy, win rate under a scorer;
* :mod:`.scorers`: scorers of responses by ground truth and by claims, and a scorer by config name
  (a reward model folder, a user's ``file.py:name``), for sample-and-rank and the win rate;
* :mod:`.suite`: :class:`~.suite.Suite`, :func:`~.suite.build_suite` and :func:`~.suite.evaluate`
  (a model in memory -> metrics), used by recipes and by ``vlalign eval`` (:mod:`vlalign.commands.eval`);
* :mod:`.paired`: the difference of two evaluations on the same questions with its paired-bootstrap
  interval over scenes (``vlalign compare``, :mod:`vlalign.commands.compare`).
* :mod:`.benchmarks`: the published benchmarks' readers and scorers (POPE, CHAIR on COCO, AMBER;
  pure text), and :mod:`.official`: those benchmarks run on a model (``vlalign eval --bench``),
  every file checked before the model is loaded.

Names are imported lazily (``from vlalign.eval import evaluate`` loads the suite on first use),
so that the pure-text modules stay cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EvalResult": "vlalign.eval.suite",
    "Suite": "vlalign.eval.suite",
    "SuiteConfig": "vlalign.eval.suite",
    "build_suite": "vlalign.eval.suite",
    "evaluate": "vlalign.eval.suite",
    "compare": "vlalign.eval.suite",
    "paired_bootstrap": "vlalign.eval.paired",
    "chair": "vlalign.eval.chair",
    "pope_metrics": "vlalign.eval.pope",
    "task_accuracy": "vlalign.eval.tasks",
    "kl_divergence": "vlalign.eval.policy",
    "win_rate": "vlalign.eval.policy",
    "ObjectVocabulary": "vlalign.data.annotations",
    "load_vocabulary": "vlalign.data.annotations",
    "GroundTruthScorer": "vlalign.eval.scorers",
    "ClaimVerifier": "vlalign.eval.scorers",
    "build_scorer": "vlalign.eval.scorers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlalign.eval' has no attribute {name!r}")


__all__ = sorted(_LAZY)

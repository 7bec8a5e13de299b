"""``reference.strategy=auto`` caches the reference when a frozen copy would not fit in memory.

The decision itself is worked by hand in ``tests/models/test_memory_defaults.py``; here one
``vlalign dpo`` run sees the free memory it is given (``preference_common.free_bytes``, replaced
for the test) and says why it chose what it chose.
"""

from __future__ import annotations

import json

import pytest
from test_dpo import _args, _records, pair_file  # noqa: F401 (pair_file: the fixture)

from vlalign.config import load_config
from vlalign.models.memory import parameter_bytes, reference_copy_problem, training_state_bytes
from vlalign.recipes import dpo, preference_common


def test_auto_caches_the_reference_when_a_copy_would_not_fit(
    tiny_model_dir,
    tiny_model,
    pair_file,  # noqa: F811 (the fixture imported above)
    tmp_path,
    monkeypatch,
):
    """Two steps of four pairs over eight pairs is one pass: with the machine's memory, auto keeps
    the frozen copy. With 1 byte free, the copy (every parameter of the tiny model) cannot fit beside
    the policy's gradients and AdamW's moments, so auto precomputes the reference log-probs, scored
    by the policy itself before its first step, and prints the sizes. The losses are the copy's
    (the same reference log-probs; only the batches they were scored in differ, within 1e-5)."""
    common = ("--data.limit=8", "--train.batch_size=4", "--train.max_steps=2", "--train.save_every=0")
    model_dir = tiny_model_dir("qwen2_vl")
    dpo.run(load_config(dpo.Config, None, _args(model_dir, pair_file, tmp_path / "copy", *common)))
    monkeypatch.setattr(preference_common, "free_bytes", lambda device: 1)
    dpo.run(load_config(dpo.Config, None, _args(model_dir, pair_file, tmp_path / "tight", *common)))
    roomy = json.loads((tmp_path / "copy" / "run.json").read_text())["reference"]
    tight = json.loads((tmp_path / "tight" / "run.json").read_text())["reference"]
    assert roomy == {"strategy": "copy", "reason": "auto: 1.00 planned passes over the data"}
    model, _ = tiny_model("qwen2_vl")  # the policy as the recipe loads it: every parameter trainable
    copy, state = parameter_bytes(model), training_state_bytes(model)
    assert state == 3 * copy
    assert tight == {"strategy": "precomputed", "reason": f"auto: {reference_copy_problem(copy, state, 1, 'cpu')}"}
    assert "more than the 0.00 GB free on cpu" in tight["reason"]
    for a, b in zip(_records(tmp_path / "copy"), _records(tmp_path / "tight"), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)

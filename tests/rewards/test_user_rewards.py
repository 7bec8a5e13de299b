"""User rewards the way users bring them: a relative ``file.py:function`` found next to the config
file, TRL's batched signature ``reward_func(prompts, completions, **kwargs) -> list[float]`` accepted
unchanged, and a dry run that calls every reward once before training."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from vlalign.config import load_config
from vlalign.data.schema import PromptSample, user_prompt
from vlalign.recipes import grpo
from vlalign.rewards import (
    BatchedUserReward,
    RewardConfigError,
    RewardError,
    build_reward,
    build_reward_from_config,
    dry_run,
    is_batched,
)

TRL_REWARDS = '''
def accuracy(completions, answer, **kwargs):
    """TRL-style: conversational completions, a data column by name, a list of floats."""
    return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]


def prompt_length(prompts, completions, scale=1.0):
    """TRL-style with prompts and an option: the prompt's text length times scale."""
    return [scale * len(p[-1]["content"][-1]["text"]) for p in prompts]


def needs_solution(completions, solution, **kwargs):
    return [0.0 for _ in completions]


def wrong_count(prompts, completions, **kwargs):
    return [1.0]


def slow(prompts, completions, **kwargs):
    import time

    time.sleep(5)
    return [0.0 for _ in completions]


def per_sample(completion, sample):
    return float(len(completion))


def fails_on_colour(completion, sample):
    if sample.meta["task"] == "colour":
        raise KeyError("no colour here")
    return 0.0
'''


def _samples() -> list[PromptSample]:
    """Two prompts (texts of 9 and 7 characters) with answers 2 and red, tasks counting and colour."""
    return [
        PromptSample(id="q1", images=[], prompt=user_prompt("How many?"), meta={"answer": "2", "task": "counting"}),
        PromptSample(id="q2", images=[], prompt=user_prompt("Colour?"), meta={"answer": "red", "task": "colour"}),
    ]


@pytest.fixture
def reward_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "trl_rewards.py").write_text(TRL_REWARDS)
    return folder


def test_a_trl_reward_function_works_unchanged(reward_dir: Path) -> None:
    """accuracy: completions "2" and "blue" against answers 2 and red -> 1, 0; prompt_length with
    scale 0.5: texts "How many?" (9) and "Colour?" (7) -> 4.5, 3.5. Total = 1*acc + 2*len ->
    (1 + 9, 0 + 7) = (10, 7)."""
    reward = build_reward(
        {"trl_rewards.py:accuracy": 1.0, "trl_rewards.py:prompt_length": 2.0},
        options={"trl_rewards.py:prompt_length": {"scale": 0.5}},
        base_dir=reward_dir,
    )
    assert all(isinstance(s, BatchedUserReward) for s in reward.scorers.values())
    scores = reward(_samples(), ["2", "blue"], dtype=torch.float64)
    assert scores.values["accuracy"].tolist() == [1.0, 0.0]
    assert scores.values["prompt_length"].tolist() == [4.5, 3.5]
    assert scores.total.tolist() == [10.0, 7.0]


def test_batched_is_told_from_the_signature(reward_dir: Path) -> None:
    from vlalign.rewards import load_user_function

    assert is_batched(load_user_function("trl_rewards.py:accuracy", base_dir=reward_dir))
    assert not is_batched(load_user_function("trl_rewards.py:per_sample", base_dir=reward_dir))


def test_batched_reward_failures_are_named(reward_dir: Path) -> None:
    def score(name: str, **kwargs):
        return build_reward({f"trl_rewards.py:{name}": 1.0}, base_dir=reward_dir, **kwargs)(_samples(), ["a", "b"])

    with pytest.raises(RewardError, match=r"'needs_solution'.*needs \['solution'\].*columns: \['answer', 'task'\]"):
        score("needs_solution")
    with pytest.raises(RewardError, match=r"'wrong_count' returned 1 scores for 2 completions"):
        score("wrong_count")
    with pytest.raises(RewardError, match=r"'slow' timed out after 0.2 s on a batch of 2"):
        score("slow", timeout_s=0.1)
    with pytest.raises(RewardConfigError, match=r"rewards.options gives \['scal'\]"):
        build_reward(
            {"trl_rewards.py:prompt_length": 1.0},
            options={"trl_rewards.py:prompt_length": {"scal": 2}},
            base_dir=reward_dir,
        )


def test_a_relative_reward_file_is_read_next_to_the_config_file(reward_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The YAML in cfg/ names trl_rewards.py:accuracy; run from another folder, the file is found
    beside the YAML (rewards.base_dir is filled with the YAML's folder); then the working directory."""
    config = reward_dir / "grpo.yaml"
    config.write_text("rewards:\n  weights: {trl_rewards.py:accuracy: 1.0}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(grpo.Config, config)
    assert cfg.rewards.base_dir == str(reward_dir.resolve())
    assert build_reward_from_config(cfg.rewards)(_samples(), ["2", "2"]).total.tolist() == [1.0, 0.0]
    (elsewhere / "cwd_rewards.py").write_text(TRL_REWARDS)
    second = reward_dir / "second.yaml"
    second.write_text("rewards:\n  weights: {cwd_rewards.py:accuracy: 1.0}\n")
    found = build_reward_from_config(load_config(grpo.Config, second).rewards)
    assert found(_samples(), ["x", "red"]).total.tolist() == [0.0, 1.0]  # not beside the YAML: the working directory
    second.write_text("rewards:\n  weights: {missing.py:f: 1.0}\n")
    with pytest.raises(RewardConfigError, match=r"file not found: .*cfg/missing.py or .*elsewhere/missing.py"):
        build_reward_from_config(load_config(grpo.Config, second).rewards)


def test_dry_run_calls_every_reward_on_the_first_sample_of_each_task(reward_dir: Path) -> None:
    """fails_on_colour raises on the colour prompt (q2): the dry run, which calls each reward on the first
    sample of every task, finds it and names the function and the sample."""
    good = build_reward({"trl_rewards.py:per_sample": 1.0, "trl_rewards.py:accuracy": 1.0}, base_dir=reward_dir)
    dry_run(good, _samples())
    bad = build_reward({"trl_rewards.py:fails_on_colour": 1.0}, base_dir=reward_dir)
    with pytest.raises(RewardError, match=r"dry run before training.*'fails_on_colour'.*'q2'.*no colour here"):
        dry_run(bad, [*_samples(), *_samples()])


def test_the_reward_documented_in_docs_rewards_md_runs(tmp_path: Path) -> None:
    """docs/rewards.md's worked example: the file it shows scores as it says."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "rewards.md"
    text = docs.read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(code))
    reward = build_reward({"my_rewards.py:short_and_right": 1.0, "my_rewards.py:answer_match": 1.0}, base_dir=tmp_path)
    scores = reward(_samples(), ["2", "it is blue I think"], dtype=torch.float64)
    assert scores.values["answer_match"].tolist() == [1.0, 0.0]
    assert scores.values["short_and_right"].tolist() == [1.0, 0.0]

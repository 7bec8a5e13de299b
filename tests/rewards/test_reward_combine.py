"""Rewards by config: weighted combination, user functions, guarded calls, time limits, scorers,
and the fact-augmented reward-model input.

The combination's totals and metrics are worked out by hand in each test's docstring; every
failure mode must raise an error that names the function and the sample (never a silent zero).
"""

from __future__ import annotations

import math
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from vlalign.config import format_help, load_config
from vlalign.data.schema import DataError, PromptSample, user_prompt
from vlalign.rewards import (
    RewardConfigError,
    RewardError,
    RewardsConfig,
    RewardTimeout,
    build_reward,
    build_reward_from_config,
    call_reward,
    call_with_timeout,
    fact_augmented_prompt,
    fact_augmented_sample,
    facts_text,
    load_user_function,
)

USER_REWARDS = """
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

LIMIT = 3


@dataclass
class Settings:  # a dataclass in a user file needs its module registered while it runs
    scale: float = 1.0


def length_bonus(completion, sample, scale=1.0):
    return scale * len(completion) / 10


def as_string(completion, sample):
    return "3"


def as_none(completion, sample):
    return None


def nan(completion, sample):
    return math.nan if completion == "bad" else 1.0


def infinite(completion, sample):
    return -math.inf


def boom(completion, sample):
    if sample.id == "s2":
        raise KeyError("gold")
    return 1.0


def slow(completion, sample):
    time.sleep(3)
    return 1.0


def stubborn(completion, sample):
    try:
        time.sleep(3)
    except Exception:
        return 1.0
    return 1.0


def numpy_value(completion, sample):
    return np.float32(0.5)


def tensor_value(completion, sample):
    return torch.tensor([0.25])


def boolean(completion, sample):
    return completion == "3"


def no_sample(completion):
    return 1.0
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def make_samples(answers: list[str]) -> list[PromptSample]:
    return [
        PromptSample(id=f"s{i}", images=[], prompt=user_prompt("How many?"), meta={"answer": a})
        for i, a in enumerate(answers)
    ]


# ----------------------------------------------------------------------------- combination


def test_weighted_total_and_metrics_hand_worked() -> None:
    """count_match = [1, 0, 1, 0], format = [1, 1, 0, 0], weights 1 and 0.5:
    total = [1.5, 0.5, 1, 0], mean 0.75, population std sqrt((0.5625·2 + 0.0625·2)/4) = sqrt(0.3125).
    count_match mean 0.5, std 0.5; format mean 0.5, std 0.5."""
    reward = build_reward({"count_match": 1.0, "format": 0.5})
    samples = make_samples(["3", "3", "2", "2"])
    completions = [
        "<think>a</think><answer>3</answer>",
        "<think>a</think><answer>4</answer>",
        "2",
        "3",
    ]
    scores = reward(samples, completions, dtype=torch.float64)
    torch.testing.assert_close(scores.values["count_match"], torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(scores.values["format"], torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(scores.total, torch.tensor([1.5, 0.5, 1.0, 0.0], dtype=torch.float64), rtol=0, atol=0)
    metrics = scores.metrics()
    assert set(metrics) == {f"rewards/{n}/{s}" for n in ("count_match", "format", "total") for s in ("mean", "std")}
    assert metrics["rewards/total/mean"].item() == 0.75
    assert metrics["rewards/total/std"].item() == pytest.approx(math.sqrt(0.3125), abs=1e-15)
    assert metrics["rewards/count_match/std"].item() == 0.5
    assert scores.weights == {"count_match": 1.0, "format": 0.5}
    assert reward(samples, completions).total.dtype == torch.float32


def test_zero_weight_is_logged_not_added_and_single_sample_std() -> None:
    reward = build_reward({"count_match": 1.0, "format": 0.0})
    scores = reward(make_samples(["3"]), ["<think>x</think><answer>3</answer>"])
    assert scores.values["format"].tolist() == [1.0]
    assert scores.total.tolist() == [1.0]
    assert scores.metrics()["rewards/total/std"].item() == 0.0


def test_options_are_bound_and_checked() -> None:
    """overlong_penalty with max 4, cache 2 (free 2): 3 words -> (2 - 3)/2 = -0.5."""
    reward = build_reward({"overlong_penalty": 2.0}, options={"overlong_penalty": {"max_length": 4, "cache_length": 2}})
    assert reward(make_samples(["x"]), ["a b c"]).total.tolist() == [-1.0]
    missing = r"'overlong_penalty'.*missing a required argument: 'max_length'.*rewards\.options"
    with pytest.raises(RewardConfigError, match=missing):
        build_reward({"overlong_penalty": 1.0})
    typo = r"'box_iou': cannot be called as fn\(completion, sample, threshhold=...\).*'threshold'"
    with pytest.raises(RewardConfigError, match=typo):
        build_reward({"box_iou": 1.0}, options={"box_iou": {"threshhold": 0.5}})
    with pytest.raises(RewardConfigError, match=r"rewards.options names \['format'\]"):
        build_reward({"count_match": 1.0}, options={"format": {}})


def test_config_errors() -> None:
    with pytest.raises(RewardConfigError, match=r"unknown reward 'count'.*count_match"):
        build_reward({"count": 1.0})
    with pytest.raises(RewardConfigError, match="empty"):
        build_reward({})
    with pytest.raises(RewardConfigError, match=r"rewards.weights.format: nan"):
        build_reward({"format": math.nan})
    with pytest.raises(ValueError, match="2 samples but 1 completions"):
        build_reward({"format": 1.0})(make_samples(["a", "b"]), ["x"])


def test_config_section_from_yaml_with_a_user_function(tmp_path: Path, user_file: Path) -> None:
    """A YAML rewards section naming a user file relative to the config's folder:
    total = 1·count_match + 0.1·length_bonus(scale=2) = 1 + 0.1·2·len("3")/10 = 1.02 for "3"."""
    cfg_path = tmp_path / "rewards.yaml"
    cfg_path.write_text(
        textwrap.dedent(
            """
            weights: {count_match: 1.0, "my_rewards.py:length_bonus": 0.1}
            options: {"my_rewards.py:length_bonus": {scale: 2}}
            timeout_s: 5
            """
        )
    )
    cfg = load_config(RewardsConfig, cfg_path)
    reward = build_reward_from_config(cfg, base_dir=tmp_path)
    scores = reward(make_samples(["3", "3"]), ["3", "4444"], dtype=torch.float64)
    assert set(scores.values) == {"count_match", "length_bonus"}
    torch.testing.assert_close(scores.total, torch.tensor([1.02, 0.08], dtype=torch.float64), rtol=0, atol=1e-15)
    assert "Time limit of one reward call" in format_help(RewardsConfig)


# ----------------------------------------------------------------------------- user functions


def test_user_function_import_errors(tmp_path: Path, user_file: Path) -> None:
    with pytest.raises(RewardConfigError, match=r"'nothere.py:f'.*file not found: .*nothere.py"):
        build_reward({"nothere.py:f": 1.0}, base_dir=tmp_path)
    with pytest.raises(RewardConfigError, match=r"has no function 'missing'.*'length_bonus'"):
        build_reward({"my_rewards.py:missing": 1.0}, base_dir=tmp_path)
    with pytest.raises(RewardConfigError, match=r"my_rewards.py:LIMIT is a int, not a function"):
        build_reward({"my_rewards.py:LIMIT": 1.0}, base_dir=tmp_path)
    arity = r"no_sample': cannot be called as fn\(completion, sample\): too many positional.*\['completion'\]"
    with pytest.raises(RewardConfigError, match=arity):
        build_reward({"my_rewards.py:no_sample": 1.0}, base_dir=tmp_path)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(completion, sample):\n    return (\n")
    with pytest.raises(RewardConfigError, match=r"importing .*broken.py failed: SyntaxError"):
        load_user_function(str(broken) + ":f")
    raising = tmp_path / "raising.py"
    raising.write_text("import no_such_dependency\n")
    with pytest.raises(RewardConfigError, match=r"importing .*raising.py failed: ModuleNotFoundError"):
        load_user_function(str(raising) + ":f")
    with pytest.raises(RewardConfigError, match=r"cannot import module 'no_such_pkg.rewards'"):
        load_user_function("no_such_pkg.rewards:f")
    with pytest.raises(RewardConfigError, match=r"written 'file.py:function'"):
        load_user_function("my_rewards.py:")


def test_user_function_by_module_path_and_absolute_file(user_file: Path) -> None:
    fn = load_user_function("vlalign.rewards.verifiable:count_match")
    assert fn("3", make_samples(["3"])[0]) == 1.0
    assert load_user_function(f"{user_file}:length_bonus")("abcde", None) == 0.5


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("as_string", r"'as_string' on sample 's0' returned \"'3'\" \(str\), not a number"),
        ("as_none", r"'as_none' on sample 's0' returned 'None' \(NoneType\), not a number"),
        ("infinite", r"'infinite' on sample 's0' returned -inf; rewards must be finite"),
    ],
)
def test_non_numbers_stop_the_step(tmp_path: Path, user_file: Path, name: str, message: str) -> None:
    reward = build_reward({f"my_rewards.py:{name}": 1.0}, base_dir=tmp_path)
    with pytest.raises(RewardError, match=message) as info:
        reward(make_samples(["3"]), ["3"])
    assert (info.value.function, info.value.sample_id) == (name, "s0")


def test_nan_and_raising_name_function_and_sample(tmp_path: Path, user_file: Path) -> None:
    samples = make_samples(["1", "2", "3"])
    reward = build_reward({"my_rewards.py:nan": 1.0}, base_dir=tmp_path)
    with pytest.raises(RewardError, match=r"'nan' on sample 's1' returned nan") as info:
        reward(samples, ["ok", "bad", "ok"])
    assert info.value.sample_id == "s1"
    reward = build_reward({"my_rewards.py:boom": 1.0}, base_dir=tmp_path)
    with pytest.raises(RewardError, match=r"'boom' raised KeyError on sample 's2' \(completion 'c'\): 'gold'") as info:
        reward(samples, ["a", "b", "c"])
    assert isinstance(info.value.__cause__, KeyError)


def test_builtin_reward_errors_are_named_too() -> None:
    """A missing meta field inside a registered reward reaches the loop as a RewardError."""
    reward = build_reward({"box_iou": 1.0})
    with pytest.raises(RewardError, match=r"'box_iou' raised DataError on sample 's0'.*no meta field 'box'"):
        reward(make_samples(["3"]), ["[0, 0, 1, 1]"])


def test_other_number_types_are_accepted(tmp_path: Path, user_file: Path) -> None:
    weights = {f"my_rewards.py:{n}": 1.0 for n in ("numpy_value", "tensor_value", "boolean")}
    scores = build_reward(weights, base_dir=tmp_path)(make_samples(["3", "3"]), ["3", "4"], dtype=torch.float64)
    assert scores.total.tolist() == [1.75, 0.75]


# ----------------------------------------------------------------------------- time limits


@pytest.mark.parametrize("mode", ["signal", "thread"])
@pytest.mark.parametrize("name", ["slow", "stubborn"])
def test_timeout_names_function_and_sample(tmp_path: Path, user_file: Path, mode: str, name: str) -> None:
    """A 3 s reward under a 0.2 s limit stops the step in well under a second, in both modes, even
    when the user's code catches Exception around the wait."""
    reward = build_reward({f"my_rewards.py:{name}": 1.0}, base_dir=tmp_path, timeout_s=0.2, mode=mode)
    start = time.perf_counter()
    with pytest.raises(RewardError, match=rf"'{name}' timed out after 0.2 s on sample 's0' \(completion 'abc'\)"):
        reward(make_samples(["3"]), ["abc"])
    assert time.perf_counter() - start < 1.0


def test_signal_guard_restores_handler_and_timer() -> None:
    marker = signal.getsignal(signal.SIGALRM)
    assert call_with_timeout(lambda x: x + 1, 1, timeout_s=1.0, mode="signal") == 2
    assert signal.getsignal(signal.SIGALRM) is marker
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pytest.raises(RewardTimeout):
        call_with_timeout(time.sleep, 2, timeout_s=0.05, mode="signal")
    assert signal.getsignal(signal.SIGALRM) is marker
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, timeout_s=1.0, mode="thread")


def test_auto_mode_leaves_an_armed_timer_alone_and_works_off_the_main_thread() -> None:
    previous = signal.signal(signal.SIGALRM, lambda *a: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert call_with_timeout(lambda: 7, timeout_s=1.0) == 7  # falls back to a thread
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 90.0 < remaining <= 100.0
        with pytest.raises(RuntimeError, match="signal-based time limits need"):
            call_with_timeout(lambda: 7, timeout_s=1.0, mode="signal")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)
    outcome: dict[str, object] = {}

    def worker() -> None:
        try:
            call_reward(lambda c, s: time.sleep(2), "sleepy", "x", make_samples(["1"])[0], timeout_s=0.1)
        except RewardError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert "'sleepy' timed out after 0.1 s on sample 's0'" in str(outcome.get("error"))


# ----------------------------------------------------------------------------- batched scorers


class FixedScorer:
    """A stand-in reward model: returns the given scores whatever the batch."""

    def __init__(self, scores: object) -> None:
        self.scores = scores
        self.calls = 0

    def __call__(self, samples, completions):
        self.calls += 1
        if isinstance(self.scores, Exception):
            raise self.scores
        return self.scores


def test_batch_scorer_in_the_combination() -> None:
    """total = 1·rm + 0.5·count_match = [0.25 + 0.5, -1 + 0] = [0.75, -1]."""
    scorer = FixedScorer(torch.tensor([0.25, -1.0]))
    reward = build_reward({"rm": 1.0, "count_match": 0.5}, scorers={"rm": scorer})
    scores = reward(make_samples(["3", "3"]), ["3", "4"], dtype=torch.float64)
    assert scores.total.tolist() == [0.75, -1.0]
    assert scorer.calls == 1
    assert set(scores.metrics()) >= {"rewards/rm/mean", "rewards/rm/std"}


class RecordingScorer:
    """A stand-in reward model that scores each completion by its length and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], list[str]]] = []

    def __call__(self, samples, completions):
        self.seen.append(([s.id for s in samples], list(completions)))
        return [float(len(c)) for c in completions]


def test_rewards_restricted_to_tasks() -> None:
    """Samples s0 (describe), s1 (counting, answer 3), s2 (describe), s3 (counting, answer 2).
    rm scores only the descriptions: it is called once with s0 and s2 ("abcd" 4, "xy" 2);
    count_match only the counting answers: s1 "3" right (1), s3 "5" wrong (0).
    total = 1·rm + 2·count_match = [4, 2, 2, 0]; each function's metrics over what it scored:
    rm mean 3, std 1; count_match mean 0.5, std 0.5."""
    samples = [
        PromptSample(id=f"s{i}", images=[], prompt=user_prompt("q"), meta={"task": t, "answer": a})
        for i, (t, a) in enumerate([("describe", ""), ("counting", "3"), ("describe", ""), ("counting", "2")])
    ]
    scorer = RecordingScorer()
    reward = build_reward(
        {"rm": 1.0, "count_match": 2.0}, scorers={"rm": scorer}, tasks={"rm": ["describe"], "count_match": ["counting"]}
    )
    scores = reward(samples, ["abcd", "3", "xy", "5"], dtype=torch.float64)
    assert scorer.seen == [(["s0", "s2"], ["abcd", "xy"])]
    assert scores.total.tolist() == [4.0, 2.0, 2.0, 0.0]
    assert scores.values["rm"].tolist() == [4.0, 0.0, 2.0, 0.0]
    m = scores.metrics()
    assert (float(m["rewards/rm/mean"]), float(m["rewards/rm/std"])) == (3.0, 1.0)
    assert (float(m["rewards/count_match/mean"]), float(m["rewards/count_match/std"])) == (0.5, 0.5)
    only_counting = reward([samples[1], samples[3]], ["3", "5"])  # rm scores nothing: not called, no metrics
    assert len(scorer.seen) == 1 and "rewards/rm/mean" not in only_counting.metrics()
    assert only_counting.total.tolist() == [2.0, 0.0]


def test_task_restriction_errors() -> None:
    with pytest.raises(RewardConfigError, match=r"rewards.tasks names \['rm'\], which are not in rewards.weights"):
        build_reward({"count_match": 1.0}, tasks={"rm": ["describe"]})
    with pytest.raises(RewardConfigError, match=r"rewards.tasks.count_match: give a non-empty list"):
        build_reward({"count_match": 1.0}, tasks={"count_match": "counting"})
    reward = build_reward({"count_match": 1.0}, tasks={"count_match": ["counting"]})
    with pytest.raises(RewardError, match=r"no reward scores sample 's0' \(task 'answer'\)"):
        reward(make_samples(["3"]), ["3"])  # no task column: task_of calls it an 'answer' row
    colour = PromptSample(id="c0", images=[], prompt=user_prompt("q"), meta={"task": "colour", "answer": "red"})
    with pytest.raises(
        RewardError,
        match=r"no reward scores sample 'c0' \(task 'colour'\): rewards.tasks names only "
        r"\['counting'\]",
    ):
        reward([colour], ["red"])
    unrestricted = build_reward({"count_match": 1.0, "colour_match": 1.0}, tasks={"count_match": ["counting"]})
    assert unrestricted([colour], ["red"]).total.tolist() == [1.0]  # colour_match scores every sample


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([1.0], r"scorer 'rm' returned 1 scores for 2 completions"),
        ([1.0, math.nan], r"'rm' on sample 's1' returned nan"),
        ([1.0, "x"], r"'rm' on sample 's1' returned \"'x'\" \(str\)"),
        (RuntimeError("out of memory"), r"scorer 'rm' raised RuntimeError on a batch of 2.*out of memory"),
    ],
)
def test_batch_scorer_failures(scores: object, message: str) -> None:
    reward = build_reward({"rm": 1.0}, scorers={"rm": FixedScorer(scores)})
    with pytest.raises(RewardError, match=message):
        reward(make_samples(["3", "3"]), ["3", "4"])


# ----------------------------------------------------------------------------- fact-augmented input


def test_facts_text_from_each_kind_of_column() -> None:
    s = PromptSample(
        "r1",
        [],
        user_prompt("How many squares?"),
        {
            "caption": "  Two red circles.  ",
            "objects": ["red circle", "blue square"],
            "scene_objects": [
                {"shape": "square", "colour": "blue", "size": 0.2, "x": 0.1, "y": 0.1},
                {"shape": "circle", "colour": "red", "size": 0.2, "x": 0.5, "y": 0.1},
                {"shape": "circle", "colour": "red", "size": 0.2, "x": 0.9, "y": 0.1},
            ],
            "bad": 3,
        },
    )
    assert facts_text(s, "caption") == "Two red circles."
    assert facts_text(s, "objects") == "red circle; blue square"
    assert facts_text(s, "scene_objects") == "The image shows two red circles and a blue square."
    with pytest.raises(DataError, match=r"sample 'r1' has no meta field 'options'"):
        facts_text(s, "options")
    with pytest.raises(DataError, match=r"sample 'r1' meta\['bad'\] is a int"):
        facts_text(s, "bad")


def test_fact_augmented_sample_keeps_images_and_leaves_the_original() -> None:
    prompt = user_prompt("How many squares?")
    s = PromptSample("r1", ["img.png"], prompt, {"objects": ["red circle", "blue square"]})
    out = fact_augmented_sample(s, "objects")
    assert out.prompt == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Facts about the image: red circle; blue square\n"},
                {"type": "text", "text": "How many squares?"},
            ],
        }
    ]
    assert s.prompt == user_prompt("How many squares?")  # not mutated
    assert (out.id, out.images, out.meta) == ("r1", ["img.png"], s.meta)
    plain = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Describe."}]
    assert fact_augmented_prompt(plain, "a cat", template="[{facts}] ")[1]["content"] == "[a cat] Describe."
    images_only = [{"role": "user", "content": [{"type": "image"}]}]
    expected = {"type": "text", "text": "Facts about the image: x\n"}
    assert fact_augmented_prompt(images_only, "x")[0]["content"] == [{"type": "image"}, expected]
    with pytest.raises(ValueError, match="must contain"):
        fact_augmented_prompt(prompt, "x", template="no placeholder")
    with pytest.raises(ValueError, match="no user turn"):
        fact_augmented_prompt([{"role": "system", "content": "x"}], "x")

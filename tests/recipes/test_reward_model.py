"""``vlalign rm`` and reward-model scoring: the accuracy metric by hand, held-out splits, a run that
learns, and a saved model that scores (plain and fact-augmented) exactly as it was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlalign.commands import pairs as pairs_cli
from vlalign.config import load_config
from vlalign.data.collate import encode_completions, encode_prompts
from vlalign.data.io import load_samples
from vlalign.data.schema import DataError, PreferenceSample, PromptSample, user_prompt
from vlalign.eval.scorers import build_scorer
from vlalign.models.heads import RewardModel, RewardModelInfo, new_head
from vlalign.recipes import reward_model as rm
from vlalign.rewards import fact_augmented_sample
from vlalign.rewards.model import RewardModelScorer, group_consecutive, load_reward_scorer, prepare_samples
from vlalign.training.metrics import read_metrics


@pytest.fixture(scope="module")
def pair_files(recipe_world: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Injected-hallucination pairs of the recipe world's train and validation splits."""
    out = tmp_path_factory.mktemp("rm-pairs")
    files = []
    for split in ("train", "validation"):
        cfg = load_config(
            pairs_cli.Config,
            None,
            [
                "--method=inject",
                "--inject.balance_existence=false",
                f"--data={recipe_world / f'{split}.jsonl'}",
                f"--out={out / f'{split}.jsonl'}",
            ],
        )
        pairs_cli.run(cfg)
        files.append(out / f"{split}.jsonl")
    return files[0], files[1]


def _args(model_dir: Path, train: Path, heldout: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        f"--data.train={train}",
        f"--data.eval={heldout}",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        *extra,
    ]


def _pair(i: int, source: str = "", scene: str = "") -> PreferenceSample:
    meta = {k: v for k, v in {"source": source, "scene_id": scene}.items() if v}
    return PreferenceSample(
        id=f"p{i}",
        images=[f"img{i}.png"],
        prompt=user_prompt("Describe the image."),
        chosen="a",
        rejected="b",
        meta=meta,
    )


# ----------------------------------------------------------------------------- by hand


def test_pairwise_accuracy_by_hand():
    """Chosen (1, 2, 3, 0.5) against rejected (0, 2, 4, 0.1): win, tie, loss, win = (1 + 0.5 + 0 + 1) / 4."""
    chosen = torch.tensor([1.0, 2.0, 3.0, 0.5])
    rejected = torch.tensor([0.0, 2.0, 4.0, 0.1])
    assert float(rm.pairwise_accuracy(chosen, rejected)) == 0.625
    assert float(rm.pairwise_accuracy(torch.zeros(5), torch.zeros(5))) == 0.5  # a constant model is at chance
    with pytest.raises(ValueError, match="non-empty"):
        rm.pairwise_accuracy(torch.zeros(0), torch.zeros(0))


def test_heldout_metrics_per_source_by_hand():
    """Sources a, a, b with margins +1, -1, 0: accuracy 1/2 for a, 1/2 (a tie) for b, 1/2 overall;
    BT loss mean = (log(1+e^-1) + log(1+e^1) + log 2) / 3; mean margin 0; the one describe pair (+1) has
    task accuracy 1."""
    samples = [_pair(0, "a"), _pair(1, "a"), _pair(2, "b")]
    samples[0].meta["task"] = "describe"
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 3.0])
    out = rm.heldout_metrics(chosen, rejected, samples)
    assert out["eval/accuracy"] == 0.5 and out["eval/accuracy/a"] == 0.5 and out["eval/accuracy/b"] == 0.5
    assert out["eval/pairs/a"] == 2 and out["eval/pairs/b"] == 1 and out["eval/margin"] == 0.0
    assert out["eval/accuracy/task/describe"] == 1.0 and out["eval/pairs/task/describe"] == 1
    expected = (
        torch.log1p(torch.exp(torch.tensor(-1.0, dtype=torch.float64)))
        + torch.log1p(torch.exp(torch.tensor(1.0, dtype=torch.float64)))
        + torch.log(torch.tensor(2.0, dtype=torch.float64))
    ) / 3
    assert abs(out["eval/loss"] - float(expected)) < 1e-12


def test_heldout_split_keeps_images_apart():
    """Ten scenes with three pairs each, 20 % held out: 2 scenes (6 pairs), no scene on both sides,
    the same split for the same seed."""
    samples = [_pair(3 * s + k, scene=f"scene{s}") for s in range(10) for k in range(3)]
    train, held = rm.split_heldout(samples, 0.2, seed=0)
    assert len(held) == 6 and len(train) == 24
    assert not {s.meta["scene_id"] for s in train} & {s.meta["scene_id"] for s in held}
    assert [s.id for s in rm.split_heldout(samples, 0.2, seed=0)[1]] == [s.id for s in held]
    with pytest.raises(ValueError, match="heldout_fraction"):
        rm.split_heldout(samples, 0.0, seed=0)


def test_margin_column_must_hold_numbers():
    samples = [_pair(0), _pair(1)]
    samples[0].meta["margin"], samples[1].meta["margin"] = 0.5, "big"
    with pytest.raises(ValueError, match="'p1'.*margin"):
        rm.pair_margins(samples, "margin")
    assert rm.pair_margins(samples[:1], "margin").tolist() == [0.5]
    assert rm.pair_margins(samples, "") is None


def test_group_consecutive_by_hand():
    a, b = _pair(0), _pair(1)
    assert group_consecutive([a, a, a, b, b, a]) == [(0, 3), (3, 5), (5, 6)]
    assert group_consecutive([]) == []


def test_fact_augmented_inputs_name_a_sample_without_facts():
    info = RewardModelInfo(hidden_size=8, facts_column="objects")
    with_facts = PromptSample(
        id="s0", images=["x.png"], prompt=user_prompt("Describe."), meta={"objects": ["red circle"]}
    )
    seen = prepare_samples([with_facts], info)[0]
    assert seen.prompt[0]["content"][1]["text"] == "Facts about the image: red circle\n"
    with pytest.raises(DataError, match="s1"):
        prepare_samples([PromptSample(id="s1", images=["x.png"], prompt=user_prompt("Describe."))], info)


def test_scorer_shares_prompts_and_matches_one_by_one(tiny_model, shape_images):
    """Scoring [s0, s0, s1] in one call (s0's two completions share its prompt) equals scoring each
    alone, and normalisation is (raw - offset) / scale."""
    model, processor = tiny_model("qwen2_vl")
    reward_model = RewardModel(model, new_head(model, seed=1))
    info = RewardModelInfo(hidden_size=reward_model.head.hidden_size, offset=0.5, scale=4.0)
    scorer = RewardModelScorer(reward_model, processor, info, batch_size=2)
    s0 = PromptSample(id="s0", images=[shape_images[0]], prompt=user_prompt("Describe the image."))
    s1 = PromptSample(id="s1", images=[shape_images[1]], prompt=user_prompt("How many squares?"))
    texts = ["A red disc.", "A blue square and a disc.", "1"]
    together = scorer.raw_scores([s0, s0, s1], texts)
    alone = torch.cat([scorer.raw_scores([s], [t]) for s, t in zip([s0, s0, s1], texts)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert scorer([s0, s0, s1], texts) == pytest.approx(((together.double() - 0.5) / 4.0).tolist(), abs=1e-12)
    with torch.no_grad():  # the head reads the completion followed by the end-of-turn token, as in training
        direct = reward_model(encode_prompts(processor, [s0]), encode_completions(processor, [texts[:1]]))
    torch.testing.assert_close(together[:1], direct, rtol=0, atol=1e-6)
    assert scorer.num_scored == 9  # 3 together, 3 alone, 3 normalised


# ----------------------------------------------------------------------------- the recipe


def test_rm_learns_a_fixed_set_of_pairs(tiny_model_dir, pair_files, tmp_path):
    """Twelve steps on the same eight pairs (two micro-batches of four): the Bradley-Terry loss falls
    well below log 2 and the pairs are then ranked correctly."""
    train, _ = pair_files
    out = tmp_path / "run"
    cfg = load_config(
        rm.Config,
        None,
        _args(
            tiny_model_dir("qwen2_vl"),
            train,
            train,
            out,
            "--data.limit=8",
            "--data.eval_limit=8",
            "--train.max_steps=12",
            "--train.batch_size=4",
            "--train.grad_accum=2",
            "--train.lr=3e-3",
            "--train.save_every=0",
        ),
    )
    final = rm.run(cfg)
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses) == 12 and abs(losses[0] - 0.693) < 0.05
    assert losses[-1] < 0.35
    assert final["eval/accuracy"] >= 0.875 and final["eval/pairs"] == 8


def test_saved_fact_augmented_model_scores_as_measured(tiny_model_dir, pair_files, tmp_path):
    """A fact-augmented run: the saved model records its facts column, the scorer re-reads the facts
    from each sample, reproduces the held-out accuracy the run logged, and its normalised held-out
    rewards have mean 0 and std 1; naming its folder as a scorer loads the same scorer."""
    train, heldout = pair_files
    out = tmp_path / "facts"
    cfg = load_config(
        rm.Config,
        None,
        _args(
            tiny_model_dir("qwen2_vl"),
            train,
            heldout,
            out,
            "--train.max_steps=3",
            "--train.batch_size=8",
            "--facts_column=objects",
        ),
    )
    final = rm.run(cfg)
    saved = json.loads((out / "model" / "reward_model.json").read_text())
    assert saved["facts_column"] == "objects" and saved["heldout_accuracy"] == final["eval/accuracy"]
    scorer = load_reward_scorer(out / "model", device="cpu", dtype="float32")
    pairs = load_samples(heldout, "preference")
    prompts = [PromptSample(id=p.id, images=p.images, prompt=p.prompt, meta=p.meta) for p in pairs]
    chosen = torch.tensor(scorer(prompts, [p.chosen for p in pairs]))
    rejected = torch.tensor(scorer(prompts, [p.rejected for p in pairs]))
    assert float(rm.pairwise_accuracy(chosen, rejected)) == final["eval/accuracy"]
    both = torch.cat([chosen, rejected])
    assert abs(float(both.mean())) < 1e-5 and abs(float(both.std(correction=0)) - 1.0) < 1e-5
    with torch.no_grad():  # the facts are in what the model saw
        first = fact_augmented_sample(prompts[0], "objects")
        direct = scorer.model(
            encode_prompts(scorer.processor, [first]), encode_completions(scorer.processor, [[pairs[0].chosen]])
        )
    assert float(scorer.info.normalise(direct.double())) == pytest.approx(float(chosen[0]), abs=1e-5)
    by_name = build_scorer(str(out / "model"))  # what --scorer / --rank.scorer=<folder> load
    assert isinstance(by_name, RewardModelScorer)
    assert by_name(prompts[:4], [p.chosen for p in pairs[:4]]) == pytest.approx(chosen[:4].tolist(), abs=1e-5)

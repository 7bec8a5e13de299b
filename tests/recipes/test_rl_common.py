"""The shared RL phases: batch bookkeeping, advantages by name (hand-worked, and whitened over two
emulated processes), the composed per-token loss, guarded scoring, and the update's global
normalisation (one micro-batch = two micro-batches, exactly)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from vlalign.data.collate import EncodedPrompts, encode_prompts, image_token_ids, pad_token_id_of
from vlalign.data.schema import PromptSample
from vlalign.losses import dapo_group_filter, grpo_advantages, rloo_advantages
from vlalign.models.tiny import ARCHITECTURES
from vlalign.recipes.rl_common import (
    PolicyUpdateConfig,
    advantages,
    global_masked_moments,
    policy_logprobs,
    score,
)
from vlalign.recipes.rl_update import UpdateContext, micro_batch_groups, policy_loss_terms, update
from vlalign.recipes.rollouts import Rollouts, rollout_seed
from vlalign.rewards import RewardError, build_reward
from vlalign.training import Run, TrainConfig

F64 = torch.float64


def _prompts(n: int) -> EncodedPrompts:
    """Text-only encoded prompts (ids 10 + i), enough for bookkeeping tests."""
    return EncodedPrompts(
        sample_ids=[f"s{i}" for i in range(n)],
        input_ids=[[10 + i, 11 + i] for i in range(n)],
        token_fields={},
        vision={},
        vision_rows={},
        num_images=[0] * n,
        image_token_count=[0] * n,
    )


def _rollouts(lengths: list[list[int]]) -> Rollouts:
    """Rollouts whose completion (i, k) is ``[100*i + 10*k + t for t in range(length)]``."""
    n, g = len(lengths), len(lengths[0])
    ids = [
        [[100 * i + 10 * k + t for t in range(length)] for k, length in enumerate(group)]
        for i, group in enumerate(lengths)
    ]
    return Rollouts(
        samples=[PromptSample(id=f"s{i}", images=[], prompt=[], meta={"answer": str(i)}) for i in range(n)],
        prompts=_prompts(n),
        token_ids=ids,
        texts=[[str(c) for c in group] for group in ids],
        stopped=[[True] * g for _ in range(n)],
        group_size=g,
    )


# ----------------------------------------------------------------------------- bookkeeping


def test_select_groups_cuts_rows_and_width_and_concat_pads_back():
    """Three prompts of G = 2 with lengths [[1, 2], [4, 1], [3, 3]]: selecting prompts [2, 0] keeps rows
    [4, 5, 0, 1] and cuts per-token tensors to width 3 (the longest kept completion); concat of the
    selection with prompt 1 pads back to width 4 with zeros."""
    ro = _rollouts([[1, 2], [4, 1], [3, 3]])
    assert ro.width == 4 and ro.num_rows == 6 and ro.num_tokens == 14
    assert ro.mask.tolist()[2] == [True, True, True, True] and ro.mask.tolist()[0] == [True, False, False, False]
    ro.rewards = torch.arange(6, dtype=torch.float32)
    ro.old_logps = torch.arange(24, dtype=torch.float32).view(6, 4)
    ro.extras["values"] = torch.arange(24, dtype=torch.float32).view(6, 4) + 100
    sel = ro.select_groups([2, 0])
    assert sel.rewards.tolist() == [4.0, 5.0, 0.0, 1.0]
    assert sel.old_logps.tolist() == [[16, 17, 18], [20, 21, 22], [0, 1, 2], [4, 5, 6]]
    assert sel.extras["values"].shape == (4, 3)
    assert [s.id for s in sel.samples] == ["s2", "s0"] and sel.prompts.sample_ids == ["s2", "s0"]
    assert sel.token_ids[1][1] == [10, 11]
    back = Rollouts.concat([sel, ro.select_groups([1])])
    assert back.width == 4 and back.old_logps.shape == (6, 4)
    assert back.old_logps[0].tolist() == [16, 17, 18, 0] and back.old_logps[4].tolist() == [8, 9, 10, 11]
    assert back.rewards.tolist() == [4.0, 5.0, 0.0, 1.0, 2.0, 3.0]
    assert back.prompts.input_ids == [[12, 13], [10, 11], [11, 12]]
    assert Rollouts.concat([ro.select_groups([]), sel]).rewards.tolist() == sel.rewards.tolist()


def test_micro_batches_and_seeds_are_pure_functions():
    assert micro_batch_groups(5, 2, seed=0, step=3, epoch=0, shuffle=False) == [[0, 1, 2], [3, 4]]
    assert micro_batch_groups(1, 3, seed=0, step=3, epoch=0, shuffle=False) == [[0], [], []]
    a = micro_batch_groups(8, 2, seed=1, step=3, epoch=1, shuffle=True)
    assert a == micro_batch_groups(8, 2, seed=1, step=3, epoch=1, shuffle=True)
    assert a != micro_batch_groups(8, 2, seed=1, step=3, epoch=2, shuffle=True)
    assert sorted(a[0] + a[1]) == list(range(8))
    assert rollout_seed(0, 5) == rollout_seed(0, 5) != rollout_seed(0, 6) != rollout_seed(0, 5, 1)


def test_group_filter_keeps_groups_with_a_reward_spread():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5000001])
    assert dapo_group_filter(rewards, group_size=2).tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------- advantages


def test_outcome_estimators_by_name_match_the_loss_functions():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=F64)
    mask = torch.ones(8, 3, dtype=torch.bool)
    assert torch.equal(
        advantages("grpo", r, group_size=4, mask=mask, eps=1e-4), grpo_advantages(r, group_size=4, eps=1e-4)
    )
    assert torch.equal(advantages("rloo", r, group_size=4, mask=mask), rloo_advantages(r, group_size=4))
    # Dr.GRPO by hand: group means 0.25 and 0.75.
    assert advantages("dr_grpo", r, group_size=4, mask=mask).tolist() == [
        0.75,
        -0.25,
        -0.25,
        -0.25,
        0.25,
        0.25,
        -0.75,
        0.25,
    ]
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        advantages("ppo", r, group_size=4, mask=mask)


def _whitened(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def test_reinforce_pp_by_hand():
    """One prompt, G = 2; completion 0 has two tokens, completion 1 one token. Outcomes r = [1, 0],
    per-token KL k = [[0.5, 0.25], [0.1, pad]], beta = 0.2, gamma = 1.

    Token rewards -beta*k plus the outcome on the last token: [[-0.1, -0.05 + 1], [-0.02 + 0]];
    returns (sums to the end): [[0.85, 0.95], [-0.02]]; whitened with the mean and population
    variance of the three valid returns. The baseline variant subtracts the group mean outcome 0.5
    first: token rewards [[-0.1, 0.45], [-0.52]], returns [[0.35, 0.45], [-0.52]]."""
    mask = torch.tensor([[True, True], [True, False]])
    kl = torch.tensor([[0.5, 0.25], [0.1, 99.0]], dtype=F64)
    r = torch.tensor([1.0, 0.0], dtype=F64)
    plain = advantages("reinforce_pp", r, group_size=2, mask=mask, kl=kl, kl_coef=0.2)
    want = _whitened([0.85, 0.95, -0.02])
    assert plain[mask].tolist() == pytest.approx(want, abs=1e-12)
    assert plain[1, 1] == 0.0
    base = advantages("reinforce_pp_baseline", r, group_size=2, mask=mask, kl=kl, kl_coef=0.2)
    assert base[mask].tolist() == pytest.approx(_whitened([0.35, 0.45, -0.52]), abs=1e-12)
    # No KL given: the coefficient is ignored (the KL went in the loss instead).
    no_kl = advantages("reinforce_pp", r, group_size=2, mask=mask, kl=None, kl_coef=0.2)
    assert no_kl[mask].tolist() == pytest.approx(_whitened([1.0, 1.0, 0.0]), abs=1e-12)


class _TwoProcessSum:
    """Emulates an all-reduce sum across two threads (each plays one process)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2)
        self.slots: dict[int, torch.Tensor] = {}

    def __call__(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = self.slots[0] + self.slots[1]
        self.barrier.wait()
        return total


def test_reinforce_pp_whitening_is_global_across_processes():
    """Two processes holding half of the groups each, whitening with all-reduced moments, give
    exactly the advantages of one process holding the whole batch (float64)."""
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(8, generator=gen, dtype=F64)
    kl = torch.rand(8, 5, generator=gen, dtype=F64)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 5, 1])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    whole = advantages("reinforce_pp_baseline", r, group_size=2, mask=mask, kl=kl, kl_coef=0.1)
    reducer = _TwoProcessSum()
    out: dict[int, torch.Tensor] = {}

    def worker(rank: int) -> None:
        rows = slice(4 * rank, 4 * rank + 4)
        out[rank] = advantages(
            "reinforce_pp_baseline",
            r[rows],
            group_size=2,
            mask=mask[rows],
            kl=kl[rows],
            kl_coef=0.1,
            reduce_sum=lambda t: reducer(rank, t),
        )

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat([out[0], out[1]]), whole, rtol=0, atol=1e-12)
    mean, var = global_masked_moments(kl, mask)
    flat = kl[mask]
    assert float(mean) == pytest.approx(float(flat.mean()), abs=1e-14)
    assert float(var) == pytest.approx(float(flat.var(unbiased=False)), abs=1e-14)


# ----------------------------------------------------------------------------- the per-token loss


def test_policy_loss_terms_by_hand():
    """One completion of two tokens, advantage A = 2 (per sequence), clip 0.2 / 0.28.
    log pi = [-1.0, -1.5], log pi_old = [-1.1, -2.0]: ratios e^0.1 = 1.10517 (inside the range:
    -A*rho) and e^0.5 = 1.64872 (above 1.28: the clipped branch -A*1.28 is the larger). KL in the
    loss with beta = 0.1 and k3 against log ref = [-1.5, -0.5]: d = ref - pi = [-0.5, 1.0],
    k3 = e^d - d - 1 = [0.1065307, 0.7182818]. Entropy bonus 0.01 with H = [1.0, 0.5]."""
    cfg = PolicyUpdateConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    logps = torch.tensor([[-1.0, -1.5]], dtype=F64)
    old = torch.tensor([[-1.1, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -0.5]], dtype=F64)
    ent = torch.tensor([[1.0, 0.5]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    per_token, metrics = policy_loss_terms(
        logps, old, torch.tensor([2.0], dtype=F64), mask, cfg=cfg, ref_logps=ref, entropy=ent
    )
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2.0]
    want = [-2 * math.exp(0.1) + 0.1 * k3[0] - 0.01 * 1.0, -2 * 1.28 + 0.1 * k3[1] - 0.01 * 0.5]
    assert per_token[0].tolist() == pytest.approx(want, abs=1e-12)
    assert float(metrics["kl/ref"]) == pytest.approx(sum(k3) / 2, abs=1e-12)
    assert float(metrics["policy/clip_frac"]) == 0.5
    assert float(metrics["policy/entropy"]) == 0.75
    # KL placed in the reward: the loss holds the surrogate alone, the KL is still measured.
    reward_cfg = PolicyUpdateConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_in="reward")
    per_token, metrics = policy_loss_terms(
        logps, old, torch.tensor([2.0], dtype=F64), mask, cfg=reward_cfg, ref_logps=ref
    )
    assert per_token[0].tolist() == pytest.approx([-2 * math.exp(0.1), -2 * 1.28], abs=1e-12)
    assert "kl/ref" in metrics


def test_update_config_errors_name_the_fields():
    with pytest.raises(ValueError, match="update.kl_coef > 0 needs a reference"):
        PolicyUpdateConfig(kl_coef=0.1, reference="none")
    with pytest.raises(ValueError, match="update.dual_clip"):
        PolicyUpdateConfig(dual_clip=0.5)
    assert PolicyUpdateConfig().on_policy and not PolicyUpdateConfig(epochs=2).on_policy


# ----------------------------------------------------------------------------- scoring


def _bad_rewards(tmp_path: Path) -> Path:
    path = tmp_path / "bad_rewards.py"
    path.write_text(
        "import math, time\n"
        "def nan_on_s1(completion, sample):\n"
        "    return math.nan if sample.id == 's1' else 1.0\n"
        "def slow(completion, sample):\n"
        "    time.sleep(5)\n"
        "    return 1.0\n"
    )
    return path


@pytest.mark.parametrize("fn, sample, what", [("nan_on_s1", "s1", "returned nan"), ("slow", "s0", "timed out")])
def test_score_stops_the_step_naming_function_sample_and_step(tmp_path, fn, sample, what):
    ro = _rollouts([[1, 1], [2, 1]])
    reward = build_reward({f"{_bad_rewards(tmp_path)}:{fn}": 1.0}, timeout_s=0.2)
    with pytest.raises(RewardError, match=rf"step 7: reward function '.*{fn}' .*sample '{sample}'") as info:
        score(ro, reward, step=7)
    assert what in str(info.value) and info.value.sample_id == sample


# ----------------------------------------------------------------------------- the update


def _image_rollouts(processor, images, lengths: list[list[int]]) -> Rollouts:
    """Real encoded prompts (one image each) with fixed completions of ordinary tokens."""
    samples = [
        PromptSample(
            id=f"p{i}",
            images=[images[i % len(images)]],
            prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q {i}"}]}],
        )
        for i in range(len(lengths))
    ]
    banned = set(image_token_ids(processor))
    gen = torch.Generator().manual_seed(1)
    ids = []
    for group in lengths:
        ids.append([])
        for length in group:
            row = [int(t) for t in torch.randint(3, 200, (length,), generator=gen) if int(t) not in banned]
            ids[-1].append(row or [5])
    return Rollouts(
        samples=samples,
        prompts=encode_prompts(processor, samples),
        token_ids=ids,
        texts=[["x"] * len(g) for g in ids],
        stopped=[[True] * len(g) for g in ids],
        group_size=len(lengths[0]),
    )


def _one_update(tmp_path, model, ro, cfg: PolicyUpdateConfig, micro: int, pad: int) -> dict[str, torch.Tensor]:
    """Parameter change of one `update` call with SGD(lr = 1), no clipping: minus the gradient."""
    run = Run(TrainConfig(output_dir=str(tmp_path / f"run-{micro}"), trackers=[], progress=False, max_grad_norm=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ctx = UpdateContext(temperature=0.7, pad_token_id=pad, micro_batches=micro, norm_length=16, seed=0, step=0)
    metrics = update(run, model, optimizer, scheduler, ro, cfg, ctx)
    assert math.isfinite(metrics["train/loss"])
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_gradient_of_one_batch(tiny_model, shape_images, tmp_path, aggregation):
    """Four prompts x G = 2 with ragged completions: one micro-batch and two micro-batches (each with
    the step's global token / sequence count) give the same SGD step, to float32 rounding. A
    per-micro-batch normaliser would not (the halves hold 12 and 7 tokens)."""
    cfg = PolicyUpdateConfig(aggregation=aggregation, kl_coef=0.05, reference="copy")
    deltas = []
    for micro in (1, 2):
        model, processor = tiny_model("qwen2_vl")
        ro = _image_rollouts(processor, shape_images, [[3, 1], [2, 6], [1, 1], [4, 1]])
        ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])
        ro.ref_logps = torch.full((8, ro.width), -3.0)
        deltas.append(_one_update(tmp_path, model, ro, cfg, micro, pad_token_id_of(processor)))
    biggest = max(float(d.abs().max()) for d in deltas[0].values())
    assert biggest > 1e-4  # the step did something
    for name in deltas[0]:
        torch.testing.assert_close(deltas[1][name], deltas[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_positive_advantage_raises_its_log_prob(tiny_model, shape_images, tmp_path, arch):
    """On-policy step with advantages +1 for completion 0 and -1 for completion 1 of each prompt: after
    one small AdamW step the log-prob of every positively-advantaged completion rises, and of every
    negatively-advantaged one falls (every tiny architecture)."""
    model, processor = tiny_model(arch)
    pad = pad_token_id_of(processor)
    ro = _image_rollouts(processor, shape_images, [[3, 3], [2, 4]])
    ro.advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        before = policy_logprobs(model, ro, temperature=1.0, pad_token_id=pad).sums
    run = Run(TrainConfig(output_dir=str(tmp_path / "run"), trackers=[], progress=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ctx = UpdateContext(temperature=1.0, pad_token_id=pad, micro_batches=1, norm_length=8, seed=0, step=0)
    update(run, model, optimizer, scheduler, ro, PolicyUpdateConfig(reference="none"), ctx)
    with torch.no_grad():
        after = policy_logprobs(model, ro, temperature=1.0, pad_token_id=pad).sums
    change = (after - before).tolist()
    assert change[0] > 0 and change[2] > 0, change
    assert change[1] < 0 and change[3] < 0, change


class _CountingProcessor:
    """A processor that counts its calls (everything else is delegated)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_each_prompt_is_processed_once_per_step(tiny_model, shape_images):
    """Rollout, old log-probs and the update's forward of a step share the rollout's one processor
    call: the images of the B prompts are processed once, not once per completion or per phase."""
    from vlalign.models.generate import GenerationSettings
    from vlalign.recipes.rl_common import old_logprobs
    from vlalign.recipes.rollouts import rollout

    model, processor = tiny_model("qwen2_vl")
    counting = _CountingProcessor(processor)
    samples = [
        PromptSample(
            id=f"p{i}",
            images=[shape_images[i]],
            prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]}],
        )
        for i in range(3)
    ]
    settings = GenerationSettings(n=4, temperature=1.0, max_new_tokens=4, batch_size=8)
    ro = rollout(model, counting, samples, settings=settings, seed=3)
    assert counting.calls == 1 and ro.num_rows == 12 and len(ro.prompts) == 3
    pad = pad_token_id_of(processor)
    old = old_logprobs(model, ro, temperature=1.0, pad_token_id=pad, micro_batch=2)
    out = policy_logprobs(model, ro, temperature=1.0, pad_token_id=pad)
    assert counting.calls == 1
    assert out.mode == "shared" and out.token_ids[out.mask].tolist() == [t for g in ro.token_ids for c in g for t in c]
    torch.testing.assert_close(out.logps.detach(), old, rtol=0, atol=1e-5)

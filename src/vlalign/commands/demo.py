"""``vlalign demo``: the whole alignment pipeline on the shapes world, in one command.

Stages, in order (each a folder of the demo folder: ``runs/demo`` unless told otherwise, and
``runs/demo-quick`` for ``--quick``)::

    world      the shapes world (images, SFT conversations, prompts, POPE files)
    sft        supervised fine-tuning of the small demo model: the base model
    eval-base  the evaluation suite on the base model
    pairs      preference pairs: hallucination injection + sample-and-rank of the base model's
               descriptions (its own hallucinations as the rejected responses)
    dpo        DPO with mDPO's image-conditioned term, from the base model
    eval-dpo   the suite on the DPO model (KL from the base model)
    grpo       GRPO with verifiable rewards on descriptions (object F1 against the scene),
               colour questions (colour match) and existence questions (yes/no match), from the
               DPO model
    eval-grpo  the suite on the GRPO model (KL from the base model)
    video-sft, eval-video-sft, video-grpo, eval-video-grpo
               the world's video task ("Which shape moved?" over 4-frame clips): the demo model's
               Gemma3 processor takes no video, so ``video_model`` (default the small Qwen2-VL)
               learns it from its own start: SFT on the clips' answers, GRPO with the moved reward
               from it, each evaluated on the held-out clips (``--video_model=''`` skips them)
    report     report.html (curves, before/after bars, a gallery of descriptions)

A stage whose folder holds a ``stage.json`` with the same fingerprint (a hash of its settings
and of the fingerprints of the stages it reads) is reused; a stage interrupted mid-way resumes
from its last checkpoint; a stage whose settings changed is run again (and so is everything
after it). The demo ends by printing one table, the stages side by side with the last stage's
difference from the base and its 95% paired-bootstrap interval over the test scenes, and the video
task's accuracy in a table of its own, written also as ``demo_summary.json``.

``--quick`` runs the same stages on a small world for a few steps each: a smoke test of the
pipeline (a few minutes on a CPU), whose numbers say nothing about alignment. It says so above its
table, in ``demo_summary.json`` (``"quick": true``) and in the report's header, and it writes to
its own folder so that it never mixes with the full demo's.

Every stage's settings are ``--key=value`` overrides of the recipe it runs, so the demo can be
steered without code: ``vlalign demo --sft='{train.max_steps: 500}'`` (see ``--help``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlalign.commands import eval as eval_cli
from vlalign.commands import pairs as pairs_cli
from vlalign.commands.demo_summary import SMOKE_TEST as SMOKE_TEST  # re-exported: tests and demo_check read them
from vlalign.commands.demo_summary import TABLE_METRICS as TABLE_METRICS
from vlalign.commands.demo_summary import format_summary, stage_intervals, summarise, video_summary
from vlalign.commands.pipeline import STAGE_FILE as STAGE_FILE  # re-exported: the demo's tests read it
from vlalign.commands.pipeline import Action, Stage, run_stage, stage_fingerprint
from vlalign.config import StrictFields, load_config, to_dict
from vlalign.models.tiny import BUILDER_VERSION
from vlalign.recipes import dpo, grpo, sft
from vlalign.report.html import write_report
from vlalign.shapes.embedded import SHAPES_PREFIX, world_folder
from vlalign.shapes.tasks import write_world
from vlalign.shapes.world import DEMO_WORLD, WorldConfig
from vlalign.training.launch import threads_for

SUMMARY_FILE = "demo_summary.json"
FULL_DIR = "runs/demo"
"""The full demo's folder when ``--output_dir`` is not given."""
QUICK_DIR = "runs/demo-quick"
"""The quick demo's folder when ``--output_dir`` is not given (never the full demo's)."""
VIDEO_CLIPS = 1000
"""Clips of the video task ("Which shape moved?") per split of the demo's world (fewer in splits with
fewer scenes): DEMO_WORLD writes none, the demo adds them through its own world settings."""


def _world_defaults() -> dict[str, Any]:
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in DEMO_WORLD.items()}, "video_clips": VIDEO_CLIPS}


def _sft_defaults() -> dict[str, Any]:
    return {
        "train.max_steps": 900,
        "train.batch_size": 16,
        "train.lr": 5e-4,
        "train.warmup_ratio": 0.03,
        "train.save_every": 200,
        "train.log_every": 20,
        "data.eval_limit": 128,
    }


def _inject_defaults() -> dict[str, Any]:
    return {"inject.probes_per_image": 1, "limit": 1000}


def _rank_defaults() -> dict[str, Any]:
    # on-policy pairs on descriptions: the base model's own hallucinations, as rejected responses
    return {
        "tasks": ["describe"],
        "rank.n": 8,
        "rank.scorer": "ground_truth",
        "rank.max_new_tokens": 40,
        "rank.pairing": "all",
        "rank.max_pairs_per_prompt": 3,
        "limit": 3000,
    }


def _dpo_defaults() -> dict[str, Any]:
    # mDPO's image-conditioned term at half weight: at 1.0 it cost colour and counting (see the README)
    return {
        "loss.weights": {"mdpo": 1.0, "nll": 1.0},
        "loss.options": {"mdpo": {"conditional_weight": 0.5}},
        "loss.beta": 0.1,
        "train.max_steps": 250,
        "train.batch_size": 16,
        "train.lr": 5e-5,
        "train.save_every": 100,
        "train.log_every": 10,
        "data.eval": "",
    }


def _grpo_defaults() -> dict[str, Any]:
    return {
        "grpo.tasks": ["describe", "colour", "existence"],
        "rewards.weights": {"shapes_answer": 1.0},
        "rollout.n": 8,
        "rollout.max_new_tokens": 40,
        "update.kl_coef": 0.3,
        "train.batch_size": 16,
        "train.max_steps": 120,
        "train.lr": 3e-5,
        "train.schedule": "constant",
        "train.warmup_ratio": 0.0,
        "train.save_every": 20,
        "train.log_every": 5,
        "eval_tasks": [],
    }


def _suite_defaults() -> dict[str, Any]:
    # every test scene: 500 descriptions, 500 questions per task (+-1.6 points of standard error
    # on an accuracy near 0.85; the suite's default 100 gives +-4) and 1,500 POPE questions per mode
    return {"describe": 500, "questions_per_task": 500, "pope_questions": 1500}


def _video_sft_defaults() -> dict[str, Any]:
    return {
        "train.max_steps": 150,
        "train.batch_size": 16,
        "train.lr": 5e-4,
        "train.warmup_ratio": 0.03,
        "train.save_every": 50,
        "train.log_every": 10,
        "data.eval_limit": 64,
    }


def _video_grpo_defaults() -> dict[str, Any]:
    return {
        "grpo.tasks": ["moved"],
        "rewards.weights": {"shapes_answer": 1.0},
        "rollout.n": 8,
        "rollout.max_new_tokens": 8,
        "update.kl_coef": 0.1,
        "train.batch_size": 16,
        "train.max_steps": 20,
        "train.lr": 3e-5,
        "train.schedule": "constant",
        "train.warmup_ratio": 0.0,
        "train.save_every": 10,
        "train.log_every": 5,
        "eval_tasks": [],
    }


def _video_suite_defaults() -> dict[str, Any]:
    return {"parts": ["heldout"], "questions_per_task": 500, "kl_prompts": 48, "max_new_tokens": 8}


QUICK: dict[str, dict[str, Any]] = {
    "world": {"n_train": 300, "n_validation": 40, "n_test": 60, "n_compositional": 40, "video_clips": 40},
    "sft": {"train.max_steps": 60, "train.save_every": 30, "data.eval_limit": 32},
    "inject": {"limit": 200},
    "rank": {"limit": 16, "rank.n": 2},
    "dpo": {"train.max_steps": 10, "train.batch_size": 8, "train.save_every": 5},
    "grpo": {"train.max_steps": 3, "train.batch_size": 4, "rollout.n": 4, "train.save_every": 2},
    "suite": {
        "pope_questions": 30,
        "describe": 12,
        "questions_per_task": 12,
        "compositional_describe": 6,
        "compositional_questions_per_task": 6,
        "kl_prompts": 8,
    },
    "video_sft": {"train.max_steps": 10, "train.save_every": 5, "data.eval_limit": 16},
    "video_grpo": {"train.max_steps": 2, "train.batch_size": 4, "rollout.n": 4, "train.save_every": 1},
    "video_suite": {"questions_per_task": 20, "kl_prompts": 8},
}
"""What ``--quick`` changes (merged over the defaults; explicit settings still win)."""


@dataclass
class Config(StrictFields):
    """The shapes-world alignment pipeline: world, SFT, evaluation, pairs, DPO, GRPO, report."""

    output_dir: str = ""
    """The demo folder: one sub-folder per stage, demo_summary.json and report.html ('' = runs/demo,
    or runs/demo-quick with --quick)."""
    model: str = "tiny:gemma3:small"
    """The starting model: tiny:<arch>:<size> (built offline), a folder or a hub name."""
    quick: bool = False
    """A smaller world and far fewer steps (a first look, and the tests): a few minutes on a CPU."""
    device: str = "auto"
    """Where every stage runs: auto (CUDA when available), cpu, cuda ..."""
    seed: int = 0
    """Seed of every stage."""
    threads: int = 2
    """CPU threads of every stage's operations (``torch.set_num_threads``). The numbers depend on it
    (a sum split over more threads rounds differently), so it is fixed rather than taken from the
    machine's core count: the README's table was measured with 2. 0 keeps torch's default."""
    rerun: list[str] = field(default_factory=list)
    """Stages to run again even if their outputs are current (their successors follow)."""
    world: dict[str, Any] = field(default_factory=_world_defaults)
    """WorldConfig settings of the shapes world (default: data.world.DEMO_WORLD, four shapes, up to three objects)."""
    sft: dict[str, Any] = field(default_factory=_sft_defaults)
    """vlalign sft settings ({train.max_steps: 900, train.lr: 0.0005 ...})."""
    inject: dict[str, Any] = field(default_factory=_inject_defaults)
    """vlalign pairs --method=inject settings (hallucination injection from the training descriptions)."""
    rank: dict[str, Any] = field(default_factory=_rank_defaults)
    """vlalign pairs --method=rank settings (sample-and-rank of the base model's descriptions)."""
    dpo: dict[str, Any] = field(default_factory=_dpo_defaults)
    """vlalign dpo settings (default: mDPO from the base model on both pair sets)."""
    grpo: dict[str, Any] = field(default_factory=_grpo_defaults)
    """vlalign grpo settings (default: the shapes_answer reward (object F1 / colour / yes-no match) on
    describe, colour and existence prompts, from the DPO model; see the README for what counting
    rewards did)."""
    suite: dict[str, Any] = field(default_factory=_suite_defaults)
    """Evaluation-suite settings shared by the three evaluations (see vlalign eval --help)."""
    video_model: str = "tiny:qwen2_vl:small"
    """The video task's model ("Which shape moved?" over the world's clips): the demo model's Gemma3
    processor takes no video, so a family whose processor does, trained on the clips from its own
    start; '' skips the video stages."""
    video_sft: dict[str, Any] = field(default_factory=_video_sft_defaults)
    """vlalign sft settings of the video model on the clips' answers ({train.max_steps: 150 ...})."""
    video_grpo: dict[str, Any] = field(default_factory=_video_grpo_defaults)
    """vlalign grpo settings of the video model from its SFT (the moved reward: the moving object named)."""
    video_suite: dict[str, Any] = field(default_factory=_video_suite_defaults)
    """Evaluation settings of the video task on the held-out clips (see vlalign eval --help)."""
    report: bool = True
    """Write report.html at the end."""


# ------------------------------------------------------------------------------------ stages


def _args(settings: dict[str, Any]) -> list[str]:
    """``{"train.lr": 0.001}`` -> ``["--train.lr=0.001"]`` (values as JSON, read back as YAML)."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()]


def _merged(cfg: Config, part: str) -> dict[str, Any]:
    base = {
        "world": _world_defaults,
        "sft": _sft_defaults,
        "inject": _inject_defaults,
        "rank": _rank_defaults,
        "dpo": _dpo_defaults,
        "grpo": _grpo_defaults,
        "suite": _suite_defaults,
        "video_sft": _video_sft_defaults,
        "video_grpo": _video_grpo_defaults,
        "video_suite": _video_suite_defaults,
    }[part]()
    user = getattr(cfg, part)
    changed = {k: v for k, v in user.items() if base.get(k, object()) != v}
    return {**base, **user, **(QUICK.get(part, {}) if cfg.quick else {}), **changed}


def _builder_version(model: str) -> int | None:
    """The tiny-model builder's version for a ``tiny:`` model (a new version means new weights)."""
    if not model.startswith("tiny:"):
        return None
    return BUILDER_VERSION


def _recipe(module: Any, settings: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    recipe_cfg = load_config(module.Config, None, _args({**settings, **fixed}))
    return module.run(recipe_cfg) or {}


def _world_action(cfg: Config) -> Action:
    """Write the shapes world of ``cfg`` into the stage's folder."""

    def action(folder: Path, resume: bool) -> dict[str, Any]:
        write_world(
            load_config(WorldConfig, None, _args({"seed": cfg.seed, **_merged(cfg, "world")})), folder, overwrite=True
        )
        return {}

    return action


def _train_action(cfg: Config, module: Any, part: str, start: Path | str, data: dict[str, Any]) -> Action:
    """Run the recipe ``module`` from the model ``start`` with the demo's ``part`` settings."""
    common = _common(cfg)

    def action(folder: Path, resume: bool) -> dict[str, Any]:
        return _recipe(
            module,
            {**common, **data, **_merged(cfg, part)},
            **{"model.name_or_path": str(start), "train.output_dir": str(folder), "train.resume": resume},
        )

    return action


def _pairs_action(cfg: Config, world: Path, base: Path) -> Action:
    """Injection pairs from the training descriptions, then sample-and-rank pairs of the base model,
    and both concatenated into ``train.jsonl``."""

    def action(folder: Path, resume: bool) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        _recipe(
            pairs_cli,
            _merged(cfg, "inject"),
            method="inject",
            data=str(world / "train.jsonl"),
            out=str(folder / "inject.jsonl"),
            overwrite=True,  # a stage resumed after a kill writes its files again
        )
        _recipe(
            pairs_cli,
            {"rank.device": cfg.device, "rank.seed": cfg.seed, **_merged(cfg, "rank")},
            method="rank",
            data=str(world / "train_prompts.jsonl"),
            out=str(folder / "rank.jsonl"),
            overwrite=True,
            **{"rank.model": str(base)},
        )
        with (folder / "train.jsonl").open("w") as out:
            for name in ("inject.jsonl", "rank.jsonl"):
                out.write((folder / name).read_text())
        return {}

    return action


def _eval_action(cfg: Config, suite: dict[str, Any], base: Path, model: Path) -> Action:
    """``vlalign eval`` of ``model`` on ``suite``, with the KL from ``base`` (unless it is the base)."""

    def action(folder: Path, resume: bool) -> dict[str, Any]:
        reference = {"reference": str(base)} if model != base else {}
        return _recipe(
            eval_cli,
            {"device": cfg.device, **{f"suite.{k}": v for k, v in suite.items()}},
            model=str(model),
            output_dir=str(folder),
            overwrite=True,  # a stage run again replaces its own evaluation
            **reference,
        )

    return action


def _common(cfg: Config) -> dict[str, Any]:
    """The settings every training stage shares."""
    return {"model.device": cfg.device, "train.seed": cfg.seed, "train.progress": True}


def demo_dir(cfg: Config) -> Path:
    """The demo folder: ``output_dir``, else :data:`QUICK_DIR` for ``--quick`` and :data:`FULL_DIR` otherwise."""
    return Path(cfg.output_dir or (QUICK_DIR if cfg.quick else FULL_DIR))


def build_stages(cfg: Config) -> list[Stage]:
    """The pipeline of ``cfg`` (each stage's settings fully resolved, for its fingerprint)."""
    root = demo_dir(cfg)
    world, base, dpo_model, grpo_model = (
        root / "world",
        root / "sft" / "model",
        root / "dpo" / "model",
        root / "grpo" / "model",
    )
    suite = {"data": str(world), **_merged(cfg, "suite")}
    common = _common(cfg)
    sft_data = {"data.train": str(world / "train_sft.jsonl"), "data.eval": str(world / "validation.jsonl")}
    return [
        Stage("world", {"seed": cfg.seed, **_merged(cfg, "world")}, [], _world_action(cfg)),
        Stage(
            "sft",
            {"model": cfg.model, "tiny_builder": _builder_version(cfg.model), **common, **_merged(cfg, "sft")},
            ["world"],
            _train_action(cfg, sft, "sft", cfg.model, sft_data),
        ),
        Stage("eval-base", suite, ["sft"], _eval_action(cfg, suite, base, base), label="base"),
        Stage(
            "pairs",
            {"inject": _merged(cfg, "inject"), "rank": _merged(cfg, "rank")},
            ["sft"],
            _pairs_action(cfg, world, base),
        ),
        Stage(
            "dpo",
            {**common, **_merged(cfg, "dpo")},
            ["sft", "pairs"],
            _train_action(cfg, dpo, "dpo", base, {"data.train": str(root / "pairs" / "train.jsonl")}),
        ),
        Stage("eval-dpo", suite, ["dpo"], _eval_action(cfg, suite, base, dpo_model), label="dpo"),
        Stage(
            "grpo",
            {**common, **_merged(cfg, "grpo")},
            ["dpo"],
            _train_action(cfg, grpo, "grpo", dpo_model, {"data.train": str(world / "train_prompts.jsonl")}),
        ),
        Stage("eval-grpo", suite, ["grpo"], _eval_action(cfg, suite, base, grpo_model), label="grpo"),
        *(video_stages(cfg, root) if cfg.video_model else []),
    ]


VIDEO_STAGES = ("video-sft", "eval-video-sft", "video-grpo", "eval-video-grpo")
"""The video task's stages (after the others; they read only the world)."""


def video_stages(cfg: Config, root: Path) -> list[Stage]:
    """SFT of ``cfg.video_model`` on the world's clips, GRPO from it with the moved reward, and the
    held-out clips' evaluation of both (the GRPO model's KL from the video SFT model)."""
    world, common = root / "world", _common(cfg)
    sft_model, grpo_model = root / "video-sft" / "model", root / "video-grpo" / "model"
    suite = {"data": str(world / "test_video_prompts.jsonl"), **_merged(cfg, "video_suite")}
    sft_data = {"data.train": str(world / "train_video.jsonl"), "data.eval": str(world / "validation_video.jsonl")}
    grpo_data = {"data.train": str(world / "train_video_prompts.jsonl")}
    model = {"model": cfg.video_model, "tiny_builder": _builder_version(cfg.video_model)}
    return [
        Stage(
            "video-sft",
            {**model, **common, **_merged(cfg, "video_sft")},
            ["world"],
            _train_action(cfg, sft, "video_sft", cfg.video_model, sft_data),
        ),
        Stage("eval-video-sft", suite, ["video-sft"], _eval_action(cfg, suite, sft_model, sft_model)),
        Stage(
            "video-grpo",
            {**common, **_merged(cfg, "video_grpo")},
            ["video-sft"],
            _train_action(cfg, grpo, "video_grpo", sft_model, grpo_data),
        ),
        Stage("eval-video-grpo", suite, ["video-grpo"], _eval_action(cfg, suite, sft_model, grpo_model)),
    ]


def run(cfg: Config) -> dict[str, Any]:
    """Run (or reuse) every stage, print the summary table, write demo_summary.json and the report;
    with ``cfg.threads`` CPU threads (the caller's count restored afterwards)."""
    with threads_for(cfg.threads):
        return _run(cfg)


def _run(cfg: Config) -> dict[str, Any]:
    root = demo_dir(cfg)
    cfg = replace(cfg, output_dir=str(root))
    if cfg.quick:
        print(f"[demo] {SMOKE_TEST}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo_config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str) + "\n")
    stages = build_stages(cfg)
    known = {s.name for s in stages}
    unknown = sorted(set(cfg.rerun) - known)
    if unknown:
        raise SystemExit(f"vlalign demo: --rerun names unknown stage(s) {unknown}; stages: {[s.name for s in stages]}")
    prints: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    total = time.perf_counter()
    ran: set[str] = set()
    for stage in stages:
        prints[stage.name] = stage_fingerprint(stage, [prints[a] for a in stage.after])
        force = stage.name in cfg.rerun or any(a in ran for a in stage.after)  # a rerun's successors follow
        records[stage.name], did_run = run_stage(stage, root / stage.name, prints[stage.name], force=force)
        if did_run:
            ran.add(stage.name)
    summary = summarise(stages, records)
    summary["video"] = video_summary(stages, records, cfg.video_model)
    summary["quick"] = cfg.quick
    summary["threads"] = torch.get_num_threads()
    summary["intervals"] = {k: asdict(v) for k, v in stage_intervals(root, summary).items()}
    summary["total_seconds"] = time.perf_counter() - total
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    print()
    print(format_summary(summary))
    if cfg.report:
        path = write_report(root, data_folders={SHAPES_PREFIX: world_folder()})
        print(f"\nreport: {path}")
    print(f"summary: {root / SUMMARY_FILE}")
    return summary

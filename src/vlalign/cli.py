"""The ``vlalign`` command: one subcommand per recipe, plus world, pairs, eval, compare, demo and report.

Every subcommand is configured the same way::

    vlalign <command> [--config FILE.yaml] [--resume] [--section.field=value ...]
    vlalign <command> --help        # every field, its type, default and documentation
    vlalign <command> ... --print_config   # the resolved config as YAML; loads nothing
    vlalign --version

A subcommand is a module exposing a ``Config`` dataclass and a ``run(cfg)`` function, and
optionally ``check_config(cfg)``: the checks of values that need no model or data, run before
anything loads (and by ``--print_config``), raising :class:`~vlalign.config.ConfigError`. The table
below maps names to modules (with the one-line description ``vlalign --help`` prints), imported
only when used so that ``vlalign --help`` is instant.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import traceback
from typing import Any

import yaml

from vlalign import __version__
from vlalign.config import format_help, load_config, to_dict
from vlalign.errors import UserError
from vlalign.models.quantization import hold_kernel_notice

COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("vlalign.commands.world", "build the shapes world (images + JSONL datasets) on disk"),
    "sft": ("vlalign.recipes.sft", "supervised fine-tuning on (prompt, images, completion) data"),
    "dpo": ("vlalign.recipes.dpo", "direct preference optimisation and its variants (IPO, SimPO, mDPO, ...)"),
    "kto": ("vlalign.recipes.kto", "KTO on unpaired desirable / undesirable completions"),
    "rm": ("vlalign.recipes.reward_model", "train a Bradley-Terry reward model on preference pairs"),
    "grpo": ("vlalign.recipes.grpo", "GRPO / Dr.GRPO / RLOO / REINFORCE++ with verifiable or learned rewards"),
    "ppo": ("vlalign.recipes.ppo", "actor-critic PPO with a vision-language critic"),
    "pairs": (
        "vlalign.commands.pairs",
        "build preference pairs: hallucination injection, image corruption, sample-and-rank, POVID",
    ),
    "eval": ("vlalign.commands.eval", "POPE, CHAIR, task accuracy, win rate and KL; one model or two side by side"),
    "compare": (
        "vlalign.commands.compare",
        "the difference between two evaluations, with its paired-bootstrap interval",
    ),
    "rollout-server": (
        "vlalign.commands.rollout_server",
        "a vLLM engine behind HTTP for the rollouts of trainers on other devices (rollout.vllm_server)",
    ),
    "demo": ("vlalign.commands.demo", "the whole pipeline on the shapes world, with a table and a report"),
    "report": ("vlalign.commands.report", "an HTML report (plots, gallery) of a run folder"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {name.ljust(width)}  {doc}" for name, (module, doc) in COMMANDS.items() if _exists(module))
    return (
        "usage: vlalign <command> [--config FILE.yaml] [--resume] [--section.field=value ...]\n"
        "       vlalign <command> --help           every option, with the default it runs with\n"
        "       vlalign <command> ... --print_config   the resolved config as YAML, then exit\n"
        "       vlalign --version\n\n"
        f"commands:\n{rows}\n"
    )


def _positional(module: Any, args: list[str]) -> list[str]:
    """Leading bare arguments as the command's ``POSITIONAL`` fields: ``report DIR`` = ``report --run_dir=DIR``."""
    names = getattr(module, "POSITIONAL", ())
    out = list(args)
    for i, name in enumerate(names[: len(out)]):
        if out[i].startswith("-"):
            break
        out[i] = f"--{name}={out[i]}"
    return out


def _exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    """Run ``vlalign <command> ...``; its exit status.

    Output piped into a reader that stops early (``vlalign demo --help | head``) ends the command
    quietly with status 1, the reader's choice, instead of a ``BrokenPipeError`` traceback.
    """
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version", "version"):
        print(f"vlalign {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS or not _exists(COMMANDS[name][0]):
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"vlalign: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    hold_kernel_notice()  # before bitsandbytes can be imported (PEFT imports it): see its docstring
    module = importlib.import_module(COMMANDS[name][0])
    if "-h" in rest or "--help" in rest:
        print(f"vlalign {name}: {COMMANDS[name][1]}\n")
        if module.__doc__:
            print(module.__doc__.strip() + "\n")
        print("options (YAML keys in --config files, or --key=value on the command line):")
        print(format_help(module.Config))
        return 0
    rest = _positional(module, rest)
    debug = "--debug" in rest or os.environ.get("VLALIGN_DEBUG", "") not in ("", "0")
    print_config = "--print_config" in rest or "--print-config" in rest
    rest = [a for a in rest if a not in ("--debug", "--print_config", "--print-config")]
    config_path, overrides = _split_config_flag(rest)
    try:
        cfg = load_config(module.Config, config_path, overrides)
        if not (print_config and unset_required(cfg)):  # printing shows what is missing instead
            check_values(module, cfg)
        if print_config:
            print(resolved_config_text(cfg), end="")
            return 0
        result = module.run(cfg)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"vlalign {name}: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def check_values(module: Any, cfg: Any) -> None:
    """The checks of option values that need no model or data: the training loop's (each section's
    ``validate``, through :func:`vlalign.training.options.validate_config`) and the command's
    ``check_config``; each failure is a one-line :class:`~vlalign.config.ConfigError`."""
    train = getattr(cfg, "train", None)
    if callable(getattr(train, "validate", None)):
        from vlalign.training.options import validate_config  # the training loop's checks

        validate_config(cfg, train)
    if hasattr(module, "check_config"):
        module.check_config(cfg)


def unset_required(cfg: Any) -> list[str]:
    """The options of ``type(cfg).REQUIRED`` left empty."""
    return [key for key in getattr(type(cfg), "REQUIRED", ()) if _dotted(cfg, key) in ("", None)]


def resolved_config_text(cfg: Any) -> str:
    """``cfg`` as YAML (what ``--config`` reads back), headed by the processes and the global batch
    when it has a ``train`` section: ``batch_size * grad_accum * processes``, processes from
    ``WORLD_SIZE`` (set by ``accelerate launch`` / ``torchrun``) or 1. Required options left unset
    are listed at the end."""
    head = ""
    train = getattr(cfg, "train", None)
    if train is not None and hasattr(train, "batch_size") and hasattr(train, "grad_accum"):
        processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
        batch = train.batch_size * train.grad_accum * processes
        head = (
            f"# processes: {processes}; global batch: {batch} "
            f"(train.batch_size {train.batch_size} x train.grad_accum {train.grad_accum} x {processes})\n"
        )
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    unset = unset_required(cfg)
    tail = f"# required, not set: {', '.join(unset)}\n" if unset else ""
    return head + text + tail


def _dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _split_config_flag(args: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--config FILE`` out of ``args`` and turn ``--resume`` into ``--train.resume=true``."""
    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            config_path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--resume":
            rest.append("--train.resume=true")
        else:
            rest.append(arg)
        i += 1
    return config_path, rest


if __name__ == "__main__":
    raise SystemExit(main())

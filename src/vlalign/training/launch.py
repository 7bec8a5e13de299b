"""Checks of how a run was launched: the CPU threads it may use, and whether ``accelerate launch``
got the processes it asked for.

``accelerate launch --num_processes 2 -m vlalign.cli dpo ...`` on a machine where accelerate
decides on one process (a CPU machine without a multi-CPU config, even with ``--cpu``; a single
GPU) runs one process silently; :func:`launch_warning` says so at the start of the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

logger = logging.getLogger("vlalign")


def requested_processes(env: Mapping[str, str]) -> int | None:
    """The processes the launcher asked for: ``WORLD_SIZE`` (``torchrun``, accelerate's multi-process
    launchers) or ``ACCELERATE_NUM_PROCESSES``, whichever is larger; None for "several, number unknown"
    when ``accelerate launch`` fell back to its single-process launcher although asked for more (it
    then sets ``MASTER_ADDR`` beside its ``ACCELERATE_USE_CPU`` but no ``WORLD_SIZE``); 1 otherwise."""
    asked = []
    for name in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES"):
        try:
            asked.append(int(env.get(name, "")))
        except ValueError:
            continue
    if asked:
        return max(asked)
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
        return None
    return 1


def launch_warning(env: Mapping[str, str], num_processes: int) -> str | None:
    """A warning when the launcher asked for more processes than the run has (None when they agree)."""
    asked = requested_processes(env)
    if asked is not None and asked <= num_processes:
        return None
    wanted = f"{asked} processes" if asked is not None else "several processes"
    return (
        f"vlalign: the launcher asked for {wanted} but this run has {num_processes}; it trains as "
        f"{num_processes} process(es). On CPUs, launch with ACCELERATE_USE_CPU=true accelerate launch "
        "--config_file examples/accelerate/ddp_cpu.yaml; on GPUs check that the devices are visible."
    )


def check_launch(num_processes: int, *, env: Mapping[str, str] | None = None) -> str | None:
    """Log (and return) :func:`launch_warning` for the current environment."""
    message = launch_warning(os.environ if env is None else env, num_processes)
    if message:
        logger.warning(message)
    return message


def apply_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads`` > 0 (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


@contextmanager
def threads_for(threads: int) -> Iterator[None]:
    """:func:`apply_threads` for the block; the thread count before it is restored afterwards (a
    caller in the same process, a test session or a notebook, keeps its own)."""
    before = torch.get_num_threads()
    apply_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

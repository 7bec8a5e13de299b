"""What vlalign does around bitsandbytes' 4-bit layers (QLoRA, ``model.quantization: nf4``),
beyond the loading itself (:func:`vlalign.models.load.nf4_config`).

* :func:`hold_kernel_notice`: bitsandbytes 0.50, when imported on a CPU with AVX512-BF16, tries
  to fetch an optional fused CPU kernel (the ``kernels`` package, downloading from the Hugging Face
  hub) and, failing, logs a warning on its logger ``bitsandbytes.backends.cpu.ops``: ``Failed to
  load CPU gemm_4bit_forward from kernels-community: ...``. PEFT imports bitsandbytes whenever it is
  installed, so that line would head the output of every ``vlalign`` command, QLoRA or not (and
  break the one-line error of a bad option). The CLI calls this at start-up, before any command
  module is imported: a :class:`logging.Filter` on that one logger drops that one message and
  keeps its text; :func:`report_kernel_notice` logs it (once) when a model is actually loaded in
  4-bit, where it applies (the fallback kernel is slower). Every other record of that logger
  passes. Configuration of the standard ``logging`` module: nothing of bitsandbytes is changed.
* :func:`keep_training_layout`, :func:`is_quantized`: the 4-bit layers' training kernel, and
  whether a model has any.

Importing this module imports neither torch nor bitsandbytes (the CLI loads it before anything).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"
"""The logger bitsandbytes 0.50's CPU backend logs its missing-kernel warning on (its module name)."""

NOTICE_START = "Failed to load CPU gemm_4bit_forward"
"""How that warning's message (its format string) starts."""


class KernelNotice(logging.Filter):
    """Drops bitsandbytes' missing-CPU-kernel warning, keeping its text in :attr:`held`; passes
    every other record."""

    def __init__(self) -> None:
        super().__init__()
        self.held: str | None = None
        """The dropped warning's text (the last one), or None when none was logged."""
        self.reported = False
        """Whether :func:`report_kernel_notice` has logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(NOTICE_START):
            self.held = record.getMessage()
            return False
        return True


def _installed() -> KernelNotice | None:
    found = [f for f in logging.getLogger(NOTICE_LOGGER).filters if isinstance(f, KernelNotice)]
    return found[0] if found else None


def hold_kernel_notice() -> KernelNotice:
    """Install the :class:`KernelNotice` filter on bitsandbytes' CPU-backend logger (once; the
    installed one is returned when called again). Must run before bitsandbytes is imported: the
    warning is logged at its import."""
    notice = _installed()
    if notice is None:
        notice = KernelNotice()
        logging.getLogger(NOTICE_LOGGER).addFilter(notice)
    return notice


def report_kernel_notice() -> None:
    """Log the held warning, once, as vlalign's own: called when a model is loaded in 4-bit."""
    notice = _installed()
    if notice is not None and notice.held is not None and not notice.reported:
        notice.reported = True
        logger.warning("bitsandbytes (4-bit layers on the CPU use its slower built-in kernel): %s", notice.held)


def keep_training_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer on its training kernel in eval mode too.

    bitsandbytes 0.50 repacks a ``Linear4bit``'s weight, on a CPU with AVX512-BF16, into an
    inference-only layout at its first eval-mode forward without gradients (a reference or rollout
    pass); every training forward after that fails (``result += bias`` on a leaf view) and the
    eval-mode log-probs come from another kernel than the training ones. The module's own
    ``support_avx512bf16_for_cpu`` flag switches that repacking off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or the base of a PEFT model) was loaded in 4-bit
    (:func:`vlalign.models.load.nf4_config`)."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())

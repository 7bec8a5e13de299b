"""QLoRA: ``model.quantization: nf4`` with ``model.use_lora``, on the CPU (bitsandbytes' CPU backend).

* The loader puts the language model's linear layers in 4-bit NF4 and leaves the vision tower, the
  projector and the LM head in float32; only LoRA matrices train.
* A DPO step and a GRPO step run on the tiny Qwen2-VL in NF4 + LoRA: DPO's first loss is exactly
  ``ln 2`` (the policy is its own reference at step 0: the adapter-disabled pass and the training
  pass use the same 4-bit kernel), the adapter moves, the run writes an adapter folder.
* The saved adapter loads on the full-precision base and gives the log-probs of the quantized
  model with the same adapter, within the quantisation error. That error is measured, not
  guessed: ``d0``, the largest per-token log-prob difference between the NF4 base and the float32
  base without adapter (0.075 nats here). With the adapter, the two models differ by the same
  rounding of the same base weights (the adapter is added in float32 on both), so the per-token
  difference must stay within ``2 * d0``, and so must the difference between the adapter's effect
  on either base. The adapter's own effect is measured too (about 1.8 nats a token after two steps
  at lr 1e-2), far above ``2 * d0``: an adapter that failed to load would fail the test.
* The options are refused in one line where they cannot work.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

from vlalign.config import ConfigError, load_config  # noqa: E402
from vlalign.data.collate import encode_completions, encode_prompts, pad_token_id_of  # noqa: E402
from vlalign.data.io import load_samples, write_samples  # noqa: E402
from vlalign.data.pairs.inject import InjectConfig, inject_pairs  # noqa: E402
from vlalign.models.load import LoraSpec, ModelLoadError, load_model_and_processor, nf4_config  # noqa: E402
from vlalign.models.logprobs import completion_logprobs  # noqa: E402
from vlalign.models.quantization import NOTICE_LOGGER, KernelNotice, report_kernel_notice  # noqa: E402
from vlalign.recipes import dpo, grpo  # noqa: E402
from vlalign.recipes.common import ModelConfig  # noqa: E402
from vlalign.shapes.vocabulary import load_vocabulary  # noqa: E402
from vlalign.training.metrics import read_metrics  # noqa: E402

SPEC = LoraSpec()  # the recipes' default LoRA (r=16, alpha=32, the language model's linear layers)


@pytest.fixture(scope="module")
def pairs(recipe_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = load_samples(recipe_world / "train.jsonl", "supervised")
    made, _ = inject_pairs(samples, load_vocabulary(recipe_world / "manifest.json"), InjectConfig(tasks=("describe",)))
    out = tmp_path_factory.mktemp("qlora-pairs") / "pairs.jsonl"
    write_samples(made[:8], out)
    return out


def _args(model_dir: Path, out: Path) -> list[str]:
    return [
        f"--model.name_or_path={model_dir}",
        "--model.device=cpu",
        "--model.dtype=float32",
        "--model.use_lora=true",
        "--model.quantization=nf4",
        f"--train.output_dir={out}",
        "--train.trackers=[]",
        "--train.progress=false",
        "--train.log_every=1",
        "--train.warmup_ratio=0",
        "--train.max_steps=2",
        "--train.batch_size=2",
        "--train.lr=1e-2",
    ]


def test_nf4_quantizes_the_language_model_only(tiny_model_dir):
    model, _ = load_model_and_processor(
        tiny_model_dir("qwen2_vl"), device="cpu", dtype="float32", lora=SPEC, quantization="nf4"
    )
    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    four_bit = [n for n, kind in linears.items() if kind == "Linear4bit"]
    assert four_bit and all(".language_model." in n for n in four_bit)
    plain = [n for n, kind in linears.items() if kind == "Linear"]
    assert any(".visual.blocks." in n for n in plain) and any(".visual.merger." in n for n in plain)
    assert any(n.endswith("lm_head") for n in plain)
    kept = {n: p.dtype for n, p in model.named_parameters() if "visual" in n or "lm_head" in n}
    assert set(kept.values()) == {torch.float32}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _logps(model, processor, samples) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    prompts = encode_prompts(processor, samples)
    completions = encode_completions(processor, [[s.chosen, s.rejected] for s in samples])
    with torch.no_grad():
        scored = completion_logprobs(model, prompts, completions, pad_token_id=pad_token_id_of(processor))
    return scored.logps, scored.mask


def test_dpo_step_in_nf4_and_its_adapter_on_the_full_precision_base(tiny_model_dir, pairs, tmp_path):
    start = tiny_model_dir("qwen2_vl")
    out = tmp_path / "dpo"
    dpo.run(load_config(dpo.Config, None, [*_args(start, out), f"--data.train={pairs}"]))
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(losses[1])
    adapter = load_file(out / "model" / "adapter_model.safetensors")
    assert not (out / "model" / "model.safetensors").exists()
    assert any("lora_B" in k and bool(v.any()) for k, v in adapter.items())

    samples = load_samples(pairs, "preference")[:4]
    full, processor = load_model_and_processor(out / "model", device="cpu", dtype="float32")  # float32 base
    assert not any(type(m).__name__ == "Linear4bit" for m in full.modules())
    with_adapter, mask = _logps(full, processor, samples)
    with full.disable_adapter():
        base, _ = _logps(full, processor, samples)
    quantized, _ = load_model_and_processor(start, device="cpu", dtype="float32", lora=SPEC, quantization="nf4")
    q_base, _ = _logps(quantized, processor, samples)
    assert not set_peft_model_state_dict(quantized, adapter).unexpected_keys
    q_adapter, _ = _logps(quantized, processor, samples)

    def largest(x: torch.Tensor) -> float:
        return float(x[mask].abs().max())

    d0 = largest(q_base - base)  # the quantisation error of the base alone
    assert 0 < d0 < 0.2
    assert largest(q_adapter - with_adapter) <= 2 * d0
    assert largest((q_adapter - q_base) - (with_adapter - base)) <= 2 * d0
    assert largest(with_adapter - base) > 5 * d0  # the adapter matters: a missing one would fail


def test_grpo_step_in_nf4(tiny_model_dir, recipe_world, tmp_path):
    reward = tmp_path / "parity_reward.py"
    reward.write_text("def parity(completion, sample):\n    return float(sum(map(ord, completion)) % 2)\n")
    out = tmp_path / "grpo"
    extra = [
        f"--data.train={recipe_world / 'train_prompts.jsonl'}",
        "--grpo.tasks=[describe]",
        "--rollout.n=4",
        f"--rewards.weights={{{reward}:parity: 1.0}}",
        "--rollout.max_new_tokens=6",
        "--eval_tasks=[]",
    ]
    grpo.run(load_config(grpo.Config, None, [*_args(tiny_model_dir("qwen2_vl"), out), *extra]))
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    adapter = load_file(out / "model" / "adapter_model.safetensors")
    assert any("lora_B" in k and bool(v.any()) for k, v in adapter.items())


@pytest.mark.slow
def test_two_processes_in_nf4_match_one_process(tiny_model_dir, pairs, tmp_path, launch_two_processes):
    """QLoRA under DDP (two CPU processes, gloo) against one process with the same global batch: the
    4-bit base is the same on both sides and frozen, only the adapters' gradients are all-reduced, so
    the losses and adapters agree to float32 rounding (measured: bitwise here). LoRA dropout is off:
    each process draws its own dropout masks, another (valid) run than one process."""
    common = [*_args(tiny_model_dir("qwen2_vl"), tmp_path), "--model.lora.dropout=0", "--train.batch_size=1"]
    common = [a for a in common if not a.startswith("--train.output_dir")] + [f"--data.train={pairs}"]
    one, two = tmp_path / "one", tmp_path / "two"
    dpo.run(load_config(dpo.Config, None, [*common, "--train.grad_accum=2", f"--train.output_dir={one}"]))
    launch_two_processes("dpo", [*common, "--train.grad_accum=1", f"--train.output_dir={two}"])
    losses = [[r["train/loss"] for r in read_metrics(d) if "train/loss" in r] for d in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    a = load_file(one / "model" / "adapter_model.safetensors")
    b = load_file(two / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-5)


def test_nf4_is_refused_where_it_cannot_work(monkeypatch):
    with pytest.raises(ConfigError, match="nf4 \\(QLoRA\\) needs use_lora"):
        ModelConfig(quantization="nf4").validate()
    with pytest.raises(ConfigError, match="must be none or nf4"):
        ModelConfig(quantization="int8", use_lora=True).validate()
    with pytest.raises(ModelLoadError, match="needs LoRA"):
        nf4_config("nf4", torch.float32, None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="needs the bitsandbytes package: pip install 'vlalign\\[qlora\\]'"):
        ModelConfig(quantization="nf4", use_lora=True).validate()
    with pytest.raises(ModelLoadError, match="needs the bitsandbytes package"):
        nf4_config("nf4", torch.float32, SPEC)


def test_the_missing_kernel_notice_is_held_until_a_model_is_quantized(caplog):
    """The filter drops exactly bitsandbytes' missing-kernel warning (logged with its own format
    string, as bitsandbytes does), passes any other record of that logger, and
    :func:`report_kernel_notice` logs the held text once, as vlalign's."""
    bnb_logger = logging.getLogger(NOTICE_LOGGER)
    earlier = [f for f in bnb_logger.filters if isinstance(f, KernelNotice)]  # a CLI run in this process
    for f in earlier:
        bnb_logger.removeFilter(f)
    notice = KernelNotice()
    bnb_logger.addFilter(notice)
    try:
        with caplog.at_level(logging.WARNING):
            bnb_logger.warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels"
            )
            bnb_logger.warning("another warning")
            assert [r.getMessage() for r in caplog.records] == ["another warning"]
            assert notice.held == "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels. Please ..."
            report_kernel_notice()
            report_kernel_notice()
        reported = [r for r in caplog.records if r.name == "vlalign.models.quantization"]
        assert len(reported) == 1 and "kernels-community: no kernels" in reported[0].getMessage()
    finally:
        bnb_logger.removeFilter(notice)
        for f in earlier:
            bnb_logger.addFilter(f)


def test_importing_bitsandbytes_prints_nothing_once_the_notice_is_held():
    """In a fresh interpreter (as the CLI does at start-up): the filter installed, then bitsandbytes
    imported (PEFT imports it): nothing on stderr. On a CPU with AVX512-BF16 bitsandbytes 0.50.2
    does log the warning there, and the filter must have caught it, by the text it really has."""
    code = (
        "from vlalign.models.quantization import hold_kernel_notice\n"
        "notice = hold_kernel_notice()\n"
        "import bitsandbytes\n"
        "from bitsandbytes.functional import has_avx512bf16\n"
        "print(bool(has_avx512bf16()), notice.held is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    avx512bf16, held = done.stdout.split()
    assert held == avx512bf16  # held exactly where bitsandbytes logs it (no `kernels` package here)

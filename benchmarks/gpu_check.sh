#!/usr/bin/env bash
# GPU check of vlalign: does the pipeline run on CUDA in bf16, and what does prefix sharing save there?
#
#   (a) torch / transformers (and friends) versions, the GPU's name, bf16 support;
#   (b) `vlalign demo --quick` with the defaults device=auto (-> cuda), dtype=auto and mixed_precision=auto
#       (trained models: float32 weights, bf16 autocast; evaluated ones: bf16 weights, on a GPU that has
#       bf16): every stage, the summary table, every number of the summary, the evaluations and the
#       training logs finite, the models' peak GPU memory, the final model reloaded (device, dtype);
#   (c) benchmarks/logprobs.py --device cuda in bfloat16 and in float32 (speed-ups, peak-memory ratios,
#       largest shared-vs-naive log-prob difference);
#   (d) a few fast CPU tests that touch bf16 (tests/models/test_load.py, test_heads.py), with the versions
#       installed there;
#   (e) FSDP2 through accelerate (GPU only: accelerate applies FSDP to GPU processes only, see
#       docs/distributed.md): tests/recipes/test_fsdp_gpu.py -- SFT, DPO and KTO sharded over min(GPUs, 2)
#       processes equal one unsharded process, resume exactly after a stop, and save a whole model/
#       folder -- and the CPU test of the sharded checkpoint code (tests/recipes/test_fsdp_checkpoints.py).
#
# Run from the repository root on a machine with a GPU:
#
#     bash benchmarks/gpu_check.sh                  # logs to $OUT (default /tmp/vlalign-gpu-check/out)
#     VLALIGN_WHEELS=.whl bash benchmarks/gpu_check.sh   # offline: first install .whl/*.whl into /tmp/site
#
# The demo's folder is $WORK/demo-quick (default WORK=/tmp/vlalign-gpu-check); only its demo_summary.json
# and report.html are copied to $OUT. DEVICE=cpu runs the same steps on the CPU (to try the script out);
# DEMO_TIMEOUT, TEST_TIMEOUT and FSDP_TIMEOUT (seconds) bound steps (b), (d) and (e), REPS the benchmark's
# repetitions; ONLY=fsdp2 runs step (a) and step (e) alone (about 5 minutes on one GPU, estimated);
# ONLY=zero2 or ONLY=zero3 runs step (a) and step (f), DeepSpeed ZeRO through accelerate (tests/recipes/
# test_deepspeed_gpu.py: DPO equals one process and resumes, GRPO's decode under ZeRO-3; DS_TIMEOUT bounds it).
# ONLY=vllm runs step (a) and step (g), vLLM as the rollout engine (VLLM_PYTHON: a Python with vLLM installed).
# The exit status is 0 only when every step passed; each step's outcome is listed at the end.

set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/vlalign-gpu-check}
OUT=${OUT:-$WORK/out}
REPS=${REPS:-5}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
: >"$LOG"
RESULTS=()

say() { echo "$*" | tee -a "$LOG"; }
# step NAME LOGFILE CMD...: run CMD, its output teed into LOGFILE and the main log, and record the outcome
step() {
    local name=$1 file=$2
    shift 2
    say ""
    say "=== $name: $*"
    local t0=$SECONDS rc
    if [ "$file" = "$LOG" ]; then
        "$@" 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
    else
        "$@" 2>&1 | tee -a "$file" >>"$LOG"
        rc=${PIPESTATUS[0]}
        tail -n 60 "$file"
    fi
    say "=== $name: exit $rc after $((SECONDS - t0)) s"
    RESULTS+=("$name: $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s")
    return "$rc"
}

if [ -n "${VLALIGN_WHEELS:-}" ]; then
    SITE=${SITE:-/tmp/site}
    say "installing $(ls "$VLALIGN_WHEELS"/*.whl | wc -l) wheels from $VLALIGN_WHEELS into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$VLALIGN_WHEELS"/*.whl >>"$LOG" 2>&1 || { tail -n 20 "$LOG"; exit 1; }
    export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import transformers" >>"$LOG" 2>&1; then  # keep going with the machine's own
        say "WARNING: the carried transformers does not import (see the log); using the installed one"
        rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
    fi
else
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi

# ------------------------------------------------------------------------------ (a) the machine
step versions "$LOG" "$PY" - "$DEVICE" <<'EOF'
import importlib, importlib.metadata, platform, sys
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
for name in ("transformers", "tokenizers", "huggingface_hub", "accelerate", "peft", "datasets", "num2words", "numpy", "deepspeed", "bitsandbytes"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', None) or importlib.metadata.version(name)}")
    except Exception as exc:  # report, the later steps say whether it matters
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
if sys.argv[1] != "cpu":
    assert torch.cuda.is_available(), "CUDA is not available"
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    from vlalign.models.load import resolve_device, resolve_dtype
    from vlalign.recipes.common import trained_weights_dtype
    from vlalign.training import resolve_mixed_precision
    dev = resolve_device("auto")
    print(f"vlalign resolves device=auto -> {dev}; dtype=auto -> {resolve_dtype('auto', dev)} for frozen models "
          f"and LoRA bases, {trained_weights_dtype('auto', lora=False)} for fully trained ones; "
          f"train.mixed_precision=auto -> {resolve_mixed_precision('auto')}")
EOF

if [ -z "${ONLY:-}" ]; then
# ------------------------------------------------------------------------------ (b) the quick demo
DEMO="$WORK/demo-quick"
rm -rf "$DEMO"
DEMO_ARGS=(demo --quick --output_dir "$DEMO")
[ "$DEVICE" = cpu ] && DEMO_ARGS+=(--device cpu)
step demo "$OUT/demo.log" timeout "${DEMO_TIMEOUT:-3600}" "$PY" -m vlalign.cli "${DEMO_ARGS[@]}"
cp "$DEMO/demo_summary.json" "$DEMO/report.html" "$OUT/" 2>/dev/null

step demo-checks "$LOG" "$PY" - "$DEMO" "$DEVICE" <<'EOF'
"""Every number the demo wrote is finite; the stages ran on the device; the final model reloads there."""
import json, math, sys
from pathlib import Path

root, device = Path(sys.argv[1]), sys.argv[2]


def numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


files = [root / "demo_summary.json", *sorted(root.glob("eval-*/eval.json")), *sorted(root.glob("*/stage.json")),
         *sorted(root.glob("*/metrics.jsonl"))]
bad, total = [], 0
for path in files:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.suffix == ".jsonl" else [json.loads(path.read_text())]
    for record in records:
        for x in numbers(record):
            total += 1
            if not math.isfinite(x):
                bad.append(str(path.relative_to(root)))
print(f"{total} numbers in {len(files)} files; non-finite: {len(bad)} {sorted(set(bad))}")
summary = json.loads((root / "demo_summary.json").read_text())
print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["stage_seconds"].items())
      + f"; total {summary['total_seconds']:.1f}")
for name in ("sft", "dpo", "grpo"):
    rows = [json.loads(l) for l in (root / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    peaks = [r["perf/peak_mem_mb"] for r in rows if "perf/peak_mem_mb" in r]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    print(f"{name}: {len(rows)} log records, train/loss first {losses[0] if losses else None} last "
          f"{losses[-1] if losses else None}, peak memory {max(peaks) if peaks else float('nan'):.0f} MiB")
import torch
from vlalign.models.load import load_model_and_processor

model, _ = load_model_and_processor(root / "grpo" / "model", device="cpu" if device == "cpu" else "auto")
params = {(str(p.device), str(p.dtype)) for p in model.parameters()}
print(f"final model reloaded with device/dtype auto: {sorted(params)}")
ok = not bad and (device == "cpu" or all(d.startswith("cuda") and t == "torch.bfloat16" for d, t in params))
sys.exit(0 if ok else 1)
EOF

# ------------------------------------------------------------------------------ (c) the log-prob benchmark
if [ "$DEVICE" = cpu ]; then DTYPES=(float32); else DTYPES=(bfloat16 float32); fi
for dtype in "${DTYPES[@]}"; do
    step "bench-$dtype" "$OUT/bench_$dtype.log" "$PY" benchmarks/logprobs.py --device "$DEVICE" --dtype "$dtype" \
        --reps "$REPS" --model-dir "$WORK/bench-models"
done

# ------------------------------------------------------------------------------ (d) a few bf16 tests
step tests "$OUT/pytest.log" timeout "${TEST_TIMEOUT:-600}" "$PY" -m pytest -q -x -p no:cacheprovider -m "not slow" \
    tests/models/test_load.py tests/models/test_heads.py
fi  # ONLY

# ------------------------------------------------------------------------------ (e) FSDP2 through accelerate
# Not on CPUs: with ACCELERATE_USE_CPU=true accelerate 1.15 turns an FSDP config into plain DDP, and without
# it a GPU-less machine starts unconnected processes. -m "" includes the tests marked slow.
if [ "$DEVICE" != cpu ] && { [ -z "${ONLY:-}" ] || [ "$ONLY" = fsdp2 ]; }; then
    step fsdp2 "$OUT/fsdp2.log" timeout "${FSDP_TIMEOUT:-1200}" "$PY" -m pytest -q -x -p no:cacheprovider -m "" -rs \
        tests/recipes/test_fsdp_gpu.py tests/recipes/test_fsdp_checkpoints.py
fi

# ------------------------------------------------------------------------------ (f) DeepSpeed ZeRO through accelerate
# Not on CPUs: accelerate 1.15 takes its DeepSpeed branch only for GPU-like processes (docs/distributed.md).
# deepspeed is not a vlalign dependency: install it first (pip install deepspeed, or carry a wheel built with
# DS_BUILD_OPS=0 pip wheel --no-deps deepspeed in $VLALIGN_WHEELS). ONLY=zero2 / ONLY=zero3 pick one stage.
if [ "$DEVICE" != cpu ] && { [ -z "${ONLY:-}" ] || [ "$ONLY" = zero2 ] || [ "$ONLY" = zero3 ]; }; then
    case "${ONLY:-}" in zero2) STAGES=2 ;; zero3) STAGES=3 ;; *) STAGES=2,3 ;; esac
    if step deepspeed-import "$LOG" "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)"; then
        step "zero-$STAGES" "$OUT/deepspeed.log" env VLALIGN_ZERO_STAGES="$STAGES" timeout "${DS_TIMEOUT:-1200}" \
            "$PY" -m pytest -q -x -p no:cacheprovider -m "" -rs tests/recipes/test_deepspeed_gpu.py
    fi
fi

# ------------------------------------------------------------------------------ (g) vLLM as the rollout engine
# vllm is not a vlalign dependency: install the GPU build first (pip install vllm==0.33.0, which brings its
# own torch; docs/vllm.md), or point VLLM_PYTHON at an environment that has it. ONLY=vllm runs (a) and (g):
# the rollout-engine tests (greedy equal to vlalign's loop, log-probs, weight sync, GRPO and PPO end to end)
# and benchmarks/rollout_engines.py (hf vs vllm completions/s and tokens/s, G = 8) on bench-vocab in bf16.
if [ -z "${ONLY:-}" ] || [ "$ONLY" = vllm ]; then
    VPY=${VLLM_PYTHON:-$PY}
    if step vllm-import "$LOG" "$VPY" -c "import vllm; print('vllm', vllm.__version__)"; then
        step vllm-tests "$OUT/vllm_tests.log" timeout "${VLLM_TIMEOUT:-1800}" \
            "$VPY" -m pytest -q -x -p no:cacheprovider -m vllm tests/vllm_rollout
        vdtype=bfloat16; [ "$DEVICE" = cpu ] && vdtype=float32
        step vllm-bench "$OUT/vllm_bench.log" timeout "${VLLM_TIMEOUT:-1800}" "$VPY" benchmarks/rollout_engines.py \
            --device "$DEVICE" --dtype "$vdtype" --size "${VLLM_BENCH_SIZE:-bench-vocab}" --prompts 16 --group-size 8 \
            --max-new 128 --reps "$REPS"
    fi
fi

say ""
say "=== summary"
failed=0
for r in "${RESULTS[@]}"; do
    say "  $r"
    case $r in *FAILED*) failed=1 ;; esac
done
exit $failed

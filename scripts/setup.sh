#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: .venv with speedrun (editable) and its test tools,
# the CPU build of torch where there is no NVIDIA GPU, and Debian's Fashion-MNIST package.
# Fast when everything is already there. Output goes to stderr so scripts can read stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 3>&1 1>&2

PYTHON=${PYTHON:-python3}
VENV=${SPEEDRUN_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --quiet "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the default (CUDA) build of torch"
    pip install torch
  else
    # No GPU: never let pip pick the multi-GB CUDA build. The pinned CPU wheel is found locally
    # on machines that carry it; elsewhere PyTorch's CPU index serves it.
    echo "setup: no GPU, installing the CPU build of torch"
    pip install "torch==2.13.0+cpu" 2>/dev/null \
      || pip install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi

if ! "$VENV/bin/python" -c "import speedrun, pytest" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.speedrun-installed" ]; then
  echo "setup: installing speedrun and its dependencies"
  pip install -e ".[dev]"
  touch "$VENV/.speedrun-installed"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
    || echo "setup: could not install dataset-fashion-mnist; speedrun will try to download Fashion-MNIST"
fi

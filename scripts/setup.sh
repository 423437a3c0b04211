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

# Debian packages: the Fashion-MNIST files, Chromium for the report's headless-browser test, and
# PostgreSQL for `speedrun tune --storage postgresql://` (its test starts a server of its own on loopback).
APT=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || APT+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || APT+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || APT+=(postgresql)
if [ ${#APT[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian packages: ${APT[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null; } \
    || echo "setup: could not install ${APT[*]}; Fashion-MNIST will be downloaded, the browser and PostgreSQL tests skipped"
fi

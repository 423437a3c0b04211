#!/usr/bin/env bash
# The GPU check of issue 4: `cifar10-94` to 94% on the real CIFAR-10 copy, on a CUDA device.
#
#     bash benchmarks/gpu_cifar10_94.sh PATH/TO/cifar10-jpeg.tar.gz [OUTDIR]
#
# Runs from the repository root without installing speedrun (PYTHONPATH), with whatever python3 holds a
# CUDA build of PyTorch. In order, each under its own time limit so one failure does not hide the rest:
#   1. the device and software;
#   2. one-time preparation of the dataset (timed by `speedrun data prepare`, outside every clock);
#   3. `speedrun train --recipe cifar10-94 --seeds 5`: time-to-accuracy per seed and their summary;
#   4. the test suite with CUDA visible (tests that pick the device automatically then run on the GPU);
#   5. the same recipe with torch.compile, 3 seeds (the first pays the compilation inside its clock).
# Logs and the run store land in OUTDIR (default $OUT, else ./gpu-out).
set -u
data=${1:?usage: gpu_cifar10_94.sh PATH/TO/cifar10-jpeg.tar.gz [OUTDIR]}
out=${2:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export SPEEDRUN_HOME=${SPEEDRUN_HOME:-$(mktemp -d)}
py=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, go on regardless
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

stage env 30 bash -c "nvidia-smi; $py -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cudnn.version())'"
stage prepare 90 "$py" -m speedrun data prepare "$data"
stage train 200 "$py" -m speedrun train --recipe cifar10-94 --data "$data" --seeds 5 --device cuda \
    --store "$out/runs.sqlite"
stage pytest 150 "$py" -m pytest -q -p no:cacheprovider tests
stage compile 180 "$py" -m speedrun train --recipe cifar10-94 --data "$data" --seeds 3 --device cuda \
    --set train.compile=true --store "$out/runs.sqlite"

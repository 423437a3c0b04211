"""The environment a run executed in, stored beside its results."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

import speedrun
from speedrun.config import ConfigError
from speedrun.cpuinfo import cpu_flags


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where bf16 matmuls run in hardware (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot work on ``device`` here, in one line; None when it can.

    TorchInductor turns the graph into C++ on a CPU and into Triton kernels on a GPU, and both
    are built at run time: without a C++ compiler (or Triton) the first compiled call fails deep
    inside inductor, after the clock has started. This asks inductor's own compiler search
    (``$CXX``, else g++), so it agrees with what compilation will do.
    """
    import importlib.util

    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return ("train.compile needs Triton on a GPU and it is not installed; pip install triton, "
                    "or set train.compile=false")
        return None
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import get_cpp_compiler
    except Exception as e:  # an inductor that cannot even be imported
        return f"train.compile cannot work here: TorchInductor fails to import ({type(e).__name__}: {e})"
    try:
        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler
        wanted = " or ".join(str(c) for c in inductor_config.cpp.cxx if c)
        return (f"train.compile needs a C++ compiler for TorchInductor on the CPU and none was found "
                f"(looked for {wanted}); install g++ or point $CXX at one, or set train.compile=false")
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


@functools.cache
def code_version() -> str:
    """The package version, plus the git commit (and '-dirty') when run from a checkout."""
    version = speedrun.__version__
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            version += f"+g{sha}" + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def environment(device: torch.device) -> dict:
    return {
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "code_version": code_version(),
    }


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it (else fp16), bf16 on CPUs with native bf16, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision

"""The device's theoretical peak FLOP/s: cores x clock x FLOP per cycle on a CPU, a datasheet on a GPU.

A CPU core's FLOP per cycle follows from its vector units: two 256-bit FMA pipes (AVX2: Zen 2/3,
Intel Haswell to Comet Lake) do 2 x 8 fp32 multiply-adds = 32 FLOP/cycle; Zen 4 runs 512-bit
instructions on those same pipes (32); Zen 5 and Intel's server cores with two 512-bit FMA units do
64. Native bf16 (AVX-512 BF16's dot products) doubles the fp32 rate; AMX tiles reach 1024 bf16
FLOP/cycle. Where bf16 has no hardware it is emulated and there is no bf16 peak to speak of.

The clock is the one the system reports (``/sys`` cpufreq maximum where present, else /proc/cpuinfo's
"cpu MHz", often the nominal base clock in a VM): turbo may run above it, so a measured matmul can
exceed this "theoretical" figure; it is a yardstick, labelled with how it was computed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from speedrun.env import cpu_flags

# Dense tensor-core (or FP32 pipe) peaks in TFLOP/s from the vendors' datasheets, SXM parts where there
# are two: (model name, {precision: TFLOP/s}), matched as whole words of the device's name, the first
# match winning ("L4" is not the "L40S", "A100" not the "RTX A1000"). fp32 is the plain FP32 rate
# (PyTorch does not use TF32 for matmuls by default; cuDNN may for fp32 convolutions, see the README).
GPU_PEAKS_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
)


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    how: str  # how it was computed, for the label


def _cpuinfo_field(name: str) -> list[str]:
    try:
        return [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.split(":", 1)[0].strip() == name]
    except OSError:
        return []


def cpu_clock_ghz() -> float | None:
    """The maximum clock the system reports, in GHz (see the module docstring)."""
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        if khz > 0:
            return khz / 1e6
    except (OSError, ValueError):
        pass
    mhz = [float(v) for v in _cpuinfo_field("cpu MHz") if v.replace(".", "", 1).isdigit()]
    return max(mhz) / 1000 if mhz and max(mhz) > 0 else None  # some VMs report 0: unknown


def fp32_flop_per_cycle(flags: frozenset[str], *, vendor: str, family: int | None) -> int | None:
    """fp32 FLOP per cycle per core from the vector extensions (two FMA pipes assumed where there are FMAs)."""
    if "avx512f" in flags:
        if vendor == "AuthenticAMD":
            return 64 if (family or 0) >= 26 else 32  # Zen 5 has full 512-bit pipes; Zen 4 splits them
        return 64
    if "fma" in flags and "avx2" in flags:
        return 32
    if "avx" in flags:
        return 16
    if "sse2" in flags:
        return 8
    return None


def cpu_peak(precision: str, *, threads: int, flags: frozenset[str] | None = None, vendor: str | None = None,
             family: int | None = None, clock_ghz: float | None = None) -> Peak | None:
    """Theoretical peak of ``threads`` cores in ``precision``; None where it cannot be known here."""
    flags = cpu_flags() if flags is None else flags
    vendor = vendor if vendor is not None else next(iter(_cpuinfo_field("vendor_id")), "")
    if family is None:
        family = next((int(v) for v in _cpuinfo_field("cpu family") if v.isdigit()), None)
    clock = cpu_clock_ghz() if clock_ghz is None else clock_ghz
    fp32 = fp32_flop_per_cycle(flags, vendor=vendor, family=family)
    if not clock or fp32 is None:  # unknown, or a reported 0
        return None
    if precision == "bf16":
        if "amx_bf16" in flags:
            per_cycle, unit = 1024, "AMX bf16"
        elif "avx512_bf16" in flags:
            per_cycle, unit = 2 * fp32, "AVX-512 BF16"
        else:
            return None  # emulated: no hardware rate
    else:
        per_cycle, unit = fp32, "fp32 FMA"
    return Peak(threads * clock * 1e9 * per_cycle,
                f"{threads} cores x {clock:.2f} GHz x {per_cycle} FLOP/cycle ({unit})")


def gpu_peak(device_name: str, precision: str) -> Peak | None:
    for model, peaks in GPU_PEAKS_TFLOPS:
        if re.search(rf"(?<!\w){re.escape(model)}(?!\w)", device_name):
            return Peak(peaks[precision] * 1e12, f"{model} datasheet, dense {precision}") if precision in peaks else None
    return None


def theoretical_peak(device_type: str, device_name: str, precision: str, *, threads: int | None = None) -> Peak | None:
    """The theoretical peak for a run on this device in ``precision`` (resolved), or None when unknown."""
    if device_type == "cuda":
        return gpu_peak(device_name, precision)
    return cpu_peak(precision, threads=threads or os.cpu_count() or 1)

"""The CPU's feature flags, read without importing torch (the technique catalog asks before any run)."""
from __future__ import annotations

from pathlib import Path


def cpu_flags() -> frozenset[str]:
    """/proc/cpuinfo's flags (avx2, avx512_bf16, amx_bf16, ...); empty where there is no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()

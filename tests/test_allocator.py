"""retain-memory: after the switch, freeing and reallocating big buffers stops page-faulting."""
from __future__ import annotations

import subprocess
import sys

import pytest

from speedrun.techniques.registry import TECHNIQUES

# Runs the default recipe's training step and prints minor page faults per step, before and after the
# switch. In a child process because the setting is process-wide. At batch 1024 the biggest activation
# buffers (~75 MB) exceed 32 MiB, the ceiling of glibc's dynamic mmap threshold: by default they are
# mmapped and unmapped on every step whatever glibc learned (smaller blocks it may move to the heap by
# itself after a few steps, which made the default's count vary from 0 to thousands at the recipe's batch).
CHILD = """
import resource, torch
from speedrun.recipes import get_recipe
from speedrun.models import build_model
from speedrun.techniques.allocator import retain_freed_memory

torch.set_num_threads(1)
model = build_model(get_recipe("fashion-mnist").model, in_channels=1, num_classes=10, image_size=(28, 28))
x, y = torch.randn(1024, 1, 28, 28), torch.randint(0, 10, (1024,))

def faults_per_step(n=9, warm_up=2):
    # The median step's faults: a step that grows the heap to a new high-water mark faults once,
    # which the setting does not prevent; the steady state is what it changes.
    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for _ in range(warm_up):
        step()
    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(faults)[n // 2]

default = faults_per_step()
print(retain_freed_memory(), default, faults_per_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_stops_page_faults_on_reallocation():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    took, default, retained = out.split()
    assert took == "True"
    assert float(default) > 200, f"glibc reused the buffers even by default ({default} faults/step)"
    assert float(retained) < float(default) / 4


def test_the_technique_is_marked_process_wide():
    assert TECHNIQUES["retain-memory"].process_wide
    assert not any(t.process_wide for n, t in TECHNIQUES.items() if n != "retain-memory")


@pytest.mark.parametrize("on", [True, False])
def test_a_run_switches_it_on_before_its_data_and_model_exist(synthetic_dir, monkeypatch, on):
    """train.retain_memory reaches glibc in a real run (a catalog refactor once left it a silent no-op)."""
    import speedrun
    from speedrun.techniques import allocator

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append("on"))
    speedrun.train("fashion-mnist", data=synthetic_dir, store=None, budget="1ep",
                   overrides={"train.retain_memory": on, "train.epochs": 1})
    assert calls == (["on"] if on else [])

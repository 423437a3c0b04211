"""The examples in examples/ run and learn (on slices)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import FASHION_MNIST

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_own_loop_learns_on_a_fashion_mnist_slice(capsys):
    accuracy = _load("own_loop").main("fashion-mnist", epochs=2, limit=4000)
    assert accuracy > 0.7  # 10 classes, chance 10%; a slice of 4,000 images, 30 steps (77% when written)
    assert "after 2 epochs (30 steps)" in capsys.readouterr().out

"""speedrun: train to a target accuracy as fast as the hardware allows, and measure what bought the speed."""
from __future__ import annotations

__version__ = "0.1.0"

from speedrun.config import ConfigError, Recipe  # noqa: E402
from speedrun.train import TrainResult, train  # noqa: E402

__all__ = ["ConfigError", "Recipe", "TrainResult", "train", "__version__"]

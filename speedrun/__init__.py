"""speedrun: train to a target accuracy as fast as the hardware allows, and measure what bought the speed."""
from __future__ import annotations

__version__ = "0.1.0"

from speedrun import train  # noqa: E402 (the subpackage: cheap, its names load lazily)
from speedrun.config import ConfigError, Recipe  # noqa: E402
from speedrun.lazy import lazy_attributes  # noqa: E402

# `train` and `TrainResult` import torch, so they load on first use. The subpackage is imported above
# because importing it later would make the import system set `speedrun.train` over the function.
del train
__getattr__, __dir__ = lazy_attributes(__name__, {"train.run": ("TrainResult", "train"),
                                                  "inference": ("Classifier", "load")})

__all__ = ["Classifier", "ConfigError", "Recipe", "TrainResult", "load", "train", "__version__"]

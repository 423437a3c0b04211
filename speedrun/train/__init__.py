"""The trainer: the event loop, its hooks, and ``train`` which assembles a recipe into a timed run."""
from speedrun.lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, {"loop": ("EVENTS", "FitState", "StopFit", "fit"),
                                                  "run": ("Budget", "TrainResult", "train")})

__all__ = ["EVENTS", "Budget", "FitState", "StopFit", "TrainResult", "fit", "train"]

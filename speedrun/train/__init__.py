"""The trainer: the event loop, its hooks, and ``train`` which assembles a recipe into a timed run."""
from speedrun.train.loop import EVENTS, FitState, StopFit, fit
from speedrun.train.run import Budget, TrainResult, train

__all__ = ["EVENTS", "Budget", "FitState", "StopFit", "TrainResult", "fit", "train"]

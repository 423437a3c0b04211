"""Datasets: sources, the one-time uint8 cache and the device-resident loader."""
from speedrun.data.loader import ResidentLoader, flip_batch, translate_batch
from speedrun.data.sources import DataError, ImageSet, Prepared, load_prepared, prepare, resolve

__all__ = ["DataError", "ImageSet", "Prepared", "ResidentLoader", "flip_batch", "load_prepared",
           "prepare", "resolve", "translate_batch"]

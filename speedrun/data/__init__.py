"""Datasets: sources, the one-time uint8 cache, the device-resident and the streaming loader."""
from speedrun.data.loader import ResidentLoader, flip_batch, process_shard, translate_batch
from speedrun.data.sources import DataError, ImageSet, Prepared, load_prepared, prepare, resolve
from speedrun.data.stream import StreamLoader, available_memory, choose_loader

__all__ = ["DataError", "ImageSet", "Prepared", "ResidentLoader", "StreamLoader", "available_memory",
           "choose_loader", "flip_batch", "load_prepared", "prepare", "process_shard", "resolve", "translate_batch"]

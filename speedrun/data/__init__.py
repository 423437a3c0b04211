"""Datasets: sources, the one-time uint8 cache, the device-resident and the streaming loader."""
from speedrun.lazy import lazy_attributes


class DataError(RuntimeError):
    """Missing, unreadable or malformed data; the message says what and how to fix it."""


# The loaders import torch and the sources numpy: they load on first use (see speedrun.lazy).
__getattr__, __dir__ = lazy_attributes(__name__, {
    "crops": ("CropLoader", "crop_loaders"),
    "imageset": ("RaggedImages",),
    "loader": ("ResidentLoader", "flip_batch", "process_shard", "translate_batch"),
    "sources": ("ImageSet", "Prepared", "cache_path", "load_prepared", "prepare", "read_meta", "resolve",
                "source_options"),
    "stream": ("StreamLoader", "available_memory", "choose_loader"),
})

__all__ = ["CropLoader", "DataError", "ImageSet", "Prepared", "RaggedImages", "ResidentLoader", "StreamLoader",
           "available_memory", "cache_path", "choose_loader", "crop_loaders", "flip_batch", "load_prepared", "prepare",
           "process_shard", "read_meta", "resolve", "source_options", "translate_batch"]

"""Measurement: the time-to-accuracy clock, FLOP counting and MFU, multi-seed statistics."""

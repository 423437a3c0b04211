"""Speedup techniques: each a pure function anyone can call, plus a thin hook for the trainer."""

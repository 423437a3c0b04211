"""The rich consoles the commands print through, and the small formatters they share.

Text that comes from the user or the store (recipe names such as ``fashion-mnist[baseline]``, paths,
error messages) goes through ``rich.markup.escape`` before a console reads it as markup: rich would
take ``[baseline]`` for a style tag and drop it.
"""
from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

__all__ = ["escape", "new_console", "percent", "plural"]

PIPE_WIDTH = 200  # columns allowed when printing into a pipe or a file


def new_console(*, stderr: bool = False, highlight: bool = True) -> Console:
    """A console that never wraps lines (scripts and tests read them too).

    Into a pipe or a file rich assumes 80 columns and squeezes a wide table into cells one word wide
    (``speedrun ablate ... | tee log``); there it allows :data:`PIPE_WIDTH` columns instead, unless
    ``COLUMNS`` sets the width. A table still takes only the width its content needs.
    """
    out = Console(stderr=stderr, soft_wrap=True, highlight=highlight)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = PIPE_WIDTH
    return out


def percent(fraction: float) -> str:
    """A fraction as a percentage with the precision it was given: 0.92 -> "92%", 0.759 -> "75.9%"."""
    return f"{round(fraction * 100, 6):g}%"


def plural(n: int, word: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {word}{'' if n == 1 else 's'}"

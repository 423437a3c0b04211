"""The rich consoles the commands print through."""
from __future__ import annotations

import os

from rich.console import Console

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

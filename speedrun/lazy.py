"""Package attributes imported on first use (PEP 562).

The public names of ``speedrun``, ``speedrun.train`` and ``speedrun.data`` live in modules that import
torch (~2 s); loading them on first use lets ``speedrun runs``, ``recipes`` and ``--help`` start
without it.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Mapping


def lazy_attributes(package: str, sources: Mapping[str, Iterable[str]]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, importing each name from its submodule on first use.

    ``sources`` maps a submodule, relative to ``package``, to the names it defines. Example, in a
    package's ``__init__.py``::

        __getattr__, __dir__ = lazy_attributes(__name__, {"loader": ("ResidentLoader",)})
    """
    where = {name: module for module, names in sources.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # Not cached in the package: a name monkeypatched in its submodule must not stick here.
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__

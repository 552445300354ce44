"""The registry: every implementation of `attnkit.attention`, one file each.

Adding a backend is adding its file and one line to `_MODULES`.
"""

from __future__ import annotations

import importlib

from attnkit.backends.base import Backend, Result

__all__ = ["BACKENDS", "Backend", "Result", "get"]

_MODULES = (
    "reference",
)

BACKENDS: dict[str, Backend] = {
    name: importlib.import_module(f"attnkit.backends.{name}").BACKEND for name in _MODULES
}


def get(name: str) -> Backend:
    """The backend called `name`; ValueError listing the known names otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"impl={name!r} is not a known implementation; known: auto, {', '.join(BACKENDS)}"
        ) from None

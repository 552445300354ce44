"""The registry: every implementation of `attnkit.attention`, one file each.

Adding a backend is adding its file and one line to `_MODULES`. A module defines
`BACKEND`, or `BACKENDS` (a list) when it is a family of backends sharing one code path
(sdpa and its pinned kernels).
"""

from __future__ import annotations

import importlib

from attnkit.backends.base import Backend, Result

__all__ = ["BACKENDS", "Backend", "Result", "get"]

_MODULES = (
    "reference",
    "fused_triton",
    "naive",
    "einsum",
    "chunked",
    "sdpa",
    "flex",
)

def _load(module_name: str) -> list[Backend]:
    module = importlib.import_module(f"attnkit.backends.{module_name}")
    return list(getattr(module, "BACKENDS", None) or [module.BACKEND])


# Keyed by each Backend's own name, which may differ from its module's (fused_triton
# is "triton": a module called triton would shadow the triton package).
BACKENDS: dict[str, Backend] = {
    backend.name: backend for m in _MODULES for backend in _load(m)
}


def get(name: str) -> Backend:
    """The backend called `name`; ValueError listing the known names otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"impl={name!r} is not a known implementation; known: auto, {', '.join(BACKENDS)}"
        ) from None

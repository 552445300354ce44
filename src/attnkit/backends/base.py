"""What every backend file declares: a name, what it supports, and how to run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.call import AttentionCall

__all__ = ["Backend", "Result", "always_available", "cuda_only"]

# (output (B, Hq, Sq, Dv) in the input dtype, log-sum-exp (B, Hq, Sq) float32 or None)
Result = tuple[Tensor, Tensor | None]


@dataclass(frozen=True)
class Backend:
    """One implementation of `attnkit.attention`.

    available(device) -> None, or why this backend cannot run on that device at all.
    supports(call)    -> None, or why it cannot run this particular call.
    run(call)         -> (out, lse); lse may be None unless call.return_lse.
    details(device)   -> None, or a line for `attnkit info` on what it does on that
                         device beyond its summary (e.g. a kernel switched off there).
    leads(call)       -> True where this backend was measured faster on the call than
                         the backends before it in impl="auto"'s device order, which
                         then tries it first. Cheap: it runs for every auto call.
    """

    name: str
    summary: str
    available: Callable[[torch.device], str | None]
    supports: Callable[[AttentionCall], str | None]
    run: Callable[[AttentionCall], Result]
    details: Callable[[torch.device], str | None] = lambda device: None
    leads: Callable[[AttentionCall], bool] = lambda call: False


def always_available(device: torch.device) -> str | None:
    return None


def cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else f"needs a CUDA device, got {device.type}"

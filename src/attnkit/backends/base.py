"""What every backend file declares: a name, what it supports, and how to run."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from attnkit.call import AttentionCall, UnsupportedError

__all__ = ["FULLY_DIFFERENTIABLE", "GRID_ROWS", "NO_FORWARD_AD", "Backend", "Result",
           "always_available", "cuda_only", "forbid_second_derivative", "in_batch_pieces",
           "raise_recompile_limits"]

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


# CUDA launches at most this many blocks along a grid's second and third dimensions, where
# Triton kernels (ours, and inductor's for FlexAttention) lay batch or (batch, head) rows.
GRID_ROWS = 65535


# The implementations written in plain torch ops, which autograd differentiates every way:
# a second time (create_graph=True), and in forward mode (jvp).
FULLY_DIFFERENTIABLE = ("reference", "naive", "einsum", "sdpa_math")
NO_FORWARD_AD = (f"computes no forward-mode derivative (torch.func.jvp, forward_ad tangents on "
                 f"q, k or v); these do: {', '.join(FULLY_DIFFERENTIABLE)}")


def forbid_second_derivative(name: str) -> None:
    """Raises inside backend `name`'s backward when autograd records it for a second
    derivative (create_graph=True turns grad mode on there). Its kernels cannot be
    differentiated, and a second derivative would silently leave their part out: None,
    or only the other terms' share where a loss also reaches the inputs another way."""
    if torch.is_grad_enabled():
        raise UnsupportedError(
            f"{name}'s backward cannot be differentiated again (create_graph=True, e.g. a "
            f"gradient penalty or a Hessian product); these can: "
            f"{', '.join(FULLY_DIFFERENTIABLE)}")


def in_batch_pieces(call: AttentionCall, per_piece: int,
                    run: Callable[[AttentionCall], Result]) -> Result:
    """run over pieces of per_piece batch elements (views of the call's tensors; its key
    lengths, and a mask that is not broadcast over the batch, cut along with them),
    joined along the batch: out (B, Hq, Sq, Dv) as a view of a (B, Sq, Hq, Dv) tensor,
    lse (B, Hq, Sq) or None."""
    def pieces(t: Tensor | None):
        return t.split(per_piece) if t is not None and t.shape[0] > 1 else itertools.repeat(t)

    outs, lses = [], []
    for q, k, v, lengths, mask in zip(call.q.split(per_piece), pieces(call.k), pieces(call.v),
                                      pieces(call.key_lengths), pieces(call.attn_mask),
                                      strict=False):  # q's pieces end it; repeats do not
        out, lse = run(replace(call, q=q, k=k, v=v, key_lengths=lengths, attn_mask=mask))
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    lse = None if any(piece is None for piece in lses) else torch.cat(lses)
    return torch.cat(outs).transpose(1, 2), lse


def raise_recompile_limits(per_function: int, accumulated: int) -> None:
    """Raises dynamo's recompile limits to at least these (never lowers them). Older torch
    (2.5) calls them cache_size_limit and accumulated_cache_size_limit."""
    config = torch._dynamo.config
    for name, old_name, limit in (
        ("recompile_limit", "cache_size_limit", per_function),
        ("accumulated_recompile_limit", "accumulated_cache_size_limit", accumulated),
    ):
        name = name if hasattr(config, name) else old_name
        setattr(config, name, max(getattr(config, name), limit))

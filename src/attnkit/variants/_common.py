"""What every variant shares: input checks, the causal mask past context_length, masks.

Masks follow the functional contract (`attnkit.attention`): `attn_mask` is bool
(True = may attend) or floating (added to the scaled scores), broadcastable to
(B, H, S, S). A query row that can see no key gets zeros, never NaN.

context_length: the notebook's classes keep a (context_length, context_length) `mask`
buffer and slice it, so they break (or silently mis-mask) past context_length. Here the
buffer stays (same name, dtype and shape, so the notebook's state dicts load strictly) and
is sliced while it covers the sequence; a longer sequence gets a causal mask built for its
actual length. Every variant therefore accepts any length, like `MultiHeadAttention`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.call import checked_mask
from attnkit.masks import masked_softmax

__all__ = [
    "additive_mask",
    "attend_mask",
    "causal_buffer",
    "check_heads",
    "check_input",
    "check_mask",
    "future_mask",
    "hide",
    "init_like_linear_",
    "softmax",
]


def check_heads(d_out: int, num_heads: int) -> int:
    """head_dim = d_out // num_heads; ValueError unless it divides evenly."""
    if num_heads <= 0 or d_out % num_heads:
        raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
    return d_out // num_heads


def causal_buffer(context_length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The notebook's buffer: (context_length, context_length), 1/True above the diagonal."""
    return torch.triu(torch.ones(context_length, context_length), diagonal=1).to(dtype)


def future_mask(buffer: Tensor | None, s: int, device: torch.device) -> Tensor:
    """Bool (S, S), True where key j lies in the future of query i (j > i).

    Slices `buffer` (the notebook's `mask`) when it covers S; builds the mask for the
    actual length otherwise, so that no variant breaks past context_length.
    """
    if buffer is not None and buffer.shape[-1] >= s:
        return buffer[:s, :s].bool()
    return torch.ones(s, s, dtype=torch.bool, device=device).triu(1)


def check_input(x: Tensor, d_in: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != d_in:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, S, d_in={d_in}), got {shape}")


def check_mask(attn_mask: Tensor | None, b: int, h: int, s: int) -> Tensor | None:
    """attn_mask reshaped to 4-D, or ValueError/TypeError when it cannot broadcast."""
    if attn_mask is None:
        return None
    return checked_mask(attn_mask, (b, h, s, s), "(B, H, S, S)")


def hide(scores: Tensor, future: Tensor | None, attn_mask: Tensor | None) -> Tensor:
    """Scaled scores (..., S, S) with hidden keys at -inf and a floating mask added."""
    if future is not None:
        scores = scores.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def additive_mask(
    future: Tensor | None, attn_mask: Tensor | None, dtype: torch.dtype
) -> Tensor | None:
    """One additive mask (B|1, H|1, S, S) in `dtype`: -inf where hidden, plus the float mask."""
    if future is None and attn_mask is None:
        return None
    if attn_mask is None:
        mask = torch.zeros(future.shape, dtype=dtype, device=future.device)
    elif attn_mask.dtype == torch.bool:
        mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        mask = mask.masked_fill(~attn_mask, float("-inf"))
    else:
        mask = attn_mask.to(dtype)
    return mask if future is None else mask.masked_fill(future, float("-inf"))


def attend_mask(future: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """The mask in SDPA's convention (bool True = may attend, or additive), causal merged in.

    Stays bool when the user mask is bool (or absent), so SDPA can keep its bool path.
    """
    if future is None:
        return attn_mask
    if attn_mask is None:
        return ~future
    if attn_mask.dtype == torch.bool:
        return attn_mask & ~future
    return attn_mask.masked_fill(future, float("-inf"))


def softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim; a row that sees no key gets zeros (torch.softmax: NaN)."""
    return masked_softmax(scores)[0]


def init_like_linear_(weight_in_out: Tensor, bias: Tensor | None) -> None:
    """Initialize a raw (d_in, d_out) matrix (and bias) as nn.Linear(d_in, d_out) would."""
    # Kaiming on the (d_out, d_in) view gives fan_in = d_in, the nn.Linear convention.
    nn.init.kaiming_uniform_(weight_in_out.T, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight_in_out.shape[0])
        nn.init.uniform_(bias, -bound, bound)

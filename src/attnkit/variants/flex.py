"""FlexAttention, compiled (the notebook ran it uncompiled: 13.9 ms against SDPA's 1.1 ms).

Causality is a block mask (built once per length and device, and cached: building one is
slow); a user `attn_mask` enters through `score_mod`. Limits of FlexAttention itself, raised
as attnkit.UnsupportedError at forward: no dropout, no backward on the CPU (run under
torch.no_grad() there), head dims of at least 32 on the CPU, and what the `flex` backend
needs (CPU or CUDA, torch >= 2.9, a C++ compiler on the CPU).
The first call per shape compiles (~10-30 s on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnkit.backends import flex as flex_backend
from attnkit.backends.base import NO_FORWARD_AD
from attnkit.call import UnsupportedError, carries_tangents
from attnkit.variants._common import check_heads, check_input, check_mask

__all__ = ["FlexAttention"]

_compiled: Callable[..., Tensor] | None = None


def _flex() -> Callable[..., Tensor]:
    """torch.compile(flex_attention), compiled once per process on first use."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


class FlexAttention(nn.Module):
    """`qkv` -> compiled flex_attention -> `proj` (the notebook's names)."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        self.head_dim = check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads, self.causal = d_in, d_out, num_heads, causal
        self.context_length = context_length
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout
        # A BlockMask is not a tensor, so it cannot be a buffer: cache by (S, device).
        self._block_masks: dict[tuple[int, torch.device], object] = {}

    def _block_mask(self, s: int, device: torch.device) -> object:
        from torch.nn.attention.flex_attention import create_block_mask

        key = (s, device)
        if key not in self._block_masks:
            self._block_masks[key] = create_block_mask(_causal, None, None, s, s, device=device)
        return self._block_masks[key]

    def _check_runnable(self, x: Tensor) -> None:
        # The flex backend's word on the device and on this torch (version, C++ compiler)
        missing = flex_backend.available(x.device)
        if missing:
            raise UnsupportedError(missing)
        if self.training and self.dropout:
            raise UnsupportedError(
                f"FlexAttention has no dropout; got dropout={self.dropout} in training mode"
            )
        if x.device.type == "cpu" and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            raise UnsupportedError(
                "FlexAttention has no backward on the CPU: run this variant under "
                "torch.no_grad() / torch.inference_mode(), or on CUDA"
            )

        empty = flex_backend.empty_refusal(x.shape[1], x.shape[1])
        if empty:
            raise UnsupportedError(empty)
        if x.device.type == "cpu" and self.head_dim < flex_backend.CPU_MIN_HEAD_DIM:
            raise UnsupportedError(
                f"compiled FlexAttention on a CPU computes wrong results for head dims below "
                f"{flex_backend.CPU_MIN_HEAD_DIM}, got {self.head_dim}"
            )

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        b, s, _ = x.shape
        h = self.num_heads
        mask = check_mask(attn_mask, b, h, s)
        self._check_runnable(x)
        qkv = self.qkv(x).view(b, s, 3, h, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, D)
        if carries_tangents(q, k, v):  # from x or the weights; compiled FlexAttention drops them
            raise UnsupportedError(f"FlexAttention {NO_FORWARD_AD}")
        score_mod = None
        if mask is not None:
            # A stride-0 expand: score_mod indexes it with (b, h, q, kv), no copy is made.
            full = mask.expand(b, h, s, s)
            if full.dtype == torch.bool:
                def score_mod(score: Tensor, bi: Tensor, hi: Tensor, qi: Tensor,
                              ki: Tensor) -> Tensor:
                    return torch.where(full[bi, hi, qi, ki], score, float("-inf"))
            else:
                def score_mod(score: Tensor, bi: Tensor, hi: Tensor, qi: Tensor,
                              ki: Tensor) -> Tensor:
                    return score + full[bi, hi, qi, ki]
        block_mask = self._block_mask(s, x.device) if self.causal else None
        out = _flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)  # (B, H, S, D)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.d_out))

"""The notebook's modules around `torch.nn.functional.scaled_dot_product_attention`.

Both keep the notebook's `qkv` + `proj` (and `mask` for the explicit-mask form) and, unlike
the notebook's first version, apply `proj`. The notebook's explicit-mask form also passed its
"hide" triangle (True above the diagonal) as SDPA's "may attend" mask; here it is inverted.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.variants._common import (
    attend_mask,
    causal_buffer,
    check_heads,
    check_input,
    check_mask,
    future_mask,
)

__all__ = ["SDPA", "SDPAExplicitMask"]


class SDPA(nn.Module):
    """`qkv` -> SDPA(is_causal=causal) -> `proj`; no mask buffer (the notebook has none).

    SDPA refuses is_causal together with attn_mask, so with a user mask the causal triangle
    is merged into it and SDPA runs with is_causal=False.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        self.head_dim = check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads, self.causal = d_in, d_out, num_heads, causal
        self.context_length = context_length
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def _mask(self, attn_mask: Tensor | None, s: int, x: Tensor) -> tuple[Tensor | None, bool]:
        """(attn_mask for SDPA, is_causal)."""
        if attn_mask is None:
            return None, self.causal
        future = future_mask(None, s, x.device) if self.causal else None
        return attend_mask(future, attn_mask), False

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        b, s, _ = x.shape
        mask = check_mask(attn_mask, b, self.num_heads, s)
        qkv = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, D)
        mask, is_causal = self._mask(mask, s, x)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, S, D)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.d_out))


class SDPAExplicitMask(SDPA):
    """SDPA given the causal mask explicitly (which keeps it off the flash kernels).

    Has the notebook's bool `mask` buffer (True = hidden future key); it is sliced while it
    covers S and rebuilt for the actual length past context_length.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias,
                         causal=causal)
        self.register_buffer("mask", causal_buffer(context_length).bool())

    def _mask(self, attn_mask: Tensor | None, s: int, x: Tensor) -> tuple[Tensor | None, bool]:
        future = future_mask(self.mask, s, x.device) if self.causal else None
        return attend_mask(future, attn_mask), False

"""`torch.nn.MultiheadAttention` in the variants' interface, with and without need_weights.

Unlike the notebook's class: `qkv_bias` maps to `bias=` (the notebook passed it as
`add_bias_kv`, which appends learned key/value *tokens*), and there is no second projection
after the class's own `out_proj`. Consequences of using torch's class as it is:
- `bias` switches the input and the output projection biases together, so with
  qkv_bias=False this variant has no output bias (`attnkit.weights.convert` refuses to drop
  a nonzero one).
- its queries are x itself, so it needs d_in == d_out (ValueError otherwise).
- with need_weights=True a query row that sees no key comes out NaN (torch's softmax);
  with need_weights=False torch routes to SDPA, which gives zeros like the other variants.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnkit.variants._common import (
    additive_mask,
    causal_buffer,
    check_heads,
    check_input,
    check_mask,
    future_mask,
)

__all__ = ["TorchMHA", "TorchMHANoWeights"]


class TorchMHA(nn.Module):
    """`multihead_attn` = nn.MultiheadAttention(batch_first=True), called with need_weights.

    Keeps the notebook's bool `mask` buffer (True = hidden future key); past context_length
    the mask is built for the actual length.
    """

    need_weights = True

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        check_heads(d_out, num_heads)
        if d_in != d_out:
            raise ValueError(
                f"{type(self).__name__} needs d_in == d_out (torch.nn.MultiheadAttention "
                f"projects x of width embed_dim), got d_in={d_in}, d_out={d_out}"
            )
        self.d_in, self.d_out, self.num_heads, self.causal = d_in, d_out, num_heads, causal
        self.multihead_attn = nn.MultiheadAttention(
            embed_dim=d_out, num_heads=num_heads, dropout=dropout, bias=qkv_bias,
            batch_first=True,
        )
        self.register_buffer("mask", causal_buffer(context_length).bool())

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        b, s, _ = x.shape
        h = self.num_heads
        mask = check_mask(attn_mask, b, h, s)
        future = future_mask(self.mask, s, x.device) if self.causal else None
        # torch's class reads a bool mask as True = hidden (the opposite of SDPA) and takes
        # only (S, S) or (B*H, S, S): hand it one additive mask in that shape.
        mask = additive_mask(future, mask, x.dtype)
        if mask is not None and mask.dim() == 4:
            mask = mask.expand(b, h, s, s).reshape(b * h, s, s)
        out, _ = self.multihead_attn(x, x, x, attn_mask=mask, need_weights=self.need_weights)
        return out


class TorchMHANoWeights(TorchMHA):
    """The same with need_weights=False, which lets torch run SDPA inside."""

    need_weights = False

"""The ttnn tutorial's BERT-style attention, in torch: the six-op form and its fused form.

The tutorial multiplies by raw (d_in, d_out) weights (`hidden_states @ query_weight`), so
these forms keep raw matrices with the tutorial's names. It has no causal mask; here
`causal=True` (the variants' default) adds one to the additive mask, and a bool
`attn_mask` is turned into an additive one, so both forms add one mask as the tutorial does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.variants._common import (
    additive_mask,
    check_heads,
    check_input,
    check_mask,
    future_mask,
    init_like_linear_,
    softmax,
)

__all__ = ["TTNNFused", "TTNNSixOp", "attention_softmax"]


def _raw_linear(d_in: int, d_out: int, bias: bool) -> tuple[nn.Parameter, nn.Parameter | None]:
    w = nn.Parameter(torch.empty(d_in, d_out))
    b = nn.Parameter(torch.empty(d_out)) if bias else None
    init_like_linear_(w.data, None if b is None else b.data)
    return w, b


class TTNNSixOp(nn.Module):
    """Attention from six primitives: matmul, add, reshape, permute, mul, softmax.

    Parameters: `query_weight/key_weight/value_weight` (d_in, d_out) with `*_bias` (d_out,)
    (None without qkv_bias), `output_weight` (d_out, d_out), `output_bias` (d_out,).
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        self.head_dim = check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads, self.causal = d_in, d_out, num_heads, causal
        self.context_length = context_length
        self.query_weight, self.query_bias = _raw_linear(d_in, d_out, qkv_bias)
        self.key_weight, self.key_bias = _raw_linear(d_in, d_out, qkv_bias)
        self.value_weight, self.value_bias = _raw_linear(d_in, d_out, qkv_bias)
        self.output_weight, self.output_bias = _raw_linear(d_out, d_out, True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        b, s, _ = x.shape
        h, d = self.num_heads, self.head_dim
        future = future_mask(None, s, x.device) if self.causal else None
        mask = additive_mask(future, check_mask(attn_mask, b, h, s), x.dtype)

        query = x @ self.query_weight
        if self.query_bias is not None:
            query = query + self.query_bias
        query = torch.permute(torch.reshape(query, (b, s, h, d)), (0, 2, 1, 3))  # (B, H, S, D)
        key = x @ self.key_weight
        if self.key_bias is not None:
            key = key + self.key_bias
        key = torch.permute(torch.reshape(key, (b, s, h, d)), (0, 2, 3, 1))  # (B, H, D, S)
        value = x @ self.value_weight
        if self.value_bias is not None:
            value = value + self.value_bias
        value = torch.permute(torch.reshape(value, (b, s, h, d)), (0, 2, 1, 3))  # (B, H, S, D)

        scores = torch.mul(query @ key, 1 / d**0.5)  # (B, H, S, S)
        if mask is not None:
            scores = scores + mask
        probs = self.dropout(softmax(scores))  # the tutorial's softmax, zeros for empty rows
        context = torch.permute(probs @ value, (0, 2, 1, 3))  # (B, S, H, D)
        context = torch.reshape(context, (b, s, self.d_out))
        return context @ self.output_weight + self.output_bias


def attention_softmax(scores: Tensor, attention_mask: Tensor | None, head_size: int) -> Tensor:
    """softmax(scores / sqrt(head_size) + mask): ttnn.transformer.attention_softmax_ in torch.

    One call in the fused form, as in the tutorial, where the device fuses it into one op.
    """
    scores = scores * head_size**-0.5
    if attention_mask is not None:
        scores = scores + attention_mask
    return softmax(scores)


class TTNNFused(nn.Module):
    """The tutorial's optimized form: one fused QKV weight, fused split-heads,
    fused scale+mask+softmax, fused concatenate-heads.

    Parameters: `qkv_weight` (d_in, 3*d_out) = [query | key | value] weights concatenated
    on the output axis (the tutorial's preprocessing, done once, at load time: see
    `attnkit.weights.convert`), `qkv_bias` (3*d_out,) or None, `output_weight`,
    `output_bias`.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        self.head_dim = check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads, self.causal = d_in, d_out, num_heads, causal
        self.context_length = context_length
        parts = [_raw_linear(d_in, d_out, qkv_bias) for _ in range(3)]
        self.qkv_weight = nn.Parameter(torch.cat([w.data for w, _ in parts], dim=-1))
        self.qkv_bias = (
            nn.Parameter(torch.cat([bb.data for _, bb in parts], dim=-1)) if qkv_bias else None
        )
        self.output_weight, self.output_bias = _raw_linear(d_out, d_out, True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        b, s, _ = x.shape
        h, d = self.num_heads, self.head_dim
        future = future_mask(None, s, x.device) if self.causal else None
        mask = additive_mask(future, check_mask(attn_mask, b, h, s), x.dtype)

        # Fused linear: the bias is added inside the matmul (addmm), as ttnn.linear does.
        x2 = x.reshape(b * s, self.d_in)
        if self.qkv_bias is None:
            fused = x2 @ self.qkv_weight
        else:
            fused = torch.addmm(self.qkv_bias, x2, self.qkv_weight)  # (B*S, 3*d_out)
        # Fused split-heads: one view + permute; keys come out pre-transposed, as in ttnn.
        fused = fused.view(b, s, 3, h, d)
        query = fused[:, :, 0].permute(0, 2, 1, 3)  # (B, H, S, D)
        key = fused[:, :, 1].permute(0, 2, 3, 1)  # (B, H, D, S)
        value = fused[:, :, 2].permute(0, 2, 1, 3)  # (B, H, S, D)

        probs = self.dropout(attention_softmax(query @ key, mask, d))  # (B, H, S, S)
        context = (probs @ value).permute(0, 2, 1, 3).reshape(b * s, self.d_out)  # concat heads
        return torch.addmm(self.output_bias, context, self.output_weight).view(b, s, self.d_out)

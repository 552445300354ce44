"""The notebook's matmul + softmax modules: per-head wrapper, batched, combined QKV, einsum.

Parameter and buffer names are the notebook's (rasbt LLMs-from-scratch, ch03
mha-implementations), so its state dicts load with strict=True. Differences on purpose:
the scale is always multiplied by D**-0.5, `causal=False` is supported, `attn_mask` is
accepted, sequences past context_length work (see `_common`), and rows that see no key
give zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.variants._common import (
    causal_buffer,
    check_heads,
    check_input,
    check_mask,
    future_mask,
    hide,
    init_like_linear_,
    softmax,
)

__all__ = ["CausalHead", "CombinedQKV", "Einsum", "HeadWrapper", "SeparateQKV"]


class CausalHead(nn.Module):
    """One head of width head_dim (the notebook's `CausalAttention`): x (B, S, d_in) ->
    (B, S, head_dim). `attn_mask` here is already this head's slice, (B|1, 1, S|1, S)."""

    def __init__(self, d_in: int, head_dim: int, context_length: int, dropout: float,
                 qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.W_query = nn.Linear(d_in, head_dim, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, head_dim, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_buffer(context_length))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        s = x.shape[1]
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)  # (B, S, Dh)
        scores = (q @ k.transpose(1, 2)) * k.shape[-1] ** -0.5  # (B, S, S)
        future = future_mask(self.mask, s, x.device) if self.causal else None
        mask = None if attn_mask is None else attn_mask[:, 0]  # (B|1, S|1, S)
        weights = self.dropout(softmax(hide(scores, future, mask)))
        return weights @ v  # (B, S, Dh)


class HeadWrapper(nn.Module):
    """A list of single heads run one after another, concatenated, then `out_proj`.

    The notebook builds this with d_out = one head's width and out_proj of d_out*num_heads;
    here d_out is the total and each head is d_out // num_heads wide: the shapes agree.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        head_dim = check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads = d_in, d_out, num_heads
        self.heads = nn.ModuleList(
            CausalHead(d_in, head_dim, context_length, dropout, qkv_bias, causal=causal)
            for _ in range(num_heads)
        )
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        mask = check_mask(attn_mask, x.shape[0], self.num_heads, x.shape[1])
        outs = []
        for i, head in enumerate(self.heads):
            # Head i's slice of the mask, keeping the head axis: (B|1, 1, S|1, S).
            head_mask = None if mask is None else mask[:, i:i + 1] if mask.shape[1] > 1 else mask
            outs.append(head(x, head_mask))  # (B, S, head_dim)
        return self.out_proj(torch.cat(outs, dim=-1))


class SeparateQKV(nn.Module):
    """Batched heads with separate `W_query`, `W_key`, `W_value` (the chapter-3 class)."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        self.head_dim = check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads, self.causal = d_in, d_out, num_heads, causal
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_buffer(context_length))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        b, s, _ = x.shape
        h, d = self.num_heads, self.head_dim
        mask = check_mask(attn_mask, b, h, s)
        q = self.W_query(x).view(b, s, h, d).transpose(1, 2)  # (B, H, S, D)
        k = self.W_key(x).view(b, s, h, d).transpose(1, 2)
        v = self.W_value(x).view(b, s, h, d).transpose(1, 2)
        scores = (q @ k.transpose(2, 3)) * d**-0.5  # (B, H, S, S)
        future = future_mask(self.mask, s, x.device) if self.causal else None
        weights = self.dropout(softmax(hide(scores, future, mask)))
        out = (weights @ v).transpose(1, 2).reshape(b, s, self.d_out)  # (B, S, H*D)
        return self.out_proj(out)


class CombinedQKV(nn.Module):
    """One `qkv` Linear (d_in -> 3*d_out, rows [q heads | k heads | v heads]) and `proj`.

    The notebook's version divided the scores by D**-0.5 (i.e. multiplied by sqrt(D));
    here they are multiplied by D**-0.5 like everywhere else.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        self.head_dim = check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads, self.causal = d_in, d_out, num_heads, causal
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_buffer(context_length))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        b, s, _ = x.shape
        mask = check_mask(attn_mask, b, self.num_heads, s)
        qkv = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, S, S)
        future = future_mask(self.mask, s, x.device) if self.causal else None
        weights = self.dropout(softmax(hide(scores, future, mask)))
        out = (weights @ v).transpose(1, 2).reshape(b, s, self.d_out)
        return self.proj(out)


class Einsum(nn.Module):
    """Raw (d_in, d_out) matrices `W_query/W_key/W_value` and `bias_q/k/v`, all in einsum.

    The notebook declares its matrices as (d_out, d_in) but multiplies them as (d_in, d_out),
    which only runs when d_in == d_out; here they are (d_in, d_out), so the notebook's state
    dicts (which exist only for d_in == d_out) load strictly and d_in != d_out works too.
    Biases are registered as None without qkv_bias, as in the notebook.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False, *, causal: bool = True) -> None:
        super().__init__()
        self.head_dim = check_heads(d_out, num_heads)
        self.d_in, self.d_out, self.num_heads, self.causal = d_in, d_out, num_heads, causal
        self.W_query = nn.Parameter(torch.empty(d_in, d_out))
        self.W_key = nn.Parameter(torch.empty(d_in, d_out))
        self.W_value = nn.Parameter(torch.empty(d_in, d_out))
        for name in ("bias_q", "bias_k", "bias_v"):
            if qkv_bias:
                self.register_parameter(name, nn.Parameter(torch.empty(d_out)))
            else:
                self.register_parameter(name, None)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", causal_buffer(context_length))
        for w, bias in ((self.W_query, self.bias_q), (self.W_key, self.bias_k),
                        (self.W_value, self.bias_v)):
            init_like_linear_(w.data, None if bias is None else bias.data)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out)."""
        check_input(x, self.d_in)
        b, s, _ = x.shape
        h, d = self.num_heads, self.head_dim
        mask = check_mask(attn_mask, b, h, s)
        q = torch.einsum("bsi,io->bso", x, self.W_query)
        k = torch.einsum("bsi,io->bso", x, self.W_key)
        v = torch.einsum("bsi,io->bso", x, self.W_value)
        if self.bias_q is not None:
            q, k, v = q + self.bias_q, k + self.bias_k, v + self.bias_v
        q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * d**-0.5
        future = future_mask(self.mask, s, x.device) if self.causal else None
        weights = self.dropout(softmax(hide(scores, future, mask)))
        out = torch.einsum("bhqk,bhkd->bhqd", weights, v)  # (B, H, S, D)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, self.d_out))

"""`attnkit.MultiHeadAttention`: the module users put in their models, and its `KVCache`.

Data flows one way: x -> one fused QKV projection -> `attnkit.attention` -> output
projection. The QKV output is split into q, k, v by views (no copies), so the backend
picked by `impl` sees strided tensors straight from the matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.functional import attention, autocasting

__all__ = ["KVCache", "MultiHeadAttention"]


class KVCache(nn.Module):
    """Preallocated keys and values for incremental decoding (gpt-fast style).

    Buffers `k`, `v`: (B, Hkv, max_len, D); `length` counts the positions filled so far.
    `append` writes new keys/values after the filled part and returns views of everything
    filled, which the attention call then reads with bottom-right causal alignment (one new
    query sees the whole cache).

    The buffers are written in place, so the cache is meant for inference (`torch.no_grad()`
    or `torch.inference_mode()`); backpropagating through two appends fails in autograd's
    in-place check.

    Keys and values must come in the cache's dtype, except under `torch.autocast`, where
    `attention` casts the cached ones to autocast's dtype each step (a cache made in that
    dtype spares the cast).

    Under `torch.compile`, `length` is an int attribute of a module, which dynamo holds
    static: a compiled decoding loop compiles again for each new length, and runs eagerly
    once `torch._dynamo.config.recompile_limit` is reached. With
    `torch._dynamo.config.allow_unspec_int_on_nn_module = True` (torch 2.7 on; 2.5 has no
    such setting) it traces the length as a dynamic size and compiles twice in all.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("max_len", max_len), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache {name} must be a positive int, got {value!r}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        # Not persistent: a cache is run state, not a weight; it must not enter state dicts.
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused, not cleared)."""
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, S_new, D) after the filled part.

        Returns views (B, Hkv, length, D) of all keys and values filled so far.
        """
        b, hkv, _, d = self.k.shape
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, hkv, d) or (
                t.shape[2] != k.shape[2]
            ):
                raise ValueError(
                    f"KVCache.append: {name} must have shape (B, Hkv, S_new, D) = "
                    f"({b}, {hkv}, S_new, {d}) to match the cache {tuple(self.k.shape)}, "
                    f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
                )
        if k.device != self.k.device:
            raise ValueError(f"KVCache is on {self.k.device}, got k on {k.device}: make it on "
                             f"the module's device (MultiHeadAttention.make_kv_cache)")
        if k.dtype != self.k.dtype and autocasting(k) is None:
            # Written in, the keys would be rounded to the cache's dtype and then meet
            # queries of another: under autocast both are cast to one dtype, else not.
            raise TypeError(
                f"KVCache holds {self.k.dtype}, got k {k.dtype}: make the cache in the dtype "
                f"the keys come in (MultiHeadAttention.make_kv_cache without dtype), or "
                f"decode under torch.autocast")
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache is full: {self.length} positions filled + {k.shape[2]} new > "
                f"max_len {self.max_len}"
            )
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadAttention(nn.Module):
    """Multi-head (grouped-query when num_kv_heads < num_heads) self-attention.

    Parameters: `qkv` = Linear(d_in, (Hq + 2*Hkv) * D), its output rows ordered as
    [Hq query heads | Hkv key heads | Hkv value heads], each head D = d_out // Hq wide;
    `out_proj` = Linear(d_out, d_out).

    `dropout` is applied to the attention weights in training mode only.
    `impl` is passed to `attnkit.attention` ("auto" picks the fastest that can run).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        causal: bool = True,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("d_in", d_in), ("d_out", d_out), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.d_in, self.d_out = d_in, d_out
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_out // num_heads
        self.causal, self.dropout, self.impl = causal, dropout, impl
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(
            d_in, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias, **factory
        )
        self.out_proj = nn.Linear(d_out, d_out, bias=out_bias, **factory)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}, dropout={self.dropout}, "
            f"impl={self.impl!r}"
        )

    def make_kv_cache(self, batch_size: int, max_len: int,
                      dtype: torch.dtype | None = None) -> KVCache:
        """An empty KVCache sized for this module, on its device, in `dtype` (default: the
        module's). Decoding under torch.autocast, give autocast's dtype: a cache in the
        module's float32 works too, but each step then casts all of it."""
        w = self.qkv.weight
        return KVCache(batch_size, self.num_kv_heads, max_len, self.head_dim,
                       device=w.device, dtype=dtype or w.dtype)

    def forward(
        self,
        x: Tensor,
        *,
        key_lengths: Tensor | None = None,
        attn_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, S, d_in) -> (B, S, d_out).

        key_lengths: int (B,); attn_mask: bool (True = may attend) or additive, broadcastable
        to (B, Hq, S, Skv), as in `attnkit.attention`. With `kv_cache`, the new keys/values
        are appended first and Skv = the cache length after appending; causal masking is
        aligned to the bottom right, so token t of x sees every cached position before it.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, S, d_in={self.d_in}), got {shape}")
        b, s, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # One transpose and one split, all views: no copy before the backend, and few
        # Python steps (at small sizes the host time of this path is what a GPU waits on).
        heads = self.qkv(x).view(b, s, hq + 2 * hkv, d).transpose(1, 2)
        q, k, v = heads.split((hq, hkv, hkv), dim=1)  # (B, Hq|Hkv|Hkv, S, D)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, Hkv, Skv, D)
        out = attention(
            q, k, v,
            causal=self.causal,
            key_lengths=key_lengths,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            impl=self.impl,
        )  # (B, Hq, S, D)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, self.d_out))

"""The validated description of one `attention()` call, shared by every backend.

`make_call` checks the arguments once, so that no backend has to; a backend reads the
fields of `AttentionCall` and never re-validates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd import forward_ad

__all__ = ["AttentionCall", "UnsupportedError", "carries_tangents", "checked_mask",
           "make_call"]


class UnsupportedError(RuntimeError):
    """No implementation (or not the one asked for) can run this call; the message says why."""


@dataclass(frozen=True)
class AttentionCall:
    """One attention problem, validated.

    q: (B, Hq, Sq, D); k: (B, Hkv, Skv, D); v: (B, Hkv, Skv, Dv); Hq % Hkv == 0.
    key_lengths: int64 (B,) or None. attn_mask: bool or floating, 4-D and broadcastable
    to (B, Hq, Sq, Skv), or None. window: (left, right), each None for unbounded.
    memo: what a backend worked out about this call in `supports` and reuses in `run`
    (SDPA's plan and mask), so that it lives exactly as long as the call; never copied
    by dataclasses.replace, whose new call starts with an empty one. An attribute, not a
    field: dynamo before torch 2.11 rebuilds a dataclass from all its fields, init=False
    ones too, and raised on it ("takes 11 positional arguments but 12 were given").
    """

    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    key_lengths: Tensor | None
    attn_mask: Tensor | None
    window: tuple[int | None, int | None] | None
    scale: float
    dropout_p: float
    return_lse: bool

    def __post_init__(self) -> None:
        memo: dict[object, object] = {}
        object.__setattr__(self, "memo", memo)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def group(self) -> int:
        """How many query heads share one key/value head."""
        return self.heads_q // self.heads_kv

    @property
    def grouped(self) -> bool:
        """Whether query heads share key/value heads (Hq > Hkv): a Python bool even where
        torch.compile traces the head counts as dynamic sizes, as arguments such as SDPA's
        enable_gqa need (a SymBool raised there; dynamo keeps bool() of one a SymBool,
        and settles a branch on it)."""
        if self.heads_q != self.heads_kv:
            return True
        return False

    @property
    def seq_q(self) -> int:
        return self.q.shape[2]

    @property
    def seq_kv(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def diagonal_offset(self) -> int:
        """Skv - Sq: query i is aligned with key i + offset (bottom-right alignment)."""
        return self.seq_kv - self.seq_q

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    @property
    def carries_tangents(self) -> bool:
        """Whether q, k or v carry forward-mode AD tangents (torch.func.jvp, forward_ad)."""
        return carries_tangents(self.q, self.k, self.v)

    @property
    def causal_alone(self) -> bool:
        """Causal with no window, key lengths or mask tensor: the bottom-right-aligned
        diagonal is all that hides a key."""
        return (self.causal and self.window is None and self.key_lengths is None
                and self.attn_mask is None)

    @property
    def has_mask(self) -> bool:
        """True when any key is hidden from any query (beyond plain full attention). Causal
        alone hides none from one query row: aligned to the bottom right, it sees every key
        (a decoding step against a cache)."""
        return (
            (self.causal and self.seq_q > 1)
            or self.window is not None
            or self.key_lengths is not None
            or self.attn_mask is not None
        )

    def describe(self) -> str:
        """Short human-readable summary, used in error messages and tables."""
        parts = [
            f"q{tuple(self.q.shape)}",
            f"k{tuple(self.k.shape)}",
            f"v{tuple(self.v.shape)}",
            str(self.dtype).removeprefix("torch."),
            self.device.type,
        ]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.key_lengths is not None:
            parts.append("key_lengths")
        if self.attn_mask is not None:
            kind = "bool" if self.attn_mask.dtype == torch.bool else "additive"
            parts.append(f"{kind} mask{tuple(self.attn_mask.shape)}")
        if self.dropout_p:
            parts.append(f"dropout={self.dropout_p}")
        return " ".join(parts)


_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def carries_tangents(*tensors: Tensor) -> bool:
    """Whether any of `tensors` carries a forward-mode AD tangent (torch.func.jvp,
    forward_ad), which kernels that autograd does not see would drop silently."""
    # -1 outside every dual_level: the common case costs one compare, not an unpack each
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_dense(name: str, t: Tensor) -> None:
    """TypeError for a sparse or nested tensor: every implementation indexes dense ones,
    and a sparse q failed deep inside a backend (`expand is unsupported`)."""
    if t.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested one: pad the batch "
                        f"and pass key_lengths for the padded keys")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def make_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_lengths: Tensor | None = None,
    attn_mask: Tensor | None = None,
    window: int | tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> AttentionCall:
    """Validate the arguments of `attention()` and bundle them; raises ValueError/TypeError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_dense(name, t)
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {_shape(t)}"
            )
        if t.dtype not in _FLOATING:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    b, hq, sq, d = q.shape
    bk, hkv, skv, dk = k.shape
    if bk != b or v.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )
    if v.shape[1] != hkv or v.shape[2] != skv:
        raise ValueError(
            f"k and v must have the same heads and sequence length: k {_shape(k)}, v {_shape(v)}"
        )
    if dk != d:
        raise ValueError(f"q and k head dims differ: q {_shape(q)}, k {_shape(k)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}): "
            f"q {_shape(q)}, k {_shape(k)}"
        )
    if d == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be positive: q {_shape(q)}, v {_shape(v)}")

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")

    if key_lengths is not None:
        if not isinstance(key_lengths, Tensor):
            raise TypeError(f"key_lengths must be a tensor, got {type(key_lengths).__name__}")
        _check_dense("key_lengths", key_lengths)
        if key_lengths.dtype.is_floating_point or key_lengths.dtype in (torch.bool,):
            raise TypeError(f"key_lengths must be an integer tensor, got {key_lengths.dtype}")
        if _shape(key_lengths) != (b,):
            raise ValueError(
                f"key_lengths must have shape (batch,) = ({b},), got {_shape(key_lengths)}"
            )
        if key_lengths.device != q.device:
            raise ValueError(
                f"key_lengths is on {key_lengths.device} but q is on {q.device}"
            )
        # Checked on the CPU only: on a GPU reading the values back would stall the
        # stream. Skipped while torch.compile traces: the values are data the graph does
        # not know yet, and branching on them would break the graph. Read from plain
        # tensors only: a FakeTensor (under FakeTensorMode) has no values.
        if (key_lengths.device.type == "cpu" and type(key_lengths) is Tensor
                and not torch.compiler.is_compiling() and b) and (
            int(key_lengths.min()) < 0 or int(key_lengths.max()) > skv
        ):
            raise ValueError(
                f"key_lengths must lie in [0, {skv}] (the key length), "
                f"got values from {int(key_lengths.min())} to {int(key_lengths.max())}"
            )
        key_lengths = key_lengths.to(torch.int64)

    if attn_mask is not None:
        attn_mask = checked_mask(attn_mask, (b, hq, sq, skv), "(B, Hq, Sq, Skv)")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")

    window = _normalize_window(window)

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    # Compared, not math.isfinite: dynamo cannot trace that on a float it holds dynamic
    # (a scale that changed between compiled calls).
    elif not -math.inf < scale < math.inf:
        raise ValueError(f"scale must be finite, got {scale}")

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")

    return AttentionCall(
        q=q,
        k=k,
        v=v,
        causal=causal,
        key_lengths=key_lengths,
        attn_mask=attn_mask,
        window=window,
        scale=float(scale),
        dropout_p=float(dropout_p),
        return_lse=return_lse,
    )


def checked_mask(attn_mask: Tensor, full: tuple[int, ...], dims: str) -> Tensor:
    """attn_mask as a 4-D view broadcastable to `full` (named `dims` in messages).

    Every dim must be 1 or equal to the full size: no silent broadcast. TypeError for a
    non-tensor or a dtype other than bool/floating, ValueError for a shape that does not fit.
    """
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
    _check_dense("attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(
            f"attn_mask must be bool (True = may attend) or floating (added to scores), "
            f"got {attn_mask.dtype}"
        )
    if not 2 <= attn_mask.dim() <= 4:
        raise ValueError(
            f"attn_mask must have 2 to 4 dims broadcastable to {dims} = {full}, "
            f"got shape {_shape(attn_mask)}"
        )
    padded = (1,) * (4 - attn_mask.dim()) + _shape(attn_mask)
    # Two compares, not `m not in (1, f)`: under torch.compile, dynamo (torch 2.13) takes
    # `17 in (1, s)` for False where s is a dynamic size equal to 17.
    if any(m != 1 and m != f for m, f in zip(padded, full, strict=True)):
        raise ValueError(
            f"attn_mask of shape {_shape(attn_mask)} does not broadcast to {dims} = {full}"
        )
    return attn_mask.reshape(padded)


def _normalize_window(
    window: int | tuple[int | None, int | None] | None,
) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, 0)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None, an int, or (left, right), got {window!r}")
    sides = []
    for side, value in zip(("left", "right"), window, strict=True):
        if value is None:
            sides.append(None)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            sides.append(value)
        else:
            raise ValueError(f"window {side} must be a non-negative int or None, got {value!r}")
    if sides == [None, None]:
        return None
    return (sides[0], sides[1])

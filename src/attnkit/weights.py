"""Moving weights between every variant, `MultiHeadAttention` and `torch.nn.MultiheadAttention`.

The canonical form: `CanonicalWeights` with Wq, Wk, Wv (d_out, d_in) in nn.Linear's
(out, in) convention, heads concatenated along the output axis (head h = rows
h*D:(h+1)*D), biases bq, bk, bv (d_out,), Wo (d_out, d_out), bo (d_out,), and num_heads.

Each class declares, in `_VIEWS`, where each canonical tensor lives in it: a list of
views into its parameters (several for the per-head wrapper, one otherwise; a transposed
view for the raw (d_in, d_out) matrices), or None for a bias it does not have. Reading
concatenates the views; writing copies into them.

Biases: a source without a bias gives zeros. A destination without a bias accepts only an
all-zero one (it computes the same function then); a nonzero bias raises ValueError
rather than being dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit import variants as V
from attnkit.module import MultiHeadAttention

__all__ = ["CanonicalWeights", "convert", "from_canonical", "to_canonical"]

_NAMES = ("wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo")


@dataclass
class CanonicalWeights:
    """Heads-concatenated weights; biases None where the source has none."""

    wq: Tensor
    wk: Tensor
    wv: Tensor
    bq: Tensor | None
    bk: Tensor | None
    bv: Tensor | None
    wo: Tensor
    bo: Tensor | None
    num_heads: int

    @property
    def d_in(self) -> int:
        return self.wq.shape[1]

    @property
    def d_out(self) -> int:
        return self.wq.shape[0]


# name -> list of views into parameters (concatenated along dim 0), or None
_Views = dict[str, list[Tensor] | None]


def _named(*parts: list[Tensor] | None) -> _Views:
    return dict(zip(_NAMES, parts, strict=True))


def _split3(t: Tensor | None, d: int) -> list[list[Tensor] | None]:
    """Rows [q | k | v] of a fused (3*d, ...) weight or (3*d,) bias, as three views."""
    return [None] * 3 if t is None else [[t[i * d:(i + 1) * d]] for i in range(3)]


def _linear(layer: nn.Linear) -> list[list[Tensor] | None]:
    return [[layer.weight.detach()], None if layer.bias is None else [layer.bias.detach()]]


def _fused_qkv(qkv: nn.Linear, out: nn.Linear, d_out: int) -> _Views:
    w = _split3(qkv.weight.detach(), d_out)
    b = _split3(None if qkv.bias is None else qkv.bias.detach(), d_out)
    wo, bo = _linear(out)
    return _named(*w, *b, wo, bo)


def _mha_views(m: MultiHeadAttention) -> _Views:
    if m.num_kv_heads != m.num_heads:
        raise ValueError(
            f"MultiHeadAttention with num_kv_heads={m.num_kv_heads} != num_heads="
            f"{m.num_heads} (grouped-query) has no equivalent among the variants; "
            f"weights convert only when num_kv_heads == num_heads"
        )
    return _fused_qkv(m.qkv, m.out_proj, m.d_out)


def _wrapper_views(m: V.HeadWrapper) -> _Views:
    views: _Views = {}
    for name, attr in (("q", "W_query"), ("k", "W_key"), ("v", "W_value")):
        layers = [getattr(head, attr) for head in m.heads]
        views["w" + name] = [layer.weight.detach() for layer in layers]
        views["b" + name] = (
            None if layers[0].bias is None else [layer.bias.detach() for layer in layers]
        )
    views["wo"], views["bo"] = _linear(m.out_proj)
    return views


def _separate_views(m: V.SeparateQKV) -> _Views:
    (wq, bq), (wk, bk), (wv, bv) = (_linear(m.W_query), _linear(m.W_key), _linear(m.W_value))
    wo, bo = _linear(m.out_proj)
    return _named(wq, wk, wv, bq, bk, bv, wo, bo)


def _raw(w: Tensor, b: Tensor | None) -> list[list[Tensor] | None]:
    """A raw (d_in, d_out) matrix seen as (d_out, d_in) by a transposed view."""
    return [[w.detach().T], None if b is None else [b.detach()]]


def _einsum_views(m: V.Einsum) -> _Views:
    (wq, bq), (wk, bk), (wv, bv) = (
        _raw(m.W_query, m.bias_q), _raw(m.W_key, m.bias_k), _raw(m.W_value, m.bias_v)
    )
    wo, bo = _linear(m.out_proj)
    return _named(wq, wk, wv, bq, bk, bv, wo, bo)


def _torch_views(m: nn.MultiheadAttention) -> _Views:
    if not m._qkv_same_embed_dim or m.bias_k is not None:
        raise ValueError(
            "torch.nn.MultiheadAttention converts only with kdim == vdim == embed_dim and "
            "add_bias_kv=False"
        )
    d = m.embed_dim
    w = _split3(m.in_proj_weight.detach(), d)
    b = _split3(None if m.in_proj_bias is None else m.in_proj_bias.detach(), d)
    wo, bo = _linear(m.out_proj)
    return _named(*w, *b, wo, bo)


def _six_op_views(m: V.TTNNSixOp) -> _Views:
    (wq, bq), (wk, bk), (wv, bv) = (
        _raw(m.query_weight, m.query_bias), _raw(m.key_weight, m.key_bias),
        _raw(m.value_weight, m.value_bias),
    )
    wo, bo = _raw(m.output_weight, m.output_bias)
    return _named(wq, wk, wv, bq, bk, bv, wo, bo)


def _fused_views(m: V.TTNNFused) -> _Views:
    w = _split3(m.qkv_weight.detach().T, m.d_out)
    b = _split3(None if m.qkv_bias is None else m.qkv_bias.detach(), m.d_out)
    wo, bo = _raw(m.output_weight, m.output_bias)
    return _named(*w, *b, wo, bo)


# class -> where its weights live; subclasses are found through the MRO. Every class here
# has `num_heads`.
_VIEWS: dict[type, Callable[[nn.Module], _Views]] = {
    MultiHeadAttention: _mha_views,
    nn.MultiheadAttention: _torch_views,
    V.HeadWrapper: _wrapper_views,
    V.SeparateQKV: _separate_views,
    V.CombinedQKV: lambda m: _fused_qkv(m.qkv, m.proj, m.d_out),
    V.SDPA: lambda m: _fused_qkv(m.qkv, m.proj, m.d_out),
    V.FlexAttention: lambda m: _fused_qkv(m.qkv, m.proj, m.d_out),
    V.Einsum: _einsum_views,
    V.TorchMHA: lambda m: _torch_views(m.multihead_attn),
    V.TTNNSixOp: _six_op_views,
    V.TTNNFused: _fused_views,
}


def _lookup(module: nn.Module) -> tuple[_Views, int]:
    for cls in type(module).__mro__:
        if cls in _VIEWS:
            return _VIEWS[cls](module), module.num_heads
    known = ", ".join(sorted(c.__name__ for c in _VIEWS))
    raise TypeError(f"no weight layout known for {type(module).__name__}; known: {known}")


def to_canonical(module: nn.Module) -> CanonicalWeights:
    """A detached copy of `module`'s weights in the canonical form."""
    views, heads = _lookup(module)
    return CanonicalWeights(
        **{n: None if views[n] is None else torch.cat(views[n]).clone() for n in _NAMES},
        num_heads=heads,
    )


def _sizes(w: CanonicalWeights) -> str:
    biases = "".join(n[1] for n in ("bq", "bk", "bv", "bo") if getattr(w, n) is not None)
    return (
        f"d_in={w.d_in}, d_out={w.d_out}, num_heads={w.num_heads}, "
        f"biases={biases or 'none'}"
    )


def from_canonical(
    module: nn.Module, weights: CanonicalWeights, *, source: str = "canonical weights"
) -> nn.Module:
    """Copy `weights` into `module` in place and return it; ValueError when sizes differ."""
    views, heads = _lookup(module)
    target = CanonicalWeights(
        **{n: None if views[n] is None else torch.cat(views[n]) for n in _NAMES},
        num_heads=heads,
    )
    where = (
        f"cannot copy {source} ({_sizes(weights)}) into {type(module).__name__} "
        f"({_sizes(target)})"
    )
    if heads != weights.num_heads:
        raise ValueError(f"{where}: num_heads differ")
    for n in _NAMES:
        src, dst = getattr(weights, n), getattr(target, n)
        if dst is not None and src is not None and src.shape != dst.shape:
            raise ValueError(
                f"{where}: {n} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
            )
        if dst is None and src is not None and bool(src.ne(0).any()):
            raise ValueError(f"{where}: the destination has no {n} and the source's is nonzero")
    with torch.no_grad():
        for n in _NAMES:
            if views[n] is None:
                continue
            src = getattr(weights, n)
            if src is None:  # a missing bias is a zero bias
                for view in views[n]:
                    view.zero_()
                continue
            for view, part in zip(views[n], src.split([v.shape[0] for v in views[n]]), strict=True):
                view.copy_(part)
    return module


def convert(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy the weights of `src` into `dst` (any two of: the variants, MultiHeadAttention,
    torch.nn.MultiheadAttention) and return `dst`; ValueError naming both when sizes differ.
    """
    return from_canonical(dst, to_canonical(src), source=type(src).__name__)

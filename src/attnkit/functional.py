"""`attnkit.attention`: one call, many implementations, picked by `impl`."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit import backends
from attnkit.call import AttentionCall, UnsupportedError, make_call

__all__ = ["AUTO_ORDER", "AUTO_ORDER_PADDED", "attention", "auto_order", "available",
           "device_auto_order", "select"]

# impl="auto" takes the first backend in this list that supports the call, fastest first
# as measured (benchmarks/results/h100-core-*): on an H100, plain SDPA (which itself runs
# cuDNN there; attnkit's sdpa leaves cuDNN out for masked calls that need gradients at
# Skv % 128 == 64, backends/sdpa.py, and then left it out of every one) was within 2% of
# the fastest backend on 39 of the 40 `core` configs, forward and forward+backward, and 4%
# on the last; pinning SDPA to cuDNN fell to 0.52x on one. On an H200 with PyTorch 2.11
# plain SDPA still ran cuDNN's kernels for training at D=64 and D=128 and `auto` was
# 0.98x or more of the fastest backend on every `core` row (benchmarks/sdpa_kernels.py;
# NOTES run 40). attnkit's Triton kernel comes next: it takes the calls SDPA refuses
# (return_lse), then FlexAttention.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("sdpa", "triton", "flex", "chunked", "naive"),
    "cpu": ("sdpa", "naive", "chunked", "einsum"),
}
_AUTO_FALLBACK = ("sdpa", "naive", "chunked", "reference")
# Calls that hide padded keys (key_lengths, or a (B|1, 1, 1, Skv) key-padding mask) take
# this order where the device has one: SDPA ran them on its mem-efficient kernel, which
# on the H100 was 2-8x slower than the Triton kernel forward and 4-8x forward+backward,
# where the Triton kernel skips the padded key blocks (run 10,
# benchmarks/results/h100-core-bf16-key-lengths). With cuDNN's masked backward back in
# SDPA's choice (run 53) the Triton kernel still led at bert's padding mask on an H200
# under CUDA graphs: 0.276 against 0.341 ms forward+backward (h200-bert-bf16-graphs-run53).
AUTO_ORDER_PADDED: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "sdpa", "flex", "chunked", "naive"),
}


def hides_padded_keys(call: AttentionCall) -> bool:
    """Whether `call` has key_lengths or a mask that only hides keys per batch element."""
    mask = call.attn_mask
    return call.key_lengths is not None or (
        mask is not None and mask.shape[1] == 1 and mask.shape[2] == 1)


def device_auto_order(device_type: str, padded: bool = False) -> tuple[str, ...]:
    """The backends impl="auto" tries on a device type, in order; padded: for calls that
    hide padded keys (the same order where the device has no order of its own for them)."""
    if padded and device_type in AUTO_ORDER_PADDED:
        return AUTO_ORDER_PADDED[device_type]
    return AUTO_ORDER.get(device_type, _AUTO_FALLBACK)


def auto_order(call: AttentionCall) -> tuple[str, ...]:
    """The backends impl="auto" tries for `call`, in order: the device's order, with the
    backends in it that lead this call (Backend.leads) moved to the front."""
    order = device_auto_order(call.device.type, hides_padded_keys(call))
    leading = tuple(name for name in order
                    if name in backends.BACKENDS and backends.BACKENDS[name].leads(call))
    return leading + tuple(name for name in order if name not in leading)


def attention(
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
    impl: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head scaled dot-product attention.

    Args:
        q: (B, Hq, Sq, D) queries.
        k: (B, Hkv, Skv, D) keys; Hq must be a multiple of Hkv (grouped / multi-query).
        v: (B, Hkv, Skv, Dv) values.
        causal: query i sees key j when j <= i + (Skv - Sq) (bottom-right aligned).
        key_lengths: int (B,); key j of batch b is hidden when j >= key_lengths[b].
        attn_mask: bool (True = may attend) or floating (added to the scaled scores),
            broadcastable to (B, Hq, Sq, Skv). A floating entry below masks.HIDDEN_BELOW
            (-3.4e38 / log2(e), -2.36e38: the lowest values of bfloat16 and float32 are
            below it) hides its key as -inf does.
        window: (left, right): query i sees keys in [i+off-left, i+off+right], off = Skv-Sq;
            None on a side is unbounded; an int w means (w, 0).
        scale: multiplies q @ k^T; defaults to 1/sqrt(D).
        dropout_p: probability of dropping an attention weight (applied as given, also in
            eval mode, as in `torch.nn.functional.scaled_dot_product_attention`).
        impl: "auto" or a name from `attnkit.available()`.
        return_lse: also return the float32 (B, Hq, Sq) log-sum-exp of the scaled, masked
            scores (-inf for a query that sees no key).

    Returns:
        (B, Hq, Sq, Dv) in the dtype of q, or (out, lse) when return_lse. A query that sees
        no key gets zeros.

    Under `torch.autocast` on q's device, every implementation computes in autocast's dtype,
    as SDPA does: q, k and v (floating, float64 excepted) are cast to it, and the output is
    in it. attn_mask is added as given.

    Raises:
        ValueError / TypeError for malformed input; UnsupportedError when `impl` cannot run
        this call (the message says why), forward-mode tangents on q, k, v included, and
        from the backward of an implementation that has no second derivative when autograd
        is asked for one (create_graph=True); `backends.base.FULLY_DIFFERENTIABLE` has both.
    """
    autocast_device = autocasting(q)
    if autocast_device is not None:
        q, k, v = (_autocast_input(t, autocast_device) for t in (q, k, v))
    call = make_call(
        q, k, v, causal=causal, key_lengths=key_lengths, attn_mask=attn_mask, window=window,
        scale=scale, dropout_p=dropout_p, return_lse=return_lse,
    )
    backend = select(call, impl)
    if autocast_device is None:
        out, lse = backend.run(call)
    else:
        # Off inside, so that the backend computes what it computes for inputs of this dtype
        # (the calls verify checks), not its own float32 steps cast down again by autocast.
        with torch.autocast(autocast_device, enabled=False):
            out, lse = backend.run(call)
    if return_lse:
        if lse is None:
            raise AssertionError(f"backend {backend.name} returned no lse for return_lse=True")
        return out, lse
    return out


# The device types torch.autocast covers in this build, found once: dynamo cannot trace
# torch.amp.is_autocast_available before torch 2.13 (a graph break in every compiled call,
# run 51), and torch.is_autocast_enabled raises for a type autocast does not cover.
_AUTOCAST_DEVICE_TYPES = frozenset(
    t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "ipu")
    if torch.amp.is_autocast_available(t))


def autocasting(t: object) -> str | None:
    """t's device type when t is a tensor and torch.autocast is on for its device, else
    None."""
    if not isinstance(t, Tensor) or t.device.type not in _AUTOCAST_DEVICE_TYPES:
        return None
    return t.device.type if torch.is_autocast_enabled(t.device.type) else None


def _autocast_input(t: object, device_type: str) -> object:
    """t in autocast's dtype where autocast would cast it for one of its lower-precision
    ops (a floating tensor on device_type, float64 excepted); anything else as given."""
    if (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type):
        return t.to(torch.get_autocast_dtype(device_type))
    return t


def refusal(backend: backends.Backend, call: AttentionCall) -> str | None:
    """Why `backend` cannot run `call`, or None when it can."""
    return backend.available(call.device) or backend.supports(call)


def select(call: AttentionCall, impl: str = "auto") -> backends.Backend:
    """The backend that runs `call` for `impl`; UnsupportedError says why when none can."""
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a str, got {type(impl).__name__}")
    if impl != "auto":
        backend = backends.get(impl)
        reason = refusal(backend, call)
        if reason is not None:
            raise UnsupportedError(f"impl={impl!r} cannot run {call.describe()}: {reason}")
        return backend
    order = auto_order(call)
    reasons = []
    for name in order:
        backend = backends.BACKENDS.get(name)
        if backend is None:
            continue
        reason = refusal(backend, call)
        if reason is None:
            return backend
        reasons.append(f"  {name}: {reason}")
    raise UnsupportedError(
        f"no implementation can run {call.describe()}:\n" + "\n".join(reasons)
    )


def available(device: str | torch.device | None = None) -> dict[str, str | None]:
    """Every backend name mapped to None when it can run on `device`, else the reason.

    device defaults to CUDA when present, else the CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: backend.available(device) for name, backend in backends.BACKENDS.items()}

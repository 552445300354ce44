"""Online softmax over blocks of keys, in plain PyTorch on any device.

Forward: each key block updates a running row max m, a running sum of exp(s - m) and an
accumulator acc of exp(s - m) @ v, rescaling the old sum and acc by exp(m_old - m_new); the
output is acc / sum and the log-sum-exp is m + log(sum).

Backward (FlashAttention-2's, written in torch ops): with delta = rowsum(dO * O), each key
block recomputes its probabilities P = exp((s - m) - log(sum)) from the saved row max and
sum and adds its share to dq, dk, dv. Autograd saves only q, k, v, out, m and log(sum), so
scores live for one block at a time, (B, Hq, Sq, BLOCK) instead of (B, Hq, Sq, Skv), in
training too. m and log(sum) are kept apart, not as their sum lse: where a huge finite
additive mask (-1e38, say: one above masks.HIDDEN_BELOW, below which it would hide) covers a
row's every key, m is about that value, and m + log(sum) rounds to m, so exp(s - lse)
gave each key 1 instead of 1/n (gradients n times too large, while the forward was right;
run 53, at float32's lowest value, which hides its keys since run 54).

Grouped heads are handled by viewing q as (B, Hkv, G, Sq, D), so k/v are never repeated.
Arithmetic runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.backends.base import (
    NO_FORWARD_AD,
    Backend,
    Result,
    always_available,
    forbid_second_derivative,
)
from attnkit.backends.einsum import grouped
from attnkit.call import AttentionCall
from attnkit.masks import score_bias

BLOCK = 256  # keys per step: large enough to keep the matmuls efficient on a CPU


def supports(call: AttentionCall) -> str | None:
    if call.attn_mask is not None and call.attn_mask.requires_grad:
        return "gives no gradient for attn_mask (its backward recomputes the scores)"
    if call.carries_tangents:  # an autograd.Function with no jvp
        return NO_FORWARD_AD
    return None


def key_span(call: AttentionCall) -> tuple[int, int]:
    """[lo, hi) of the keys that causal/window let at least one query see."""
    lo, hi = 0, call.seq_kv
    left, right = call.window or (None, None)
    if call.causal:
        right = 0 if right is None else min(right, 0)
    # Query i sits at key position i + off, so queries 0..Sq-1 reach [off - left, Sq-1+off+right].
    if right is not None:
        hi = min(hi, call.seq_q - 1 + call.diagonal_offset + right + 1)
    if left is not None:
        lo = max(lo, call.diagonal_offset - left)
    return lo, max(lo, hi)


def _blocks(call: AttentionCall, q: Tensor, k: Tensor):
    """Per visible key block: (k0, k1, scaled and masked scores (B, Hkv, G, Sq, bk))."""
    lo, hi = key_span(call)
    # Keys outside the causal/window band [lo, hi) are never computed.
    for k0 in range(lo, hi, BLOCK):
        k1 = min(k0 + BLOCK, hi)
        s = torch.einsum("bhgqd,bhkd->bhgqk", q, k[:, :, k0:k1]) * call.scale
        bias = score_bias(call, s.dtype, k_range=(k0, k1))  # (B|1, Hq|1, Sq, bk)
        if bias is not None:
            s = s + grouped(bias, call.heads_kv)
        yield k0, k1, s


def _work(call: AttentionCall) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, Hkv, G, Sq, D), k (B, Hkv, Skv, D), v (B, Hkv, 1, Skv, Dv) in the work dtype."""
    dtype = torch.float64 if call.dtype == torch.float64 else torch.float32
    q = grouped(call.q, call.heads_kv).to(dtype)
    # v broadcasts over the group dim.
    return q, call.k.to(dtype), call.v.to(dtype).unsqueeze(2)


def _forward(call: AttentionCall) -> tuple[Tensor, Tensor, Tensor]:
    """out (B, Hkv, G, Sq, Dv), the row max m and log(sum of exp(s - m)) (B, Hkv, G, Sq, 1),
    all in the work dtype; a row that sees no key has m = 0 and log(sum) = -inf, so that
    lse = m + log(sum) is -inf."""
    q, k, v = _work(call)
    m = q.new_full((*q.shape[:-1], 1), float("-inf"))  # running max (B, Hkv, G, Sq, 1)
    total = q.new_zeros(m.shape)  # running sum of exp(s - m)
    acc = q.new_zeros((*q.shape[:-1], call.head_dim_v))  # running sum of exp(s - m) @ v
    for k0, k1, s in _blocks(call, q, k):
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        # A row that has seen no key yet has max -inf; shifting by 0 keeps exp() at 0.
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - shift)  # (B, Hkv, G, Sq, bk)
        alpha = torch.exp(m - shift)  # rescales what earlier blocks accumulated
        total = total * alpha + p.sum(dim=-1, keepdim=True)
        if call.dropout_p:
            # Dropping unnormalized weights equals dropping normalized ones: 1/total is
            # linear. The backward replays these draws block by block, in this order.
            p = F.dropout(p, call.dropout_p)
        acc = acc * alpha + p @ v[:, :, :, k0:k1]
        m = m_new
    # Rows that saw no key have total = 0 and acc = 0: divide by 1 to return zeros.
    out = acc / torch.where(total > 0, total, torch.ones_like(total))
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return out, shift, torch.log(total)  # log(0) = -inf for those rows


def _backward(call: AttentionCall, out: Tensor, shift: Tensor, log_total: Tensor,
              dout: Tensor | None, dlse: Tensor | None):
    """dq, dk, dv in the work dtype, shaped like the call's q, k, v, from the gradients of
    out (B, Hq, Sq, Dv) and of lse (B, Hq, Sq), either of them None for none; shift and
    log_total as _forward returns them."""
    q, k, v = _work(call)
    if dout is None:
        dout = torch.zeros_like(out)
        delta = torch.zeros_like(shift)
    else:
        dout = grouped(dout, call.heads_kv).to(q.dtype)  # (B, Hkv, G, Sq, Dv)
        delta = (dout * out).sum(dim=-1, keepdim=True)  # (B, Hkv, G, Sq, 1)
    if dlse is not None:
        # d lse / d s = p, so lse's gradient joins dS = P * (dP - delta) as delta - dlse
        delta = delta - grouped(dlse.unsqueeze(-1), call.heads_kv).to(q.dtype)
    # A row that sees no key has log(sum) = -inf and no probabilities: exp(s - inf) = 0.
    log_total = torch.where(torch.isfinite(log_total), log_total,
                            torch.full_like(log_total, float("inf")))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v.squeeze(2))
    for k0, k1, s in _blocks(call, q, k):
        p = torch.exp((s - shift) - log_total)  # (B, Hkv, G, Sq, bk), normalized
        dp = dout @ v[:, :, :, k0:k1].transpose(-2, -1)  # dL/d(dropped probabilities)
        if call.dropout_p:
            keep = F.dropout(torch.ones_like(p), call.dropout_p)  # 0 or 1/(1-p), as forward
            dv[:, :, k0:k1] = torch.einsum("bhgqk,bhgqd->bhkd", p * keep, dout)
            dp = dp * keep
        else:
            dv[:, :, k0:k1] = torch.einsum("bhgqk,bhgqd->bhkd", p, dout)
        ds = p * (dp - delta) * call.scale  # dL/d(q k^T)
        dq += ds @ k[:, :, None, k0:k1]
        dk[:, :, k0:k1] = torch.einsum("bhgqk,bhgqd->bhkd", ds, q)
    return dq.flatten(1, 2), dk, dv


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall):
        # Dropout's masks are replayed in backward from the generator state they came from.
        ctx.rng = _rng_state(call.device) if call.dropout_p else None
        out, shift, log_total = _forward(call)
        ctx.save_for_backward(q, k, v, out, shift, log_total)
        ctx.call = call
        b, hq, sq = call.batch, call.heads_q, call.seq_q
        ctx.set_materialize_grads(False)  # a gradient nobody sent stays None
        return (out.reshape(b, hq, sq, call.head_dim_v).to(call.dtype),
                (shift + log_total).reshape(b, hq, sq).float())

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        forbid_second_derivative("chunked")  # out and the softmax stats were saved as constants
        if dout is None and dlse is None:
            return None, None, None, None
        q, k, v, out, shift, log_total = ctx.saved_tensors
        # The saved tensors, not the ones the call was built with, are what autograd
        # checks for in-place changes; the call only carries the options.
        call = dataclasses.replace(ctx.call, q=q, k=k, v=v)
        with _replayed_rng(call.device, ctx.rng):
            dq, dk, dv = _backward(call, out, shift, log_total, dout, dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state: tuple[Tensor, Tensor | None] | None):
    """Run the block with the generators as `state` left them, then restore them."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def run(call: AttentionCall) -> Result:
    return _ChunkedAttention.apply(call.q, call.k, call.v, call)


BACKEND = Backend(
    name="chunked",
    summary="online softmax over key blocks in plain PyTorch; O(S * block) memory, "
    "forward and backward",
    available=always_available,
    supports=supports,
    run=run,
)

"""Online softmax over blocks of keys, in plain PyTorch on any device.

Each key block updates a running row max m, a running sum of exp(s - m) and an
accumulator acc of exp(s - m) @ v, rescaling the old sum and acc by exp(m_old - m_new); the
output is acc / sum and the log-sum-exp is m + log(sum). Scores live for one block at a time,
(B, Hq, Sq, BLOCK) instead of (B, Hq, Sq, Skv), and accumulate in float32. Grouped heads
are handled by viewing q as (B, Hkv, G, Sq, D), so k/v are never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.backends.base import Backend, Result, always_available
from attnkit.backends.einsum import grouped
from attnkit.call import AttentionCall
from attnkit.masks import score_bias

BLOCK = 256  # keys per step: large enough to keep the matmuls efficient on a CPU


def supports(call: AttentionCall) -> str | None:
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


def run(call: AttentionCall) -> Result:
    b, hq, sq, _ = call.q.shape
    hkv, dv = call.heads_kv, call.head_dim_v
    q = grouped(call.q, hkv).float()  # (B, Hkv, G, Sq, D)
    k = call.k.float()  # (B, Hkv, Skv, D)
    v = call.v.float().unsqueeze(2)  # (B, Hkv, 1, Skv, Dv): broadcast over the group
    m = q.new_full((*q.shape[:-1], 1), float("-inf"))  # running max (B, Hkv, G, Sq, 1)
    total = q.new_zeros(m.shape)  # running sum of exp(s - m)
    acc = q.new_zeros((*q.shape[:-1], dv))  # running sum of exp(s - m) @ v

    lo, hi = key_span(call)
    # Keys outside the causal/window band [lo, hi) are never computed.
    for k0 in range(lo, hi, BLOCK):
        k1 = min(k0 + BLOCK, hi)
        s = torch.einsum("bhgqd,bhkd->bhgqk", q, k[:, :, k0:k1]) * call.scale
        bias = score_bias(call, torch.float32, k_range=(k0, k1))  # (B|1, Hq|1, Sq, bk)
        if bias is not None:
            s = s + grouped(bias, hkv)
        # The max only keeps exp() in range; the result does not depend on it, so it
        # carries no gradient (which also keeps -inf - -inf out of the backward pass).
        m_new = torch.maximum(m, s.detach().amax(dim=-1, keepdim=True))
        # A row that has seen no key yet has max -inf; shifting by 0 keeps exp() at 0.
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - shift)  # (B, Hkv, G, Sq, bk)
        alpha = torch.exp(m - shift)  # rescales what earlier blocks accumulated
        total = total * alpha + p.sum(dim=-1, keepdim=True)
        if call.dropout_p:
            # Dropping unnormalized weights equals dropping normalized ones: 1/total is linear.
            p = F.dropout(p, call.dropout_p)
        acc = acc * alpha + p @ v[:, :, :, k0:k1]
        m = m_new

    # Rows that saw no key have total = 0 and acc = 0: divide by 1 to return zeros.
    out = acc / torch.where(total > 0, total, torch.ones_like(total))
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = (shift + torch.log(total)).reshape(b, hq, sq)  # log(0) = -inf for those rows
    return out.reshape(b, hq, sq, dv).to(call.dtype), lse


BACKEND = Backend(
    name="chunked",
    summary="online softmax over key blocks in plain PyTorch; O(S * block) score memory",
    available=always_available,
    supports=supports,
    run=run,
)

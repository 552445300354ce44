"""Attention written with torch.einsum over grouped heads: q is viewed as
(B, Hkv, G, Sq, D) so that each key/value head serves its G query heads without being
repeated in memory. The scores are float32 for half-precision inputs (masks.score_dtype)."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.backends.base import Backend, Result, always_available
from attnkit.call import AttentionCall
from attnkit.masks import masked_softmax, score_bias, score_dtype


def supports(call: AttentionCall) -> str | None:
    return None


def grouped(t: Tensor, heads_kv: int) -> Tensor:
    """(B|1, Hq|1, ...) -> (B|1, Hkv|1, G|1, ...): query head h = hkv * G + g."""
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.unflatten(1, (heads_kv, -1))


def run(call: AttentionCall) -> Result:
    b, hq, sq, _ = call.q.shape
    work = score_dtype(call.q.dtype)
    q = grouped(call.q.to(work), call.heads_kv)  # (B, Hkv, G, Sq, D)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q, call.k.to(work)) * call.scale
    bias = score_bias(call, work)  # (B|1, Hq|1, Sq, Skv)
    if bias is not None:
        scores = scores + grouped(bias, call.heads_kv)
    probs, lse = masked_softmax(scores)  # (B, Hkv, G, Sq, Skv); zeros on rows that see no key
    probs = probs.to(call.v.dtype)
    if call.dropout_p:
        probs = torch.nn.functional.dropout(probs, call.dropout_p)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, call.v)  # (B, Hkv, G, Sq, Dv)
    return out.reshape(b, hq, sq, call.head_dim_v), lse.reshape(b, hq, sq)


BACKEND = Backend(
    name="einsum",
    summary="torch.einsum over (B, Hkv, G, S, D): grouped heads without repeating k/v",
    available=always_available,
    supports=supports,
    run=run,
)

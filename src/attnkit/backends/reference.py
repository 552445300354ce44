"""The float64 oracle: plain matmul + softmax, obviously correct, slow, S x S memory."""

from __future__ import annotations

import torch

from attnkit.backends.base import Backend, Result, always_available
from attnkit.call import AttentionCall
from attnkit.masks import expand_kv, masked_softmax, score_bias


def supports(call: AttentionCall) -> str | None:
    return None


def run(call: AttentionCall) -> Result:
    k, v = expand_kv(call)
    q, k, v = (t.to(torch.float64) for t in (call.q, k, v))
    scores = (q @ k.transpose(-2, -1)) * call.scale  # (B, Hq, Sq, Skv)
    bias = score_bias(call, torch.float64)
    if bias is not None:
        scores = scores + bias
    probs, lse = masked_softmax(scores)
    if call.dropout_p:
        probs = torch.nn.functional.dropout(probs, call.dropout_p)
    out = probs @ v  # (B, Hq, Sq, Dv)
    return out.to(call.dtype), lse.to(torch.float32)


BACKEND = Backend(
    name="reference",
    summary="float64 matmul + softmax; the oracle every other backend is checked against",
    available=always_available,
    supports=supports,
    run=run,
)

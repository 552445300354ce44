"""The float64 oracle: plain matmul + softmax, obviously correct, slow, S x S memory.

It is the `naive` computation carried out in float64; tests/test_reference.py checks it
against a per-element loop written straight from the contract.
"""

from __future__ import annotations

import torch

from attnkit.backends.base import Backend, Result, always_available
from attnkit.call import AttentionCall
from attnkit.masks import dense_attention, expand_kv


def supports(call: AttentionCall) -> str | None:
    return None


def run(call: AttentionCall) -> Result:
    k, v = expand_kv(call)
    out, lse = dense_attention(call, *(t.to(torch.float64) for t in (call.q, k, v)))
    return out.to(call.dtype), lse


BACKEND = Backend(
    name="reference",
    summary="float64 matmul + softmax; the oracle every other backend is checked against",
    available=always_available,
    supports=supports,
    run=run,
)

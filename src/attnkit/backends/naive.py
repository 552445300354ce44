"""The ttnn tutorial's six primitive ops, in the input dtype: q @ k^T, scale, add the mask
bias, softmax, (dropout), @ v. Materializes the (B, Hq, Sq, Skv) scores; k/v are repeated
to Hq heads."""

from __future__ import annotations

import torch

from attnkit.backends.base import Backend, Result, always_available
from attnkit.call import AttentionCall
from attnkit.masks import expand_kv, masked_softmax, score_bias


def supports(call: AttentionCall) -> str | None:
    return None


def run(call: AttentionCall) -> Result:
    k, v = expand_kv(call)  # (B, Hq, Skv, D), (B, Hq, Skv, Dv)
    scores = call.q @ k.transpose(-2, -1)  # (B, Hq, Sq, Skv)
    scores = scores * call.scale
    bias = score_bias(call, scores.dtype)  # (B|1, Hq|1, Sq, Skv)
    if bias is not None:
        scores = scores + bias
    # A plain softmax gives NaN on a row that sees no key; masked_softmax gives zeros.
    probs, lse = masked_softmax(scores)
    if call.return_lse and scores.dtype in (torch.float16, torch.bfloat16):
        # A half-precision sum of exps loses the log-sum-exp's third digit; the same
        # scores summed in float32 keep it.
        lse = torch.logsumexp(scores.float(), dim=-1)
    if call.dropout_p:
        probs = torch.nn.functional.dropout(probs, call.dropout_p)
    out = probs @ v  # (B, Hq, Sq, Dv)
    return out, lse.to(torch.float32)


BACKEND = Backend(
    name="naive",
    summary="six primitive ops in the input dtype (matmul, scale, mask, softmax, matmul)",
    available=always_available,
    supports=supports,
    run=run,
)

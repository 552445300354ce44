"""The ttnn tutorial's primitive ops: q @ k^T, scale, add the mask bias, softmax, (dropout),
@ v. Materializes the (B, Hq, Sq, Skv) scores, float32 for half-precision inputs
(masks.score_dtype), and takes the probabilities back to the input dtype for @ v; k/v are
repeated to Hq heads."""

from __future__ import annotations

from attnkit.backends.base import Backend, Result, always_available
from attnkit.call import AttentionCall
from attnkit.masks import dense_attention, expand_kv


def supports(call: AttentionCall) -> str | None:
    return None


def run(call: AttentionCall) -> Result:
    k, v = expand_kv(call)  # (B, Hq, Skv, D), (B, Hq, Skv, Dv)
    return dense_attention(call, call.q, k, v)


BACKEND = Backend(
    name="naive",
    summary="primitive ops (matmul, scale, mask, softmax, matmul), scores in float32",
    available=always_available,
    supports=supports,
    run=run,
)

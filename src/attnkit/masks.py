"""Which keys each query may see, as tensors the PyTorch backends can use.

One definition of visibility for every backend written in PyTorch ops (the Triton kernel
re-states it in index arithmetic): query i sees key j when

    causal:       j <= i + (Skv - Sq)
    window:       i + off - left <= j <= i + off + right      (off = Skv - Sq)
    key_lengths:  j < key_lengths[b]
    bool mask:    attn_mask[b, h, i, j] is True
and a floating mask is added to the scaled scores, except that an entry below HIDDEN_BELOW
hides its key as -inf does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.call import AttentionCall

__all__ = [
    "HIDDEN_BELOW", "dense_attention", "expand_kv", "hidden_as_inf", "masked_softmax",
    "score_bias", "score_dtype", "visibility",
]

# A floating mask entry below -3.4e38 / log2(e) (-2.36e38) hides its key, as -inf does:
# the lowest values of bfloat16 and float32 (-3.39e38, -3.40e38), with which Hugging Face
# fills padding to mean -inf, are below it. It is where a fused kernel's scale of the bias
# by log2(e) overflows to -inf in float32, so the Triton kernel needs no pass over the mask
# for it (within a unit in the last place of the bound, kernels that round otherwise may
# differ). Added to the scores, such a value absorbs them, so a row that such entries hid
# whole had no one answer (NOTES runs 53-54): the float64 oracle and the kernels that
# materialize the scores gave the uniform row, the fused GPU kernels zeros, and backwards
# that rebuild the probabilities from the log-sum-exp n times the uniform row's gradient.
HIDDEN_BELOW = -torch.finfo(torch.float32).max / math.log2(math.e)


def hidden_as_inf(mask: Tensor) -> Tensor:
    """A floating mask with its entries below HIDDEN_BELOW set to -inf."""
    if torch.finfo(mask.dtype).min >= HIDDEN_BELOW:
        return mask  # float16 cannot hold such an entry (its lowest is -65504)
    return mask.masked_fill(mask < HIDDEN_BELOW, float("-inf"))


def visibility(
    call: AttentionCall,
    q_range: tuple[int, int] | None = None,
    k_range: tuple[int, int] | None = None,
) -> Tensor | None:
    """Bool (B|1, Hq|1, sq, sk) of the keys each query may see, or None when all are visible.

    q_range / k_range = (start, stop) restrict the result to a block of queries / keys
    (the chunked backend walks key blocks). The floating part of attn_mask is not here:
    see `score_bias`.
    """
    q0, q1 = q_range or (0, call.seq_q)
    k0, k1 = k_range or (0, call.seq_kv)
    device = call.device
    visible: Tensor | None = None

    def both(mask: Tensor) -> Tensor:
        return mask if visible is None else visible & mask

    if call.causal or call.window is not None:
        # Aligned to the bottom right: query i sits at key position i + (Skv - Sq).
        pos_q = torch.arange(q0, q1, device=device)[:, None] + call.diagonal_offset
        pos_k = torch.arange(k0, k1, device=device)[None, :]
        left, right = call.window or (None, None)
        if call.causal:
            right = 0 if right is None else min(right, 0)
        band = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
        if right is not None:
            band &= pos_k <= pos_q + right
        if left is not None:
            band &= pos_k >= pos_q - left
        visible = both(band[None, None])
    if call.key_lengths is not None:
        pos_k = torch.arange(k0, k1, device=device)
        visible = both((pos_k[None, :] < call.key_lengths[:, None])[:, None, None, :])
    if call.attn_mask is not None and call.attn_mask.dtype == torch.bool:
        visible = both(_block(call.attn_mask, q0, q1, k0, k1))
    return visible


def score_bias(
    call: AttentionCall,
    dtype: torch.dtype,
    q_range: tuple[int, int] | None = None,
    k_range: tuple[int, int] | None = None,
    *,
    lowest_as_inf: bool = True,
) -> Tensor | None:
    """Additive (B|1, Hq|1, sq, sk) bias in `dtype`: the floating mask (hidden_as_inf), -inf
    where hidden.

    None when every key is visible and there is no floating mask. lowest_as_inf=False
    leaves the mask's entries below HIDDEN_BELOW as they are, one pass fewer, for a caller
    that finds the rows they hide whole itself: on a row with a key to see, exp() of such
    an entry is 0 as it is of -inf.
    """
    q0, q1 = q_range or (0, call.seq_q)
    k0, k1 = k_range or (0, call.seq_kv)
    bias: Tensor | None = None
    if call.attn_mask is not None and call.attn_mask.dtype != torch.bool:
        # Before the cast, so that what hides a key is the caller's value, not its rounding.
        bias = _block(call.attn_mask, q0, q1, k0, k1)
        bias = (hidden_as_inf(bias) if lowest_as_inf else bias).to(dtype)
    visible = visibility(call, (q0, q1), (k0, k1))
    if visible is not None:
        mask_bias = torch.zeros(visible.shape, dtype=dtype, device=call.device)
        mask_bias.masked_fill_(~visible, float("-inf"))
        bias = mask_bias if bias is None else bias + mask_bias
    return bias


def masked_softmax(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim where a row of all -inf gives zeros, not NaN.

    Returns (probabilities in the dtype of `scores`, float32 log-sum-exp); the log-sum-exp
    of an empty row is -inf. Half-precision scores are exponentiated and summed in float32:
    a bfloat16 sum of a thousand exps keeps barely two digits.
    """
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if work.shape[-1] == 0:  # no keys at all (Skv = 0): amax has nothing to reduce
        row_max = work.new_full((*work.shape[:-1], 1), -math.inf)
    else:
        row_max = work.amax(dim=-1, keepdim=True)
    # An empty row has max -inf; shifting by 0 instead keeps exp() at 0 rather than NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(work - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    # Dividing an empty row by 1 (not by a tiny number) keeps its gradient finite too, and
    # so does its log: a zero gradient of lse times log's 1/0 would be NaN in every score
    # (torch.compile's autograd passes lse a zero gradient where eager passes none).
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    probs = weights / safe_total
    lse = torch.where(seen, row_max + torch.log(safe_total), -math.inf).squeeze(-1)
    return probs.to(scores.dtype), lse.float()


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the materialized scores are kept in: float32 for half-precision inputs.

    A logit rounded to bfloat16 is off by up to |logit| * 2**-9, so exp() of it by as
    much: at logits of a few tens (scale 0.5 at D=256, run 52) the whole output was 1.2-3%
    off the oracle, where the fused kernels, whose scores never leave float32, stay at 0.2%.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dense_attention(call: AttentionCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The textbook form, materializing all (B, Hq, Sq, Skv) scores (float32 for
    half-precision inputs, see `score_dtype`); the probabilities go back to the dtype of
    q for the product with v, as in the fused kernels.

    q: (B, Hq, Sq, D); k, v: (B, Hq, Skv, D|Dv), already repeated to Hq heads.
    Returns ((B, Hq, Sq, Dv) output, float32 (B, Hq, Sq) log-sum-exp).
    """
    work = score_dtype(q.dtype)
    scores = (q.to(work) @ k.to(work).transpose(-2, -1)) * call.scale  # (B, Hq, Sq, Skv)
    bias = score_bias(call, work)  # (B|1, Hq|1, Sq, Skv)
    if bias is not None:
        scores = scores + bias
    probs, lse = masked_softmax(scores)
    probs = probs.to(v.dtype)
    if call.dropout_p:
        probs = torch.nn.functional.dropout(probs, call.dropout_p)
    return probs @ v, lse


def expand_kv(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """k, v repeated to Hq heads: query head h reads key/value head h // (Hq // Hkv)."""
    if call.group == 1:
        return call.k, call.v
    return (
        call.k.repeat_interleave(call.group, dim=1),
        call.v.repeat_interleave(call.group, dim=1),
    )


def _block(mask: Tensor, q0: int, q1: int, k0: int, k1: int) -> Tensor:
    """Slice a broadcastable 4-D mask to a query/key block, leaving size-1 dims alone."""
    whole_rows = mask.shape[2] == 1 or (q0 == 0 and q1 == mask.shape[2])
    whole_cols = mask.shape[3] == 1 or (k0 == 0 and k1 == mask.shape[3])
    if whole_rows and whole_cols:
        return mask  # indexing makes a view even so: ~8 us of host time a call (CPU, run 53)
    rows = slice(q0, q1) if mask.shape[2] != 1 else slice(None)
    cols = slice(k0, k1) if mask.shape[3] != 1 else slice(None)
    return mask[:, :, rows, cols]

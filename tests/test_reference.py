"""The oracle itself, checked against a per-element loop written straight from DESIGN.md
(and the one rule attnkit adds to it: masks.HIDDEN_BELOW)."""

import math

import pytest
import torch

import attnkit


def attention_by_loops(q, k, v, *, causal, key_lengths, attn_mask, window, scale):
    """Element by element: one softmax per (b, h, i), visibility spelled out per key."""
    b_n, hq, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    out = torch.zeros(b_n, hq, sq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b_n, hq, sq), -math.inf, dtype=torch.float64)
    left, right = window if window is not None else (None, None)
    for b in range(b_n):
        for h in range(hq):
            for i in range(sq):
                pos = i + skv - sq
                scores, values = [], []
                for j in range(skv):
                    if causal and j > pos:
                        continue
                    if right is not None and j > pos + right:
                        continue
                    if left is not None and j < pos - left:
                        continue
                    if key_lengths is not None and j >= key_lengths[b]:
                        continue
                    s = scale * float(q[b, h, i].double() @ k[b, h // group, j].double())
                    if attn_mask is not None:
                        m = attn_mask.expand(b_n, hq, sq, skv)[b, h, i, j]
                        if attn_mask.dtype == torch.bool:
                            if not m:
                                continue
                        elif float(m) < -torch.finfo(torch.float32).max / math.log2(math.e):
                            continue  # Hugging Face's "-inf": the dtype's lowest value
                        else:
                            s += float(m)
                    if s == -math.inf:
                        continue
                    scores.append(s)
                    values.append(v[b, h // group, j].double())
                if scores:
                    top = max(scores)
                    weights = [math.exp(s - top) for s in scores]
                    total = sum(weights)
                    out[b, h, i] = sum(w / total * x for w, x in zip(weights, values, strict=True))
                    lse[b, h, i] = top + math.log(total)
    return out, lse


@pytest.mark.parametrize(
    "sq, skv, causal, window, lengths, mask",
    [
        (5, 5, False, None, None, None),
        (5, 5, True, None, None, None),
        (3, 7, True, None, None, None),
        (7, 3, True, None, None, None),  # the first queries see nothing
        (6, 6, False, (2, 1), None, None),
        (4, 6, True, (1, None), None, None),
        (5, 6, False, None, [6, 0], None),
        (5, 6, False, None, None, "bool"),
        (5, 6, True, None, [3, 6], "additive"),
        (5, 6, False, None, None, "bfloat16-lowest"),
        (5, 6, False, None, None, "float32-lowest"),
        (5, 6, False, None, None, "float32-below-bound"),  # -2.37e38: hides
        (5, 6, False, None, None, "float32-above-bound"),  # -2.35e38: added (uniform rows)
    ],
)
def test_reference_matches_loops(sq, skv, causal, window, lengths, mask):
    gen = torch.Generator().manual_seed(sq * 100 + skv)
    q = torch.randn(2, 4, sq, 3, generator=gen)
    k = torch.randn(2, 2, skv, 3, generator=gen)
    v = torch.randn(2, 2, skv, 5, generator=gen)
    key_lengths = torch.tensor(lengths) if lengths is not None else None
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(2, 1, sq, skv, generator=gen) > 0.4
    elif mask == "additive":
        attn_mask = torch.randn(1, 4, sq, skv, generator=gen).double()
        attn_mask[0, 0, 0, :] = -math.inf
    elif mask is not None:
        # Batch element 0 covered whole, element 1 from key 2 on, at the named value.
        dtype_name, value = mask.split("-", 1)
        dtype = getattr(torch, dtype_name)
        attn_mask = torch.zeros(2, 1, 1, skv, dtype=dtype)
        attn_mask[0, ..., :] = attn_mask[1, ..., 2:] = {
            "lowest": torch.finfo(dtype).min, "below-bound": -2.37e38,
            "above-bound": -2.35e38}[value]
    kwargs = dict(causal=causal, key_lengths=key_lengths, attn_mask=attn_mask, window=window)
    out, lse = attnkit.attention(
        q.double(), k.double(), v.double(), impl="reference", return_lse=True, **kwargs
    )
    want_out, want_lse = attention_by_loops(q, k, v, scale=3**-0.5, **kwargs)
    torch.testing.assert_close(out, want_out)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse.float()))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite].float())
    assert not out.isnan().any()

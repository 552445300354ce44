"""Every textbook variant computes the function of the float64 oracle, on shared weights."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import attnkit
from attnkit import variants
from attnkit.verify import rel_err as rel
from attnkit.weights import CanonicalWeights, convert, to_canonical
from conftest import assert_dropout_only_in_training, skip_if_unavailable

EAGER = [name for name in variants.REGISTRY if name != "flex"]
NO_BIAS_OUT = ("torch_mha", "torch_mha_noweights")  # torch's class: bias=False drops bo too
SQUARE_ONLY = NO_BIAS_OUT  # nn.MultiheadAttention needs d_in == d_out

# (batch, seq, d_in, d_out, heads, context_length): odd lengths, head dim 15, S past and
# within context_length, S = 1, d_in != d_out.
SHAPES = [(2, 17, 60, 60, 4, 8), (3, 1, 60, 60, 4, 8), (2, 5, 24, 60, 4, 8)]


def oracle(w: CanonicalWeights, x: torch.Tensor, *, causal: bool,
           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projections and the float64 reference backend: x (B, S, d_in) -> (B, S, d_out)."""
    b, s, _ = x.shape
    h, d = w.num_heads, w.d_out // w.num_heads

    def proj(wt, bias, t):
        y = t @ wt.double().T
        return y if bias is None else y + bias.double()

    q, k, v = (proj(wt, bias, x).view(b, s, h, d).transpose(1, 2)
               for wt, bias in ((w.wq, w.bq), (w.wk, w.bk), (w.wv, w.bv)))
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.double()
    out = attnkit.attention(q, k, v, causal=causal, attn_mask=attn_mask, impl="reference")
    return proj(w.wo, w.bo, out.transpose(1, 2).reshape(b, s, w.d_out))


def make_mask(kind: str, b: int, h: int, s: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "additive":  # the ttnn tutorial's padding mask
        return torch.randn(b, 1, 1, s)
    mask = torch.rand(1, h, s, s) > 0.4  # per head, so the wrapper's head slicing counts
    return mask | torch.eye(s, dtype=torch.bool)  # every query keeps one key


def build(name: str, d_in: int, d_out: int, heads: int, ctx: int, *, qkv_bias: bool,
          causal: bool, dropout: float = 0.0) -> torch.nn.Module:
    """The variant, with weights converted from a randomly initialized MultiHeadAttention."""
    src = attnkit.MultiHeadAttention(d_in, d_out, heads, qkv_bias=qkv_bias, causal=causal,
                                     impl="reference")
    if name in NO_BIAS_OUT and not qkv_bias:
        src.out_proj.bias.data.zero_()
    dst = variants.REGISTRY[name](d_in, d_out, ctx, dropout, heads, qkv_bias, causal=causal)
    return convert(src, dst)


def check_forward_backward(m: torch.nn.Module, x: torch.Tensor, causal: bool,
                           mask: torch.Tensor | None) -> None:
    x = x.clone().requires_grad_()
    out = m(x, attn_mask=mask)
    x64 = x.detach().double().requires_grad_()
    ref = oracle(to_canonical(m), x64, causal=causal, attn_mask=mask)
    assert out.shape == ref.shape
    assert rel(out, ref) < 1e-5
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    assert rel(x.grad, x64.grad) < 1e-5


def test_registry_has_every_form():
    assert len(variants.REGISTRY) == 11
    assert all(issubclass(c, torch.nn.Module) for c in variants.REGISTRY.values())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}S{}din{}dout{}H{}ctx{}".format(*s))
@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name", EAGER)
def test_variant_matches_oracle(name, causal, mask_kind, shape):
    b, s, d_in, d_out, h, ctx = shape
    if name in SQUARE_ONLY and d_in != d_out:
        pytest.skip("torch.nn.MultiheadAttention needs d_in == d_out")
    qkv_bias = s % 2 == 1  # both bias settings across the shapes
    m = build(name, d_in, d_out, h, ctx, qkv_bias=qkv_bias, causal=causal)
    check_forward_backward(m, torch.randn(b, s, d_in), causal, make_mask(mask_kind, b, h, s))


@pytest.mark.parametrize("name", EAGER)
def test_module_and_variants_agree_on_one_set_of_weights(name):
    src = attnkit.MultiHeadAttention(60, 60, 4, qkv_bias=True, impl="reference")
    m = convert(src, variants.REGISTRY[name](60, 60, 8, 0.0, 4, True))
    x, mask = torch.randn(2, 17, 60), torch.randn(2, 1, 1, 17)
    torch.testing.assert_close(m(x, attn_mask=mask), src(x, attn_mask=mask), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", [n for n in EAGER if n != "torch_mha"])
def test_query_that_sees_no_key_gives_zeros(name):
    m = build(name, 24, 24, 3, 8, qkv_bias=True, causal=True)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    mask[0, :, 4] = False  # query 4 of batch 0 sees nothing
    check_forward_backward(m, torch.randn(2, 9, 24), True, mask)


def test_torch_mha_with_weights_gives_nan_for_empty_rows_as_documented():
    m = build("torch_mha", 24, 24, 3, 8, qkv_bias=True, causal=True)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    assert torch.isnan(m(torch.randn(1, 5, 24), attn_mask=mask)[0, 2]).all()


@pytest.mark.parametrize("name", EAGER)
def test_dropout_only_in_training(name):
    m = build(name, 24, 24, 3, 8, qkv_bias=True, causal=True, dropout=0.5)
    plain = build(name, 24, 24, 3, 8, qkv_bias=True, causal=True)
    convert(m, plain)
    assert_dropout_only_in_training(m, plain, torch.randn(2, 9, 24))


@pytest.mark.parametrize("name", list(variants.REGISTRY))
def test_bad_input_raises(name):
    m = variants.REGISTRY[name](24, 24, 8, 0.0, 3)
    with torch.no_grad():
        with pytest.raises(ValueError, match="d_in=24"):
            m(torch.randn(2, 5, 23))
        with pytest.raises(ValueError, match="d_in=24"):
            m(torch.randn(5, 24))
        with pytest.raises(ValueError, match="does not broadcast"):
            m(torch.randn(2, 5, 24), attn_mask=torch.ones(2, 1, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        variants.REGISTRY[name](24, 26, 8, 0.0, 3)


def test_torch_mha_needs_square():
    with pytest.raises(ValueError, match="d_in == d_out"):
        variants.TorchMHA(24, 60, 8, 0.0, 4)


# The notebook's classes (rasbt/LLMs-from-scratch ch03/02_bonus_efficient-multihead-attention/
# mha-implementations.ipynb) with d_in = d_out = 12, 3 heads, context_length 6,
# qkv_bias=True: their state-dict keys and shapes, written out.
NOTEBOOK_STATE = {
    "wrapper": {  # Ch03_MHA_Wrapper(d_in=12, d_out=4, ..., num_heads=3)
        **{f"heads.{i}.{p}.{t}": (4, 12) if t == "weight" else (4,)
           for i in range(3) for p in ("W_query", "W_key", "W_value")
           for t in ("weight", "bias")},
        **{f"heads.{i}.mask": (6, 6) for i in range(3)},
        "out_proj.weight": (12, 12), "out_proj.bias": (12,),
    },
    "separate_qkv": {  # Ch03_MHA
        "W_query.weight": (12, 12), "W_query.bias": (12,),
        "W_key.weight": (12, 12), "W_key.bias": (12,),
        "W_value.weight": (12, 12), "W_value.bias": (12,),
        "out_proj.weight": (12, 12), "out_proj.bias": (12,),
        "mask": (6, 6),
    },
    "combined_qkv": {  # MultiHeadAttentionCombinedQKV
        "qkv.weight": (36, 12), "qkv.bias": (36,),
        "proj.weight": (12, 12), "proj.bias": (12,),
        "mask": (6, 6),
    },
    "einsum": {  # MHAEinsum
        "W_query": (12, 12), "W_key": (12, 12), "W_value": (12, 12),
        "bias_q": (12,), "bias_k": (12,), "bias_v": (12,),
        "out_proj.weight": (12, 12), "out_proj.bias": (12,),
        "mask": (6, 6),
    },
    "sdpa": {  # MHAPyTorchScaledDotProduct: no mask buffer
        "qkv.weight": (36, 12), "qkv.bias": (36,),
        "proj.weight": (12, 12), "proj.bias": (12,),
    },
}
QKV_BIAS_KEYS = ("W_query.bias", "W_key.bias", "W_value.bias", "qkv.bias",
                 "bias_q", "bias_k", "bias_v")


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("name", list(NOTEBOOK_STATE))
def test_notebook_state_dict_loads_strictly(name, qkv_bias):
    shapes = {k: v for k, v in NOTEBOOK_STATE[name].items()
              if qkv_bias or not k.endswith(QKV_BIAS_KEYS)}
    state = {k: torch.triu(torch.ones(v), diagonal=1) if k.endswith("mask") else torch.randn(v)
             for k, v in shapes.items()}
    m = variants.REGISTRY[name](12, 12, 6, 0.0, 3, qkv_bias)
    m.load_state_dict(state, strict=True)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    check_forward_backward(m, torch.randn(2, 9, 12), True, None)  # 9 > context_length


@pytest.mark.slow
def test_flex_matches_oracle_forward():
    """Compiled flex on the CPU: forward only (no backward there), a few compiles ~10 s.

    Head dim 32: below that compiled flex on a CPU is wrong, and the variant refuses.
    """
    skip_if_unavailable("flex", torch.device("cpu"))
    x = torch.randn(2, 17, 60)
    for causal, mask_kind in ((True, "none"), (False, "additive"), (True, "bool")):
        m = build("flex", 60, 128, 4, 8, qkv_bias=True, causal=causal)
        mask = make_mask(mask_kind, 2, 4, 17)
        with torch.no_grad():
            out = m(x, attn_mask=mask)
        ref = oracle(to_canonical(m), x.double(), causal=causal, attn_mask=mask)
        assert rel(out, ref) < 1e-5


def test_flex_refuses_what_flex_cannot_do():
    skip_if_unavailable("flex", torch.device("cpu"))
    m = variants.FlexAttention(24, 24, 8, 0.5, 3)
    x = torch.randn(1, 5, 24)
    with pytest.raises(RuntimeError, match="no dropout"):
        m(x)
    m.eval()
    if x.device.type == "cpu":
        with pytest.raises(RuntimeError, match="no backward on the CPU"):
            m(x)
        with torch.no_grad(), pytest.raises(attnkit.UnsupportedError, match="head dims below"):
            m(x)
    # Forward-mode tangents, which compiled FlexAttention dropped silently (run 51): refused
    # before anything compiles
    wide = variants.FlexAttention(64, 64, 8, 0.0, 2).eval()
    x = torch.randn(1, 5, 64)
    with torch.no_grad(), forward_ad.dual_level(), pytest.raises(
            attnkit.UnsupportedError, match="forward-mode derivative"):
        wide(forward_ad.make_dual(x, torch.randn_like(x)))
    # An empty sequence killed the CPU process with SIGFPE inside compiled FlexAttention (run 52)
    with torch.no_grad(), pytest.raises(attnkit.UnsupportedError, match="empty call"):
        wide(torch.randn(1, 0, 64))

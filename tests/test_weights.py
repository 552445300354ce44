"""attnkit.weights: round trips between every layout, bias rules, clear size errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit
from attnkit import variants
from attnkit.weights import CanonicalWeights, convert, from_canonical, to_canonical


def make(kind: str, d_in: int = 24, d_out: int = 24, heads: int = 3, bias: bool = True):
    """A module of any supported kind, freshly initialized."""
    if kind == "module":
        return attnkit.MultiHeadAttention(d_in, d_out, heads, qkv_bias=bias, out_bias=bias,
                                          impl="reference")
    if kind == "torch":
        return nn.MultiheadAttention(d_out, heads, bias=bias, batch_first=True)
    return variants.REGISTRY[kind](d_in, d_out, 8, 0.0, heads, bias)


KINDS = ["module", "torch", *variants.REGISTRY]


def assert_same(a: CanonicalWeights, b: CanonicalWeights) -> None:
    assert a.num_heads == b.num_heads
    for n in ("wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo"):
        x, y = getattr(a, n), getattr(b, n)
        assert (x is None) == (y is None), n
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def random_canonical(d_in=24, d_out=24, heads=3) -> CanonicalWeights:
    def r(*s):
        return torch.randn(*s)
    return CanonicalWeights(r(d_out, d_in), r(d_out, d_in), r(d_out, d_in), r(d_out),
                            r(d_out), r(d_out), r(d_out, d_out), r(d_out), heads)


@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("src_kind", KINDS)
def test_convert_round_trip(src_kind, dst_kind):
    src, dst = make(src_kind), make(dst_kind)
    assert convert(src, dst) is dst
    assert_same(to_canonical(dst), to_canonical(src))
    back = convert(dst, make(src_kind))
    assert {k: v for k, v in back.state_dict().items()}.keys() == src.state_dict().keys()
    for key, value in src.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_from_canonical_writes_every_weight(kind):
    w = random_canonical()
    m = from_canonical(make(kind), w)
    assert_same(to_canonical(m), w)


def test_convert_runs_same_function_as_source():
    src = make("module")
    x = torch.randn(2, 7, 24)
    for name, cls in variants.REGISTRY.items():
        if name == "flex":
            continue
        dst = convert(src, cls(24, 24, 8, 0.0, 3, True))
        torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)


def test_missing_source_bias_copies_zeros():
    src = make("separate_qkv", bias=False)
    dst = convert(src, make("combined_qkv", bias=True))
    assert dst.qkv.bias.abs().sum() == 0
    torch.testing.assert_close(dst.proj.bias, src.out_proj.bias)


def test_nonzero_bias_into_module_without_one_raises():
    src, dst = make("separate_qkv", bias=True), make("einsum", bias=False)
    with pytest.raises(ValueError, match=r"SeparateQKV .*into Einsum.*no bq"):
        convert(src, dst)


def test_zero_bias_into_module_without_one_is_dropped():
    src = make("combined_qkv", bias=True)
    src.qkv.bias.data.zero_()
    dst = convert(src, make("einsum", bias=False))
    assert dst.bias_q is None
    torch.testing.assert_close(dst.W_query.T, src.qkv.weight[:24])


def test_torch_without_bias_refuses_nonzero_output_bias():
    src = make("separate_qkv", bias=False)  # out_proj always has a bias
    with pytest.raises(ValueError, match="no bo"):
        convert(src, make("torch_mha", bias=False))
    src.out_proj.bias.data.zero_()
    convert(src, make("torch_mha", bias=False))


@pytest.mark.parametrize(
    "dst_args, what",
    [((12, 24, 3), "d_in=24.*d_in=12"), ((24, 36, 3), "wq has shape"),
     ((24, 24, 4), "num_heads differ")],
)
def test_size_mismatch_names_both_modules(dst_args, what):
    d_in, d_out, heads = dst_args
    with pytest.raises(ValueError, match=r"SeparateQKV .*into CombinedQKV .*") as info:
        convert(make("separate_qkv"), make("combined_qkv", d_in, d_out, heads))
    assert info.match(what)


def test_grouped_query_module_refuses_variants():
    gqa = attnkit.MultiHeadAttention(24, 24, 4, num_kv_heads=2, impl="reference")
    with pytest.raises(ValueError, match="num_kv_heads=2 != num_heads=4"):
        convert(gqa, make("sdpa", heads=4))
    with pytest.raises(ValueError, match="grouped-query"):
        convert(make("sdpa", heads=4), gqa)
    mqa_equal = attnkit.MultiHeadAttention(24, 24, 4, num_kv_heads=4, impl="reference")
    convert(mqa_equal, make("sdpa", heads=4))


def test_unknown_module_type():
    with pytest.raises(TypeError, match="no weight layout known for Linear"):
        to_canonical(nn.Linear(3, 3))


def test_torch_add_bias_kv_refused():
    with pytest.raises(ValueError, match="add_bias_kv"):
        to_canonical(nn.MultiheadAttention(24, 3, add_bias_kv=True))


def test_convert_casts_dtype():
    src = make("module")
    dst = variants.SDPA(24, 24, 8, 0.0, 3, True).double()
    convert(src, dst)
    assert dst.qkv.weight.dtype == torch.float64
    torch.testing.assert_close(dst.qkv.weight.float(), src.qkv.weight)


def test_convert_does_not_touch_autograd_state():
    src, dst = make("module"), make("wrapper")
    convert(src, dst)
    assert all(p.requires_grad and p.grad is None and p.is_leaf for p in dst.parameters())

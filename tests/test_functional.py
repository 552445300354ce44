"""Input validation of `attnkit.attention`, and `masks.visibility` against its definition."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.call import make_call
from attnkit.masks import score_bias, visibility


def qkv(b=2, hq=4, hkv=2, sq=5, skv=7, d=8, dv=None, dtype=torch.float32, device="cpu"):
    """Random (B, Hq, Sq, D), (B, Hkv, Skv, D), (B, Hkv, Skv, Dv)."""
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, skv, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, skv, dv or d, dtype=dtype, device=device)
    return q, k, v


def raises(error: type[Exception], *patterns: str, **kwargs):
    """Run attention(**kwargs) on default q/k/v (overridable) and check the message."""
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v} | kwargs
    with pytest.raises(error) as info:
        attnkit.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in {str(info.value)!r}"


def test_mismatched_batch() -> None:
    q, k, v = qkv()
    raises(ValueError, "batch", r"\(3, 4, 5, 8\)", q=torch.randn(3, 4, 5, 8))
    raises(ValueError, "batch", r"v \(1, 2, 7, 8\)", v=v[:1])


def test_heads_must_divide() -> None:
    raises(ValueError, "multiple", r"\(3\)", r"\(2, 3, 5, 8\)", q=torch.randn(2, 3, 5, 8))


def test_head_dims_differ() -> None:
    raises(ValueError, "head dim", r"\(2, 4, 5, 16\)", q=torch.randn(2, 4, 5, 16))


def test_k_and_v_disagree() -> None:
    raises(ValueError, "k and v", r"\(2, 2, 6, 8\)", v=torch.randn(2, 2, 6, 8))


@pytest.mark.parametrize("shape", [(2, 4, 5), (1, 2, 4, 5, 8)])
def test_wrong_rank(shape: tuple[int, ...]) -> None:
    raises(ValueError, "q must be 4-D", re.escape(str(shape)), q=torch.randn(shape))


def test_not_a_tensor() -> None:
    raises(TypeError, "k must be a torch.Tensor", k=[[1.0]])


def test_sparse_and_nested_tensors_are_refused() -> None:
    """A sparse q failed deep inside a backend ("expand is unsupported for Sparse
    tensors"), a nested one inside SDPA (run 51)."""
    q, k, v = qkv()
    raises(TypeError, "q must be a dense", "sparse_coo", q=q.to_sparse())
    raises(TypeError, "k must be a dense", "nested", "key_lengths",
           k=torch.nested.nested_tensor([k[0], k[1]], layout=torch.jagged))
    raises(TypeError, "attn_mask must be a dense", attn_mask=torch.ones(2, 1, 5, 7).to_sparse())
    raises(TypeError, "key_lengths must be a dense", key_lengths=torch.tensor([7, 3]).to_sparse())


def test_mixed_dtypes() -> None:
    q, k, v = qkv()
    raises(TypeError, "one dtype", "float64", k=k.double())


def test_integer_inputs() -> None:
    raises(TypeError, "q must be", "int64", q=torch.ones(2, 4, 5, 8, dtype=torch.int64))


def test_mixed_devices() -> None:
    q, k, v = qkv()
    raises(ValueError, "one device", "meta", v=v.to("meta"))


@pytest.mark.parametrize(
    ("mask", "patterns"),
    [
        (
            torch.ones(2, 4, 5, 6, dtype=torch.bool),
            ["attn_mask", r"\(2, 4, 5, 6\)", r"\(2, 4, 5, 7\)"],
        ),
        (torch.ones(3, 1, 1, 7, dtype=torch.bool), ["does not broadcast", r"\(3, 1, 1, 7\)"]),
        (torch.ones(7, dtype=torch.bool), ["2 to 4 dims", r"\(7,\)"]),
        (torch.ones(2, 4, 5, 7, dtype=torch.int32), ["attn_mask must be bool", "int32"]),
    ],
)
def test_mask_that_does_not_fit(mask: torch.Tensor, patterns: list[str]) -> None:
    error = TypeError if not (mask.dtype == torch.bool or mask.is_floating_point()) else ValueError
    raises(error, *patterns, attn_mask=mask)


def test_static_mask_beside_dynamic_lengths_under_compile() -> None:
    """A padding mask whose key dim torch.compile holds static, beside q and k whose lengths
    it traces as dynamic (a server marks them so; dynamo does it after a length changes):
    the shape check must compare the sizes, which dynamo gets wrong for `17 in (1, s)`."""
    q, k, v = qkv(sq=17, skv=17)
    mask = torch.rand(2, 1, 1, 17) > 0.3
    for t in (q, k, v):
        torch._dynamo.maybe_mark_dynamic(t, 2)
    torch._dynamo.reset()
    compiled = torch.compile(attnkit.attention, backend="eager", fullgraph=True)
    out = compiled(q, k, v, attn_mask=mask, impl="naive")
    torch.testing.assert_close(out, attnkit.attention(q, k, v, attn_mask=mask, impl="naive"))


@pytest.mark.parametrize("impl", ["sdpa", "naive"])
def test_dynamic_head_counts_and_scale_under_compile(impl: str) -> None:
    """Head counts that torch.compile traces as dynamic sizes, and a scale that changed
    between compiled calls (which dynamo then holds dynamic): SDPA's enable_gqa needs a
    Python bool, not a SymBool, and math.isfinite cannot be traced on a dynamic float."""
    q, k, v = qkv(hq=4, hkv=2)
    for t in (q, k, v):
        torch._dynamo.maybe_mark_dynamic(t, 1)
    torch._dynamo.reset()  # this test's compiles alone against dynamo's recompile limit
    compiled = torch.compile(attnkit.attention, backend="eager", fullgraph=True)
    for scale in (0.5, 0.25):
        out = compiled(q, k, v, scale=scale, impl=impl)
        torch.testing.assert_close(out, attnkit.attention(q, k, v, scale=scale, impl=impl))


def test_mask_on_another_device() -> None:
    raises(ValueError, "attn_mask", "meta", attn_mask=torch.ones(2, 1, 5, 7, device="meta"))


@pytest.mark.parametrize(
    ("lengths", "error", "patterns"),
    [
        (torch.tensor([3, 4, 5]), ValueError, ["key_lengths", r"\(2,\)", r"\(3,\)"]),
        (torch.tensor([[3, 4]]), ValueError, ["key_lengths", r"\(1, 2\)"]),
        (torch.tensor([3.0, 4.0]), TypeError, ["key_lengths", "float32"]),
        (torch.tensor([True, False]), TypeError, ["key_lengths", "bool"]),
        (torch.tensor([3, 8]), ValueError, ["key_lengths", r"\[0, 7\]", "8"]),
        (torch.tensor([-1, 4]), ValueError, ["key_lengths", "-1"]),
        ([3, 4], TypeError, ["key_lengths", "list"]),
    ],
)
def test_bad_key_lengths(lengths, error: type[Exception], patterns: list[str]) -> None:
    raises(error, *patterns, key_lengths=lengths)


@pytest.mark.parametrize("impl", ["auto", "naive", "chunked", "sdpa"])
def test_key_lengths_under_fake_tensors(impl: str) -> None:
    """Under FakeTensorMode (shape inference with fake tensors) the lengths have no
    values to check: the call gives the output's shape instead of the
    DataDependentOutputException it raised before run 52."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.randn(2, 4, 5, 32), torch.randn(2, 2, 7, 32)
        out = attnkit.attention(q, k, k, key_lengths=torch.tensor([3, 7]), causal=True,
                                impl=impl)
    assert out.shape == (2, 4, 5, 32)


@pytest.mark.parametrize(
    ("window", "error"),
    [(-1, ValueError), ((2, -3), ValueError), ((1, 2, 3), TypeError), ("4", TypeError),
     ((1.5, 0), ValueError), (True, TypeError)],
)
def test_bad_window(window, error: type[Exception]) -> None:
    raises(error, "window", window=window)


@pytest.mark.parametrize(
    ("scale", "error"), [("0.1", TypeError), (float("nan"), ValueError), (float("inf"), ValueError)]
)
def test_bad_scale(scale, error: type[Exception]) -> None:
    raises(error, "scale", scale=scale)


@pytest.mark.parametrize(
    ("p", "error"), [(1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError), (None, TypeError)]
)
def test_bad_dropout(p, error: type[Exception]) -> None:
    raises(error, "dropout_p", dropout_p=p)


def test_bad_flags() -> None:
    raises(TypeError, "causal", causal=1)
    raises(TypeError, "return_lse", return_lse="yes")


def test_unknown_impl() -> None:
    raises(ValueError, "impl='nope'", "reference", impl="nope")
    raises(TypeError, "impl", impl=3)


# --- masks.visibility against its definition --------------------------------------------


def brute_force(
    b: int, hq: int, sq: int, skv: int, causal: bool, window, lengths, allowed
) -> torch.Tensor:
    """The definition in masks.py's docstring, one (b, h, i, j) at a time."""
    off = skv - sq
    out = torch.zeros(b, hq, sq, skv, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                for j in range(skv):
                    ok = True
                    if causal:
                        ok &= j <= i + off
                    if window is not None:
                        left, right = window
                        ok &= left is None or j >= i + off - left
                        ok &= right is None or j <= i + off + right
                    if lengths is not None:
                        ok &= j < int(lengths[bi])
                    if allowed is not None:
                        ok &= bool(allowed[bi % allowed.shape[0], h % allowed.shape[1],
                                           i % allowed.shape[2], j % allowed.shape[3]])
                    out[bi, h, i, j] = ok
    return out


side = st.one_of(st.none(), st.integers(0, 6))


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    sq=st.integers(1, 7),
    skv=st.integers(1, 9),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(side, side)),
    use_lengths=st.booleans(),
    mask_dims=st.one_of(st.none(), st.tuples(*[st.booleans()] * 4)),
    seed=st.integers(0, 2**16),
)
def test_visibility_matches_definition(
    b, hkv, group, sq, skv, causal, window, use_lengths, mask_dims, seed
) -> None:
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q, k, v = qkv(b, hq, hkv, sq, skv, d=4)
    lengths = torch.randint(0, skv + 1, (b,), generator=g) if use_lengths else None
    allowed = None
    if mask_dims is not None:  # each dim either full or broadcast (1)
        shape = [n if full else 1 for n, full in zip((b, hq, sq, skv), mask_dims, strict=True)]
        allowed = torch.rand(shape, generator=g) > 0.3
    call = make_call(
        q, k, v, causal=causal, window=window, key_lengths=lengths, attn_mask=allowed
    )
    want = brute_force(b, hq, sq, skv, causal, call.window, lengths, allowed)
    got = visibility(call)
    got = torch.ones_like(want) if got is None else got.expand_as(want)
    assert torch.equal(got, want)

    # A block of it is the same block of the whole.
    q0, k0 = sq // 3, skv // 2
    block = visibility(call, (q0, sq), (k0, skv))
    block = torch.ones_like(want[..., q0:, k0:]) if block is None else block
    assert torch.equal(block.expand_as(want[..., q0:, k0:]), want[..., q0:, k0:])

    bias = score_bias(call, torch.float32)
    if bias is not None:
        assert torch.equal(torch.isneginf(bias).expand_as(want), ~want)

"""attnkit.MultiHeadAttention and KVCache against a float64 oracle."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import KVCache, MultiHeadAttention
from attnkit.verify import module_oracle
from attnkit.verify import rel_err as rel
from conftest import assert_dropout_only_in_training


def oracle(m: MultiHeadAttention, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """The module's function in float64, written out from its weights: (B, S, d_out)."""
    return module_oracle(m, x, heads=m.num_heads, kv_heads=m.num_kv_heads, causal=m.causal,
                         **kwargs)


@pytest.mark.parametrize("s", [1, 17])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool", "key_lengths"])
def test_matches_oracle_forward_backward(s, heads, causal, mask_kind):
    hq, hkv = heads
    b, d_in, d_out = 3, 24, 60  # head dim 15
    m = MultiHeadAttention(d_in, d_out, hq, num_kv_heads=hkv, causal=causal,
                           qkv_bias=s > 1, out_bias=s == 1, impl="reference")
    kwargs = {}
    if mask_kind == "additive":
        kwargs["attn_mask"] = torch.randn(b, 1, 1, s)
    elif mask_kind == "bool":
        kwargs["attn_mask"] = (torch.rand(b, hq, s, s) > 0.5) | torch.eye(s, dtype=torch.bool)
    elif mask_kind == "key_lengths":
        kwargs["key_lengths"] = torch.randint(1, s + 1, (b,))
    x = torch.randn(b, s, d_in, requires_grad=True)
    out = m(x, **kwargs)
    x64 = x.detach().double().requires_grad_()
    ref_kwargs = dict(kwargs)
    if mask_kind == "additive":
        ref_kwargs["attn_mask"] = kwargs["attn_mask"].double()
    ref = oracle(m, x64, **ref_kwargs)
    assert out.shape == (b, s, d_out)
    assert rel(out, ref) < 1e-5
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    assert rel(x.grad, x64.grad) < 1e-5


def test_key_lengths_equal_padding_mask():
    m = MultiHeadAttention(24, 24, 3, causal=False, impl="reference")
    x, lengths = torch.randn(3, 9, 24), torch.tensor([9, 4, 1])
    mask = (torch.arange(9)[None, :] < lengths[:, None])[:, None, None, :]
    torch.testing.assert_close(m(x, key_lengths=lengths), m(x, attn_mask=mask))


def test_qkv_are_views_of_the_projection(monkeypatch):
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v)
        return attnkit.attention(q, k, v, **kwargs)

    monkeypatch.setattr("attnkit.module.attention", spy)
    m = MultiHeadAttention(24, 24, 4, num_kv_heads=2, impl="reference")
    m(torch.randn(2, 5, 24))
    ptrs = {seen[n].untyped_storage().data_ptr() for n in "qkv"}
    assert len(ptrs) == 1  # all three share the qkv output's storage: no copies
    assert seen["q"].shape == (2, 4, 5, 6) and seen["k"].shape == (2, 2, 5, 6)


@pytest.mark.parametrize("prefill", [1, 6])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_kv_cache_incremental_decode_equals_full_forward(prefill, heads):
    hq, hkv = heads
    m = MultiHeadAttention(24, 32, hq, num_kv_heads=hkv, qkv_bias=True, impl="reference")
    x = torch.randn(2, 11, 24)
    cache = m.make_kv_cache(2, 16)
    with torch.no_grad():
        full = m(x)
        parts = [m(x[:, :prefill], kv_cache=cache)]
        for t in range(prefill, 11):
            parts.append(m(x[:, t:t + 1], kv_cache=cache))
    assert cache.length == 11
    assert rel(torch.cat(parts, dim=1), full) < 1e-5


def test_kv_cache_decoding_under_autocast():
    """Decoding under torch.autocast with the module's float32 cache: each step's bfloat16
    queries meet the float32 cached keys, which attention() refused before run 51 (q, k, v
    must share one dtype). The steps give what a bfloat16 cache gives, and the full
    forward's rows within bfloat16's tolerance."""
    m = MultiHeadAttention(24, 32, 4, num_kv_heads=2, qkv_bias=True)
    x = torch.randn(2, 7, 24)
    steps = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = m(x)
        for dtype in (None, torch.bfloat16):
            cache = m.make_kv_cache(2, 8, dtype=dtype)
            parts = [m(x[:, :3], kv_cache=cache)]
            parts += [m(x[:, t:t + 1], kv_cache=cache) for t in range(3, 7)]
            steps[cache.k.dtype] = torch.cat(parts, dim=1)
    assert steps.keys() == {torch.float32, torch.bfloat16}
    assert steps[torch.float32].dtype == torch.bfloat16
    assert torch.equal(steps[torch.float32], steps[torch.bfloat16])
    assert rel(steps[torch.float32], full) < 1e-2
    with torch.no_grad(), pytest.raises(TypeError, match="KVCache holds torch.bfloat16"):
        m(x, kv_cache=m.make_kv_cache(2, 8, dtype=torch.bfloat16))  # no autocast


def test_compiled_decoding_with_the_cache_length_unspecialized():
    """What KVCache's docstring tells a user compiling a decoding loop: with
    allow_unspec_int_on_nn_module, the cache's length is traced as a dynamic size, so
    dynamo compiles twice (the prefill's length, then any length), not once per token."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    if not hasattr(torch._dynamo.config, "allow_unspec_int_on_nn_module"):
        pytest.skip(f"torch {torch.__version__} has no allow_unspec_int_on_nn_module")

    torch._dynamo.reset()
    m = MultiHeadAttention(24, 32, 4, num_kv_heads=2, causal=True, impl="reference")
    x = torch.randn(2, 11, 24)
    cache = m.make_kv_cache(2, 16)
    frames = CompileCounter()
    compiled = torch.compile(m, backend=frames, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        full = m(x)
        parts = [compiled(x[:, :3], kv_cache=cache)]
        parts += [compiled(x[:, t:t + 1], kv_cache=cache) for t in range(3, 11)]
    assert frames.frame_count <= 2
    assert rel(torch.cat(parts, dim=1), full) < 1e-5


def test_kv_cache_errors_and_state():
    m = MultiHeadAttention(24, 24, 4, num_kv_heads=2, impl="reference")
    cache = m.make_kv_cache(2, 4)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 2, 4, 6)
    assert "k" not in cache.state_dict()
    with torch.no_grad():
        m(torch.randn(2, 3, 24), kv_cache=cache)
        with pytest.raises(ValueError, match="KVCache is full"):
            m(torch.randn(2, 2, 24), kv_cache=cache)
        with pytest.raises(ValueError, match="must have shape"):
            m(torch.randn(3, 1, 24), kv_cache=cache)
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="max_len"):
        KVCache(1, 1, 0, 4)
    elsewhere = KVCache(2, 2, 4, 6, device="meta")  # a cache on another device than x
    with torch.no_grad(), pytest.raises(ValueError, match="KVCache is on meta, got k on cpu"):
        m(torch.randn(2, 1, 24), kv_cache=elsewhere)


def test_dropout_only_in_training():
    m = MultiHeadAttention(24, 24, 3, dropout=0.5, impl="reference")
    plain = MultiHeadAttention(24, 24, 3, impl="reference")
    plain.load_state_dict(m.state_dict())
    assert_dropout_only_in_training(m, plain, torch.randn(2, 9, 24))


def test_parameters_and_shapes():
    m = MultiHeadAttention(24, 60, 4, num_kv_heads=2, qkv_bias=True, out_bias=False)
    assert dict((k, tuple(v.shape)) for k, v in m.state_dict().items()) == {
        "qkv.weight": ((4 + 2 * 2) * 15, 24), "qkv.bias": ((4 + 2 * 2) * 15,),
        "out_proj.weight": (60, 60),
    }
    m = MultiHeadAttention(8, 8, 2, dtype=torch.float64)
    assert m.qkv.weight.dtype == torch.float64


@pytest.mark.parametrize(
    "args, kwargs, match",
    [((24, 26, 4), {}, r"d_out \(26\) must be divisible by num_heads \(4\)"),
     ((24, 24, 4), {"num_kv_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads"),
     ((0, 24, 4), {}, "d_in must be a positive int"),
     ((24, 24, 4), {"dropout": 1.0}, "dropout")],
)
def test_constructor_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(*args, **kwargs)


@pytest.mark.parametrize("shape", [(2, 5, 23), (5, 24), (1, 2, 5, 24)])
def test_forward_rejects_bad_x(shape):
    m = MultiHeadAttention(24, 24, 4, impl="reference")
    with pytest.raises(ValueError, match=r"x must have shape \(B, S, d_in=24\)"):
        m(torch.randn(*shape))


def test_auto_impl_runs_when_a_backend_can():
    m = MultiHeadAttention(24, 24, 4)
    x = torch.randn(2, 7, 24)
    try:
        out = m(x)
    except attnkit.UnsupportedError as e:  # only `reference` registered, not in auto's list
        pytest.skip(f"no auto backend registered yet: {e}")
    assert rel(out, oracle(m, x.double())) < 1e-5

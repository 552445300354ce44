"""The fused Triton backend against the float64 oracle.

Without a GPU these run on the CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which is slow: shapes stay tiny, and the interpreter's block size is
16, so lengths 17 and 65 cross several key and query blocks. The interpreter miscomputes
bfloat16 dots (triton-lang/triton#11584), so CPU cases use float16.
"""

import collections
import dataclasses
import functools
import importlib
import inspect
import itertools
import sys
import types
from dataclasses import replace

import pytest
import torch

from attnkit import MultiHeadAttention, UnsupportedError, attention
from attnkit.backends import dropout_mask, fused_triton, hopper_backward
from attnkit.verify import Case, check, default_cases, rel_err
from conftest import benchmark_script, masks_past_the_threshold

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

CUDA = torch.cuda.is_available()
if old_triton := fused_triton.too_old_triton("cuda" if CUDA else "cpu"):
    pytest.skip(old_triton, allow_module_level=True)
DTYPE = torch.bfloat16 if CUDA else torch.float16
BASE = Case(batch=2, heads_q=2, heads_kv=1, seq_q=17, seq_kv=17, head_dim=16, dtype=DTYPE)

CASES = [
    BASE,
    replace(BASE, seq_q=1, seq_kv=65, causal=True),  # one query against a cache
    # wide heads against a cache: on a GPU the forward's tile for few rows (16, 32, 4, 3)
    replace(BASE, seq_q=1, seq_kv=65, head_dim=256, key_lengths=True),
    replace(BASE, seq_q=65, seq_kv=17, causal=True),  # early rows see no key
    replace(BASE, seq_q=17, seq_kv=65, causal=True),
    replace(BASE, batch=1, heads_q=4, heads_kv=1, seq_q=65, seq_kv=65, causal=True),  # MQA
    replace(BASE, head_dim=80, heads_kv=2),
    replace(BASE, head_dim=80, head_dim_v=16, causal=True),
    replace(BASE, seq_q=33, seq_kv=65, window=(7, 3)),
    replace(BASE, seq_q=65, seq_kv=33, window=(20, 0), causal=True),
    replace(BASE, seq_q=17, seq_kv=65, window=(5, None)),
    replace(BASE, seq_q=65, seq_kv=65, window=(None, 4), batch=1),
    replace(BASE, seq_kv=65, key_lengths=True, dead_rows=True),  # a zero key length
    replace(BASE, seq_kv=65, key_lengths=True, causal=True),
    replace(BASE, seq_kv=65, mask="padding"),  # additive (B, 1, 1, Skv)
    replace(BASE, seq_kv=65, mask="padding", dead_rows=True),
    replace(BASE, seq_kv=65, mask="bool", dead_rows=True),  # bool (B, 1, Sq, Skv)
    replace(BASE, seq_kv=65, mask="additive", causal=True),  # general (B, Hq, Sq, Skv)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_oracle(case, device):
    result = check("triton", case, device)
    assert result.skipped is None, result.skipped
    assert result.passed, (result.out_err, result.lse_err, result.grad_err, result.errors)
    assert result.lse_err <= 1e-3  # return_lse ran, and its -inf pattern matched


# Enough keys for several key ranges (on a GPU the ranges are 128 keys, so longer there).
SPLIT_CASES = [replace(c, seq_kv=c.seq_kv * (12 if CUDA else 1)) for c in CASES
               if c.seq_kv > 17]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.name)
def test_forward_over_key_ranges_matches_oracle(case, device, monkeypatch):
    """The forward run over separate key ranges, then merged: what a call with few query
    rows gets on a GPU (_kv_splits). Dead rows, masks, windows and the backward through
    the merged out and lse, as in test_matches_oracle."""
    from attnkit.backends import fused_triton as ft

    launched = _force_key_ranges(monkeypatch, 3)
    result = check("triton", case, device)
    assert result.skipped is None, result.skipped
    assert result.passed, (result.out_err, result.lse_err, result.grad_err, result.errors)
    assert result.lse_err <= 1e-3
    assert ft._merge_kernel in launched  # the forward did run over several ranges


def test_key_ranges_of_unequal_length_merge_under_a_huge_finite_mask(device, monkeypatch):
    """A row wholly at -1e31 is a uniform average of v in the oracle (float64 loses the
    scores against the mask). Merged over key ranges of unequal length by each range's
    float32 lse, the ranges got equal weights instead, whatever their key counts (run 55:
    2.2-2.5% off at 1000 keys in ranges of 512 and 488); by their maxima and sums apart,
    the weights are the key counts."""
    from attnkit.backends import fused_triton as ft

    launched = _force_key_ranges(monkeypatch, 3)
    seq_kv = 1000 if CUDA else 40  # ranges 384, 384, 232 on a GPU; 16, 16, 8 on the CPU
    gen = torch.Generator().manual_seed(55)
    q = torch.randn(1, 2, 2, 16, generator=gen)
    k, v = (torch.randn(1, 2, seq_kv, 16, generator=gen) for _ in range(2))
    mask = torch.randn(1, 1, 2, seq_kv, generator=gen)
    mask[..., 0, :] = -1e31  # the first query row wholly; the second as scores go
    want = attention(*(t.double() for t in (q, k, v)), attn_mask=mask.double(),
                     impl="reference")
    got = attention(*(t.to(device, DTYPE) for t in (q, k, v)), attn_mask=mask.to(device),
                    impl="triton")
    assert ft._merge_kernel in launched
    assert torch.allclose(want[..., 0, :], v.double().mean(2), atol=1e-12)
    assert rel_err(got.double().cpu(), want) < 1e-2, rel_err(got.double().cpu(), want)


def _force_key_ranges(monkeypatch, ranges: int) -> list:
    """Every forward over `ranges` key ranges; on the CPU, ranges as short as the
    interpreter's key block, so that small shapes split too. Returns the list that each
    kernel launched through _launch_jitted (the merge among them) is then appended to."""
    from attnkit.backends import fused_triton as ft

    monkeypatch.setattr(ft, "_kv_splits", lambda call, packed: ranges)
    if not CUDA:
        monkeypatch.setattr(ft, "_SPLIT_ALIGN", ft._INTERPRET_META["BLOCK_N"])
    launched, launch = [], ft._launch_jitted
    monkeypatch.setattr(ft, "_launch_jitted", lambda jitted, *args: launched.append(jitted)
                        or launch(jitted, *args))
    return launched


def test_key_splits_only_where_query_rows_leave_the_gpu_idle(monkeypatch):
    from types import SimpleNamespace

    from attnkit.backends import fused_triton as ft

    monkeypatch.setattr(ft, "_multiprocessors", lambda device: 132)

    def decoding(batch, heads, seq_q, seq_kv, heads_kv=None, device="cuda"):
        heads_kv = heads_kv or heads
        return SimpleNamespace(device=torch.device(device), batch=batch, heads_q=heads,
                               heads_kv=heads_kv, group=heads // heads_kv,
                               grouped=heads != heads_kv, seq_q=seq_q, seq_kv=seq_kv)

    def splits(*shape, **kwargs):
        call = decoding(*shape, **kwargs)
        return ft._kv_splits(call, ft._packs_group(call))

    # 32 programs: 8 ranges make 256, two per SM; 9 would leave 24 to a second wave
    assert splits(1, 32, 1, 16384) == 8
    assert splits(1, 32, 1, 4096) == 4  # at least _SPLIT_KEYS keys per range
    # 32 programs, fewer than half the SMs: ranges of _SHORT_SPLIT_KEYS keys or more
    assert splits(1, 32, 1, 1500) == 5
    assert splits(1, 32, 1, 300) == 1
    assert splits(8, 32, 1, 16384) == 1  # 256 programs already
    assert splits(1, 1, 1, 2**20) == ft._MAX_SPLITS
    assert splits(1, 32, 1, 16384, device="cpu") == 1
    # A group's query heads share one program (packed rows): 8 programs for 32 heads.
    assert splits(1, 32, 1, 16384, heads_kv=8) == 16  # capped by _SPLIT_KEYS
    # shorter caches: 8 programs would be 32 with 4 ranges of _SPLIT_KEYS; instead one
    # program per SM, in ranges of _SHORT_SPLIT_KEYS keys or more
    assert splits(1, 32, 1, 4096, heads_kv=8) == 16
    assert splits(1, 32, 1, 8192, heads_kv=8) == 17
    assert splits(1, 32, 1, 1024, heads_kv=8) == 4
    assert splits(8, 32, 1, 16384, heads_kv=8) == 4  # 64 programs
    assert splits(16, 32, 1, 4096, heads_kv=8) == 2  # 128 programs
    assert splits(1, 32, 64, 16384, heads_kv=8) == 8  # 64 query rows: a tile per head
    # What _forward runs by default: ranges rounded to multiples of _SPLIT_ALIGN keys.
    assert ft._default_key_ranges(decoding(1, 32, 1, 16384)) == 8  # 2048 keys each
    assert ft._default_key_ranges(decoding(1, 32, 1, 1500)) == 4  # 5 wanted: 384 each
    assert ft._default_key_ranges(decoding(1, 32, 1, 300)) == 1


def test_default_matrix(device):
    for case in default_cases(DTYPE, large=CUDA):
        result = check("triton", case, device)
        assert result.skipped is None and result.passed, (case.name, result)


def test_mask_entries_past_the_threshold_hide_their_keys(device):
    # The kernel hides entries below the bound by its scale's overflow to -inf alone.
    q, k, v, mask, grad = masks_past_the_threshold(seed=54)
    q, k, v = (t.to(DTYPE).requires_grad_() for t in (q, k, v))
    assert (attention(q, k, v, attn_mask=mask, impl="triton")[:, :, :3] == 0).all()
    _assert_matches_reference(q, k, v, grad.to(DTYPE), attn_mask=mask)


@pytest.mark.parametrize("scale", [-40.0, 0.0, 2.5])
@pytest.mark.parametrize("causal", [False, True])
def test_explicit_scale(scale, causal, device):
    # Interior key blocks take the row max before scaling (one multiply-add per score):
    # a negative scale turns that max into a min, and at -40 on unit-variance inputs the
    # wrong one overflows exp2.
    q, k, v = (torch.randn(1, 2, 65, 16).to(device, DTYPE).requires_grad_() for _ in range(3))
    _assert_matches_reference(q, k, v, causal=causal, scale=scale, return_lse=True)
    # Gradients on queries shrunk so that |scale * q.k| stays near 10: at 160 every row's
    # softmax is one-hot, its true gradient lies below the fp32 rounding of dP - delta
    # (times |scale|), and the relative error would measure that rounding.
    shrink = min(1.0, 2.5 / abs(scale)) if scale else 1.0
    q = (q.detach() * shrink).requires_grad_()
    grad = torch.randn(1, 2, 65, 16).to(device, DTYPE)
    _assert_matches_reference(q, k, v, grad, causal=causal, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
def test_row_maxima_that_grow_and_shrink_along_the_keys(causal, device):
    """Keys scaled up along the sequence: where q.k > 0 a row's max grows by far more than
    exp2's range over the key blocks (running sums not re-based on it overflow), where
    q.k < 0 the first block's max stays the row's max."""
    s = 300 if CUDA else 65
    ramp = torch.linspace(0.2, 6.0, s)[:, None]
    q, k, v = (torch.randn(2, 2, s, 16) for _ in range(3))
    q, k, v = (t.to(device, DTYPE).requires_grad_() for t in (q, k * ramp, v))
    grad = torch.randn(2, 2, s, 16).to(device, DTYPE)
    _assert_matches_reference(q, k, v, grad, causal=causal, return_lse=True)


def _assert_matches_reference(q, k, v, grad=None, **kwargs) -> None:
    """attention(impl="triton") against the float64 oracle: out (and lse, with return_lse)
    and, given `grad` on out, the gradients of q, k, v, each within 1e-2."""
    results = []
    for impl in ("triton", "reference"):
        outputs = attention(q, k, v, impl=impl, **kwargs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = () if grad is None else torch.autograd.grad(outputs[0], (q, k, v), grad)
        results.append((*outputs, *grads))
    for got, want in zip(*results, strict=True):
        assert rel_err(got, want) < 1e-2


def _fused_qkv(device, b=2, s=33, hq=4, hkv=2, d=16):
    """q, k, v as strided views into one (B, S, (Hq + 2 Hkv) * D) projection output."""
    qkv = torch.randn(b, s, (hq + 2 * hkv) * d).to(device, DTYPE).requires_grad_()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    views = [t.unflatten(-1, (-1, d)).transpose(1, 2) for t in (q, k, v)]  # (B, H, S, D)
    return qkv, views


@pytest.mark.parametrize("causal", [False, True])
def test_strided_views_of_fused_qkv(causal, device):
    qkv, (q, k, v) = _fused_qkv(device)
    assert not q.is_contiguous()
    lengths = torch.tensor([33, 20], device=device)
    out, lse = attention(q, k, v, causal=causal, key_lengths=lengths, impl="triton",
                         return_lse=True)
    ref, lse_ref = attention(q, k, v, causal=causal, key_lengths=lengths, impl="reference",
                             return_lse=True)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(lse, lse_ref) < 1e-3
    # Written in (B, S, H, D) order: the module's move back to (B, S, H*D) is a view.
    assert out.transpose(1, 2).is_contiguous()
    grad_out = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)
    (g,) = torch.autograd.grad(out, qkv, grad_out)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad_out)
    assert rel_err(g, g_ref) < 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_module_with_triton_matches_oracle(causal, device):
    """MultiHeadAttention(impl="triton") on strided views of its own QKV output."""
    torch.manual_seed(7)
    mha = MultiHeadAttention(32, 32, 2, num_kv_heads=1, causal=causal, qkv_bias=True,
                             impl="triton", device=device, dtype=DTYPE)
    x = torch.randn(2, 17, 32).to(device, DTYPE).requires_grad_()
    padding = torch.randn(2, 1, 1, 17).to(device, DTYPE)
    out = mha(x, attn_mask=padding)
    mha.impl = "reference"
    ref = mha(x, attn_mask=padding)
    assert rel_err(out, ref) < 1e-2
    grad_out = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, grad_out)
    (g_ref,) = torch.autograd.grad(ref, x, grad_out)
    assert rel_err(g, g_ref) < 1e-2


def test_general_broadcast_mask_per_head_row(device):
    # (1, Hq, Sq, 1)-style broadcasts stride 0 along the missing dims.
    q = torch.randn(2, 2, 17, 16).to(device, DTYPE)
    k = torch.randn(2, 1, 17, 16).to(device, DTYPE)
    v = torch.randn(2, 1, 17, 16).to(device, DTYPE)
    mask = torch.randn(1, 2, 17, 1).to(device, DTYPE).expand(1, 2, 17, 17)
    out = attention(q, k, v, attn_mask=mask, impl="triton")
    assert rel_err(out, attention(q, k, v, attn_mask=mask, impl="reference")) < 1e-2


def test_backward_is_deterministic(device):
    case = replace(BASE, heads_q=4, heads_kv=1, seq_kv=65, causal=True)
    q, k, v, kwargs = case.make_inputs(device, torch.Generator().manual_seed(3))
    out = attention(q, k, v, impl="triton", **kwargs)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@triton.jit
def _record_program_tiles(out, HEAVIEST_LAST: tl.constexpr, HEAD_GROUP: tl.constexpr):
    """out[i] = the (tile, head) of the i-th program to start."""
    tile, head = fused_triton._program_tile(HEAVIEST_LAST, HEAD_GROUP)
    started = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(out + 2 * started, tile)
    tl.store(out + 2 * started + 1, head)


@pytest.mark.parametrize("n_tiles, n_heads, group, heaviest_last", [
    (5, 7, 3, True), (4, 16, 8, False), (3, 2, 8, True), (6, 5, 1, True), (1, 9, 4, False),
])
def test_programs_go_a_group_of_heads_at_a_time_heaviest_tile_first(n_tiles, n_heads, group,
                                                                      heaviest_last, device):
    out = torch.full((n_tiles * n_heads, 2), -1, dtype=torch.int32, device=device)
    _record_program_tiles[(n_tiles, n_heads)](out, HEAVIEST_LAST=heaviest_last, HEAD_GROUP=group)
    heaviest_first = list(range(n_tiles))[::-1 if heaviest_last else 1]
    expected = [(tile, head) for first in range(0, n_heads, group) for tile in heaviest_first
                for head in range(first, min(first + group, n_heads))]
    assert [tuple(row) for row in out.tolist()] == expected


@triton.jit
def _record_dropout_keep(out, seed, bh, Sq, Skv, N: tl.constexpr):
    """out[j] = whether dropout (p = 1/2) keeps head bh's score (query 0, key j)."""
    keep = dropout_mask.keep_rows(seed, bh, tl.arange(0, 1), 0, Sq, Skv, 0.5, N)
    tl.store(out + tl.arange(0, N)[None, :], keep.to(tl.int8))


def test_dropout_draws_do_not_repeat_past_two_to_the_32_scores(device):
    """Dropout's counter runs over (head, row pair, key group): a 32-bit one wrapped every
    2**32 counts, and the heads that far apart dropped the same keys."""
    skv, n = 2**16, 64
    keeps = []
    # a head spans 8 row pairs (one query) by 2**14 key groups: these heads' calls start
    # 2**32, 2**35 and 2**36 counts after head 0's
    for bh in (0, 2**15, 2**18, 2**19):
        out = torch.empty(n, dtype=torch.int8, device=device)
        _record_dropout_keep[(1,)](out, 5, bh, 1, skv, N=n)
        keeps.append(out)
    assert all(not torch.equal(keeps[0], other) for other in keeps[1:])


@triton.jit
def _record_dropout_masks(out, seed, bh, start_m, start_n, Sq, Skv, ROWS: tl.constexpr,
                          N: tl.constexpr):
    """out[i] (ROWS, N) = the mask (p = 1/2) of rows start_m.. against keys start_n.. as
    drawn by each of dropout's three mask functions, the keys-first one transposed back."""
    rows = tl.arange(0, ROWS)[:, None]
    keys = tl.arange(0, N)[None, :]
    paired = dropout_mask.keep(seed, bh, start_m, ROWS, start_n, Sq, Skv, 0.5, N)
    tl.store(out + rows * N + keys, paired.to(tl.int8))
    keys_first = dropout_mask.keep_keys_first(seed, bh, start_m, ROWS, start_n, Sq, Skv,
                                              0.5, N)
    tl.store(out + ROWS * N + tl.arange(0, N)[:, None] + tl.arange(0, ROWS)[None, :] * N,
             keys_first.to(tl.int8))
    per_row = dropout_mask.keep_rows(seed, bh, start_m + tl.arange(0, ROWS), start_n, Sq,
                                     Skv, 0.5, N)
    tl.store(out + 2 * ROWS * N + rows * N + keys, per_row.to(tl.int8))


@pytest.mark.parametrize("start_m, start_n", [(0, 0), (32, 48), (64, 16)])
def test_dropout_mask_functions_draw_the_same_mask(start_m, start_n, device):
    """The forward and dQ kernels draw dropout's mask with queries on the rows, the dK/dV
    kernel keys first, the packed forward per row: the same scores kept by all three."""
    rows, keys = 32, 64
    out = torch.zeros(3, rows, keys, dtype=torch.int8, device=device)
    _record_dropout_masks[(1,)](out, 7, 3, start_m, start_n, 100, 130, ROWS=rows, N=keys)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert 0.4 < out[0].float().mean().item() < 0.6


def _order_heads_in_groups_of(heads: int, monkeypatch) -> None:
    """Causal calls' programs ordered `heads` heads at a time (_HEAD_GROUP), with none of
    the flags _meta worked out before under another group size."""
    monkeypatch.setattr(fused_triton, "_HEAD_GROUP", heads)
    monkeypatch.setattr(fused_triton, "_META", {})


@pytest.mark.parametrize("case", [
    replace(BASE, batch=3, heads_q=4, heads_kv=2, seq_q=65, seq_kv=65, causal=True),
    replace(BASE, batch=3, heads_q=2, heads_kv=2, seq_q=33, seq_kv=65, window=(20, 0),
            causal=True, key_lengths=True),
], ids=lambda c: c.name)
def test_causal_calls_in_groups_of_heads_match_oracle(case, device, monkeypatch):
    """Causal calls order their programs HEAD_GROUP heads at a time: with groups of 4,
    12 (batch, head) pairs make three groups in the forward and dQ kernel, 6 (batch, kv
    head) pairs a full and a short one in the dK/dV kernel."""
    _order_heads_in_groups_of(4, monkeypatch)
    result = check("triton", case, device)
    assert result.skipped is None, result.skipped
    assert result.passed, (result.out_err, result.lse_err, result.grad_err, result.errors)


@pytest.mark.parametrize("fwd_config, bwd_configs", [
    ((32, 16, 4, 1), ((16, 32, 4, 1), (32, 16, 4, 1))),
    ((16, 64, 8, 2), ((64, 16, 8, 2), (16, 64, 8, 2))),
])
def test_explicit_tile_configs_match_oracle(device, fwd_config, bwd_configs):
    # The path benchmarks/triton_configs.py times: every kernel launched with a given
    # tile config instead of the autotuned one, on a causal GQA case with dead rows.
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    case = replace(BASE, heads_q=4, heads_kv=2, seq_q=40, seq_kv=33, causal=True)
    q, k, v, kwargs = case.make_inputs(device, torch.Generator().manual_seed(5))
    call = make_call(q, k, v, **kwargs)
    out, lse = ft._forward(call, 0, fwd_config)
    grad_out = torch.randn_like(out)
    grads = ft._backward(call, 0, out, lse, grad_out, bwd_configs)
    want = attention(q, k, v, impl="reference", **kwargs)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out.double())
    assert rel_err(out, want) < 1e-2
    for got, ref in zip(grads, want_grads, strict=True):
        assert rel_err(got, ref) < 1e-2
    # The config reaches the kernel: a tile of 24 rows is not a power of two.
    with pytest.raises(Exception, match="power of 2"):  # noqa: B017 - the class varies by version
        ft._forward(call, 0, (24, 16, 4, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_wide_head_tiles_match_oracle_on_gpu(head_dim, causal):
    """Heads wider than 128 under each of their own tiles, forced where the autotuner
    might pass one over: the forward's 128-row tile through TMA and by pointers, the
    pair's (64, 32, 4, 2), dQ's (128, 32, 8, 2), the decoding tile on 32 rows; with
    grouped heads, key lengths and a row that sees no key."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    case = Case(batch=2, heads_q=4, heads_kv=2, seq_q=300, seq_kv=1000, head_dim=head_dim,
                causal=causal, key_lengths=True, dead_rows=True, dtype=torch.bfloat16)
    q, k, v, kwargs = case.make_inputs("cuda", torch.Generator().manual_seed(9))
    call = make_call(q, k, v, **kwargs)
    want = attention(q, k, v, impl="reference", **kwargs)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    for tile, tma in ((ft._WIDE_FWD_TILE, True), (ft._WIDE_FWD_TILE, False),
                      (ft._WIDE_TILES[0], False)):
        out, lse = ft._forward(call, 0, tile, tma=tma)
        assert rel_err(out, want) < 1e-2, tile
    grads = ft._backward(call, 0, out, lse, grad_out.to(out.dtype),
                         (ft._WIDE_TILES[0], ft._WIDE_DQ_TILE))
    for got, ref in zip(grads, want_grads, strict=True):
        assert rel_err(got, ref) < 1e-2
    last = make_call(q[:, :, -16:], k, v, **kwargs)  # a group's 2 x 16 rows in one program
    out = ft._forward(last, 0, ft._WIDE_DECODE_TILE, packed=True)[0]
    assert rel_err(out, want[:, :, -16:]) < 1e-2  # causal runs to the bottom right


@pytest.mark.parametrize("case", [
    replace(BASE, seq_q=65, seq_kv=17, causal=True),  # dead rows, a ragged last key block
    replace(BASE, head_dim=80, head_dim_v=16, heads_kv=2),  # D below the tile: zero fill
    replace(BASE, seq_kv=65, key_lengths=True, mask="padding", dead_rows=True),
    replace(BASE, seq_q=33, seq_kv=65, window=(7, 3), heads_q=4, heads_kv=1),
], ids=lambda c: c.name)
def test_tma_forward_matches_oracle(device, case):
    # The forward's K and V tiles through tensor descriptors, forced where _tma_ready
    # would say no (the interpreter, an older GPU): the loads that replace the masked
    # pointer loads.
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    q, k, v, kwargs = case.make_inputs(device, torch.Generator().manual_seed(9))
    call = make_call(q, k, v, **kwargs)
    out, lse = ft._forward(call, 0, (32, 16, 4, 1), tma=True)
    want, want_lse = attention(q, k, v, impl="reference", return_lse=True, **kwargs)
    assert rel_err(out, want) < 1e-2
    dead = want_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), dead)
    assert (lse[~dead] - want_lse[~dead]).abs().max() < 1e-2


def test_tma_layout_check():
    from attnkit.backends.fused_triton import _tma_layout

    qkv = torch.randn(2, 17, 3, 4, 64, dtype=torch.float16)  # a fused projection's output
    k = qkv[:, :, 1].transpose(1, 2)  # (B, H, S, D) view, rows 3 * 4 * 64 apart
    assert _tma_layout(k)
    assert not _tma_layout(k.transpose(2, 3))  # D not contiguous
    assert not _tma_layout(qkv.flatten()[1:1 + k.numel()].view(2, 4, 17, 64))  # off by 2 B
    narrow = torch.randn(2, 4, 17, 4, dtype=torch.float16)[..., :3]  # 6-byte rows
    assert not _tma_layout(narrow)


def test_prune_offers_tma_configs_only_where_allowed():
    # TMA configs are autotuned beside pointer ones only where the host found the layout
    # fit (TMA_OK); wide heads get the small pointer tiles, still naming TMA for the forward.
    from attnkit.backends import fused_triton as ft

    configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "TMA": tma}, num_warps=4,
                             num_stages=3) for tma in (False, True)]
    long = {"SEQ_BUCKET": ft._seq_bucket(4096, 4096)}
    heads = {"HEAD_D": 128, "HEAD_DV": 128, **long}
    assert ft._prune(configs, heads, TMA_OK=True) == configs
    assert [c.kwargs["TMA"] for c in ft._prune(configs, heads, TMA_OK=False)] == [False]
    wide = ft._prune(configs, {"HEAD_D": 256, "HEAD_DV": 256, **long}, TMA_OK=True)
    assert [(c.kwargs["BLOCK_N"], c.kwargs["TMA"]) for c in wide] == [(32, False), (32, False)]
    # the forward of wide heads: beside the pair, one 128-row tile, through TMA if allowed
    for tma_ok in (True, False):
        forward = ft._prune(configs, {"HEAD_D": 192, "HEAD_DV": 192, **long}, kernel="fwd",
                            TMA_OK=tma_ok)
        assert [(*ft._tiles(c), c.kwargs["TMA"]) for c in forward] == [
            (64, 32, 4, 2, False), (32, 32, 4, 1, False), (128, 64, 8, 2, tma_ok)]


@pytest.mark.parametrize("kernel, queries, keys, head, group, kept", [
    ("fwd", 32, 32, 64, 1, [(64, 64, 4, 3, False)]),  # 17 x 17: the smallest, without TMA
    ("fwd", 64, 32, 128, 1, [(64, 64, 4, 3, False)]),
    ("fwd", 128, 128, 64, 1, [(64, 64, 4, 3, False), (128, 64, 8, 3, False),  # split it
                              (128, 128, 8, 3, False),  # holds it, as TMA's (128, 128) does
                              (64, 64, 4, 3, True), (128, 64, 4, 3, True),
                              (64, 128, 4, 3, True)]),
    # one query against a cache: no tile holds the keys; 64 rows hold the query
    ("fwd", 1, 16384, 64, 1, [(64, 64, 4, 3, False), (64, 64, 4, 3, True),
                              (64, 128, 4, 3, True)]),
    ("fwd", 1, 16384, 128, 4, [(64, 64, 4, 3, False), (64, 64, 4, 3, True),  # 4 packed
                               (64, 128, 4, 3, True)]),
    ("fwd", 16, 16384, 128, 4, [(64, 64, 4, 3, False), (64, 64, 4, 3, True),  # 64 packed
                                (64, 128, 4, 3, True)]),
    ("fwd", 32, 16384, 128, 4, "all"),  # 128 packed rows: only the tallest tiles hold them
    # wide heads: one short tile for few rows (_WIDE_DECODE_ROWS), else their pair, and
    # from 65 rows the forward's own 128-row tile (here through TMA)
    ("fwd", 1, 16384, 256, 4, [(16, 32, 4, 3, False)]),
    ("fwd", 16, 16384, 256, 2, [(16, 32, 4, 3, False)]),  # 32 packed rows
    ("fwd", 32, 16384, 256, 2, [(64, 32, 4, 2, False), (32, 32, 4, 1, False)]),  # 64 packed
    ("fwd", 64, 16384, 256, 1, [(64, 32, 4, 2, False), (32, 32, 4, 1, False)]),
    ("fwd", 128, 16384, 256, 1, [(64, 32, 4, 2, False), (32, 32, 4, 1, False),
                                 (128, 64, 8, 2, True)]),
    ("fwd", 32, 32, 64, 2, [(64, 64, 4, 3, False)]),  # a packed group of 2: 2 x 17 rows
    ("fwd", 32, 32, 64, 4, [(64, 64, 4, 3, False), (128, 64, 8, 3, False),  # 4 x 17 rows:
                            (64, 64, 4, 3, True), (64, 128, 4, 3, True)]),  # 64 split them
    ("dkdv", 32, 32, 80, 1, [(32, 64, 4, 2, None)]),
    ("dkdv", 64, 64, 80, 1, [(32, 64, 4, 2, None), (64, 64, 4, 2, None)]),
    ("dkdv", 32, 32, 80, 4, [(32, 64, 4, 2, None)]),  # a group's heads loop, unpacked
    ("dq", 32, 32, 64, 1, [(64, 64, 4, 2, None)]),  # (128, 32, 4, 4): same area, more stages
    ("dq", 64, 64, 64, 1, [(64, 64, 4, 2, None), (128, 32, 4, 4, None)]),
    ("dq", 32, 32, 256, 1, [(32, 32, 4, 1, None)]),  # wide heads' small pair
    ("dq", 64, 64, 256, 1, [(64, 32, 4, 2, None), (32, 32, 4, 1, None),  # each splits it
                            (128, 32, 8, 2, None)]),  # and dQ's own for wide heads
    ("dkdv", 64, 64, 256, 1, [(64, 32, 4, 2, None), (32, 32, 4, 1, None)]),
])
def test_prune_keeps_the_smallest_of_the_tiles_that_hold_the_problem(kernel, queries, keys,
                                                                       head, group, kept):
    # Every tile that holds the whole problem runs one program per head and one loop
    # step, so tuning among them only costs compiles: the smallest is kept, and the tiles
    # that split the problem stay candidates beside it. In the forward, tiles taller than
    # the shortest that holds a program's rows go too.
    from attnkit.backends import fused_triton as ft

    variants = {"fwd": [(ft._FWD_CONFIGS, {"TMA": False}), (ft._FWD_TMA_CONFIGS, {"TMA": True})],
                "dkdv": [(ft._DKDV_CONFIGS, {})], "dq": [(ft._DQ_CONFIGS, {})]}[kernel]
    made = [config for configs, meta in variants for config in ft._tile_configs(configs, meta)]
    packed = kernel == "fwd" and group > 1
    args = {"HEAD_D": head, "HEAD_DV": head, "WINDOWED": False, "TMA_OK": True,
            # _forward buckets a packed program's rows: the group's heads' queries
            "SEQ_BUCKET": ft._seq_bucket(queries * group if packed else queries, keys),
            "DROPOUT": False, **({"PACKED": packed} if kernel == "fwd" else {})}
    every = ft._prune(made, {**args, "SEQ_BUCKET": ft._seq_bucket(16384, 16384)})
    want = [(*ft._tiles(c), c.kwargs.get("TMA")) for c in every] if kept == "all" else kept
    for order in (1, -1):  # ties go by size, not by place in the list
        offered = ft._prune(made[::order], args, kernel=kernel)  # no Q: _SWEPT stays out
        assert sorted((*ft._tiles(c), c.kwargs.get("TMA")) for c in offered) == sorted(want)


def test_a_packed_forward_is_tuned_by_its_programs_rows(monkeypatch):
    """A forward that packs a kv group's query heads into one tile (_packs_group) runs
    Sq x group rows a program, which _prune picks its tiles by: the tuning key's query
    bucket is theirs, so calls that differ only in their group are tuned apart, and none
    reuses a tile picked for another count of rows."""
    import inspect

    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    kernel = ft._fwd_kernel
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    where = list(inspect.signature(kernel).parameters).index("SEQ_BUCKET")
    launched = []
    monkeypatch.setattr(ft, "_launch", lambda kernel, grid, args, *rest, **options:
                        launched.append(args[where]))
    q = torch.randn(1, 8, 16, 16, dtype=torch.float16)
    for heads_kv in (4, 2, 8):  # groups of 2 and 4, packed; then 1, not packed
        k, v = (torch.randn(1, heads_kv, 100, 16, dtype=torch.float16) for _ in range(2))
        ft._forward(make_call(q, k, v), 0)
    assert [ft._split_bucket(bucket) for bucket in launched] == [(32, 128), (64, 128),
                                                                 (16, 128)]


# What a triton.Config adds to a launch's keywords, after its flags (all_kwargs).
_CONFIG_KEYWORDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_ctas", "num_stages", "maxnreg")


def _build_tiles(build: tuple) -> tuple[int, int, int, int]:
    """The tile config of a build as _build_ahead takes it: (kernel, args, keywords)."""
    keywords = build[2]
    assert list(keywords)[0] == "grid"
    return (keywords["BLOCK_M"], keywords["BLOCK_N"], keywords["num_warps"],
            keywords["num_stages"])


def test_autotuner_rounds_build_their_candidates_at_once_before_timing(monkeypatch):
    """_prune leaves the round's candidates with the launch's arguments; the first timing
    of the round builds them (once), on threads, with the launch's own arguments and
    flags and each config's; a round whose result came from disk times nothing and
    builds nothing, and the next round replaces what it left; a round of one candidate
    is not timed."""
    from attnkit.backends import fused_triton as ft

    built, timed = [], []

    def build(builds):
        (jitted, args, _), *_ = builds
        assert all(b[:2] == (jitted, args) for b in builds)
        built.append((jitted, args, sorted(set(builds[0][2]) - set(_CONFIG_KEYWORDS)),
                      [_build_tiles(b) for b in builds]))

    def benchmarker(call, quantiles, warmup, rep):
        timed.append(call())
        timings.append((warmup, rep))
        return [1.0] * len(quantiles)

    timings = []
    monkeypatch.setattr(ft, "_run_ms", lambda call: 0.5)  # one run of a candidate
    monkeypatch.setattr(ft, "_build_ahead", build)
    monkeypatch.setattr(ft.triton.runtime, "driver", types.SimpleNamespace(
        active=types.SimpleNamespace(get_benchmarker=lambda: benchmarker)))
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=4, num_stages=2)
               for m in (32, 64)]
    args = {"HEAD_D": 64, "HEAD_DV": 64, "SEQ_BUCKET": ft._seq_bucket(4096, 4096)}
    ft._prune(configs, {"Q": "q", "K": "k"}, jitted="on disk", **args)  # no timing follows
    kept = ft._prune(configs, {"Q": "q", "K": "k"}, jitted="kernel", grid=(1,), **args)
    assert [ft._tiles(c) for c in kept] == [(32, 64, 4, 2), (64, 64, 4, 2)]
    assert ft._timed(lambda: "first", (0.5, 0.2)) == [1.0, 1.0]
    assert ft._timed(lambda: "second", (0.5,)) == [1.0]
    assert built == [("kernel", ("q", "k"), sorted(["grid", *args]),
                      [(32, 64, 4, 2), (64, 64, 4, 2)])]
    assert timed == ["first", "second"]
    assert timings == [(2.5, 10.0)] * 2  # _TIMED_RUNS runs of 0.5 ms, a quarter to warm up
    # A round left one candidate (_one_tile, at a shape both tiles hold) times nothing.
    small = {**args, "SEQ_BUCKET": ft._seq_bucket(32, 32)}
    assert len(ft._prune(configs, {"Q": "q", "K": "k"}, jitted="kernel", **small)) == 1
    assert ft._timed(lambda: "alone", (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert timed == ["first", "second"] and len(built) == 1


@pytest.mark.parametrize("run_ms, timing_ms", [
    (0.01, 5.0),  # a small call's candidate: 5 ms, where Triton's own took 125
    (1.0, 20.0),
    (5.0, 100.0),  # from 5 ms a run, Triton's 100 ms, as before
    (40.0, 100.0),
])
def test_candidates_are_timed_for_about_twenty_runs(run_ms, timing_ms):
    from attnkit.backends import fused_triton as ft

    assert ft._timing_ms(run_ms) == timing_ms


def test_build_ahead_warms_each_config_up_on_threads(monkeypatch):
    """_build_ahead hands each build to its kernel's warmup, with the launch's arguments
    and keywords in their order (_candidate_builds: the grid, the flags but the
    autotuner's warmup keyword, the config's), inside one AsyncCompileMode; one build, or
    a warmup that raises, builds nothing ahead (the latter with a warning) and leaves the
    launches to build them."""
    from triton.runtime import _async_compile

    from attnkit.backends import fused_triton as ft

    class Kernel:
        def __init__(self, fails=False):
            self.calls, self.fails = [], fails

        def warmup(self, *args, grid, **kwargs):
            if self.fails:
                raise RuntimeError("cannot bind")
            self.calls.append((args, grid, list(kwargs.items()),
                               _async_compile.active_mode.get() is not None))
            return f"built {kwargs['BLOCK_M']}"

    launchers = []
    monkeypatch.setattr(ft, "_build_launchers", lambda built, threads: launchers.append(built))
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 32}, num_warps=w, num_stages=1)
               for m, w in ((32, 4), (64, 8))]
    kernel = Kernel()
    ft._build_ahead(ft._candidate_builds(kernel, {"Q": 1, "n": 2},
                                         {"grid": "g", "warmup": False, "FLAG": 3}, configs))
    assert [(args, grid, kw[:3], in_mode) for args, grid, kw, in_mode in kernel.calls] == [
        ((1, 2), "g", [("FLAG", 3), ("BLOCK_M", 32), ("BLOCK_N", 32)], True),
        ((1, 2), "g", [("FLAG", 3), ("BLOCK_M", 64), ("BLOCK_N", 32)], True)]
    # the config's options as the autotuner launches it: all_kwargs, in its order
    assert [kw[1:] for _, _, kw, _ in kernel.calls] == [
        list(c.all_kwargs().items()) for c in configs]
    assert launchers == [["built 32", "built 64"]]  # then their launchers, from what it built
    alone = Kernel()
    ft._build_ahead(ft._candidate_builds(alone, {"Q": 1}, {"grid": "g"}, configs[:1]))
    assert alone.calls == []
    with pytest.warns(RuntimeWarning, match="one by one"):
        ft._build_ahead(ft._candidate_builds(Kernel(fails=True), {"Q": 1}, {"grid": "g"},
                                             configs))
    assert _async_compile.active_mode.get() is None
    assert len(launchers) == 1


def test_launchers_are_built_once_per_kernel_and_argument_types(monkeypatch):
    """_build_launchers builds a launcher for each (kernel, argument types) among the
    built kernels (compiled ones, or futures of them), on threads; a failed build
    (warmup's None, a future that failed) has none, and a launcher that fails to build
    is left to the kernel's first launch."""
    import threading

    from attnkit.backends import fused_triton as ft

    def compiled(fn, signature):
        return types.SimpleNamespace(src=types.SimpleNamespace(fn=fn, signature=signature),
                                     metadata=f"{fn} metadata")

    made, caller = [], threading.get_ident()

    def launcher_cls(src, metadata):
        made.append((src.fn, src.signature, metadata, threading.get_ident() != caller))
        if src.fn == "fails":
            raise RuntimeError("no C compiler")

    monkeypatch.setattr(ft.triton.runtime, "driver", types.SimpleNamespace(
        active=types.SimpleNamespace(launcher_cls=launcher_cls)))
    built = [compiled("dq", {"Q": "*bf16", "n": "i32"}),
             types.SimpleNamespace(kernel=compiled("dq", {"Q": "*bf16", "n": "i32"})),
             compiled("dq", {"Q": "*bf16", "n": "constexpr"}),  # n == 1: other types
             types.SimpleNamespace(kernel=None), None, compiled("fails", {"Q": "*fp16"}),
             compiled("dkdv", {"Q": "*bf16", "n": "i32"})]
    ft._build_launchers(built, threads=4)
    assert sorted(made, key=str) == sorted([
        ("dq", {"Q": "*bf16", "n": "i32"}, "dq metadata", True),
        ("dq", {"Q": "*bf16", "n": "constexpr"}, "dq metadata", True),
        ("fails", {"Q": "*fp16"}, "fails metadata", True),
        ("dkdv", {"Q": "*bf16", "n": "i32"}, "dkdv metadata", True)], key=str)
    made.clear()
    ft._build_launchers([None, types.SimpleNamespace(kernel=None)], threads=4)
    assert made == []


def test_a_backwards_lone_candidates_are_built_together(monkeypatch):
    """_build_lone_rounds builds, in one _build_ahead, the kernels of the launches that
    are not tuned yet and have one candidate left; a launch with several candidates (left
    to its round) or already tuned (_CHOSEN) is not built, and nothing stays stashed."""
    from attnkit.backends import fused_triton as ft

    def tuned(left):
        def prune(configs, named, **kwargs):  # as _prune does, it stashes the round
            ft._AHEAD.pending = ("a round of", configs[:left])
            return configs[:left]

        @triton.autotune([triton.Config({"BLOCK_M": m}, num_warps=1, num_stages=1)
                          for m in (16, 32)], key=["n"],
                         prune_configs_by={"early_config_prune": prune})
        @triton.jit
        def copy(src, dst, n, FLAG: tl.constexpr, BLOCK_M: tl.constexpr):
            tl.store(dst + tl.arange(0, BLOCK_M), tl.load(src + tl.arange(0, BLOCK_M)))
        return copy

    built = []
    monkeypatch.setattr(ft, "_build_ahead", built.append)
    monkeypatch.setattr(ft, "_CHOSEN", {})
    lone, other_lone, several, chosen = tuned(1), tuned(1), tuned(2), tuned(1)
    ft._CHOSEN[(chosen, "key")] = ({"BLOCK_M": 16}, {"num_warps": 1})
    launches = [(kernel, "grid", ("src", "dst", 7), {"FLAG": i}, "key")
                for i, kernel in enumerate((lone, several, chosen, other_lone))]
    ft._build_lone_rounds(*launches)
    config = lone.configs[0].all_kwargs()
    assert built == [[(lone.fn, ("src", "dst", 7), {"grid": "grid", "FLAG": 0, **config}),
                      (other_lone.fn, ("src", "dst", 7), {"grid": "grid", "FLAG": 3, **config})]]
    assert ft._AHEAD.pending is None


def test_riders_are_built_with_the_rounds_candidates(monkeypatch):
    """What rides with a round (_launch's riders) is worked out and built in the round's
    first timing, in one _build_ahead with the round's candidates, and once; with a lone
    candidate too, which is then not timed. A round without riders builds as before."""
    from attnkit.backends import fused_triton as ft

    built, timed, asked = [], [], []
    monkeypatch.setattr(ft, "_build_ahead", lambda builds: built.append(
        [b if isinstance(b, str) else _build_tiles(b) for b in builds]))
    monkeypatch.setattr(ft.triton.runtime, "driver", types.SimpleNamespace(
        active=types.SimpleNamespace(get_benchmarker=lambda: lambda call, quantiles, **_: (
            timed.append(call()), [1.0] * len(quantiles))[1])))
    monkeypatch.setattr(ft, "_run_ms", lambda call: 1.0)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=4, num_stages=2)
               for m in (32, 64)]
    args = {"HEAD_D": 64, "HEAD_DV": 64, "SEQ_BUCKET": ft._seq_bucket(4096, 4096)}
    for shape, riders, want_built, want_timed in (
            (4096, ["dq", "dkdv"], [[(32, 64, 4, 2), (64, 64, 4, 2), "dq", "dkdv"]], 2),
            (32, ["dq"], [[(32, 64, 4, 2), "dq"]], 0),  # lone: built with its riders
            (32, None, [], 0),  # lone and alone: the autotuner's launch builds it
            (4096, None, [[(32, 64, 4, 2), (64, 64, 4, 2)]], 2)):
        built.clear(), timed.clear(), asked.clear()
        ft._AHEAD.riders = None if riders is None else functools.partial(
            lambda r: asked.append(1) or r, riders)
        kept = ft._prune(configs, {"Q": "q"}, jitted="kernel",
                         **{**args, "SEQ_BUCKET": ft._seq_bucket(shape, shape)})
        for _ in kept:  # the autotuner times each candidate in turn
            ft._timed(lambda: "a candidate", (0.5,))
        assert built == want_built and len(timed) == want_timed
        assert len(asked) == (riders is not None) and ft._AHEAD.riders is None


def test_launch_hands_riders_to_a_round_it_tunes_only(monkeypatch):
    """_launch leaves its riders for the autotuner's round only when the autotuner is to
    run (not for a key tuned already), and not after, even when the launch fails; it does
    not work them out itself (a round served from disk is not timed, and needs none)."""
    from attnkit.backends import fused_triton as ft

    @triton.autotune([triton.Config({"BLOCK_M": m}, num_warps=1, num_stages=1)
                      for m in (16, 32)], key=["n"])
    @triton.jit
    def copy(src, dst, n, BLOCK_M: tl.constexpr):
        tl.store(dst + tl.arange(0, BLOCK_M), tl.load(src + tl.arange(0, BLOCK_M)))

    seen, asked, direct = [], [], []

    def run(*args, fails=False, **kwargs):
        seen.append(ft._AHEAD.riders)
        if fails:
            raise RuntimeError("no build")
        copy.best_config = copy.configs[0]

    monkeypatch.setattr(copy, "run", run)
    monkeypatch.setattr(ft, "_CHOSEN", {})
    monkeypatch.setattr(ft, "_launch_jitted", lambda *args: direct.append(args[0]))
    riders = functools.partial(lambda: asked.append(1) or ["a build"])
    with pytest.raises(RuntimeError, match="no build"):
        ft._launch(copy, (1,), ("src", "dst", 7), {"fails": True}, "key", riders=riders)
    assert seen == [riders] and ft._AHEAD.riders is None
    ft._launch(copy, (1,), ("src", "dst", 7), {}, "key", riders=riders)
    ft._launch(copy, (1,), ("src", "dst", 7), {}, "key", riders=riders)  # tuned: direct
    ft._launch(copy, (1,), ("src", "dst", 7), {}, "other key")
    assert seen == [riders, riders, None] and not asked
    assert direct == [copy.fn] and ft._AHEAD.riders is None


_TRITON_BACKWARD_CALLS = [
    {"causal": True}, {"key_lengths": True}, {"dropout_p": 0.25}, {"window": (5, 2)},
    {"mask": "padding"}, {"grouped": True, "head_dim": 80}, {"head_dim": 24}]


@pytest.mark.parametrize("options, gluon", [
    *((options, False) for options in _TRITON_BACKWARD_CALLS),
    *((options, True) for options in _TRITON_BACKWARD_CALLS[:3])])  # what Gluon's take
def test_a_forward_foresees_its_backwards_launches(options, gluon, device, monkeypatch):
    """The backward's launches as the forward foresees them (_stand_in_backward), its
    Triton kernels' and its Gluon kernels', are the backward's own in kernel, flags (and
    tuning key), options and everything a build specializes on, for the gradients a
    backward usually gets (randn_like(out), a contiguous one); for Triton's, a gradient
    that is not laid out so (sum()'s, broadcast; a contiguous one where the head dim is
    not a multiple of 16) differs, and builds its own."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    options = dict(options)
    d = options.pop("head_dim", 64)
    heads_kv = 1 if options.pop("grouped", False) else 2
    b, h, s = 2, 2, 33
    q = torch.randn(b, h, s, d).to(device, DTYPE)
    k, v = (torch.randn(b, heads_kv, s + 4, d).to(device, DTYPE) for _ in range(2))
    if options.pop("key_lengths", False):
        options["key_lengths"] = torch.tensor([37, 20], device=device)
    if options.pop("mask", None):
        options["attn_mask"] = torch.randn(b, 1, 1, s + 4).to(device, DTYPE)
    call = make_call(q, k, v, **options)
    out, lse = ft._forward(call, 0)
    # Where the Gluon kernels take the backward, their launches are only collected.
    monkeypatch.setattr(ft, "_uses_hopper_backward", lambda call, out, dout: (gluon, gluon))
    launched = []
    monkeypatch.setattr(ft, "_launch", lambda *launch: launched.append(launch))
    monkeypatch.setattr(ft, "_launch_jitted", lambda *launch: launched.append(launch))

    def specialized(launches):  # the flags and tuning key (Triton), constexprs and options
        return [(kernel, ft._specialization(args), *rest[:2]) for kernel, grid, args, *rest
                in launches]

    triton_launches, gluon_launches = ft._stand_in_backward(call, 0, out, lse)
    foreseen = specialized(triton_launches + gluon_launches)
    assert [launch[0] for launch in foreseen] == (
        [hopper_backward.dq_kernel, hopper_backward.dkdv_kernel] if gluon
        else [ft._bwd_dq_kernel, ft._bwd_dkdv_kernel])
    # (a Gluon kernel reads the gradient through a TMA descriptor, whose strides are
    # values, not specialized on; a broadcast gradient is not TMA's and goes to Triton's)
    for dout, same in ((torch.randn_like(out), True),
                       (torch.randn(out.shape).to(out), d % 16 == 0),
                       (torch.ones((), device=device, dtype=out.dtype).expand(out.shape),
                        gluon)):
        launched.clear()
        ft._backward(call, 0, out, lse, dout)
        assert (specialized(launched) == foreseen) is same


def test_a_backward_that_cannot_be_foreseen_builds_nothing_ahead(monkeypatch):
    from attnkit.backends import fused_triton as ft

    def cannot(*args):
        raise AttributeError("a Gluon this host code does not know")

    monkeypatch.setattr(ft, "_stand_in_backward", cannot)
    assert ft._backward_builds("call", 0, "out", "lse") == []


def test_prune_keeps_the_swept_winners_for_128_wide_heads(monkeypatch):
    # The H100 sweep's winners replace the autotuner's choice where it mis-ranked them
    # (NOTES run 10), on the kind of GPU it ran on; every other head dim keeps the whole
    # list, and so does every other GPU (where a loser may be the one tile that fits).
    from attnkit.backends import fused_triton as ft

    swept = {"cpu": True}  # Q below is a CPU tensor, standing for one on a GPU
    monkeypatch.setattr(ft, "_swept_here", lambda device: swept[device.type])

    def offered(kernel, configs, head, windowed, keys=4096, dropout=False, **extra):
        made = ft._tile_configs(configs, extra)
        args = {"HEAD_D": head, "HEAD_DV": head, "WINDOWED": windowed, "TMA_OK": True,
                "SEQ_BUCKET": ft._seq_bucket(keys, keys), "DROPOUT": dropout,
                "Q": torch.empty(0)}
        return [ft._tiles(c) for c in ft._prune(made, args, kernel=kernel)]

    assert offered("dq", ft._DQ_CONFIGS, 128, False) == [(128, 64, 8, 3)]
    assert offered("dq", ft._DQ_CONFIGS, 64, False) == ft._DQ_CONFIGS
    assert offered("dkdv", ft._DKDV_CONFIGS, 128, False) == [(64, 64, 4, 2)]
    assert offered("dkdv", ft._DKDV_CONFIGS, 128, True) == [(64, 128, 8, 3)]
    assert offered("dkdv", ft._DKDV_CONFIGS, 80, True) == ft._DKDV_CONFIGS
    assert offered("dkdv", ft._DKDV_CONFIGS, 128, False, dropout=True) == ft._DKDV_CONFIGS
    tma = ft._FWD_TMA_CONFIGS
    assert offered("fwd", tma, 64, False, TMA=True) == tma
    assert offered("fwd", tma, 128, True, TMA=True) == [(64, 64, 4, 3), (128, 128, 8, 3)]
    short = offered("fwd", tma, 64, False, keys=1024, TMA=True)
    assert short == [(64, 64, 4, 3), (128, 128, 8, 3)]
    swept["cpu"] = False
    assert offered("dkdv", ft._DKDV_CONFIGS, 128, True) == ft._DKDV_CONFIGS
    assert offered("dq", ft._DQ_CONFIGS, 128, False) == ft._DQ_CONFIGS
    assert offered("fwd", tma, 128, True, TMA=True) == tma


@pytest.mark.parametrize("device, capability, swept", [
    ("cuda:0", (9, 0), True), ("cuda:1", (8, 9), False), ("cuda:0", (10, 0), False),
    ("cpu", None, False)])
def test_swept_winners_apply_on_the_gpu_kind_of_the_sweep(monkeypatch, device, capability,
                                                           swept):
    from attnkit.backends import fused_triton as ft

    def get_capability(device):
        assert capability is not None, "asked a CPU's compute capability"
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    assert ft._swept_here(torch.device(device)) is swept


def test_launch_remembers_the_autotuners_pick(monkeypatch, device):
    # After a key's first launch _launch skips Triton's Autotuner (whose per-launch key
    # building costs host time) and launches the kernel with the remembered config, all
    # of its meta-parameters (the forward's TMA, here FACTOR) as well as its tiles.
    from attnkit.backends import fused_triton as ft

    def fake_bench(fn, quantiles=None):  # every config "takes" 1 ms: the first one wins
        fn()
        return [1.0, 1.0, 1.0]

    @triton.autotune([triton.Config({"BLOCK_M": m, "BLOCK_N": 16, "FACTOR": 2}, num_warps=1,
                                    num_stages=1) for m in (16, 32)],
                     key=["n"], do_bench=fake_bench)
    @triton.jit
    def double(src, dst, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               FACTOR: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(dst + offs, FACTOR * tl.load(src + offs, mask=offs < n), mask=offs < n)

    monkeypatch.setattr(ft, "_CHOSEN", {})
    ft._AHEAD.pending = ("a round's", "candidates", "left by", "_prune")
    src = torch.randn(50, device=device)
    runs, kernel_runs = [], []
    monkeypatch.setattr(double, "run", lambda *a, _run=double.run, **kw: runs.append(1)
                        or _run(*a, **kw))
    # The kernel's own launches, each with the options it was given (the keywords that
    # are not parameters), in order: Triton's in-memory cache keys a kernel by their text.
    params = set(double.arg_names)
    monkeypatch.setattr(double.fn, "run", lambda *a, _run=double.fn.run, **kw: kernel_runs.append(
        [(k, v) for k, v in kw.items() if k not in params | {"grid", "warmup"}])
        or _run(*a, **kw))
    tuning_runs = None
    for _ in range(3):
        dst = torch.zeros(50, device=device)
        ft._launch(double, lambda meta: (ft._cdiv(50, meta["BLOCK_M"]),), (src, dst, 50), {},
                   tune_key=("n", 50))
        torch.testing.assert_close(dst, 2 * src)
        tuning_runs = tuning_runs or list(kernel_runs)
    assert len(runs) == 1  # tuned once, then launched directly
    assert ft._AHEAD.pending is None  # nor do their tensors outlive the round
    meta, options = ft._CHOSEN[(double, ("n", 50))]
    assert meta == {"BLOCK_M": 16, "BLOCK_N": 16, "FACTOR": 2}
    assert options["num_warps"] == 1 and options["num_stages"] == 1
    # The direct launches give the winner's options exactly as the autotuner's own
    # launches did, so that they find the kernel it built in memory.
    assert kernel_runs[len(tuning_runs):] and all(
        launch == tuning_runs[-1] for launch in kernel_runs[len(tuning_runs):])


@pytest.mark.parametrize("version, expected", [
    ("3.3.0", True), ("3.10.0rc1", True), ("4.0.0+git1a2b", True), ("3.2.1", False),
    ("2.9.0", False), ("unknown", False),
])
def test_direct_launch_needs_triton_3_3(monkeypatch, version, expected):
    # Before 3.3, CompiledKernel[grid] took no constexpr arguments: the direct launch
    # would pass it too many.
    from attnkit.backends import fused_triton as ft

    monkeypatch.setattr(triton, "__version__", version)
    assert ft._triton_at_least(3, 3) is expected


def test_fast_launch_reuses_a_compiled_kernel_only_for_its_specialization(monkeypatch):
    # _launch_jitted keeps each compiled kernel under what Triton specialized it on and
    # launches it directly next time; anything Triton would compile anew for (an int
    # becoming 1 or a multiple of 16, a tensor losing 16-byte alignment, its dtype,
    # another constexpr, warps or stages) must go through Triton's own path again.
    from attnkit.backends import fused_triton as ft

    class Param:
        def __init__(self, name, is_constexpr, default=inspect.Parameter.empty):
            self.name, self.is_constexpr, self.default = name, is_constexpr, default

    class Compiled:
        def __init__(self):
            self.launches = []

        def __getitem__(self, grid):
            assert len(grid) == 3  # as Triton's CompiledKernel indexes it
            return lambda *args: self.launches.append((grid, args))

    class Jitted:  # a JITFunction that compiles on every launch through its own path
        params = [Param("x", False), Param("n", False), Param("BLOCK", True),
                  Param("FLAG", True, default=False)]

        def __init__(self):
            self.compiled = []

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.compiled.append(Compiled())
                return self.compiled[-1]
            return run

    monkeypatch.setattr(ft, "_FAST_LAUNCH", True)
    monkeypatch.setattr(ft, "_COMPILED", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    kernel, x = Jitted(), torch.zeros(64)

    def launch(t, n, block=16, stages=2):
        ft._launch_jitted(kernel, lambda meta: (ft._cdiv(int(n), meta["BLOCK"]),), (t, n),
                          {"BLOCK": block}, {"num_warps": 4, "num_stages": stages})

    launch(x, 17)
    launch(x, 33)  # same specialization as 17: straight to the compiled kernel
    launch(x, 33)
    assert len(kernel.compiled) == 1
    assert kernel.compiled[0].launches == [((3, 1, 1), (x, 33, 16, False))] * 2
    for t, n, block, stages in [(x, 32, 16, 2), (x, 1, 16, 2), (x[1:], 17, 16, 2),
                                (x.half(), 17, 16, 2), (x, 17, 32, 2), (x, 17, 16, 3),
                                (x, 2**33 + 1, 16, 2), (x, 17.0, 16, 2)]:
        before = len(kernel.compiled)
        launch(t, n, block, stages)
        assert len(kernel.compiled) == before + 1, (t.dtype, t.data_ptr() % 16, n, block)
    launch(x[4:], 49)  # 16 bytes in: aligned again, as the first
    assert len(kernel.compiled) == 9 and len(kernel.compiled[0].launches) == 3

    monkeypatch.setattr(ft, "_FAST_LAUNCH", False)  # off: Triton's path every time
    launch(x, 17)
    assert len(kernel.compiled) == 10


def test_a_first_jitted_launch_builds_its_riders_with_itself(monkeypatch):
    """_launch_jitted's riders are built with the launch's own kernel, in one _build_ahead
    (its own build first, with its keywords in the launch's order), on a specialization's
    first launch only, and never once _COMPILED is full (every launch would come here);
    _unlaunched_builds leaves out the launches _COMPILED has."""
    from attnkit.backends import fused_triton as ft

    class Jitted:  # compiles on each launch through its own path
        params = [types.SimpleNamespace(name="x", is_constexpr=False),
                  types.SimpleNamespace(name="BLOCK", is_constexpr=True)]

        def __getitem__(self, grid):  # -> a compiled kernel, indexed by grid in turn
            return lambda *args, **kwargs: collections.defaultdict(lambda: lambda *args: None)

    built, asked = [], []
    monkeypatch.setattr(ft, "_FAST_LAUNCH", True)
    monkeypatch.setattr(ft, "_COMPILED", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(ft, "_build_ahead", built.append)
    kernel, x = Jitted(), torch.zeros(64)

    def riders():
        asked.append(1)
        return ["the backward's"]

    options = {"num_warps": 4, "maxnreg": 168}
    for block in (16, 16, 32):
        ft._launch_jitted(kernel, (1,), (x,), {"BLOCK": block}, options, riders=riders)
    assert built == [[(kernel, (x,), {"grid": (1,), "BLOCK": block, **options}),
                      "the backward's"] for block in (16, 32)]
    assert list(built[0][0][2]) == ["grid", "BLOCK", "num_warps", "maxnreg"]
    launches = [(kernel, (1,), (x,), {"BLOCK": block}, options) for block in (16, 64)]
    assert ft._unlaunched_builds(launches) == [(kernel, (x,), {"grid": (1,), "BLOCK": 64,
                                                               **options})]
    monkeypatch.setattr(ft, "_COMPILED_MAX", len(ft._COMPILED))
    ft._launch_jitted(kernel, (1,), (x,), {"BLOCK": 64}, options, riders=riders)
    assert len(built) == 2 and len(asked) == 2


def test_a_gluon_forward_with_a_backward_to_come_builds_the_backwards_kernels(device,
                                                                            monkeypatch):
    """The Gluon forward's launch gets riders (the backward's builds) where the call needs
    gradients, and the plain launcher where it does not."""
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_forward as hf

    launchers = []
    monkeypatch.setattr(ft, "_uses_hopper_forward", lambda call: True)
    monkeypatch.setattr(ft, "_hopper_config", lambda call: None)
    monkeypatch.setattr(hf, "launch", lambda *args, launcher: launchers.append(launcher))
    monkeypatch.setattr(ft, "_backward", lambda call, seed, out, lse, dout, **kwargs: (
        torch.zeros_like(call.q), torch.zeros_like(call.k), torch.zeros_like(call.v)))
    q, k, v, kwargs = replace(SMALL, causal=True).make_inputs(device)
    attention(q, k, v, impl="triton", **kwargs).sum().backward()
    with torch.no_grad():
        attention(q, k, v, impl="triton", **kwargs)
    with_grads, without = launchers
    assert with_grads.func is ft._launch_jitted
    assert with_grads.keywords["riders"].func is ft._backward_builds
    assert without is ft._launch_jitted


def test_fast_launch_keys_a_tma_descriptor_by_its_box():
    # Triton specializes a host TMA descriptor on its dtype, box and layout; its shape and
    # strides go to the kernel as values, so they must not split the launch cache.
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_forward as hf

    if hf.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper descriptors")

    def key(t, rows):
        return ft._specialization((hf.describe(t, rows),))

    t = torch.randn(2, 4, 1000, 128, dtype=torch.bfloat16)
    assert key(t, 64) == key(torch.randn(1, 2, 4096, 128, dtype=torch.bfloat16), 64)
    assert key(t, 64) != key(t, 128)
    assert key(t, 64) != key(t.half(), 64)
    assert key(t[..., :64], 64) != key(t, 64)  # a box of another width


def test_meta_remembers_each_call_apart():
    # _meta keeps what it worked out per call signature: two calls that differ in any
    # option _meta reads must not share an entry, and each caller gets its own flags.
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    q, k, v = (torch.randn(2, 4, 24, 16) for _ in range(3))
    lengths = torch.tensor([24, 9])
    padding = torch.rand(2, 1, 1, 24) > 0.5
    variants = [
        {}, {"causal": True}, {"window": 5}, {"window": (3, None)},
        {"attn_mask": padding}, {"attn_mask": padding.float()},
        {"attn_mask": torch.rand(2, 1, 24, 24) > 0.5}, {"key_lengths": lengths},
        {"dropout_p": 0.1}, {"scale": 0.5}, {"scale": -2.0},
    ]
    calls = [make_call(q, k, v, **kw) for kw in variants]
    calls += [make_call(q, k[:, :, :20], v[:, :, :20]), make_call(q, k, v[..., :8]),
              make_call(q[:1], k[:1], v[:1]), make_call(q[:, :2], k[:, :2], v[:, :2])]
    ft._META.clear()
    for rounds in range(2):  # the first fills _META, the second reads it
        for call in calls:
            scalars, flags = ft._meta(call, 7 + rounds)
            fresh_scalars, fresh_flags = ft._work_out_meta(call)
            assert flags == fresh_flags
            assert scalars == (*fresh_scalars[:3], 7 + rounds, *fresh_scalars[3:])
            flags["TMA_OK"] = True  # the caller's own copy
    assert len(ft._META) == len(calls)
    assert "TMA_OK" not in ft._meta(calls[0], 0)[1]


@pytest.mark.parametrize("mask", [None, "lengths", "padding"])
def test_repeated_calls_are_bit_identical(mask, device):
    # On a GPU the third launch of a kernel specialization on goes straight to its
    # compiled kernel (fused_triton._FAST_LAUNCH) with the arguments passed positionally;
    # the kernels are deterministic, so any argument out of place shows as a difference.
    b, hq, hkv, s, d = 2, 4, 2, 33, 16
    q = torch.randn(b, hq, s, d).to(device, DTYPE).requires_grad_()
    k, v = (torch.randn(b, hkv, s, d).to(device, DTYPE).requires_grad_() for _ in range(2))
    grad = torch.randn(b, hq, s, d).to(device, DTYPE)
    options = {"causal": True}
    if mask == "lengths":
        options["key_lengths"] = torch.tensor([20, 0], device=device)
    elif mask == "padding":
        options["attn_mask"] = torch.zeros(b, 1, 1, s, device=device, dtype=DTYPE)
        options["attn_mask"][0, ..., 20:] = -torch.inf
    results = []
    for _ in range(3):
        out, lse = attention(q, k, v, impl="triton", return_lse=True, **options)
        results.append((out, lse, *torch.autograd.grad(out, (q, k, v), grad)))
    ref_out = attention(q.double(), k.double(), v.double(), impl="reference", **options)
    assert rel_err(results[0][0], ref_out) < 1e-2
    for later in results[1:]:
        for first, again in zip(results[0], later, strict=True):
            assert torch.equal(first, again)


def test_eager_backward_gets_no_zero_filled_lse_gradient(monkeypatch, device):
    # An lse that no loss reaches gets no gradient: autograd would otherwise hand the
    # backward a zero-filled tensor for it on every call (an allocation, a fill kernel and
    # the forward that dQ's share of an lse gradient costs, for nothing).
    from attnkit.backends import fused_triton as ft

    seen, backward = [], ft._EagerAttention.backward
    monkeypatch.setattr(ft._EagerAttention, "backward", staticmethod(
        lambda ctx, dout, dlse: seen.append(dlse) or backward(ctx, dout, dlse)))
    q, k, v = (torch.randn(1, 2, 17, 16).to(device, DTYPE).requires_grad_() for _ in range(3))
    out, lse = attention(q, k, v, impl="triton", return_lse=True)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    assert seen == [None]
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention(*exact, impl="reference")
    for got, want in zip(grads, torch.autograd.grad((ref * ref).sum(), exact), strict=True):
        assert rel_err(got, want) < 1e-2

    class NoGradient(torch.autograd.Function):  # out's only consumer passes nothing back
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    out = attention(q, k, v, impl="triton")
    dq, dk, dv = torch.autograd.grad(NoGradient.apply(out).sum() + q.sum(), (q, k, v),
                                     allow_unused=True)
    assert seen[-1] is None and dk is None and dv is None
    assert torch.equal(dq, torch.ones_like(q))


def _oracle_probs(q: torch.Tensor, k: torch.Tensor, **options) -> torch.Tensor:
    """(B, Hq, Sq, Skv): the float64 oracle's attention probabilities of q against k under
    options (masks, window, scale), which it returns as its output for v = identity."""
    b, hkv, skv, _ = k.shape
    eye = torch.eye(skv, dtype=torch.float64, device=k.device).expand(b, hkv, skv, skv)
    return attention(q.double(), k.double(), eye, impl="reference", **options)


@pytest.mark.parametrize("ranges", [1, 2])
def test_dropout_matches_its_own_mask(device, ranges, monkeypatch):
    """With v = identity the output is the dropped, rescaled probability matrix itself;
    also with the forward run over two key ranges (each keeps its keys' dropout draws)."""
    _force_key_ranges(monkeypatch, ranges)
    p_drop, b, hq, hkv, sq, skv, d = 0.3, 1, 2, 1, 17, 64 if not CUDA else 256, 16
    q = torch.randn(b, hq, sq, d).to(device, DTYPE).requires_grad_()
    k = torch.randn(b, hkv, skv, d).to(device, DTYPE).requires_grad_()
    v = torch.randn(b, hkv, skv, d).to(device, DTYPE).requires_grad_()
    eye = torch.eye(skv).to(device, DTYPE).expand(b, hkv, skv, skv)
    torch.manual_seed(11)
    out = attention(q, k, v, dropout_p=p_drop, impl="triton")
    torch.manual_seed(11)
    dropped = attention(q, k, eye, dropout_p=p_drop, impl="triton").detach()  # (B, Hq, Sq, Skv)
    keep = dropped > 0
    assert 0.2 < 1 - keep.float().mean().item() < 0.4

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    probs = _oracle_probs(q64, k64)
    assert rel_err(dropped, torch.where(keep, probs / (1 - p_drop), 0)) < 1e-2
    ref = torch.where(keep, probs / (1 - p_drop), 0) @ v64
    assert rel_err(out, ref) < 1e-2
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(DTYPE))
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    assert max(rel_err(g, r) for g, r in zip(grads, grads_ref, strict=True)) < 1e-2


@pytest.mark.parametrize("options", [
    {"causal": True},
    {"key_lengths": [40, 0]},  # batch 1 sees no key: zeros, and no gradient
    {"window": (5, 3)},
    {"attn_mask": "bool"},
    {"causal": True, "heads": (4, 2)},  # kv groups: 17 queries, so a group shares a tile
], ids=["causal", "key_lengths", "window", "bool_mask", "grouped"])
def test_dropout_under_each_mask_matches_its_own_mask(device, options):
    """Dropout with each way of hiding keys, forward and backward: with v = identity the
    output is the dropped, rescaled probabilities of the float64 oracle under the same
    mask (hidden keys never kept), and out and its gradients follow from that mask."""
    options = dict(options)
    hq, hkv = options.pop("heads", (2, 2))  # one query head a kv head: a tile each
    p_drop, b, sq, skv, d = 0.3, 2, 17, 64, 16
    gen = torch.Generator().manual_seed(len(str(options)))
    q = torch.randn(b, hq, sq, d, generator=gen).to(device, DTYPE).requires_grad_()
    k, v = (torch.randn(b, hkv, skv, d, generator=gen).to(device, DTYPE).requires_grad_()
            for _ in range(2))
    if "key_lengths" in options:
        options["key_lengths"] = torch.tensor(options["key_lengths"], device=device)
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = (torch.rand(b, 1, 1, skv, generator=gen) < 0.7).to(device)
    eye = torch.eye(skv).to(device, DTYPE).expand(b, hkv, skv, skv)
    torch.manual_seed(11)
    out = attention(q, k, v, dropout_p=p_drop, impl="triton", **options)
    torch.manual_seed(11)
    dropped = attention(q, k, eye, dropout_p=p_drop, impl="triton", **options).detach()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    probs = _oracle_probs(q64, k64, **options)
    seen, keep = probs.detach() > 0, dropped > 0
    assert not keep[~seen].any()
    assert 0.2 < 1 - keep[seen].float().mean().item() < 0.4
    kept_probs = torch.where(keep, probs / (1 - p_drop), 0)
    assert rel_err(dropped, kept_probs) < 1e-2
    ref = kept_probs @ v64.repeat_interleave(hq // hkv, 1)
    assert rel_err(out, ref) < 1e-2
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen).to(device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(DTYPE))
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    for name, got, want in zip("qkv", grads, grads_ref, strict=True):
        assert rel_err(got, want) < 1e-2, name


def test_dropout_draws_apart_for_each_key_row_and_head(device):
    """Each of 8 neighbouring key lanes drops its share, and scores that share one Philox
    call (keys 1 and 8 apart, rows 8 apart), keys and rows of the next calls, and heads
    are not correlated (v = identity shows the mask). 8192 draws: a correlation
    estimate's spread is ~0.011."""
    p_drop, skv = 0.5, 128
    q = torch.randn(1, 2, 32, 16).to(device, DTYPE)
    k = torch.randn(1, 2, skv, 16).to(device, DTYPE)
    eye = torch.eye(skv).to(device, DTYPE).expand(1, 2, skv, skv)
    keep = (attention(q, k, eye, dropout_p=p_drop, impl="triton") > 0).double()[0]
    lanes = keep.reshape(2, 32, skv // 8, 8).mean((0, 1, 2))
    assert (lanes - (1 - p_drop)).abs().max() < 0.1, lanes
    centred = (keep - keep.mean()) / keep.std()

    def correlation(a, b):
        return (a * b).mean().item()

    for shift in (1, 2, 4, 8, 16, 24, 32):  # keys: one call's, and the next calls'
        assert abs(correlation(centred[..., shift:], centred[..., :-shift])) < 0.06, shift
    for shift in (1, 8, 16):  # rows: the next pair's, the pair's other row, the next 16
        assert abs(correlation(centred[:, shift:], centred[:, :-shift])) < 0.06, shift
    assert abs(correlation(centred[0], centred[1])) < 0.06  # heads


# Small enough for the interpreter: one batch, two query heads sharing one kv head.
SMALL = replace(BASE, batch=1, seq_kv=33)


def test_ops_pass_opcheck(device):
    """The custom ops' schemas, fake kernels (shapes, strides) and autograd, as torch checks
    them. Every option is on: key lengths, a bool mask, a window, dropout with its seed."""
    from attnkit.backends import fused_triton

    q, k, v, kwargs = replace(SMALL, key_lengths=True, mask="bool").make_inputs(device)
    seed = torch.randint(0, 2**31 - 1, ())
    options = (kwargs["key_lengths"], kwargs["attn_mask"], True, 5, 2, 0.25, 0.2, seed)
    torch.library.opcheck(fused_triton._attention_fwd, (q, k, v, *options))

    out, lse = fused_triton._attention_fwd(q, k, v, *options)
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous()
    grad_out = torch.randn_like(out)
    for grad_lse in (None, torch.randn_like(lse)):
        torch.library.opcheck(fused_triton._attention_bwd,
                              (grad_out, grad_lse, q, k, v, out.detach(), lse, *options),
                              test_utils=("test_schema", "test_faketensor"))


def test_eager_calls_skip_the_op_dispatcher(device, monkeypatch):
    """Eager calls run the kernels through an autograd.Function (less host time per call);
    only torch.compile goes through the custom ops (test_compiled_* below)."""
    from attnkit.backends import fused_triton

    def no_op(*args):
        raise AssertionError("the custom op ran in an eager call")

    monkeypatch.setattr(fused_triton, "_attention_fwd", no_op)
    q, k, v, kwargs = replace(SMALL, causal=True).make_inputs(device)
    out = attention(q, k, v, impl="triton", **kwargs)
    assert rel_err(out, attention(q, k, v, impl="reference", **kwargs)) < 1e-2
    assert all(g is not None for g in _grads(out, (q, k, v)))


@pytest.mark.parametrize("no_grad", [True, False])
def test_calls_with_nothing_to_differentiate_skip_autograd(no_grad, device, monkeypatch):
    """Under no_grad, or with no input that requires grad, the forward runs without the
    autograd.Function (its host time bought nothing there); the results are the same."""
    from attnkit.backends import fused_triton

    q, k, v, kwargs = replace(SMALL, causal=True, mask="bool").make_inputs(device)
    want = attention(q, k, v, impl="triton", return_lse=True, **kwargs)
    assert want[0].grad_fn is not None  # these inputs require grad: the Function ran

    def no_function(*args):
        raise AssertionError("the autograd.Function ran with nothing to differentiate")

    monkeypatch.setattr(fused_triton._EagerAttention, "apply", no_function)
    if no_grad:
        with torch.no_grad():
            got = attention(q, k, v, impl="triton", return_lse=True, **kwargs)
    else:
        q, k, v = (t.detach() for t in (q, k, v))
        got = attention(q, k, v, impl="triton", return_lse=True, **kwargs)
    assert got[0].grad_fn is None
    assert torch.equal(got[0], want[0].detach()) and torch.equal(got[1], want[1])


def test_only_a_forward_with_a_backward_to_come_builds_the_backwards_kernels(device,
                                                                          monkeypatch):
    """An eager call that needs gradients hands the forward's launch the backward's
    builds to make with its round (riders); one with nothing to differentiate does not."""
    from attnkit.backends import fused_triton as ft

    seen, launch = [], ft._launch
    monkeypatch.setattr(ft, "_launch", lambda *args, riders=None: (
        seen.append(riders), launch(*args, riders=riders))[1])
    q, k, v, kwargs = replace(SMALL, causal=True).make_inputs(device)
    attention(q, k, v, impl="triton", **kwargs).sum().backward()
    forward_riders, *backward = seen
    assert forward_riders.func is ft._backward_builds and backward == [None, None]
    seen.clear()
    with torch.no_grad():
        attention(q, k, v, impl="triton", **kwargs)
    assert seen == [None]


def _grads(out, inputs):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return torch.autograd.grad(out, inputs, grad_out.to(out))


@pytest.mark.parametrize("extra", ["key_lengths", "mask per batch", "mask broadcast"])
def test_calls_past_the_grids_rows_run_in_batch_pieces(extra, device, monkeypatch):
    """More (batch, query head) rows than a grid's second dimension takes (65535 on CUDA,
    5 here): the call runs in pieces of its batch, each with its own part of the key
    lengths or mask (a mask broadcast over the batch whole), forward and backward against
    the oracle, rows that see no key included; out keeps a whole call's layout."""
    from attnkit.backends import fused_triton as ft

    monkeypatch.setattr(ft, "GRID_ROWS", 5)
    pieces, run = [], ft.run
    monkeypatch.setattr(ft, "run", lambda call: (pieces.append(call.batch), run(call))[1])
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(3, h, s, 16, generator=gen).to(device, DTYPE).requires_grad_()
               for h, s in ((2, 17), (1, 20), (1, 20)))
    kwargs = {"causal": True}
    if extra == "key_lengths":
        kwargs["key_lengths"] = torch.tensor([20, 0, 7], device=device)
    else:
        shape = (3, 1, 1, 20) if extra == "mask per batch" else (1, 1, 17, 20)
        mask = torch.rand(shape, generator=gen) > 0.3
        mask[-1, ..., 0, :] = False  # a row, or a batch element's every row, that sees no key
        kwargs["attn_mask"] = mask.to(device)
    out, lse = attention(q, k, v, impl="triton", return_lse=True, **kwargs)
    want, lse_want = attention(*(t.double() for t in (q, k, v)), impl="reference",
                               return_lse=True, **kwargs)
    assert pieces == [2, 1]
    assert out.transpose(1, 2).is_contiguous()
    assert rel_err(out, want) < 1e-2
    torch.testing.assert_close(lse, lse_want.float(), atol=1e-3, rtol=1e-3)
    for got, exact in zip(_grads(out, (q, k, v)), _grads(want, (q, k, v)), strict=True):
        assert rel_err(got, exact) < 1e-2


@pytest.mark.gpu
def test_more_rows_than_a_grid_takes_on_gpu():
    """4097 x 16 = 65552 (batch, query head) rows, past CUDA's 65535 along a grid's second
    dimension (a launch raised "invalid argument" before the calls went in pieces): the
    first and the last batch element against the oracle, forward and backward."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(4097, h, 17, 64, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_() for h in (16, 4, 4))
    out = attention(q, k, v, causal=True, impl="triton")
    grad_out = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for i in (0, 4096):
        inputs = [t[i:i + 1].detach().double().requires_grad_() for t in (q, k, v)]
        want = attention(*inputs, causal=True, impl="reference")
        assert rel_err(out[i:i + 1], want) < 1e-2
        exact = torch.autograd.grad(want, inputs, grad_out[i:i + 1].double())
        for got, ref in zip(grads, exact, strict=True):
            assert rel_err(got[i:i + 1], ref) < 1e-2


@pytest.mark.parametrize("case", [
    replace(SMALL, key_lengths=True, causal=True),  # CPU key lengths: no value check traced
    replace(SMALL, mask="bool", window=(7, 3)),
], ids=lambda c: c.name)
def test_compiled_attention_matches_eager(case, device):
    """fullgraph=True makes any graph break an error; dropout draws its seed in the graph."""
    q, k, v, kwargs = case.make_inputs(device)

    def fn(q, k, v):
        return attention(q, k, v, dropout_p=0.2, impl="triton", return_lse=True, **kwargs)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    out, lse = compiled(q, k, v)
    torch.manual_seed(1)
    ref, lse_ref = fn(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, lse_ref)
    assert out.stride() == ref.stride()
    for g, g_ref in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(g, g_ref)


def test_compiled_gradient_through_the_lse(monkeypatch, device):
    """Under torch.compile the custom ops carry lse's gradient as eager calls do (they
    dropped it silently until run 50), and a graph whose loss does not reach lse hands the
    backward no zero-filled one, which would cost it a forward more."""
    seen, backward = [], fused_triton._backward
    monkeypatch.setattr(fused_triton, "_backward", lambda *args, dlse=None, **kwargs: (
        seen.append(dlse is None) or backward(*args, dlse=dlse, **kwargs)))
    q, k, v = (torch.randn(1, h, 17, 16).to(device, DTYPE).requires_grad_() for h in (2, 1, 1))
    lengths = torch.tensor([11], device=device)
    weights = torch.randn(1, 2, 17).to(device)

    def loss(impl, q, k, v, through_lse):
        out, lse = attention(q, k, v, causal=True, key_lengths=lengths, return_lse=True,
                             impl=impl)
        return (out * out).sum() + ((weights * lse).sum() if through_lse else 0)

    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    for through_lse in (True, False):
        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        seen.clear()
        grads = torch.autograd.grad(compiled("triton", q, k, v, through_lse), (q, k, v))
        assert seen == [not through_lse]
        want = torch.autograd.grad(loss("reference", *exact, through_lse), exact)
        for got, ref in zip(grads, want, strict=True):
            assert rel_err(got, ref) < 1e-2


def test_compiled_module_matches_eager(device):
    torch.manual_seed(7)
    mha = MultiHeadAttention(32, 32, 2, num_kv_heads=1, causal=True, impl="triton",
                             device=device, dtype=DTYPE)
    x = torch.randn(1, 17, 32).to(device, DTYPE).requires_grad_()
    padding = torch.randn(1, 1, 1, 17).to(device, DTYPE)
    out = torch.compile(mha, fullgraph=True, backend="aot_eager")(x, attn_mask=padding)
    ref = mha(x, attn_mask=padding)
    torch.testing.assert_close(out, ref)
    params = (x, mha.qkv.weight)
    for g, g_ref in zip(_grads(out, params), _grads(ref, params), strict=True):
        torch.testing.assert_close(g, g_ref)


def test_refuses_float32_with_reason(device):
    q = torch.randn(1, 1, 4, 16, device=device)
    with pytest.raises(UnsupportedError, match="float16 or bfloat16.*float32"):
        attention(q, q, q, impl="triton")


def test_refuses_small_head_dim(device):
    q = torch.randn(1, 1, 4, 8).to(device, DTYPE)
    with pytest.raises(UnsupportedError, match="head_dim must lie in"):
        attention(q, q, q, impl="triton")


def test_import_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = importlib.import_module("attnkit.backends.fused_triton")
    fresh = importlib.reload(module)
    try:
        assert "triton" in fresh.available(torch.device("cpu"))
    finally:
        monkeypatch.undo()
        importlib.reload(module)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_large_shapes_on_gpu(causal, head_dim):
    case = Case(batch=2, heads_q=8, heads_kv=2, seq_q=1000, seq_kv=1000, head_dim=head_dim,
                causal=causal, key_lengths=True, dtype=torch.bfloat16)
    result = check("triton", case, "cuda")
    assert result.skipped is None and result.passed, result
    # decoding: 4 query rows against 9000 cached keys take the key ranges unforced, with
    # a kv group's query heads packed into one tile, and (MHA) without
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    for heads_kv, packed in ((2, True), (8, False)):
        decode = replace(case, seq_q=4, seq_kv=9000, heads_kv=heads_kv)
        q, k, v, kwargs = decode.make_inputs("cuda", torch.Generator().manual_seed(3))
        call = make_call(q, k, v, **kwargs)
        assert ft._packs_group(call) == packed and ft._kv_splits(call, packed) > 1
        result = check("triton", decode, "cuda")
        assert result.skipped is None and result.passed, (decode.name, result)


def _long_call(dtype=torch.bfloat16, hkv=2, sq=4096, skv=4096, d=128, rows=None, **kwargs):
    """A call of 2 query heads (sq rows) against skv keys on the CPU, for rules that look at
    sizes and layouts only; rows: q, k, v as the first d columns of rows this long."""
    from attnkit.call import make_call

    width = rows or d
    q = torch.randn(1, 2, sq, width, dtype=dtype)[..., :d]
    k, v = (torch.randn(1, hkv, skv, width, dtype=dtype)[..., :d] for _ in range(2))
    return make_call(q, k, v, **kwargs)


# Calls neither Gluon kernel covers (_gluon_covers, and tiles of 64, 128 or 256 columns only).
_NOT_GLUON = [
    ({"d": 32}, False),  # tiles of 32 columns: none measured
    ({"d": 36}, False),  # rows of 72 bytes: not TMA's 16-byte multiple
    # q, k, v in rows of 48 that TMA reads, but out's heads (B, S, H, D) are 88 bytes
    ({"d": 44, "rows": 48}, False),
    ({"dtype": torch.float32}, False),
    ({"attn_mask": torch.zeros(1, 1, 1, 4096, dtype=torch.bfloat16)}, False),
    ({"window": (256, 0)}, False),
    ({"scale": -1.0}, False),
]


@pytest.mark.parametrize("kwargs, fits", [
    ({}, True),
    ({"causal": True, "hkv": 1}, True),  # grouped heads
    ({"key_lengths": torch.tensor([4000])}, True),
    ({"dtype": torch.float16}, True),
    ({"d": 64}, True),
    ({"d": 64, "causal": True}, True),  # each warpgroup's own key blocks: faster at 4k
    ({"d": 64, "causal": True, "sq": 1024, "skv": 8192}, False),  # 0.84x at 1k
    ({"sq": 1000}, True),  # Sq from 256 at D=128 against 512 keys or more
    ({"sq": 512, "skv": 512}, True),  # 1.28x at 512
    ({"sq": 255}, False),  # 0.96x at Sq = 128, 0.77x at 64
    ({"skv": 511}, False),
    ({"d": 64, "sq": 512, "skv": 512}, True),  # every key seen: 1.17x at 512
    ({"d": 64, "sq": 511, "skv": 4096}, False),  # 0.88x at Sq = 256 (192-row tiles)
    ({"dropout_p": 0.1}, False),  # the Gluon forward does not drop
    # head dims on the next power of two's tiles, and routes
    ({"d": 80}, True),
    ({"d": 96, "causal": True, "sq": 1024, "skv": 1024}, True),
    ({"d": 96, "sq": 255}, False),
    ({"d": 48, "causal": True}, True),
    ({"d": 48, "causal": True, "sq": 1024, "skv": 8192}, False),
    ({"d": 192, "causal": True, "key_lengths": torch.tensor([4000])}, True),
] + _NOT_GLUON)
def test_hopper_forward_covers_long_plain_calls_only(kwargs, fits):
    from attnkit.backends import fused_triton as ft

    assert ft._hopper_forward_fits(_long_call(**kwargs)) == fits


@pytest.mark.parametrize("kwargs, dkdv, dq", [
    ({}, True, True),
    ({"causal": True, "hkv": 1}, True, True),  # grouped heads
    ({"key_lengths": torch.tensor([4000])}, True, True),
    ({"dtype": torch.float16}, True, True),
    ({"d": 64, "causal": True}, True, False),  # dQ: 0.77x at D=64
    ({"d": 64}, True, False),
    ({"sq": 2048, "skv": 2048}, True, True),  # dQ: 1.02x at 2k (run 26)
    ({"sq": 1024, "skv": 1024}, True, True),  # dK/dV: 1.05x at 1k, dQ 1.01x
    ({"sq": 512, "skv": 512}, True, True),  # 1.06x (run 29)
    ({"causal": True, "sq": 512, "skv": 512}, False, False),  # host time: 0.88-0.92x
    ({"causal": True, "sq": 256, "skv": 1024}, True, True),
    ({"sq": 256}, True, True),  # 1.04-1.08x at Sq = 256 against 4k keys
    ({"sq": 255, "skv": 8192}, False, False),  # 0.98x at Sq = 128
    ({"skv": 511}, False, False),
    ({"d": 64, "sq": 512}, False, False),  # dK/dV: 0.96x at Sq = 512 against 4k keys
    ({"d": 64, "causal": True, "sq": 512, "skv": 512}, False, False),  # dK/dV: 0.93x
    ({"causal": True, "skv": 2048}, True, True),
    ({"causal": True, "sq": 1024, "skv": 1024}, True, True),  # dK/dV: 1.09x (run 26)
    ({"d": 64, "causal": True, "skv": 1024}, True, False),  # dK/dV: 1.02x at 1k
    ({"d": 64, "sq": 2048}, True, False),  # dK/dV: 1.05x at 2k
    ({"d": 64, "sq": 1000}, False, False),
    ({"dropout_p": 0.1}, True, True),  # the Gluon backward kernels drop
    ({"dropout_p": 0.1, "d": 64, "causal": True}, True, False),
    # wide_dkdv_kernel: 1.40-1.47x from 1k (run 60); the dQ kernel on top of it,
    # 1.09-1.15x from 256 (run 61)
    ({"d": 256}, True, True),
    ({"d": 256, "causal": True, "hkv": 1, "key_lengths": torch.tensor([3000])}, True, True),
    ({"d": 256, "sq": 256, "skv": 256}, True, True),  # 1.17-1.18x, then 1.09x
    ({"d": 256, "sq": 255}, False, False),  # 1.06x at Sq = 128 against 8k keys
    ({"d": 256, "skv": 255}, False, False),
    ({"d": 256, "dropout_p": 0.1}, True, True),  # wide_dkdv_kernel drops: 1.45-1.72x
    # head dims on the next power of two's tiles, and routes
    ({"d": 192}, True, True),
    ({"d": 160, "causal": True, "dropout_p": 0.1}, True, True),
    ({"d": 96, "causal": True, "hkv": 1}, True, True),
    ({"d": 80, "causal": True, "sq": 512, "skv": 512}, False, False),
    ({"d": 48, "sq": 2048}, True, False),
] + [(kwargs, False, False) for kwargs, _ in _NOT_GLUON])
def test_hopper_backward_kernels_cover_long_plain_calls_only(kwargs, dkdv, dq):
    from attnkit.backends import fused_triton as ft

    call = _long_call(**kwargs)
    out, dout = torch.randn_like(call.q), torch.randn_like(call.q)
    assert ft._hopper_backward_fits(call, out, dout) == (dkdv, dq)


def test_hopper_backward_kernels_need_tensors_tma_can_read():
    from attnkit.backends import fused_triton as ft

    call = _long_call()
    out = torch.randn_like(call.q)

    def fits(dout):
        return ft._hopper_backward_fits(call, out, dout)

    assert fits(torch.randn_like(call.q)) == (True, True)
    columns = torch.randn_like(call.q).transpose(2, 3).contiguous().transpose(2, 3)
    assert fits(columns) == (False, False)  # stride 1 along S
    broadcast = torch.randn_like(call.q[:, :1]).expand_as(call.q)  # stride 0 over heads
    assert fits(broadcast) == (False, False)
    # a size-1 dimension's stride is free (0 here): hopper_forward.describe replaces it
    one_batch = call.q.as_strided(call.q.shape, (0, *call.q.stride()[1:]))
    assert fits(one_batch) == (True, True)
    # the dQ kernel reads out by rows of unit stride
    assert ft._hopper_backward_fits(call, columns, torch.randn_like(call.q)) == (True, False)


def _auto_as_on_hopper(monkeypatch) -> None:
    """CPU calls stand in for calls on a Hopper GPU, as auto and triton's rules see them:
    the Gluon forward runs what it fits, and auto takes the CUDA order."""
    from attnkit import functional
    from attnkit.backends import fused_triton as ft

    monkeypatch.setattr(ft, "_uses_hopper_forward", ft._hopper_forward_fits)
    monkeypatch.setattr(ft, "_on_hopper", lambda call: True)
    monkeypatch.setitem(functional.AUTO_ORDER, "cpu", functional.AUTO_ORDER["cuda"])


@pytest.mark.parametrize("kwargs, grad, leads", [
    ({"d": 64, "sq": 8192, "skv": 8192}, False, True),
    ({"d": 64, "sq": 8192, "skv": 8192}, True, False),  # cuDNN's backward is faster
    ({"causal": True, "sq": 8192, "skv": 8192}, False, True),
    ({"causal": True}, False, False),  # 0.94-0.99x cuDNN at 4k
    ({"d": 64, "causal": True}, False, False),  # 0.94x at 4k
    ({"d": 64}, False, True),  # 1.08-1.10x at 2k-4k
    ({"d": 64, "sq": 2048, "skv": 2048}, False, True),
    ({"d": 64, "sq": 2047, "skv": 4096}, False, False),  # 0.97x at 1k
    ({"sq": 16384, "skv": 16384}, False, False),  # D=128 full: 0.93-1.03x
    ({"d": 80, "sq": 8192, "skv": 8192}, False, False),  # not measured
    # D=96, the Gluon forward's products split (64 + 32 columns)
    ({"d": 96, "sq": 1024, "skv": 1024}, False, True),  # 0.98-1.02x at 1k, 1.04x at 4k
    ({"d": 96, "sq": 1023, "skv": 4096}, False, False),
    ({"d": 96, "causal": True}, False, True),  # 1.01-1.02x at 4k, 1.09-1.16x at 16k
    ({"d": 96, "causal": True, "sq": 2048, "skv": 2048}, False, False),  # 0.93-0.95x at 1k
    ({"d": 96}, True, False),  # forward+backward 0.92-1.07x: a coin toss
    # A block of queries against a cache: SDPA gets the band as a mask (1.6-16x the time).
    ({"causal": True, "sq": 4, "skv": 16384}, False, True),
    ({"d": 80, "causal": True, "sq": 256, "skv": 4096}, False, True),
    ({"causal": True, "sq": 4, "skv": 16384}, True, False),
    # with gradients, from B * Hq * Sq * Skv * D = 2^34 (2 heads here): host time below
    ({"causal": True, "sq": 4096, "skv": 16384}, True, True),
    ({"causal": True, "sq": 4000, "skv": 16384}, True, False),
    ({"causal": True, "sq": 1, "skv": 16384}, False, False),  # no mask: SDPA's flash led
    # one row with heads wider than 128: the tile for few rows led SDPA's flash kernel
    # from B * Hkv * Skv * D = 2^24 (2 kv heads here)
    ({"d": 256, "sq": 1, "skv": 32768}, False, True),
    ({"d": 256, "causal": True, "sq": 1, "skv": 32768}, False, True),
    ({"d": 256, "sq": 1, "skv": 32000}, False, False),  # 0.73-1.00x on small caches
    ({"d": 256, "sq": 1, "skv": 32768}, True, False),
    ({"d": 256, "sq": 1, "skv": 32768, "window": (64, 0)}, False, False),
    ({"d": 256, "sq": 2, "skv": 32768}, False, False),  # not measured
    ({"causal": True, "sq": 20, "skv": 17}, False, False),  # rows that see no key
    ({"sq": 4, "skv": 16384}, False, False),  # no mask at all
    ({"causal": True, "sq": 4, "skv": 16384, "window": (64, 0)}, False, False),  # unmeasured
    ({"causal": True, "sq": 4, "skv": 16384, "dropout_p": 0.1}, False, False),  # unmeasured
])
def test_auto_tries_triton_first_where_it_led(monkeypatch, kwargs, grad, leads):
    from attnkit import functional
    from attnkit.backends import fused_triton as ft

    call = _long_call(**kwargs)
    call.q.requires_grad_(grad)
    _auto_as_on_hopper(monkeypatch)
    assert ft._leads(call) == leads
    assert functional.auto_order(call)[0] == ("triton" if leads else "sdpa")
    with torch.no_grad():  # nothing to differentiate, whatever requires_grad says
        assert ft._leads(call) == (leads or grad)


@pytest.mark.parametrize("kwargs, leads", [
    ({"d": 256, "sq": 1024, "skv": 1024}, True),  # 1.12x cuDNN's forward+backward
    ({"d": 256, "sq": 1023, "skv": 4096}, False),
    ({"d": 256, "causal": True}, True),  # 4k: 1.09x
    ({"d": 256, "causal": True, "sq": 2048, "skv": 2048}, True),  # 2k: 1.09x
    ({"d": 256, "causal": True, "sq": 1024, "skv": 1024}, False),  # 1k: 0.92x
    # with dropout the Triton forward, then the Gluon backward: 1.22-1.41x SDPA's from 1k
    ({"d": 256, "dropout_p": 0.1}, True),
    ({"d": 256, "dropout_p": 0.1, "causal": True, "sq": 1024, "skv": 1024}, True),
    ({"d": 256, "dropout_p": 0.1, "sq": 1023, "skv": 4096}, False),
    ({"d": 192, "dropout_p": 0.1, "causal": True}, False),  # 0.99x
    ({"d": 128, "dropout_p": 0.1}, False),  # 0.86-0.91x
    ({"d": 256, "window": (64, 0)}, False),
    ({"d": 192}, True),  # 4k, the products split (128 + 64 columns): 1.15-1.16x
    ({"d": 192, "causal": True}, True),  # 1.13x
    ({"d": 192, "sq": 2048, "skv": 4096}, False),  # not measured
    ({"sq": 16384, "skv": 16384}, False),  # D=128: cuDNN's backward is faster
    ({"d": 64, "sq": 16384, "skv": 16384}, False),
])
def test_auto_tries_triton_first_with_gradients_at_wide_heads(monkeypatch, kwargs, leads):
    """With gradients to compute, auto leads with triton at D=256 where the Gluon forward
    and backward kernels run the call, from 1k (2k causal), at D=192 from 4k, with dropout
    where the Gluon backward kernels do, at D=256 from 1k, and nowhere else."""
    from attnkit import functional
    from attnkit.backends import fused_triton as ft

    call = _long_call(**kwargs)
    call.q.requires_grad_()
    _auto_as_on_hopper(monkeypatch)
    assert ft._leads(call) == leads
    assert functional.auto_order(call)[0] == ("triton" if leads else "sdpa")
    with torch.no_grad():  # forward alone, cuDNN's is faster at D=256
        assert not ft._leads(call) or call.head_dim != 256
    # with either Gluon backward kernel off (it did not compile), the backward is Triton's
    for switch in ("_HOPPER_DQ", "_HOPPER_DKDV"):
        monkeypatch.setattr(ft, switch, False)
        assert not ft._leads(call)
        monkeypatch.setattr(ft, switch, True)


def test_auto_falls_back_where_triton_leads_a_block_it_cannot_run(monkeypatch):
    """A block of queries against a cache that triton leads but refuses (D=512) still runs:
    auto moves on to sdpa, as it does past any refusal."""
    from attnkit import functional
    from attnkit.backends import fused_triton as ft

    monkeypatch.setattr(ft, "_on_hopper", lambda call: True)
    monkeypatch.setitem(functional.AUTO_ORDER, "cpu", functional.AUTO_ORDER["cuda"])
    call = _long_call(torch.float16, d=512, causal=True, sq=4, skv=64)
    assert "head_dim must lie in [16, 256]" in ft.BACKEND.supports(call)
    assert ft._leads(call) and functional.auto_order(call)[0] == "triton"
    assert functional.select(call).name == "sdpa"


def test_hopper_forward_runs_a_config_the_gpu_test_checks():
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_forward as hf

    by_head_dim = [(d, routes) for (d, _), routes in ft._HOPPER_ROUTES.items()]
    for head_dim, routes in by_head_dim + list(ft._HOPPER_ALL_SEEN_ROUTES.items()):
        for _, config in routes:
            assert config in hf.CONFIGS[head_dim]


@pytest.mark.parametrize("d, causal, seq, lengths, config", [
    (128, True, 4096, None, (128, 2, 2, 1)),
    (64, False, 16384, None, (128, 3, 3, 1)),  # every key seen: a third K/V slot
    (64, False, 16383, None, (128, 2, 3, 1)),  # the last block partly hidden
    (64, False, 16384, [16384], (128, 2, 3, 1)),  # key lengths: index checks built
    (64, False, 1024, None, (128, 3, 3, 1)),
    (64, False, 1024, [1024], None),
    (64, False, 1000, None, None),
    (64, True, 4096, None, (64, 3, 3, 1, 1)),  # 192-row tiles end mid-block: own key ranges
    (64, True, 16384, None, (64, 3, 3, 1, 1)),
    (64, True, 2048, None, (64, 3, 3, 1, 1)),
    (64, True, 1280, [1000], (64, 3, 3, 1, 1)),  # 1.03-1.06x from 1280 (run 42)
    (64, True, 1279, None, None),  # 1.00x at 1152, 0.97x at 1k
    (64, False, 1536, [1536], (128, 2, 3, 1)),  # checks built: 1.06-1.07x at 1536
    (64, False, 1535, [1535], None),  # 0.93x at 1280
    (128, False, 1024, None, (128, 2, 2, 1)),
    (128, True, 2048, None, (128, 2, 2, 1)),
    (128, True, 2047, None, (64, 4, 2, 1)),  # short causal tiles: 64-key blocks
    (128, True, 1024, [512], (64, 4, 2, 1)),
    (128, True, 1023, None, (64, 4, 2, 1)),
    (128, True, 511, None, None),
    (64, False, 511, None, None),
    (256, False, 1024, None, (64, 2, 2, 0)),  # 1.12x at 4k, 1.18x at 256 (run 60)
    (256, True, 4096, [3000], (64, 2, 2, 0)),
    (256, True, 256, None, (64, 2, 2, 0)),  # 1.02x at 256 causal
    (256, True, 255, None, None),  # not measured below 256
])
def test_hopper_forward_config_by_head_dim_causality_and_length(d, causal, seq, lengths,
                                                                config):
    from attnkit.backends import fused_triton as ft

    key_lengths = None if lengths is None else torch.tensor(lengths)
    call = _long_call(d=d, causal=causal, sq=seq, skv=seq, key_lengths=key_lengths)
    assert ft._hopper_config(call) == config


@pytest.mark.parametrize("d, causal, sq, skv, config", [
    (128, True, 1024, 16384, (128, 2, 2, 1)),  # long tiles: 128-key blocks, by Skv
    (128, True, 256, 2048, (128, 2, 2, 1)),
    (128, True, 4096, 1024, (64, 4, 2, 1)),
    (128, True, 512, 512, (64, 4, 2, 1)),
    (128, True, 255, 16384, None),
    (128, False, 256, 512, (128, 2, 2, 1)),
    (128, False, 16384, 511, None),
    (64, False, 512, 512, (128, 3, 3, 1)),
    (64, False, 511, 16384, None),
    (64, False, 4096, 1000, None),  # the last block partly hidden: below (128, 2, 3, 1)'s 1536
    (64, True, 1024, 16384, None),  # 0.93x at Sq = 1k against 8k keys
    (64, True, 1280, 4096, (64, 3, 3, 1, 1)),  # 1.13x (run 42)
])
def test_hopper_forward_config_by_query_and_key_lengths(d, causal, sq, skv, config):
    from attnkit.backends import fused_triton as ft

    assert ft._hopper_config(_long_call(d=d, causal=causal, sq=sq, skv=skv)) == config


# The experiment scripts that import one another (dropped from sys.modules before a test
# imports one, so that each test sees them fresh).
_GLUON_EXPERIMENTS = ("gluon_forward", "gluon_dq", "gluon_dkdv", "dkdv_case")


@pytest.mark.parametrize("script", _GLUON_EXPERIMENTS)
def test_gluon_experiments_import_what_hopper_forward_still_has(monkeypatch, script):
    """benchmarks/gluon_*.py borrow hopper_forward's helpers by name, and dkdv_case.py
    gluon_dkdv's; one renamed or dropped there (run 16 dropped `program`) would otherwise
    break them only on a GPU.
    Names only: Gluon code compiles for sm_90 under the Triton release it was written
    for, not the one tests run under."""
    from attnkit.backends import hopper_forward as hf

    if hf.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper operations to import")
    for name in _GLUON_EXPERIMENTS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    benchmark_script(script, monkeypatch)


@pytest.mark.parametrize("script, launch, kernel_args", [
    ("gluon_dq", "launch_dq", lambda call, lse: (call, lse, lse, call.q, (32, 4))),
    ("gluon_dkdv", "launch_dkdv", lambda call, lse: (call, lse, call.q, lse, (32, 4))),
])
def test_gluon_experiments_launch_the_config_they_were_given(monkeypatch, script, launch,
                                                              kernel_args):
    """gluon_dq.py and gluon_dkdv.py hand their --config to hopper_backward's launch
    functions, whose positional arguments after the scale are now the dropout seed and
    p: passed there, a config ran the default tile with dropout (run 38)."""
    from attnkit.backends import hopper_backward as hb
    from attnkit.backends import hopper_forward as hf
    from attnkit.call import make_call

    if hf.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper operations to import")
    for name in _GLUON_EXPERIMENTS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = benchmark_script(script, monkeypatch)
    seen = {}
    monkeypatch.setattr(hb, launch, lambda *args, **kwargs: seen.update(args=args, **kwargs))
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    call = make_call(q, q, q, causal=True)
    getattr(module, script)(*kernel_args(call, torch.zeros(1, 2, 64)))
    assert seen["config"] == (32, 4)
    assert seen.get("seed", 0) == 0 and seen.get("dropout_p", 0.0) == 0.0
    assert len(seen["args"]) == 11  # through the scale


def test_ncu_step_summarizes_a_source_page(tmp_path, capsys, monkeypatch):
    """benchmarks/ncu_step.py --summarize on a source-page CSV of ncu's form: wavefronts
    by opcode (predicates dropped), stalls by reason, the lines with most samples."""
    import csv

    ncu_step = benchmark_script("ncu_step", monkeypatch)
    path = tmp_path / "page.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["Kernel Name", "dkdv_kernel"])
        out.writerow(["Address", "Source", "Warp Stall Sampling (All Samples)",
                      "L1 Wavefronts Shared", "stall_barrier", "stall_wait",
                      "stall_wait (Not Issued)"])
        out.writerow(["0x0", "  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ", "10", "3,000",
                      "0", "10", "9"])
        out.writerow(["0x10", "@!P0 LDS.64 R2, [R3]", "30", "1,000", "30", "0", "0"])
    ncu_step.summarize(str(path), top=1)
    text = capsys.readouterr().out
    assert "HGMMA 75.0%, LDS 25.0%" in text
    assert "barrier 75.0%, wait 25.0%" in text
    assert text.rstrip().endswith("75.00% barrier        @!P0 LDS.64 R2, [R3]")


def test_random_calls_match_the_oracle(monkeypatch, device, tmp_path):
    """benchmarks/random_calls.py's drawn calls of `triton` (on the CPU small, float16 and
    under the interpreter) pass its checks, the row check too: feature combinations that
    no test here names (the same twelve each run: seed 47)."""
    random_calls = benchmark_script("random_calls", monkeypatch)
    assert random_calls.main(["--impl", "triton", "--device", device.type, "--cases", "12",
                              "--seed", "47", "--out", str(tmp_path)]) == 0


def test_first_calls_counts_each_kernels_builds_on_the_device(monkeypatch):
    """benchmarks/first_calls.py counts the builds each kernel (an Autotuner's through its
    JITFunction) holds for the device it is asked about, without adding one."""
    import triton

    first_calls = benchmark_script("first_calls", monkeypatch)
    # a JITFunction's own .fn is its Python function (a Gluon kernel's too)
    jitted = types.SimpleNamespace(device_caches={0: ({"a": 1, "b": 2}, "binder"),
                                                  1: ({"c": 3},)}, fn=lambda: None)
    tuned = object.__new__(triton.runtime.Autotuner)
    tuned.fn = jitted
    monkeypatch.setattr(first_calls, "KERNELS", {
        "tuned": tuned, "plain": jitted, "none": None,
        "other": types.SimpleNamespace(device_caches={1: ({},)})})
    assert first_calls.compiled(torch.device("cuda", 0)) == {"tuned": 2, "plain": 2,
                                                             "none": 0, "other": 0}
    assert 0 not in first_calls.KERNELS["other"].device_caches


def test_consan_wrapper_runs_the_script_instrumented(tmp_path):
    """benchmarks/consan.py runs SCRIPT ARGS with ConSan's mode set before Triton reads
    it, a compile cache of its own, the backward on the calling thread and fused_triton's
    direct launcher off. In a process of its own: it sets the environment and Triton's
    allocator for good."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, sys\n"
        "import torch\n"
        "from triton import knobs\n"
        "from attnkit.backends import fused_triton\n"
        "print(json.dumps({'mode': knobs.compilation.instrumentation_mode,\n"
        "                  'cache': os.environ['TRITON_CACHE_DIR'], 'argv': sys.argv,\n"
        "                  'threads': torch._C._is_multithreading_enabled(),\n"
        "                  'fast': fused_triton._FAST_LAUNCH}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root / "src"), str(root / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INSTRUMENTATION_MODE", None)
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "consan.py"), str(probe),
                           "--flag", "x"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["mode"] == "consan"
    assert seen["argv"] == [str(probe), "--flag", "x"]
    assert os.path.basename(seen["cache"]).startswith("attnkit-consan-")
    assert seen["cache"] != os.environ.get("TRITON_CACHE_DIR")
    assert seen["threads"] is False and seen["fast"] is False


def test_memcheck_forces_short_calls_onto_every_gluon_kernel(monkeypatch):
    """benchmarks/memcheck.py reroutes fused_triton by its module names so that its short
    cases reach the three Gluon kernels; a rule renamed or added there would leave them on
    the Triton kernels, and memcheck would say so only on a GPU."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    memcheck = benchmark_script("memcheck", monkeypatch)
    memcheck.force_gluon_kernels(monkeypatch.setattr)  # undone after the test
    for case in memcheck.GLUON_CASES:
        q, k, v, kwargs = case.make_inputs("cpu", torch.Generator().manual_seed(0))
        call = make_call(q, k, v, **kwargs)
        dout = torch.randn_like(q)
        assert ft._hopper_forward_fits(call), case  # (the key-split rule is GPU-only)
        assert ft._hopper_backward_fits(call, dout, dout) == (True, True), case


def test_memcheck_counts_launches_that_ran_only(monkeypatch):
    """memcheck.py's launch counts leave out the launches that a call's first backward
    only collects to count its builds (a _Collector launcher): with them, each case's
    first run counted one backward more (run 60)."""
    from attnkit.backends import fused_triton as ft

    memcheck = benchmark_script("memcheck", monkeypatch)
    launched = [("launch_dq", ft._Collector()), ("launch_dq", None),
                ("launch_dkdv", ft._launch_jitted), ("launch_dkdv", ft._Collector())]
    assert memcheck.made(launched) == ["launch_dq", "launch_dkdv"]


def test_dropout_seed_pieces_launch_the_kernels_as_backward_does(monkeypatch):
    """benchmarks/dropout_seed.py --pieces times the backward's kernels one at a time
    through fused_triton's private launch functions: each piece (the Triton dQ and dK/dV
    kernels, and the Gluon ones as on Hopper) gets the arguments _backward gives that
    kernel, buffers it allocates itself aside, so that a change there cannot leave the
    script timing something else unnoticed until a GPU run."""
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_backward as hb
    from attnkit.call import make_call

    script = benchmark_script("dropout_seed", monkeypatch)
    seen = []
    for module, name in ((ft, "_launch_dq"), (ft, "_launch_dkdv"), (hb, "launch_dq"),
                         (hb, "launch_dkdv")):
        monkeypatch.setattr(module, name, lambda *args, _name=name, **kwargs:
                            seen.append((_name, args, kwargs)))
    monkeypatch.setattr(ft, "_ran_on_gluon", lambda name, kernel, launch: launch() or True)
    q, k, v, dout = (torch.randn(1, 2, 17, 16, dtype=DTYPE) for _ in range(4))
    call = make_call(q, k, v, causal=True, dropout_p=0.2)
    seed = torch.tensor(5)
    out, lse = torch.randn_like(q), torch.randn(1, 2, 17)

    given = {id(t): name for name, t in (("q", call.q), ("k", call.k), ("v", call.v),
                                          ("out", out), ("lse", lse), ("dout", dout),
                                          ("seed", seed))}

    def form(arg):
        """An argument as compared: the call and the tensors given by name, other tensors
        (buffers, which the pieces allocate for themselves) by their layout, tuples and
        dicts by their items."""
        if arg is call:
            return "call"
        if isinstance(arg, torch.Tensor):
            return given.get(id(arg), ("tensor", arg.shape, arg.dtype, arg.stride()))
        if isinstance(arg, (tuple, list)):
            return tuple(map(form, arg))
        return {key: form(value) for key, value in arg.items()} if isinstance(arg, dict) else arg

    def launches(gluon: bool, run) -> dict:
        """{launch function: (its arguments' form, keywords' form)} of what run launches
        with the Gluon kernels on or off (the Triton launches' last argument, the tile
        config, is None from _backward and left out by the script)."""
        monkeypatch.setattr(ft, "_uses_hopper_backward", lambda *args: (gluon, gluon))
        seen.clear()
        run()
        return {name: (form(args[:7] if name.startswith("_") else args), form(kwargs))
                for name, args, kwargs in seen}

    for gluon in (False, True):
        want = launches(gluon, lambda: ft._backward(call, seed, out, lse, dout))
        pieces = script.backward_pieces({"tensor": call}, {"tensor": seed},
                                        {"tensor": (out, lse)}, dout)
        assert set(pieces) == {"dq", "dkdv"} | ({"gluon_dq", "gluon_dkdv"} if gluon else set())
        got = launches(gluon, lambda pieces=pieces: [run("tensor") for run in pieces.values()])
        assert {name: got[name] for name in want} == want, gluon


def test_module_time_imports_what_bench_still_has(monkeypatch):
    """benchmarks/module_time.py builds its workloads with attnkit.bench's own private
    helpers; one renamed there would break it only on a GPU."""
    benchmark_script("module_time", monkeypatch)


def test_cold_start_runs_each_variant_in_turns_from_an_empty_cache(monkeypatch, tmp_path,
                                                                    capsys):
    """benchmarks/cold_start.py: every child process gets its variant's source and a Triton
    cache folder of its own that starts empty, the variants take turns round by round,
    and the JSON written after each run keeps every run's numbers under its variant."""
    import json
    import os
    from pathlib import Path

    cold = benchmark_script("cold_start", monkeypatch)
    children = []

    def fake_run(argv, env, **kwargs):
        cache = env["TRITON_CACHE_DIR"]
        children.append((env["PYTHONPATH"], cache, os.listdir(cache)))
        assert env["TRITON_PRINT_AUTOTUNING"] == "1"
        (Path(cache) / "compiled").write_text("")  # what a child leaves behind
        n = len(children)
        cases = {case: [float(n), 1.0, n / 1000] for case in cold.CASES}
        out = {"device": "GPU", "torch": "t", "triton": "tr", "cases": cases}
        tuning = (f"Autotuning kernel _fwd_kernel with config BLOCK_M: 64\n"
                  f"Triton autotuning for function _fwd_kernel,\nwith key as (64, 'a, b'),\n"
                  f"finished after {n}.50s,\nbest config selected: BLOCK_M: 64;\n"
                  f"Triton autotuning for function _bwd_dq_kernel,\nwith key as (1,),\n"
                  f"finished after 0.25s,\nbest config selected: BLOCK_M: 32;\n")
        return types.SimpleNamespace(returncode=0, stdout=tuning + json.dumps(out) + "\n",
                                     stderr="")

    monkeypatch.setattr(cold.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["cold_start.py", "--rounds", "2", "--out", str(tmp_path),
                                      "--variant", "a=src_a", "--variant", "b=src_b"])
    cold.main()
    sources = [Path(src).name for src, _, _ in children]
    assert sources == ["src_a", "src_b", "src_a", "src_b"]
    assert len({cache for _, cache, _ in children}) == 4
    assert all(listed == [] for _, _, listed in children)
    written = json.loads((tmp_path / "cold_start.json").read_text())
    first = next(iter(cold.CASES))
    assert [run["cases"][first][0] for run in written["runs"]["b"]] == [2.0, 4.0]
    assert written["device"] == "GPU" and written["rounds"] == 2
    assert written["runs"]["a"][1]["autotuning"] == [["_fwd_kernel", 3.5],
                                                     ["_bwd_dq_kernel", 0.25]]
    medians = "".join(f"{f:8.2f} / {f / 1000:.4f}".rjust(22) for f in (2.0, 3.0))  # a, b
    assert first.ljust(26) + medians in capsys.readouterr().out.splitlines()


def test_kernel_variants_runs_each_variant_as_written(monkeypatch):
    """benchmarks/kernel_variants.py: a switch set by one variant and not by the next goes
    back to its value as found; a module can stand in for one of fused_triton's."""
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_backward

    kv = benchmark_script("kernel_variants", monkeypatch)
    for attr in ("_HOPPER_DQ", "_HOPPER_DKDV", "hopper_backward"):
        monkeypatch.setattr(ft, attr, getattr(ft, attr))  # undone after the test
    variants = [kv.parse_variant("a:_HOPPER_DQ=0"),
                kv.parse_variant("b:_HOPPER_DKDV=0,hopper_backward=@json")]
    assert variants[1][1]["hopper_backward"] is importlib.import_module("json")
    found = {"_HOPPER_DQ": True, "_HOPPER_DKDV": True, "hopper_backward": hopper_backward}
    kv.switch_to(variants[0][1], found)
    assert (ft._HOPPER_DQ, ft._HOPPER_DKDV, ft.hopper_backward) == (0, True, hopper_backward)
    kv.switch_to(variants[1][1], found)
    assert (ft._HOPPER_DQ, ft._HOPPER_DKDV) == (True, 0)
    assert ft.hopper_backward is variants[1][1]["hopper_backward"]
    kv.switch_to({}, found)
    assert (ft._HOPPER_DQ, ft._HOPPER_DKDV, ft.hopper_backward) == (True, True,
                                                                     hopper_backward)


def test_kernel_variants_reads_values_and_uneven_shapes(monkeypatch):
    """benchmarks/kernel_variants.py: `@MODULE.ATTR` sets a switch to a value a module
    holds (a route table to try), `@MODULE` to the module; S may be SQ:SKV."""
    kv = benchmark_script("kernel_variants", monkeypatch)
    _, switches = kv.parse_variant("x:_HOPPER_ROUTES=@json.decoder.JSONArray,hopper_forward=@json")
    assert switches["_HOPPER_ROUTES"] is importlib.import_module("json.decoder").JSONArray
    assert switches["hopper_forward"] is importlib.import_module("json")
    with pytest.raises(AttributeError):
        kv.parse_variant("x:_HOPPER_ROUTES=@json.no_such_table")
    with pytest.raises(ModuleNotFoundError):
        kv.parse_variant("x:_HOPPER_ROUTES=@no_such_module")
    assert kv.parse_shape("8,16,1024:16384,128,1") == (8, 16, 1024, 16384, 128, True)
    assert kv.parse_shape("4,32,4096,64,0") == (4, 32, 4096, 4096, 64, False)


def test_gluon_backward_kernels_have_a_config_for_every_head_dim_they_reach():
    """Every head dim that _HOPPER_DKDV_REACH or _HOPPER_DQ_REACH routes to a Gluon
    backward kernel has that kernel's config, with dropout too (the routing does not ask:
    every routed head dim drops)."""
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_backward as hb

    dkdv_dims = {d for d, _ in ft._HOPPER_DKDV_REACH}
    assert dkdv_dims <= set(hb.DKDV_CONFIG) and dkdv_dims <= set(hb.DKDV_DROPOUT_CONFIG)
    assert {d for d, _ in ft._HOPPER_DQ_REACH} <= set(hb.DQ_CONFIG)


@pytest.mark.parametrize("head_dim", [256, 192])
def test_wide_dkdv_launch_gives_each_program_64_keys(head_dim):
    """launch_dkdv at D=256 launches wide_dkdv_kernel, one program per 64 keys and (batch,
    kv head), K and V in boxes of 64 rows, Q and dO in BLOCK_M's (DKDV_CONFIG's, or with
    dropout DKDV_DROPOUT_CONFIG's), with dropout's seed and probability and its switch;
    and so does D=192, in boxes as wide (256 columns, head_block), its own D the kernel's
    HEAD_D."""
    from attnkit.backends import hopper_backward as hb
    from attnkit.backends import hopper_forward as hf

    if hf.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper operations")
    launches = []
    q = torch.randn(2, 4, 300, head_dim, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 1000, head_dim, dtype=torch.bfloat16) for _ in range(2))
    lse = torch.randn(2, 4, 300)
    seed = torch.tensor(7)
    for dropout_p, config in ((0.0, hb.DKDV_CONFIG[256]), (0.25, hb.DKDV_DROPOUT_CONFIG[256])):
        hb.launch_dkdv(q, k, v, q, lse, lse, k, v, None, True, 0.1, seed, dropout_p,
                       launcher=lambda *launch: launches.append(launch))
        kernel, grid, args, constexprs, _ = launches[-1]
        assert kernel is hb.wide_dkdv_kernel and grid == (16, 4)
        assert constexprs["HEAD_D"] == head_dim
        assert [desc.shape[3] for desc in args[:4]] == [head_dim] * 4
        block_m, stages = config
        assert [desc.block_shape for desc in args[:4]] == [
            [1, 1, block_m, 256], [1, 1, 64, 256], [1, 1, 64, 256], [1, 1, block_m, 256]]
        assert (constexprs["BLOCK_M"], constexprs["STAGES"]) == (block_m, stages)
        assert args[-2] is seed and args[-1] == dropout_p
        assert constexprs["DROPOUT"] == (dropout_p > 0.0)
    assert len(launches) == 2


def test_split_columns_skip_the_columns_past_the_head_dim():
    """A product over a tile's columns splits in two where the parts, powers of two of at
    least a wgmma's K step (16), cover the head dim in fewer columns than the tile."""
    from attnkit.backends import hopper_forward as hf

    parts = {d: (hf.split_columns(d), hf.second_columns(d)) for d in range(40, 257, 8)}
    split = {d: first_second for d, first_second in parts.items() if first_second[0]}
    assert split == {40: (32, 16), 48: (32, 16), 72: (64, 16), 80: (64, 16), 88: (64, 32),
                     96: (64, 32), 136: (128, 16), 144: (128, 16), 152: (128, 32),
                     160: (128, 32), 168: (128, 64), 176: (128, 64), 184: (128, 64),
                     192: (128, 64)}
    for d, (first, second) in split.items():
        assert first == hf.head_block(d) // 2 < d <= first + second < hf.head_block(d)
    assert hf.split_columns(96, granule=32) == 64 and hf.split_columns(80, granule=64) == 0


@pytest.mark.parametrize("kernel, head_dim, causal", [
    *((kernel, d, causal) for kernel in ("forward", "dkdv", "dq")
      for d, causal in ((64, False), (64, True), (128, True))),
    ("forward", 256, True), ("dkdv", 256, True),  # dkdv: wide_dkdv_kernel
    ("forward", 96, True), ("dq", 80, False), ("dkdv", 192, True)])  # wider tiles
def test_gluon_sass_gives_every_kernel_parameter_its_kind(monkeypatch, kernel, head_dim,
                                                         causal):
    """benchmarks/gluon_sass.py builds the Gluon kernels' signatures from what the launch
    functions pass: a constexpr a kernel has and its launch does not pass (or passes as
    an argument) would compile as an int there."""
    from attnkit.backends import hopper_forward as hf

    if hf.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper operations")
    gluon_sass = benchmark_script("gluon_sass", monkeypatch)
    source, _ = getattr(gluon_sass, kernel)(head_dim, causal, False, None, 3)
    kinds = {name: kind == "constexpr" for name, kind in source.signature.items()}
    assert kinds == {param.name: param.is_constexpr for param in source.fn.params}


def test_gluon_sass_finds_writes_into_an_inflight_wgmmas_registers(monkeypatch):
    """gluon_sass.inflight_writes flags an instruction that writes the accumulator (N / 2
    registers for HGMMA.64xN) or the register A operand (4) of a wgmma group between its
    issue and the WARPGROUP.DEPBAR that retires it, and nothing else: not reads, not
    stores, not writes after the wait (run 43 scanned every Gluon build with it)."""
    inflight_writes = benchmark_script("gluon_sass", monkeypatch).inflight_writes
    dv = "HGMMA.64x64x16.F32.BF16 R88, R56, gdesc[UR8].tnspB, R88, gsb0"  # R88-R119, R56-R59
    dk = "HGMMA.64x128x16.F32.BF16 R120, R24, gdesc[UR4].tnspB, R120, gsb0"  # R120-R183
    code = ["WARPGROUP.ARRIVE", dv,
            "FMUL R59, R1, R2",  # dV's A operand, in flight
            "FMUL R60, R1, R2",  # past it
            "STS [R1], R90",  # a store of dV's accumulator: a read
            "IMAD.WIDE.U32 R86, R1, R2, R4",  # R86-R87
            "IMAD.WIDE.U32 R118, R1, R2, R4",  # R118-R119: dV's accumulator
            "WARPGROUP.ARRIVE", dk,
            "WARPGROUP.DEPBAR.LE gsb0, 0x1",  # dV retired, dK still in flight
            "MOV R100, RZ",
            "@P0 FADD R183, R1, R2",
            "LDS.128 R180, [R1]",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0",
            "FADD R150, R1, R2"]
    assert inflight_writes(code) == ["FMUL R59, R1, R2", "IMAD.WIDE.U32 R118, R1, R2, R4",
                                     "@P0 FADD R183, R1, R2", "LDS.128 R180, [R1]"]


def test_hopper_forward_refuses_a_config_that_does_not_fit():
    from attnkit.backends import hopper_forward as hf

    q = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16)
    # three K/V stages (192 KB), Q (32 KB) and out's boxes (32 KB): over 227 KB
    with pytest.raises(ValueError, match="does not fit in shared memory"):
        hf.launch(q, q, q, q, None, None, False, 1.0, (128, 3, 2, 1))
    assert hf.Config(128, 2, 2) == (128, 2, 2, 0, 0)


@pytest.mark.parametrize("reach, text", [
    ({(128, False): (1024, 1024), (128, True): (1024, 1024)}, "Sq and Skv >= 1024 at D=128"),
    ({(64, True): (4096, 4096), (128, False): (256, 1024), (128, True): (256, 2048)},
     "Sq >= 256 and Skv >= 1024 at D=128 (Sq >= 256 and Skv >= 2048 causal), "
     "Sq and Skv >= 4096 at D=64 causal"),
    ({(64, False): (2048, 2048)}, "Sq and Skv >= 2048 at D=64 without causal"),
])
def test_routes_in_words(reach, text):
    from attnkit.backends import fused_triton as ft

    assert ft._reach_text(reach) == text


def test_info_says_whether_the_hopper_forward_runs(monkeypatch):
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_forward as hf

    cuda = torch.device("cuda")
    monkeypatch.setattr(ft.torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert ft.BACKEND.details(cuda) is None  # not a Hopper GPU
    assert ft.BACKEND.details(torch.device("cpu")) is None
    monkeypatch.setattr(ft.torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(ft, "_INTERPRET", False)
    monkeypatch.setattr(hf, "available", lambda: False)
    assert "off: Triton" in ft.BACKEND.details(cuda) and "(3.6)" in ft.BACKEND.details(cuda)
    monkeypatch.setattr(hf, "available", lambda: True)
    assert "Gluon forward for Hopper: on for bfloat16/float16" in ft.BACKEND.details(cuda)
    assert "with D = Dv a multiple of 8 from 40 to 256 (rows that TMA reads: 16-byte " \
        "aligned), on tiles of 64, 128 or 256 columns (the narrowest that holds D), and " \
        "Sq and Skv >= 256 at D=136-256, Sq >= 256 and Skv >= 512 at D=72-128, Sq and " \
        "Skv >= 1536 at D=40-64 " \
        "(Sq and Skv >= 1280 causal); Sq and Skv >= 512 at D=40-64 where every row sees " \
        "every key (no causal mask or key lengths, Skv a multiple of 128), and no mask" \
        in ft.BACKEND.details(cuda)
    assert "runs triton first for those calls where it was faster than cuDNN: when nothing " \
        "needs a gradient, Sq and Skv >= 8192 at D=128 causal, Sq and Skv >= 1024 at D=96 " \
        "(Sq and Skv >= 4096 causal), Sq and Skv >= 2048 at D=64 (Sq and Skv >= 8192 " \
        "causal); with gradients, Sq and Skv >= 1024 at D=256 (Sq and Skv >= 2048 causal), " \
        "Sq and Skv >= 4096 at D=192; with gradients and dropout (this file's forward, the " \
        "Gluon dQ and dK/dV kernels), Sq and Skv >= 1024 at D=256" in ft.BACKEND.details(cuda)
    assert "dK/dV kernel for Hopper: on for calls of the same kinds, dropout too, with Sq " \
        "and Skv >= 256 at D=136-256, Sq >= 256 and Skv >= 512 at D=72-128 (Sq >= 256 and " \
        "Skv >= 1024 causal), Sq and Skv >= 1024 at D=40-64" in ft.BACKEND.details(cuda)
    assert "dQ kernel for Hopper: on for calls of the same kinds, dropout too, with Sq and " \
        "Skv >= 256 at D=136-256, Sq >= 256 and Skv >= 512 at D=72-128 (Sq >= 256 and Skv " \
        ">= 1024 causal)." in ft.BACKEND.details(cuda)
    assert ft.BACKEND.details(cuda).endswith(f". {ft._BLOCK_LEAD}")
    monkeypatch.setattr(ft, "_HOPPER_DKDV", False)
    assert "dK/dV kernel for Hopper: off: switched off" in ft.BACKEND.details(cuda)
    assert "dQ kernel for Hopper: on" in ft.BACKEND.details(cuda)
    monkeypatch.setattr(ft, "_HOPPER_DQ", False)
    assert "dQ kernel for Hopper: off: switched off" in ft.BACKEND.details(cuda)
    assert "Gluon forward for Hopper: on" in ft.BACKEND.details(cuda)
    monkeypatch.setattr(ft, "_HOPPER_FORWARD", False)
    assert "forward for Hopper: off: switched off in this process" in ft.BACKEND.details(cuda)
    monkeypatch.setattr(ft, "_INTERPRET", True)
    assert "TRITON_INTERPRET" in ft.BACKEND.details(cuda)


def test_hopper_forward_needs_tma_readable_tensors():
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_forward as hf
    from attnkit.call import make_call

    call = _long_call()
    k_columns = call.k.transpose(2, 3).contiguous().transpose(2, 3)  # stride 1 along S
    assert not ft._hopper_forward_fits(make_call(call.q, k_columns, call.v))
    # K and V broadcast over the heads (stride 0): a descriptor's strides are positive
    k_shared, v_shared = (t[:, :1].expand(-1, 2, -1, -1) for t in (call.k, call.v))
    assert not ft._hopper_forward_fits(make_call(call.q, k_shared, v_shared))
    one_batch = call.q[:1].as_strided(call.q.shape, (0, *call.q.stride()[1:]))
    assert ft._hopper_forward_fits(make_call(one_batch, call.k, call.v))  # size 1: free
    if hf.gluon is not None:  # its descriptor gets a stride the encoder takes
        assert all(s > 0 for s in hf.describe(one_batch, 64).strides)


@pytest.mark.parametrize("causal, lengths, skv, all_seen", [
    (False, None, 256, True),
    (True, None, 256, False),
    (False, [200], 256, False),
    (False, None, 200, False),  # the last 128-key block ends past the keys
    (False, None, 0, False),  # no keys: every row's lse is -inf, which needs the checks
])
def test_gluon_forward_skips_index_checks_only_where_every_key_is_seen(
        causal, lengths, skv, all_seen, monkeypatch):
    # an ALL_SEEN build has no masked step: a wrong True would let hidden keys in
    from attnkit.backends import hopper_forward as hf

    if hf.gluon is None:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(hf, "multiprocessors", lambda device: 1)
    q, out = (torch.randn(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, 2, skv, 64, dtype=torch.bfloat16) for _ in range(2))
    lse = torch.zeros(1, 2, 256)
    key_lengths = None if lengths is None else torch.tensor(lengths)
    seen = []
    hf.launch(q, k, v, out, lse, key_lengths, causal, 0.125, (128, 2, 2, 1),
              launcher=lambda kernel, grid, args, constexprs, options:
              seen.append(constexprs["ALL_SEEN"]))
    assert seen == [all_seen]


def test_hopper_descriptor_is_the_one_triton_would_build():
    # describe() skips TensorDescriptor's checks for host time: the descriptor must still
    # be the one the checked constructor builds, field for field (a field a later Triton
    # adds without a default fails here), on the layouts the kernels get: a plain tensor,
    # q as a view into a fused QKV projection, a batch of one with a free stride, and
    # head dims that are not powers of two, whose boxes are the next power of two wide.
    from attnkit.backends import hopper_forward as hf

    if hf.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper descriptors")
    qkv = torch.randn(2, 100, 3, 4, 64, dtype=torch.bfloat16)
    qkv96 = torch.randn(2, 100, 3, 4, 96, dtype=torch.float16)
    one_batch = torch.randn(1, 4, 100, 128, dtype=torch.float16)
    for t, rows, columns in [
        (torch.randn(2, 4, 1000, 128, dtype=torch.bfloat16), 128, 128),
        (qkv[:, :, 0].transpose(1, 2), 64, 64),
        (one_batch.as_strided(one_batch.shape, (0, *one_batch.stride()[1:])), 64, 128),
        (qkv96[:, :, 1].transpose(1, 2), 64, 128),
        (torch.randn(2, 4, 300, 192, dtype=torch.bfloat16), 32, 256),
    ]:
        strides = [st if size > 1 else t.shape[3] for size, st in
                   zip(t.shape, t.stride(), strict=True)]
        element = {torch.bfloat16: hf.gl.bfloat16, torch.float16: hf.gl.float16}[t.dtype]
        box = [1, 1, rows, columns]
        checked = hf.TensorDescriptor(t, list(t.shape), strides, box,
                                      hf.gl.NVMMASharedLayout.get_default_for(box, element))
        described = hf.describe(t, rows)
        # Field by field, the tensor by identity: from Python 3.13 a dataclass's == compares
        # each field with ==, which a tensor answers elementwise.
        for field in dataclasses.fields(checked):
            got, want = getattr(described, field.name), getattr(checked, field.name)
            assert got is want if isinstance(want, torch.Tensor) else got == want, field.name


@pytest.mark.parametrize("version, offered", [("3.6.0", True), ("3.6.1+git", True),
                                              ("3.5.1", False), ("3.9.0", False)])
def test_hopper_forward_offered_on_checked_triton_releases_only(monkeypatch, version,
                                                                offered):
    from attnkit.backends import hopper_forward as hf

    if hf.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper operations to import")
    monkeypatch.setattr(hf.triton, "__version__", version)
    assert hf.available() == offered


def _failing_launch():
    """(launches, fails): a stand-in for a Gluon launch that records its arguments in
    launches and raises the CompilationError of a Gluon the kernel does not compile under."""
    from attnkit.backends import fused_triton as ft

    launches = []

    def fails(*args, **kwargs):
        if isinstance(kwargs.get("launcher"), ft._Collector):
            return  # a forward foreseeing the backward's launches: nothing compiles there
        launches.append(args)
        raise triton.CompilationError(None, None, "no such Gluon op here")

    return launches, fails


def test_hopper_forward_that_does_not_compile_falls_back_once(monkeypatch, device):
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_forward as hf
    from attnkit.call import make_call

    launches, fails = _failing_launch()
    monkeypatch.setattr(ft, "_HOPPER_FORWARD", True)
    # as if on a Hopper GPU with a call the Gluon forward covers, the switch still read
    monkeypatch.setattr(ft, "_uses_hopper_forward", lambda call: ft._HOPPER_FORWARD)
    monkeypatch.setitem(ft._HOPPER_ROUTES, (16, True), (((1, 1), (128, 2, 2, 0)),))
    monkeypatch.setattr(hf, "launch", fails)
    q, k, v = (torch.randn(1, 2, 17, 16).to(device, DTYPE) for _ in range(3))
    call = make_call(q, k, v, causal=True)
    with pytest.warns(RuntimeWarning, match="did not compile"):
        out, _ = ft._forward(call, 0)
    assert rel_err(out, attention(q, k, v, causal=True, impl="reference")) < 1e-2
    ft._forward(call, 0)  # switched off now: no second try, no second warning
    assert len(launches) == 1 and not ft._HOPPER_FORWARD


@pytest.mark.parametrize("causal", [False, True])
def test_hopper_launches_get_the_head_group_their_switches_say(monkeypatch, device, causal):
    """Causal calls hand the Gluon forward _HOPPER_FORWARD_HEAD_GROUP and the Gluon dQ and
    dK/dV kernels _HEAD_GROUP; the rest go head by head."""
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_backward as hb
    from attnkit.backends import hopper_forward as hf
    from attnkit.call import make_call

    launches, fails = _failing_launch()
    # each launch fails and switches its kernel off: back on after the test
    monkeypatch.setattr(ft, "_HOPPER_FORWARD", True)
    monkeypatch.setattr(ft, "_HOPPER_DKDV", True)
    monkeypatch.setattr(ft, "_HOPPER_DQ", True)
    monkeypatch.setattr(ft, "_uses_hopper_forward", lambda call: True)
    monkeypatch.setattr(ft, "_uses_hopper_backward", lambda call, out, dout: (True, True))
    monkeypatch.setattr(ft, "_warn_gluon_off", lambda kernel, exc: None)
    monkeypatch.setitem(ft._HOPPER_ROUTES, (16, causal), (((1, 1), (128, 2, 2, 0)),))
    monkeypatch.setattr(hf, "launch", fails)
    for launch in ("launch_dkdv", "launch_dq"):
        monkeypatch.setattr(hb, launch,
                            lambda *args, head_group, launcher: fails(*args, head_group))
    monkeypatch.setattr(ft, "_HOPPER_FORWARD_HEAD_GROUP", 5)
    _order_heads_in_groups_of(6, monkeypatch)
    # the launches fail over to the Triton kernels, which need the tensors on the GPU
    q, k, v = (torch.randn(1, 2, 17, 16).to(device, DTYPE) for _ in range(3))
    call = make_call(q, k, v, causal=causal)
    out, lse = ft._forward(call, 0)
    ft._backward(call, 0, out, lse, torch.randn_like(out))
    assert [launch[-1] for launch in launches] == ([5, 6, 6] if causal else [1, 1, 1])


def test_dropout_seed_is_read_from_the_calls_device(device, monkeypatch):
    """Eager calls draw the seed as a tensor on the call's device, which the kernels read
    (so a CUDA graph's replays draw anew); an int seed of the same value drops the same
    weights, forward and backward."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    seeds = []
    forward = ft._forward
    monkeypatch.setattr(ft, "_forward", lambda call, seed, **kw: (seeds.append(seed),
                                                                   forward(call, seed, **kw))[1])
    q, k, v = (torch.randn(1, 2, 17, 16).to(device, DTYPE).requires_grad_() for _ in range(3))
    attention(q, k, v, dropout_p=0.3, impl="triton")
    (seed,) = seeds
    assert isinstance(seed, torch.Tensor) and seed.device == q.device
    call = make_call(*(t.detach() for t in (q, k, v)), dropout_p=0.3)
    (out, lse), (by_value, _) = forward(call, seed), forward(call, int(seed))
    assert torch.equal(out, by_value)
    assert not torch.equal(out, forward(call, int(seed) + 1)[0])
    dout = torch.randn_like(out)
    for a, b in zip(ft._backward(call, seed, out, lse, dout),
                    ft._backward(call, int(seed), out, lse, dout), strict=True):
        assert torch.equal(a, b)


def test_ops_take_a_seed_held_elsewhere_by_value():
    from attnkit.backends import fused_triton as ft

    seed = torch.tensor(1234)
    assert ft._kernel_seed(None, torch.device("cpu")) == 0
    assert ft._kernel_seed(seed, torch.device("cpu")) is seed
    assert ft._kernel_seed(seed, torch.device("cuda", 0)) == 1234


def test_tile_picks_are_kept_apart_by_dropout_and_by_how_the_seed_comes():
    """A pick tuned without dropout, or with the seed by value, would otherwise be
    launched (past the autotuner, which skips tiles that do not build) for a kernel with
    dropout, or one that loads its seed: other builds, and ptxas crashed on one (run 33)."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    q = torch.randn(1, 2, 8, 16)
    keys = set()
    for dropout_p, seed in ((0.0, 0), (0.1, 7), (0.1, torch.tensor(7))):
        _, flags = ft._meta(make_call(q, q, q, dropout_p=dropout_p), seed)
        keys.add(ft._tune_key(flags, [1, 2], seed, q))
    assert len(keys) == 3


def _worst_block_err(got: torch.Tensor, want: torch.Tensor, block: int = 64) -> float:
    """The largest rel_err over blocks of `block` positions along dim 2 (all batches and
    heads together): a mask wrong in one block of keys or rows is not averaged away."""
    return max(rel_err(g, w) for g, w in zip(got.split(block, 2), want.split(block, 2),
                                             strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dropout_drops_the_same_scores_under_every_tile_on_gpu(head_dim):
    """Dropout's mask is a function of (seed, head, query, key) alone. The forward under
    each of its tiles (K/V through TMA and not), with the seed by value or loaded, drops
    the same scores, read exactly: with q = 0 a seen key weighs 1/n, and a one-hot v
    shows head_dim keys a call, one per output column. The backward kernels under each of
    their tiles give the float64 gradients of that mask, block by block."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    b, hq, hkv, s, p_drop = 2, 4, 2, 1000, 0.5
    gen = torch.Generator(device="cuda").manual_seed(head_dim)

    def randn(heads):
        return torch.randn(b, heads, s, head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=gen)

    q, k, v, dout = randn(hq), randn(hkv), randn(hkv), randn(hq)
    seen = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
    seeds = (1234, torch.tensor(1234, device="cuda"))

    def kept(seed, **tile):
        keep = torch.zeros(b, hq, s, s, dtype=torch.bool, device="cuda")
        for first in range(0, s, head_dim):
            keys = torch.arange(first, min(first + head_dim, s), device="cuda")
            one_hot = torch.zeros_like(v)
            one_hot[:, :, keys, keys - first] = 1
            call = make_call(torch.zeros_like(q), k, one_hot, causal=True, dropout_p=p_drop)
            keep[..., keys] = ft._forward(call, seed, **tile)[0][..., :len(keys)] > 0
        return keep

    want = kept(seeds[1])
    assert not want[..., ~seen].any()
    assert abs(want[..., seen].float().mean().item() - (1 - p_drop)) < 0.01
    tiles = [{}, *({"config": c, "tma": False} for c in ft._FWD_CONFIGS)]
    if ft._tma_ready(k, v):
        tiles += [{"config": c, "tma": True} for c in ft._FWD_TMA_CONFIGS]
    ran = 0
    for seed, tile in itertools.product(seeds, tiles):
        try:
            assert torch.equal(kept(seed, **tile), want), (type(seed), tile)
            ran += 1
        except triton.runtime.errors.OutOfResources:  # D=128 (128, 128, 8, 3) by pointers;
            pass  # the autotuner passes over such a tile too
    assert ran >= 8

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    probs = _oracle_probs(q64, k64, causal=True)
    ref = torch.where(want, probs / (1 - p_drop), 0) @ v64.repeat_interleave(hq // hkv, 1)
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    call = make_call(q, k, v, causal=True, dropout_p=p_drop)
    backward_tiles = [(None, None), *((c, None) for c in ft._DKDV_CONFIGS),
                      *((None, c) for c in ft._DQ_CONFIGS)]
    for seed in seeds:
        out, lse = ft._forward(call, seed)
        assert _worst_block_err(out, ref) < 2e-2
        for configs in backward_tiles:
            grads = ft._backward(call, seed, out, lse, dout, configs)
            for name, got, grad_ref in zip("qkv", grads, grads_ref, strict=True):
                assert _worst_block_err(got, grad_ref) < 2e-2, (type(seed), configs, name)


@pytest.mark.gpu
def test_dropout_draws_anew_in_each_replay_of_a_cuda_graph_on_gpu():
    """A captured call with dropout: each replay drops other weights, each the right
    fraction, each the dropped and rescaled probabilities (v = identity shows them)."""
    p_drop, skv = 0.3, 128
    q = torch.randn(1, 2, 64, 16, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 2, skv, 16, device="cuda", dtype=torch.float16)
    eye = torch.eye(skv, device="cuda", dtype=torch.float16).expand(1, 2, skv, skv)
    attention(q, k, eye, dropout_p=p_drop, impl="triton")  # compile and tune first
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        dropped = attention(q, k, eye, dropout_p=p_drop, impl="triton")
    probs = _oracle_probs(q, k)
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        keep = dropped > 0
        assert 0.2 < 1 - keep.float().mean().item() < 0.4
        assert rel_err(dropped, torch.where(keep, probs / (1 - p_drop), 0)) < 1e-2
        masks.append(keep.clone())
    assert not torch.equal(*masks)


def test_triton_dkdv_kernel_after_a_gluon_dq_kernel(monkeypatch, device):
    """Where only the dQ kernel is Gluon's, the Triton dK/dV kernel still gets its shared
    arguments (worked out only where a Triton kernel runs) and the delta the dQ kernel
    wrote: dk, dv against the oracle, dq the stand-in's own."""
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_backward as hb
    from attnkit.call import make_call

    def gluon_dq(q, k, v, out, dout, lse, delta, dq, *rest, head_group, launcher):
        delta.copy_((out.float() * dout.float()).sum(-1))
        dq.fill_(7.0)

    monkeypatch.setattr(ft, "_uses_hopper_backward", lambda call, out, dout: (False, True))
    monkeypatch.setattr(hb, "launch_dq", gluon_dq)
    q = torch.randn(2, 4, 17, 16).to(device, DTYPE).requires_grad_()
    k, v = (torch.randn(2, 2, 33, 16).to(device, DTYPE).requires_grad_() for _ in range(2))
    lengths = torch.tensor([33, 9], device=device)
    dout = torch.randn_like(q)
    call = make_call(q.detach(), k.detach(), v.detach(), causal=True, key_lengths=lengths)
    out, lse = ft._forward(call, 0)
    dq, dk, dv = ft._backward(call, 0, out, lse, dout)
    ref = attention(q, k, v, causal=True, key_lengths=lengths, impl="reference")
    _, dk_ref, dv_ref = torch.autograd.grad(ref, (q, k, v), dout)
    assert rel_err(dk, dk_ref) < 1e-2 and rel_err(dv, dv_ref) < 1e-2
    assert bool((dq == 7.0).all())


@pytest.mark.parametrize("kernel, switch, launch", [
    ("dK/dV", "_HOPPER_DKDV", "launch_dkdv"), ("dQ", "_HOPPER_DQ", "launch_dq")])
def test_hopper_backward_kernel_that_does_not_compile_falls_back_once(monkeypatch, device,
                                                                      kernel, switch, launch):
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_backward as hb

    launches, fails = _failing_launch()
    monkeypatch.setattr(ft, "_CHOSEN", {})  # a first call, whose forward foresees the backward
    monkeypatch.setattr(ft, switch, True)
    # as if on a Hopper GPU with a call the Gluon kernel covers (the other one off)
    monkeypatch.setattr(ft, "_uses_hopper_backward", lambda call, out, dout: (
        switch == "_HOPPER_DKDV" and ft._HOPPER_DKDV, switch == "_HOPPER_DQ" and ft._HOPPER_DQ))
    monkeypatch.setattr(hb, launch, fails)
    q, k, v = (torch.randn(1, 2, 17, 16).to(device, DTYPE).requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)
    with pytest.warns(RuntimeWarning, match=f"{kernel} kernel for Hopper did not compile"):
        _assert_matches_reference(q, k, v, grad, causal=True)
    _assert_matches_reference(q, k, v, grad, causal=True)  # no second try or warning
    assert len(launches) == 1 and not getattr(ft, switch)


def test_verify_on_a_gpu_reaches_the_hopper_forward():
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    short = default_cases(torch.bfloat16)
    (long,) = [c for c in default_cases(torch.bfloat16, long=True) if c not in short]
    q, k, v, kwargs = long.make_inputs("cpu", torch.Generator().manual_seed(0))
    assert ft._hopper_forward_fits(make_call(q, k, v, **kwargs))


def _skip_without_hopper_forward():
    from attnkit.backends import hopper_forward as hf

    if torch.cuda.get_device_capability() != (9, 0) or not hf.available():
        pytest.skip("the Gluon forward runs on sm_90 under the Triton release it was "
                    "checked under (hopper_forward.available)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 96, 192, 80])  # 80: P V's 16 columns
def test_hopper_forward_configs_on_gpu(head_dim, dtype):
    """Each Gluon config against the oracle on awkward shapes, one of them with more tiles
    than the GPU has multiprocessors (persistent programs walk several), causal ones also
    with the tiles in groups of heads."""
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_forward as hf
    from attnkit.call import make_call

    _skip_without_hopper_forward()
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    for b, hq, hkv, sq, skv, causal, lengths in [
        (2, 4, 2, 1000, 1000, True, None),
        (1, 2, 2, 1000, 17, True, None),  # rows before the first key see nothing
        (2, 2, 2, 300, 700, False, [0, 555]),  # batch 0 sees no key
        (2, 2, 1, 17, 1000, True, [1000, 333]),
        (3, 8, 2, 2000, 2000, True, [2000, 777, 0]),  # more tiles than multiprocessors
        (2, 4, 2, 300, 1024, False, None),  # every key seen: no index checks built
    ]:
        q = torch.randn(b, hq, sq, head_dim, device="cuda", dtype=dtype, generator=gen)
        k, v = (torch.randn(b, hkv, skv, head_dim, device="cuda", dtype=dtype, generator=gen)
                for _ in range(2))
        key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
        call = make_call(q, k, v, causal=causal, key_lengths=key_lengths)
        want, want_lse = attention(q.double(), k.double(), v.double(), causal=causal,
                                   key_lengths=key_lengths, impl="reference", return_lse=True)
        seen = torch.isfinite(want_lse)
        # causal tiles also 3 heads at a time (several groups, the last one short)
        groups = (1, 3) if causal and b * hq > 3 else (1,)
        for config, head_group in itertools.product(hf.CONFIGS[hf.head_block(head_dim)],
                                                    groups):
            out, lse = ft._empty_outputs(q, v)
            hf.launch(q, k, v, out, lse, key_lengths, causal, call.scale, config, head_group)
            where = (b, hq, sq, skv, config, head_group)
            assert rel_err(out, want) < 1e-2, where
            assert torch.equal(torch.isfinite(lse), seen), where
            assert rel_err(lse[seen], want_lse[seen]) < 1e-3, where


@pytest.mark.gpu
def test_hopper_forward_tile_counter_is_zero_after_each_launch_on_gpu(monkeypatch):
    """The Gluon forward leaves its tile counter at zero for the next launch on the
    stream (tile_counter): launches one after another, on two streams in turns without a
    synchronize, replays of a CUDA graph (its own counter), and launches on more streams
    at once than stream_counter keeps pairs for all match the oracle."""
    from attnkit.backends import fused_triton as ft
    from attnkit.backends import hopper_forward as hf
    from attnkit.call import make_call

    _skip_without_hopper_forward()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(3, 8, 1000, 128, device="cuda", dtype=torch.bfloat16,
                           generator=gen) for _ in range(3))
    call = make_call(q, k, v, causal=True)
    want = attention(q.double(), k.double(), v.double(), causal=True, impl="reference")
    config = ft._HOPPER_ROUTES[(128, True)][-1][1]

    def forward():
        out, lse = ft._empty_outputs(q, v)
        hf.launch(q, k, v, out, lse, None, True, call.scale, config)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    outs = []
    for _ in range(3):
        outs.append(forward())
        with torch.cuda.stream(side):
            outs.append(forward())
    torch.cuda.synchronize()
    pairs = [hf.stream_counter(q.device.index, stream.cuda_stream)
             for stream in (torch.cuda.current_stream(), side)]
    assert all(pair.tolist() == [0, 0] for pair in pairs)
    assert pairs[0].data_ptr() != pairs[1].data_ptr()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        forward()  # warm-up on the capture's stream, as torch.cuda.graph asks
        before = hf.stream_counter.cache_info()
        with torch.cuda.graph(graph, stream=side):
            captured = forward()
    assert hf.stream_counter.cache_info() == before  # the graph took a pair of its own
    for _ in range(2):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        outs.append(captured.clone())
    # Pairs dropped from the cache while launches that use them are still running (a
    # cache of two here, over four streams at once) are not handed to another stream's.
    small = functools.lru_cache(maxsize=2)(hf.stream_counter.__wrapped__)
    monkeypatch.setattr(hf, "stream_counter", small)
    streams = [torch.cuda.Stream() for _ in range(4)]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(2):
        for stream in streams:
            with torch.cuda.stream(stream):
                outs.append(forward())
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    assert small.cache_info().misses == 2 * len(streams)
    for i, out in enumerate(outs):
        assert rel_err(out, want) < 1e-2, i


@pytest.mark.gpu
@pytest.mark.parametrize("grads", [True, False], ids=["train", "no_grad"])
def test_module_under_compiled_cuda_graphs_on_gpu(grads):
    """torch.compile(mode="reduce-overhead") records the module's steps into CUDA graphs:
    whatever the kernels keep from one call to the next (the Gluon forward's tile counter,
    at this causal D=128 length on Hopper) must not be made in the graphs' memory pool
    during their warm-up. Three steps on fresh inputs against the eager module."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(1024, 1024, 8, num_kv_heads=2, causal=True, impl="triton",
                             device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(mha, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        x = torch.randn(2, 2048, 1024, device="cuda", dtype=torch.bfloat16,
                        requires_grad=grads)
        with torch.set_grad_enabled(grads):
            out = compiled(x).clone()
            want = mha(x)
        assert rel_err(out, want) < 1e-2
        if grads:
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, (x, mha.qkv.weight), g)
            for a, b in zip(got, torch.autograd.grad(want, (x, mha.qkv.weight), g),
                            strict=True):
                assert rel_err(a, b) < 1e-2


def _watch_gluon_launches(monkeypatch) -> list[tuple[str, object]]:
    """The Gluon launch functions, each wrapped to note (its name, the launcher it was
    given) in the returned list before it runs (memcheck.py's watch, undone after the
    test)."""
    return benchmark_script("memcheck", monkeypatch).watch_gluon_launches(monkeypatch.setattr)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 80])
def test_hopper_backward_on_gpu(monkeypatch, head_dim, dtype):
    """The Gluon dQ and dK/dV kernels (D=256: wide_dkdv_kernel for dK/dV), through
    _backward, against the oracle on awkward shapes (partial key and query blocks, rows
    and batches that see no key, grouped heads), and the same bits twice."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    _skip_without_hopper_forward()
    # every call routed to both (the dQ kernel at D=64 too): these shapes are shorter
    # than the routes take
    monkeypatch.setattr(ft, "_hopper_backward_fits", lambda call, out, dout: (True, True))
    launched = _watch_gluon_launches(monkeypatch)
    _order_heads_in_groups_of(3, monkeypatch)  # several groups, the last one short
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    for b, hq, hkv, sq, skv, causal, lengths in [
        (2, 4, 2, 1000, 1000, True, None),
        (2, 4, 4, 1000, 1000, False, None),
        (1, 2, 2, 17, 1000, True, None),
        (1, 2, 2, 1000, 17, True, None),  # rows before the first key see nothing
        (2, 2, 2, 700, 300, False, [0, 255]),  # batch 0 sees no key
        (2, 4, 1, 700, 700, True, [700, 333]),
        (1, 2, 2, 1024, 1024, False, [960]),  # a warpgroup whose keys are all hidden
    ]:
        q, dout = (torch.randn(b, hq, sq, head_dim, device="cuda", dtype=dtype, generator=gen)
                   for _ in range(2))
        k, v = (torch.randn(b, hkv, skv, head_dim, device="cuda", dtype=dtype, generator=gen)
                for _ in range(2))
        if b == 1:  # a size-1 batch's stride is free: 0, which describe must replace
            q, k, v, dout = (t.as_strided(t.shape, (0, *t.stride()[1:]))
                             for t in (q, k, v, dout))
        key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
        call = make_call(q, k, v, causal=causal, key_lengths=key_lengths)
        out, lse = ft._forward(call, 0)
        launched.clear()
        grads = [ft._backward(call, 0, out, lse, dout) for _ in range(2)]
        assert sorted(name for name, _ in launched) == ["launch_dkdv"] * 2 + ["launch_dq"] * 2
        inputs64 = [t.double().requires_grad_() for t in (q, k, v)]
        ref = attention(*inputs64, causal=causal, key_lengths=key_lengths, impl="reference")
        want = torch.autograd.grad(ref, inputs64, dout.double())
        for name, got, expected in zip("qkv", grads[0], want, strict=True):
            assert rel_err(got, expected) < 1e-2, (name, b, hq, hkv, sq, skv, causal, lengths)
        assert all(torch.equal(x, y) for x, y in zip(*grads, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256, 192])
def test_hopper_backward_with_dropout_on_gpu(monkeypatch, head_dim):
    """The Gluon dQ and dK/dV kernels with dropout (at D=256 wide_dkdv_kernel, which
    draws the mask in one warpgroup and hands it to the other in P^T's signs), the seed
    loaded and by value, draw the mask of the Triton kernels (whose every tile
    test_dropout_drops_the_same_scores_under_every_tile_on_gpu checks against the
    forward's): the same gradients up to rounding, far from the oracle's without
    dropout, and the same bits twice."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    _skip_without_hopper_forward()
    launched = _watch_gluon_launches(monkeypatch)
    monkeypatch.setattr(ft, "_hopper_backward_fits", lambda *args: (True, True))
    # fixed tiles, small enough for D=128: autotuning every shape and seed kind took this
    # test past 200 s at D=128 on an H200 (run 36); at D=256 the wide heads' small pair
    forward_tile, *triton_tiles = ((ft._FWD_CONFIGS[0], ft._DKDV_CONFIGS[0], ft._DQ_CONFIGS[1])
                                   if head_dim <= 128 else (ft._WIDE_TILES[0],) * 3)
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    for b, hq, hkv, sq, skv, causal, lengths in [
        (2, 4, 2, 1000, 1000, True, None),
        (1, 2, 2, 700, 1024, False, None),
        (2, 4, 1, 700, 700, True, [700, 333]),
    ]:
        q, dout = (torch.randn(b, hq, sq, head_dim, device="cuda", dtype=torch.bfloat16,
                               generator=gen) for _ in range(2))
        k, v = (torch.randn(b, hkv, skv, head_dim, device="cuda", dtype=torch.bfloat16,
                            generator=gen) for _ in range(2))
        key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
        call = make_call(q, k, v, causal=causal, key_lengths=key_lengths, dropout_p=0.3)
        inputs64 = [t.double().requires_grad_() for t in (q, k, v)]
        ref = attention(*inputs64, causal=causal, key_lengths=key_lengths, impl="reference")
        without = torch.autograd.grad(ref, inputs64, dout.double())
        for seed in (torch.tensor(77, device="cuda"), 77):
            out, lse = ft._forward(call, seed, forward_tile)
            launched.clear()
            grads = [ft._backward(call, seed, out, lse, dout) for _ in range(2)]
            assert sorted(name for name, _ in launched) == ["launch_dkdv"] * 2 + ["launch_dq"] * 2
            assert all(torch.equal(x, y) for x, y in zip(*grads, strict=True))
            want = ft._backward(call, seed, out, lse, dout, tuple(triton_tiles))
            for name, got, expected, other in zip("qkv", grads[0], want, without, strict=True):
                shape = (name, type(seed), b, hq, hkv, sq, skv, causal, lengths)
                assert rel_err(got, expected) < 1e-2, shape
                assert rel_err(other, expected) > 0.1, shape


@pytest.mark.gpu
def test_gluon_kernels_launched_directly_on_gpu(monkeypatch):
    """The Gluon forward, dQ and dK/dV kernels through fused_triton's direct launch of a
    compiled kernel (_FAST_LAUNCH), reused for a call of other sizes and the same
    specialization (other descriptor shapes), give the same bits as Triton's own launch
    path."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    _skip_without_hopper_forward()
    launched = _watch_gluon_launches(monkeypatch)
    monkeypatch.setattr(ft, "_COMPILED", {})
    gen = torch.Generator(device="cuda").manual_seed(0)
    calls = []
    for b, h, causal, lengths in [(2, 4, False, None), (3, 4, False, None),
                                  (2, 2, True, [4096, 3000]), (1, 6, True, [2500])]:
        q, k, v, dout = (torch.randn(b, h, 4096, 128, device="cuda", dtype=torch.bfloat16,
                                     generator=gen) for _ in range(4))
        key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
        calls.append((make_call(q, k, v, causal=causal, key_lengths=key_lengths), dout))

    def run_all(fast: bool) -> list:
        monkeypatch.setattr(ft, "_FAST_LAUNCH", fast)
        results = []
        for call, dout in calls * 2:  # the second time round, from _COMPILED
            out, lse = ft._forward(call, 0)
            results.append((out, lse, *ft._backward(call, 0, out, lse, dout)))
        return results

    want = run_all(False)
    got = run_all(True)
    assert [launcher for _, launcher in launched] == [ft._launch_jitted] * 2 * 3 * 2 * len(calls)
    assert len(ft._COMPILED) == 3 * 2  # the second size of each kind reused the first's
    for i, (expected, actual) in enumerate(zip(want, got, strict=True)):
        assert all(torch.equal(x, y) for x, y in zip(expected, actual, strict=True)), i


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, head_dim, causal", [
    (torch.bfloat16, 128, True), (torch.float16, 128, True), (torch.bfloat16, 64, False),
    (torch.bfloat16, 64, True), (torch.bfloat16, 256, True)])
def test_attention_takes_the_hopper_forward_on_gpu(dtype, head_dim, causal):
    """attention(impl="triton") forward and backward on a long call that takes the Gluon
    forward and dK/dV kernels, and at D=128 and 256 the Gluon dQ kernel (at D=64 this
    file's dQ kernel, from the Gluon forward's lse)."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    _skip_without_hopper_forward()
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.tensor([3000, 4096], device="cuda")
    q, k, v = (torch.randn(2, 4, 4096, head_dim, device="cuda", dtype=dtype,
                           generator=gen).requires_grad_() for _ in range(3))
    call = make_call(q, k, v, causal=causal, key_lengths=lengths)
    assert ft._uses_hopper_forward(call)
    grad = torch.randn_like(q)
    # grad's layout as out's
    assert ft._uses_hopper_backward(call, grad, grad) == (True, head_dim != 64)
    _assert_matches_reference(q, k, v, grad, causal=causal, key_lengths=lengths,
                              return_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [40, 48, 80, 96, 160, 192])
def test_head_dims_between_powers_of_two_on_gpu(monkeypatch, head_dim):
    """A head dim that is not a power of two runs the Gluon forward, dQ and dK/dV kernels
    on the next power of two's tiles, TMA reading the columns past D as zeros and the
    stores leaving them: q, k, v as views into a fused QKV projection (each row's next
    columns another head's), grouped heads, causal with key lengths, forward and backward
    against the oracle. Below 64 the dQ kernel is routed by hand (D=64's is this file's)."""
    from attnkit.backends import fused_triton as ft
    from attnkit.call import make_call

    _skip_without_hopper_forward()
    launched = _watch_gluon_launches(monkeypatch)
    if head_dim < 64:
        monkeypatch.setattr(ft, "_hopper_backward_fits", lambda *args: (True, True))
    qkv, (q, k, v) = _fused_qkv("cuda", b=2, s=2000, hq=4, hkv=2, d=head_dim)
    lengths = torch.tensor([2000, 1234], device="cuda")
    grad = torch.randn_like(q)
    call = make_call(q, k, v, causal=True, key_lengths=lengths)
    assert ft._uses_hopper_forward(call)
    assert ft._uses_hopper_backward(call, grad, grad) == (True, True)
    _assert_matches_reference(q, k, v, grad, causal=True, key_lengths=lengths,
                              return_lse=True)
    assert sorted({name for name, _ in launched}) == ["launch", "launch_dkdv", "launch_dq"]


def test_forward_and_backward_make_the_calls_gpu_current(monkeypatch):
    """Triton launches on the current device's stream, so _forward and _backward make the
    call's GPU current: a call on cuda:1 made under cuda:0 enters torch.cuda.device
    (cuda:1) around the work; one on the current GPU or on the CPU enters nothing."""
    from attnkit.backends import fused_triton as ft

    entered = []

    class Guard:  # stands in for torch.cuda.device, which needs a GPU
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("left")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    work = ft._on_call_device(lambda call, x, *, y: (entered.append("work"), x + y)[1])
    for device, expected in ((torch.device("cuda", 1), [torch.device("cuda", 1), "work", "left"]),
                             (torch.device("cuda", 0), ["work"]),
                             (torch.device("cpu"), ["work"])):
        entered.clear()
        assert work(types.SimpleNamespace(device=device), 2, y=3) == 5
        assert entered == expected, device
    for entry in (ft._forward, ft._backward):
        assert inspect.unwrap(entry) is not entry  # both guarded


@pytest.mark.gpu
@pytest.mark.parametrize("seq, head_dim", [(200, 80), (1024, 128)])
def test_a_call_on_a_gpu_other_than_the_current_one_on_gpu(seq, head_dim):
    """q, k, v on the last GPU while the first is current, forward and backward, against the
    oracle: on a short odd call (the Triton kernels) and, on Hopper, a long one (the Gluon
    kernels and their tile counter, which is kept per GPU and stream)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 4, seq, head_dim, device=device, dtype=torch.bfloat16,
                           generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)
    with torch.cuda.device(0):
        for _ in range(2):  # the second time from the launch cache
            _assert_matches_reference(q, k, v, grad, causal=True, return_lse=True)
    torch.cuda.synchronize(device)

"""Dropout's mask for the `triton` backend's kernels, the Triton ones (`fused_triton`) and
the Gluon backward (`hopper_backward`) alike: which scores a seed keeps, drawn from Philox
where each kernel applies them, so that no mask is ever in memory and the backward draws
the forward's again.

One Philox call (4x32, 7 rounds) gives four 32-bit words, which serve 8 scores with 16
bits each (p resolved to 2**-16): Philox dominated the kernels at one call per score (run
33, ~5x the forward's time). The 8 scores are 2 query rows and 4 keys that one thread
holds in a tensor core's accumulator: a thread holds rows g and g + 8 of each 16 (g =
lane // 4) against columns 8 j + 2 c + {0, 1} (c = lane % 4). Score (16 R + 8 rq + g, 16
T + 8 rk + 2 c + h) takes half h of word 2 rq + rk of the call (row pair 8 R + g, key
group 4 T + c). The counter, (batch*head, row pair, key group), is an int64: no two
calls share one.

So the kernels with queries on the accumulator's rows (the forwards, dQ) draw each call
in the thread that applies it (`keep`, `rows_first`). With keys on its rows (dK/dV) a
call's scores lie in two threads, half in each: the Triton dK/dV kernel draws it in both
(`keep_keys_first`), so that no score moves between threads (run 35; run 34's calls of
1 row by 8 keys cost it a layout conversion a key block and doubled its time); the Gluon
one draws it once and swaps the halves with one shuffle (run 36;
hopper_backward.pairs_layout).

The functions are Triton-language; a Gluon kernel calls `rows_first` on index vectors in
the layout it needs, and Triton's layout inference carries that layout through the joins
and permutes to the mask's.
"""

from __future__ import annotations

import types

try:
    import triton
    import triton.language as tl
except ImportError:  # fused_triton's kernels are then never compiled; see available()
    triton = None
    tl = types.SimpleNamespace(constexpr=None)


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def seed_value(seed, DROPOUT: tl.constexpr):
    """A kernel's dropout seed: an int, or a pointer to one that a CUDA graph's replays
    draw anew (fused_triton.run), read here once per program. Read inside each key block's
    mask instead, it made ptxas 12.8 (Triton 3.6) crash on D=64 forward tiles with TMA
    loads (benchmarks/triton_registers.py --head-dim 64 --tma --dropout, run 33)."""
    if DROPOUT and seed.dtype.is_ptr():
        seed = tl.load(seed)
    return seed


@_jit
def words(seed, bh, pairs, key_groups, Sq, Skv):
    """Philox's four words for calls (bh, pairs, key_groups), broadcast together."""
    counter = ((bh.to(tl.int64) * ((Sq + 15) // 16 * 8) + pairs) * ((Skv + 15) // 16 * 4)
               + key_groups)
    # 7 rounds, as FlashAttention's dropout draws: Philox's authors (Random123) found 7
    # pass BigCrush, and chose 10, Triton's default, as a safety margin.
    return tl.randint4x(seed, counter, 7)


@_jit
def kept(bits, drop_p):
    """Whether dropout keeps the score that the low 16 bits of `bits` draw, as an int8."""
    return ((bits & 0xFFFF) >= tl.math.ceil(drop_p * 65536.0).to(tl.uint32)).to(tl.int8)


@_jit
def rows_first(seed, bh, pair_offsets, group_offsets, start_m, start_n, Sq, Skv, drop_p,
               ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(ROWS, BLOCK_N): whether dropout keeps the scores of query rows start_m .. start_m +
    ROWS - 1 of (batch*head) bh, a scalar, against keys start_n .. start_n + BLOCK_N - 1;
    all multiples of 16. pair_offsets = arange(ROWS // 2), group_offsets = arange(BLOCK_N
    // 4), in the layouts the caller wants the calls drawn in. seed: an int (seed_value)."""
    r0, r1, r2, r3 = words(seed, bh, (start_m // 2 + pair_offsets)[:, None],
                           (start_n // 4 + group_offsets)[None, :], Sq, Skv)
    both = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (pairs, key groups, rk, rq)
    both = tl.join(kept(both, drop_p), kept(both >> 16, drop_p))
    # (R, g, T, c, rk, rq, h) in score order (R, rq, g, T, rk, c, h)
    both = tl.reshape(both, (ROWS // 16, 8, BLOCK_N // 16, 4, 2, 2, 2))
    return tl.reshape(tl.permute(both, (0, 5, 1, 2, 4, 3, 6)), (ROWS, BLOCK_N)) != 0


@_jit
def keep(seed, bh, start_m, ROWS: tl.constexpr, start_n, Sq, Skv, drop_p,
         BLOCK_N: tl.constexpr):
    """rows_first in the layout Triton picks (the Triton kernels' queries-first blocks)."""
    return rows_first(seed, bh, tl.arange(0, ROWS // 2), tl.arange(0, BLOCK_N // 4), start_m,
                      start_n, Sq, Skv, drop_p, ROWS, BLOCK_N)


@_jit
def keep_keys_first(seed, bh, start_m, ROWS: tl.constexpr, start_n, Sq, Skv, drop_p,
                    BLOCK_N: tl.constexpr):
    """keep's mask transposed, (BLOCK_N, ROWS), for the Triton dK/dV kernel: drawn in that
    layout, each call twice, by the two threads that hold its keys g' and g' + 8 for h =
    0 and 1. Key pairs (T, g'): keys 16 T + g' and 16 T + g' + 8."""
    key_pairs = tl.arange(0, BLOCK_N // 2)
    key_groups = start_n // 4 + key_pairs // 8 * 4 + key_pairs % 8 // 2
    shift = (key_pairs % 2 * 16).to(tl.uint32)[:, None]
    r0, r1, r2, r3 = words(seed, bh, (start_m // 2 + tl.arange(0, ROWS // 2))[None, :],
                           key_groups[:, None], Sq, Skv)
    # (key pairs, pairs, rq, rk): (T, g', R, g, rq, rk) in score order (T, rk, g', R, rq, g)
    both = tl.join(tl.join(kept(r0 >> shift, drop_p), kept(r2 >> shift, drop_p)),
                   tl.join(kept(r1 >> shift, drop_p), kept(r3 >> shift, drop_p)))
    both = tl.reshape(both, (BLOCK_N // 16, 8, ROWS // 16, 8, 2, 2))
    return tl.reshape(tl.permute(both, (0, 5, 1, 2, 4, 3)), (BLOCK_N, ROWS)) != 0


@_jit
def keep_rows(seed, bh, rows, start_n, Sq, Skv, drop_p, BLOCK_N: tl.constexpr):
    """`keep` for any query rows (1-D) and bh (a scalar or one per row, (len(rows), 1)):
    the forward's where a tile's rows run over several heads (PACKED), which need not
    start at a multiple of 16. Each row draws its own call, the pair's other row the same
    one again: twice the Philox work, on calls with few query rows."""
    rows_n: tl.constexpr = rows.shape[0]
    upper = (rows // 8 % 2 == 1)[:, None]
    r0, r1, r2, r3 = words(seed, bh, (rows // 16 * 8 + rows % 8)[:, None],
                           start_n // 4 + tl.arange(0, BLOCK_N // 4)[None, :], Sq, Skv)
    both = tl.join(tl.where(upper, r2, r0), tl.where(upper, r3, r1))  # (rows, groups, rk)
    both = tl.join(kept(both, drop_p), kept(both >> 16, drop_p))
    # (rows, T, c, rk, h) in key order (rows, T, rk, c, h)
    both = tl.reshape(both, (rows_n, BLOCK_N // 16, 4, 2, 2))
    return tl.reshape(tl.permute(both, (0, 1, 3, 2, 4)), (rows_n, BLOCK_N)) != 0

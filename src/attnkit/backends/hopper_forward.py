"""The `triton` backend's forward for Hopper, in Gluon (Triton's lower-level language).

The Triton-language forward in `fused_triton` waits for each matmul right after issuing
it, so a warpgroup's softmax never runs while its own tensor-core work does (NOTES, run
10, `wgmma_waits.py`). Here the waits are explicit. Each key block's step (`_step`) takes
block j's row max, issues block j-1's P V, runs block j's exponentials while P V is on
the tensor cores, issues block j+1's Q K^T and only then waits (FlashAttention-3's
intra-warpgroup overlap; NOTES, run 14, says why in that order). K and V tiles arrive
through TMA into a ring of STAGES slots, from descriptors built on the host, each block's
V after the next block's K, the order a warpgroup reads them (load_kv_ring).

The kernel is warp-specialized: a tile's query rows are two warpgroups of 64 (three,
192 rows, in two D=64 configs, after FlashAttention-3's tile there), each in its own
partition, and one more partition of one warp does the loading, so nothing ties the
warpgroups together: while one runs its softmax another's matmuls can run. (A version
whose computing warps also refilled the ring was slower on the H100, as Gluon puts a
CTA barrier before each copy and that kept the warpgroups in lockstep: NOTES run 14; it
is in git history up to 3280f9e.)

The grid is persistent: one program per multiprocessor, whose loading warp takes tiles
from a counter in global memory and posts each to the warpgroups beside its Q, so that
the next tile's Q and first K/V blocks load while the last one's final blocks and stores
run, and tiles of different lengths (causal) go to whichever program is free. On an H200
it took the causal D=128 forward from 1.04x the Triton forward timed beside it (a
program per tile) to 1.07-1.11x at 4k-16k (NOTES run 16). Out goes through shared
memory and a TMA store (O_TMA), so that a warpgroup starts its next tile while the store
runs: 1.10-1.15x (run 17). For causal D=64 each warpgroup can walk only the key blocks
its own rows see (OWN_RANGES), as 192-row tiles end mid-block. (A version that chained
tiles, so that a tile's first Q K^T and last P V would overlap its neighbours' work, was
0.91-0.97x without it at D=128 and faulted on 4k at D=64: NOTES run 18; it is in git
history up to 8b4972a.)

It covers the common case only, and `fused_triton` keeps the rest: an sm_90 GPU, fp16 or
bf16, D = Dv a multiple of 8 from 40 to 256 (on tiles of 64, 128 or 256 columns:
head_block; where D is not a power of two, a product over the tile's columns is two
products that skip most of the columns past D: split_columns), a positive scale, causal
or not, key_lengths, grouped heads; no window, mask tensor or dropout; tensors that TMA
can read. Gluon does not run under TRITON_INTERPRET, so this file is tested on a GPU only
(tests/test_triton.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import re
from typing import NamedTuple

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # an older Triton: `available` says so, nothing below is compiled
    gluon = TensorDescriptor = None


# Gluon is experimental and its API moves between Triton releases (by 3.9 the TMA copy
# this file calls is gone, renamed async_load); the kernels here were written and checked
# on a GPU under Triton 3.6, so that is the only release they are offered on.
CHECKED_RELEASES = ((3, 6),)
# The kernels exponentiate with exp2: the scores' scale goes to them times log2(e). Host
# side, for this file, hopper_backward and fused_triton alike.
LOG2E = 1.4426950408889634


def head_block(head_dim: int) -> int:
    """The columns of the kernels' tiles for a head dim: the power of two at or above it,
    as their tensors' sizes must be. TMA reads the columns past head_dim as zeros, which
    add nothing to a product, and the kernels store head_dim columns only. Their shared
    memory is a tile's; their products skip the columns past head_dim that split_columns
    leaves out (the Triton kernel beside them, fused_triton's BLOCK_D, computes them
    all)."""
    return 1 << max(0, head_dim - 1).bit_length()


def split_columns(head_dim: int, granule: int = 16) -> int:
    """Where a product over a tile's head_block(head_dim) columns (the contraction of Q K^T,
    or the columns of P V's accumulator) splits in two, so as to skip the columns past
    head_dim: 0 for no split, else the first part's columns, half the tile; the second
    part's are second_columns'. A split is made where the parts cover fewer columns than
    the tile: D=96 is 64 + 32 columns, D=80 64 + 16, D=192 128 + 64; D=112 (64 + 64) is
    not split. granule: the fewest columns a part has, a wgmma's K step (16 for 16-bit
    operands). (Self-contained, as the kernels call it at compile time: split_at.)"""
    half = (1 << max(0, head_dim - 1).bit_length()) // 2
    second = max(granule, 1 << max(0, head_dim - half - 1).bit_length())
    return half if head_dim != 2 * half and granule <= half and second < half else 0


def second_columns(head_dim: int, granule: int = 16) -> int:
    """The second part's columns where split_columns splits: a power of two, at least
    granule, covering head_dim's columns past the first part."""
    half = (1 << max(0, head_dim - 1).bit_length()) // 2
    return max(granule, 1 << max(0, head_dim - half - 1).bit_length())


def available() -> bool:
    """Whether this Triton is a release the kernels were checked under, with Gluon's
    Hopper operations."""
    if gluon is None:
        return False
    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return found is not None and (int(found[1]), int(found[2])) in CHECKED_RELEASES


if gluon is not None:
    # head_block, split_columns and second_columns, for the kernels to call at compile
    # time.
    tile_columns = gluon.constexpr_function(head_block)
    split_at = gluon.constexpr_function(split_columns)
    second_part = gluon.constexpr_function(second_columns)

    @gluon.jit
    def issue(desc, coords, bar, dest):
        mbarrier.expect(bar, desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, coords, bar, dest)

    @gluon.jit
    def hold(x):
        """Keep the packed registers of x, a bf16/fp16 matmul operand, unwritten until here.
        The wait's own dependency holds each 16-bit half, not the 32-bit pairs the
        matmul reads, so ptxas would reuse a pair while P V is in flight and then wait
        for P V before the softmax instead of after it (CUTLASS fences its operands the
        same way)."""
        gl.inline_asm_elementwise("// hold $1", "=r,r", [x], dtype=x.dtype, is_pure=False,
                                  pack=2)

    @gluon.jit
    def row_limit(qi, kv_len, off, CAUSAL: gl.constexpr):
        """Per query row qi, the first key it does not see: kv_len (key_lengths), or with
        causal aligned to the bottom right (off = Skv - Sq) qi + off + 1 where that is
        less."""
        limit = kv_len + gl.zeros_like(qi)
        if CAUSAL:
            limit = gl.minimum(limit, qi + off + 1)
        return limit

    @gluon.jit
    def hide_unseen(s, kj, limit):
        """(rows, keys) scores s with those of keys kj at or past their row's limit
        (row_limit) set to -inf: one compare per score, where the two conditions apart
        took two and an and (NOTES run 39)."""
        return gl.where(gl.expand_dims(kj, 0) < gl.expand_dims(limit, 1), s, float("-inf"))

    @gluon.jit
    def _row_max(s, m_i, kj, limit, qk_scale, MASKED: gl.constexpr):
        """Block scores s (raw Q K^T) of keys kj -> the scores to exponentiate (raw,
        hidden ones -inf where MASKED; limit: row_limit's) and the new running max (log2
        units). The scale is applied after the max (it is positive, so the max commutes
        with it) and inside _exp's multiply-add, not as a multiply of its own per score."""
        if MASKED:
            s = hide_unseen(s, kj, limit)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        return s, m_new

    @gluon.jit
    def _exp(s, m_i, m_new, qk_scale, MASKED: gl.constexpr):
        """p = exp2 of the scores against the new max (scale and shift in one multiply-add
        per score; a hidden score's -inf stays -inf), and alpha, what the old running sums
        are scaled by."""
        if MASKED:
            # A row that has seen only hidden keys keeps max -inf; shifting by 0 keeps
            # exp2 at 0.
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_safe, 1))
        return p, gl.exp2(m_i - m_safe)

    @gluon.constexpr_function
    def score_layout(columns):
        """The register layout of a warpgroup's (64, columns) float32 matmul result: its
        scores (columns = BLOCK_N) or its accumulator (columns = HEAD_D)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                         instr_shape=[16, columns, 16])

    @gluon.constexpr_function
    def operand_layout(result_layout):
        """The register layout of a 16-bit A operand of a warpgroup matmul whose result
        is in result_layout (a score_layout). An operand that is another warpgroup matmul's
        result, as P is S's, takes that result's registers with no data moved."""
        return gl.DotOperandLayout(operand_index=0, parent=result_layout, k_width=2)

    @gluon.jit
    def box(ring, i):
        """Entry i of a ring of TMA boxes (N, 1, 1, rows, D), as the (rows, D) matmul
        operand."""
        return ring.index(i).reshape([ring.shape[3], ring.shape[4]])

    @gluon.constexpr_function
    def product_parts(head_dim):
        """How many wgmma groups contract and accumulate issue at head_dim: 2 where
        split_columns splits, else 1."""
        return 2 if split_at(head_dim) else 1

    @gluon.constexpr_function
    def first_layout(head_dim):
        """The register layout of a warpgroup's accumulator over head_dim (accumulator), or
        of its first part: the layout whose operand_layout a product's A operand takes."""
        return score_layout(split_at(head_dim) or tile_columns(head_dim))

    @gluon.jit
    def contract(a, b, acc, HEAD_D: gl.constexpr, IS_ASYNC: gl.constexpr):
        """a b^T of a (rows, tile) and b (rows', tile), boxes in shared memory, into acc's
        type (its values unread), over the columns that split_columns(HEAD_D) keeps: one
        product, or two chained (product_parts), the second accumulating into the first's
        result: Q K^T, and the backward's S^T, dP^T, S and dP."""
        SPLIT: gl.constexpr = split_at(HEAD_D)
        if SPLIT == 0:
            return warpgroup_mma(a, b.permute((1, 0)), acc, use_acc=False, is_async=IS_ASYNC)
        else:
            REST: gl.constexpr = second_part(HEAD_D)
            first = warpgroup_mma(a.slice(0, SPLIT, 1), b.slice(0, SPLIT, 1).permute((1, 0)),
                                  acc, use_acc=False, is_async=True)
            both = warpgroup_mma(a.slice(SPLIT, REST, 1),
                                 b.slice(SPLIT, REST, 1).permute((1, 0)), first,
                                 is_async=True)
            if not IS_ASYNC:
                both = warpgroup_mma_wait(0, deps=[both])
            return both

    @gluon.jit
    def accumulate(x, b, acc, HEAD_D: gl.constexpr, IS_ASYNC: gl.constexpr):
        """acc + x b: x (rows, K) a 16-bit register operand in operand_layout(
        first_layout(HEAD_D)), b a (K, tile) box in shared memory, acc as accumulator()
        makes it, one tensor or a pair of parts (and so the result, or with IS_ASYNC its
        token or pair of tokens): P V, and the backward's dV, dK and dQ. A part's columns
        of b are a slice of its box, which may start inside a 128-byte swizzled row (D=96:
        columns 64-95 of 128): the wgmma descriptor's start address moves into the row,
        and the swizzle, a function of the address, still holds."""
        SPLIT: gl.constexpr = split_at(HEAD_D)
        if SPLIT == 0:
            return warpgroup_mma(x, b, acc, is_async=IS_ASYNC)
        else:
            REST: gl.constexpr = second_part(HEAD_D)
            first = warpgroup_mma(x, b.slice(0, SPLIT, 1), acc[0], is_async=IS_ASYNC)
            second = warpgroup_mma(gl.convert_layout(x, operand_layout(score_layout(REST))),
                                   b.slice(SPLIT, REST, 1), acc[1], is_async=IS_ASYNC)
            return first, second

    @gluon.jit
    def accumulator(ROWS: gl.constexpr, HEAD_D: gl.constexpr):
        """A warpgroup's zeroed accumulator over a head dim: (ROWS, tile) float32, or where
        split_columns splits, a pair of parts (ROWS, first) and (ROWS, second)."""
        SPLIT: gl.constexpr = split_at(HEAD_D)
        if SPLIT == 0:
            return gl.zeros([ROWS, tile_columns(HEAD_D)], gl.float32,
                            score_layout(tile_columns(HEAD_D)))
        else:
            REST: gl.constexpr = second_part(HEAD_D)
            return (gl.zeros([ROWS, SPLIT], gl.float32, score_layout(SPLIT)),
                    gl.zeros([ROWS, REST], gl.float32, score_layout(REST)))

    @gluon.jit
    def store_rows(base, stride, row0, limit, x, col0, HEAD_D: gl.constexpr):
        """x (rows, columns), float32 in a wgmma result's layout (score_layout), cast to
        base's type and stored at rows row0.. (stride apart) and columns col0.. (unit
        stride) from base, those at or past limit (rows) and HEAD_D (columns) left out."""
        layout: gl.constexpr = score_layout(x.shape[1])
        rows = row0 + gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, layout))
        cols = col0 + gl.arange(0, x.shape[1], layout=gl.SliceLayout(0, layout))
        gl.store(base + gl.expand_dims(rows, 1) * stride + gl.expand_dims(cols, 0),
                 x.to(base.dtype.element_ty),
                 mask=gl.expand_dims(rows < limit, 1) & gl.expand_dims(cols < HEAD_D, 0))

    @gluon.jit
    def store_accumulator(base, stride, row0, limit, acc, scale, HEAD_D: gl.constexpr):
        """An accumulator (accumulator()'s) times scale, stored as store_rows stores it."""
        SPLIT: gl.constexpr = split_at(HEAD_D)
        if SPLIT == 0:
            store_rows(base, stride, row0, limit, acc * scale, 0, HEAD_D)
        else:
            store_rows(base, stride, row0, limit, acc[0] * scale, 0, HEAD_D)
            store_rows(base, stride, row0, limit, acc[1] * scale, SPLIT, HEAD_D)

    @gluon.jit
    def _rescale(o, alpha):
        """An accumulator (or part) with each row scaled by its alpha."""
        return o * per_row(alpha, o)

    @gluon.jit
    def per_row(v, o):
        """v (one value a row) in the layout that broadcasts it along o's rows (o: an
        accumulator or part, score_layout)."""
        return gl.expand_dims(gl.convert_layout(v, gl.SliceLayout(1, score_layout(o.shape[1]))),
                              1)

    @gluon.jit
    def _step(j, nxt, base, s, o, p_op, m_i, l_i, q_smem, ring, limit, qk_scale,
              MASKED: gl.constexpr, HAS_PREV: gl.constexpr, HAS_NEXT: gl.constexpr,
              STAGES: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
              p_layout: gl.constexpr, LEAN: gl.constexpr, HEAD_D: gl.constexpr):
        """Key block j, whose raw scores s are in registers: its softmax runs while block
        j-1's P V (HAS_PREV) is on the tensor cores; then block nxt's Q K^T is issued
        (HAS_NEXT) and its scores are what this returns, with o, block j's p as the P V
        operand, and the running max and sum. base: the ring position of the tile's
        block 0 (the key blocks of the program's earlier tiles came before it). limit:
        per row, the first key it does not see (read where MASKED).

        The order is what keeps the overlap: ptxas fills a stall with a matmul wait
        wherever one is free to move, so P V is issued after the row max (whose
        shuffles would be that stall) and waited for after the next Q K^T is issued,
        which has to follow the exponentials that read the score registers it reuses."""
        k_smem, v_smem, k_bars, v_bars, k_free, v_free = ring
        kj = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s, m_new = _row_max(s, m_i, kj, limit, qk_scale, MASKED)
        if HAS_PREV:
            v_at = base + j - 1
            v_slot = v_at % STAGES
            mbarrier.wait(v_bars.index(v_slot), (v_at // STAGES) & 1)
            o_tok = accumulate(p_op, box(v_smem, v_slot), o, HEAD_D, True)
        p, alpha = _exp(s, m_i, m_new, qk_scale, MASKED)
        l_i = l_i * alpha + gl.sum(p, 1)
        p_next = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        if LEAN:
            # Fewer registers live at once: P V(j-1) is waited for before Q K^T(j+1) is
            # issued, so that its scores can take p_op's registers. p_next among the
            # wait's operands keeps the wait below the exponentials.
            if HAS_PREV:
                if split_at(HEAD_D) == 0:
                    o, _, p_next = warpgroup_mma_wait(0, deps=[o_tok, p_op, p_next])
                else:
                    o0, o1, _, p_next = warpgroup_mma_wait(0, deps=[o_tok[0], o_tok[1], p_op,
                                                                    p_next])
                    o = (o0, o1)
                hold(p_op)
        if HAS_NEXT:
            k_at = base + nxt
            k_slot = k_at % STAGES
            mbarrier.wait(k_bars.index(k_slot), (k_at // STAGES) & 1)
            s_tok = contract(q_smem, box(k_smem, k_slot),
                             gl.zeros(s.shape, gl.float32, s_layout), HEAD_D, True)
        if not LEAN:
            if HAS_PREV:
                # Q K^T's products (one or two) may stay in flight.
                IN_FLIGHT: gl.constexpr = product_parts(HEAD_D) * HAS_NEXT
                if split_at(HEAD_D) == 0:
                    o, _ = warpgroup_mma_wait(IN_FLIGHT, deps=[o_tok, p_op])
                else:
                    o0, o1, _ = warpgroup_mma_wait(IN_FLIGHT, deps=[o_tok[0], o_tok[1], p_op])
                    o = (o0, o1)
                hold(p_op)
        if split_at(HEAD_D) == 0:
            o = _rescale(o, alpha)
        else:
            o = (_rescale(o[0], alpha), _rescale(o[1], alpha))
        if HAS_NEXT:
            s = warpgroup_mma_wait(0, deps=[s_tok])
        # The matmuls that read these slots are done: tell the loading warp.
        if HAS_NEXT:
            mbarrier.arrive(k_free.index(k_slot), count=1)
        if HAS_PREV:
            mbarrier.arrive(v_free.index(v_slot), count=1)
        return s, o, p_next, m_new, l_i

    @gluon.jit
    def _blocks(first, last, base, s, o, p_op, m_i, l_i, q_smem, ring, limit, qk_scale,
                MASKED: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                s_layout: gl.constexpr, p_layout: gl.constexpr,
                LEAN: gl.constexpr, HEAD_D: gl.constexpr):
        """_step over key blocks [first, last), each followed by another."""
        for j in range(first, last):
            s, o, p_op, m_i, l_i = _step(j, j + 1, base, s, o, p_op, m_i, l_i, q_smem, ring,
                                         limit, qk_scale, MASKED, True, True, STAGES, BLOCK_N,
                                         s_layout, p_layout, LEAN, HEAD_D)
        return s, o, p_op, m_i, l_i

    @gluon.jit
    def in_head_groups(index, per_head, heads, HEAD_GROUP: gl.constexpr):
        """(head, place) of the index-th of `heads` heads' `per_head` tiles each, taken
        HEAD_GROUP heads at a time: place p of every head of a group before place p + 1.
        fused_triton._program_tile's order, which a Gluon function cannot call."""
        if HEAD_GROUP == 1:
            head = index // per_head
            place = index % per_head
        else:
            first = index // (HEAD_GROUP * per_head) * HEAD_GROUP
            in_group = gl.minimum(heads - first, HEAD_GROUP)
            within = index - first * per_head
            head = first + within % in_group
            place = within // in_group
        return head, place

    @gluon.jit
    def tile_of(tile, tiles, q_blocks, Hq, group, LENGTHS, Sq, Skv, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                HEAD_GROUP: gl.constexpr):
        """Tile number -> its batch, query head, kv head, (batch * query head), first
        query row, and key range (key_blocks). The tiles go HEAD_GROUP heads at a time
        (in_head_groups), so the tiles running at once share K and V in L2; causal ones
        heaviest (latest) first, so that the tiles handed out last are light."""
        bh, block = in_head_groups(tile, q_blocks, tiles // q_blocks, HEAD_GROUP)
        if CAUSAL:
            block = q_blocks - 1 - block
        b = bh // Hq
        h = bh % Hq
        m0 = block * BLOCK_M
        kv_len, off, total, full_blocks = key_blocks(LENGTHS, b, m0, Sq, Skv, BLOCK_M,
                                                     BLOCK_N, CAUSAL, HAS_LENGTHS)
        return b, h, h // group, bh, m0, kv_len, off, total, full_blocks

    @gluon.jit
    def _consume(ROLE: gl.constexpr, Out, LSE, LENGTHS, tiles, q_blocks, Hq, group, Sq, Skv,
                 qk_scale, stride_ob, stride_oh, stride_om, q_smem, q_bars, q_free, tile_smem,
                 ring, o_desc, o_smem, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                 WARPGROUPS: gl.constexpr, Q_BUFFERS: gl.constexpr, O_TMA: gl.constexpr,
                 OWN_RANGES: gl.constexpr, HEAD_GROUP: gl.constexpr, ALL_SEEN: gl.constexpr,
                 s_layout: gl.constexpr, p_layout: gl.constexpr):
        """Warpgroup ROLE: rows [64 * ROLE, 64 * ROLE + 64) of each tile the loading warp
        posts (next_tile), every key block in turn (_step), then out and lse stored.
        Where OWN_RANGES, the key blocks are those its own rows see (key_blocks of its 64
        rows: causal tiles whose rows end in different key blocks), and it only lets the
        rest of the tile's blocks go (release). ALL_SEEN: every row sees every key (no
        causal mask or key lengths, Skv a multiple of BLOCK_N), so no step checks indices."""
        ROWS: gl.constexpr = 64
        MASKED: gl.constexpr = not ALL_SEEN
        BLOCK_M: gl.constexpr = ROWS * WARPGROUPS
        # Three warpgroups get 160 registers each, too few for _step's usual order.
        LEAN: gl.constexpr = WARPGROUPS == 3
        dtype: gl.constexpr = q_smem.dtype
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        k_smem, v_smem, k_bars, v_bars, k_free, v_free = ring
        done = 0  # tiles, for Q's buffer and phase
        base = 0  # key blocks, for the ring's slot and phase
        tile = next_tile(tile_smem, q_bars, done, Q_BUFFERS)
        while tile < tiles:
            b, h, kvh, bh, m0, kv_len, off, tile_total, full_blocks = tile_of(
                tile, tiles, q_blocks, Hq, group, LENGTHS, Sq, Skv, BLOCK_M, BLOCK_N, CAUSAL,
                HAS_LENGTHS, HEAD_GROUP)
            row0 = m0 + ROWS * ROLE
            # A warpgroup whose rows all lie past Sq (the last tile of a head, part full)
            # walks nothing. Only built for three warpgroups: their 192-row tiles leave one
            # or two of them empty at Sq = 4k, 8k, 16k; two-warpgroup builds took spilled
            # registers from the branch, and 128-row tiles are full at such lengths.
            if WARPGROUPS == 3:
                live = row0 < Sq
            else:
                live: gl.constexpr = True
            if live:
                total = tile_total
                if OWN_RANGES:
                    kv_len, off, total, full_blocks = key_blocks(LENGTHS, b, row0, Sq, Skv, ROWS,
                                                                 BLOCK_N, CAUSAL, HAS_LENGTHS)
                # What a masked step compares each key with (hide_unseen)
                limit = row_limit(row0 + gl.arange(0, ROWS, layout=row_layout), kv_len, off,
                                  CAUSAL)
                m_i = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
                l_i = gl.zeros([ROWS], gl.float32, row_layout)
                o = accumulator(ROWS, HEAD_D)
                p_op = gl.zeros([ROWS, BLOCK_N], dtype, p_layout)
                q_slot = done % Q_BUFFERS
                q = box(q_smem, q_slot * WARPGROUPS + ROLE)

                # Block 0's Q K^T alone, then block 0 (index checks unless ALL_SEEN: it may be
                # partly hidden, or wholly), which issues block 1's.
                first = base % STAGES
                mbarrier.wait(k_bars.index(first), (base // STAGES) & 1)
                s = contract(q, box(k_smem, first),
                             gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), HEAD_D, False)
                # A single block's Q K^T is issued again by _step (which always issues one),
                # on the slot still held: only that one lets the slot go.
                mbarrier.arrive(k_free.index(first), count=1, pred=total > 1)
                s, o, p_op, m_i, l_i = _step(0, gl.minimum(1, total - 1), base, s, o, p_op, m_i,
                                             l_i, q, ring, limit, qk_scale, MASKED, False, True,
                                             STAGES, BLOCK_N, s_layout, p_layout, LEAN,
                                             HEAD_D)
                # Blocks 1 .. total-2, those every row sees first; the last block apart, as it
                # issues no next Q K^T.
                split = gl.maximum(gl.minimum(full_blocks, total - 1), 1)
                s, o, p_op, m_i, l_i = _blocks(1, split, base, s, o, p_op, m_i, l_i, q, ring,
                                               limit, qk_scale, False, STAGES, BLOCK_N, s_layout,
                                               p_layout, LEAN, HEAD_D)
                if MASKED:  # else split is total - 1
                    s, o, p_op, m_i, l_i = _blocks(split, total - 1, base, s, o, p_op, m_i, l_i,
                                                   q, ring, limit, qk_scale, True, STAGES,
                                                   BLOCK_N, s_layout, p_layout, LEAN,
                                                   HEAD_D)
                if total > 1:
                    s, o, p_op, m_i, l_i = _step(total - 1, total - 1, base, s, o, p_op, m_i,
                                                 l_i, q, ring, limit, qk_scale, MASKED, True,
                                                 False, STAGES, BLOCK_N, s_layout,
                                                 p_layout, LEAN, HEAD_D)
                # Every Q K^T of the tile is done: the loading warp may refill Q's buffer
                # while the last P V and the stores run.
                mbarrier.arrive(q_free.index(q_slot), count=1)
                last = base + total - 1
                mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
                o = accumulate(p_op, box(v_smem, last % STAGES), o, HEAD_D, False)
                mbarrier.arrive(v_free.index(last % STAGES), count=1)

                _finish(o, (m_i, l_i, b, h, bh, row0),
                        (Out, LSE, Sq, stride_ob, stride_oh, stride_om, o_desc, o_smem), ROLE,
                        HEAD_D, O_TMA, s_layout)
                if OWN_RANGES:
                    # After the stores: the blocks it lets go may still be loading.
                    release(ring, base, total, tile_total, STAGES)
            else:
                # Nothing to compute or store: the tile's Q and key blocks go unread, rather
                # than a whole walk taking the tensor cores from the warpgroups whose rows
                # are real.
                mbarrier.arrive(q_free.index(done % Q_BUFFERS), count=1)
                release(ring, base, 0, tile_total, STAGES)
            done += 1
            base += tile_total
            tile = next_tile(tile_smem, q_bars, done, Q_BUFFERS)
        if O_TMA:
            tma.store_wait(0)  # before the program ends and its shared memory goes

    @gluon.jit
    def _finish(o, rows_of, dest, ROLE: gl.constexpr, HEAD_D: gl.constexpr,
                O_TMA: gl.constexpr, s_layout: gl.constexpr):
        """Out and lse of a warpgroup's 64 rows, from its accumulator o (accumulator()'s:
        head_block(HEAD_D) columns, or two parts, HEAD_D of them stored). rows_of: (running
        max (log2 units), running sum, batch, query head, batch * query head, first row);
        dest: (Out, LSE, Sq, Out's strides over batch, head and row, o_desc, o_smem)."""
        m_i, l_i, b, h, bh, row0 = rows_of
        Out, LSE, Sq, stride_ob, stride_oh, stride_om, o_desc, o_smem = dest
        SPLIT: gl.constexpr = split_at(HEAD_D)
        REST: gl.constexpr = second_part(HEAD_D)
        ROWS: gl.constexpr = 64
        qi = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        # A row that saw no key: l = 0, out = 0, lse = -inf.
        dead = l_i == 0.0
        lse = gl.where(dead, float("-inf"),
                       (m_i + gl.log2(gl.where(dead, 1.0, l_i))) * 0.6931471805599453)
        l_safe = gl.where(dead, 1.0, l_i)
        if O_TMA:
            # Through shared memory and one TMA store (rows past Sq and columns past HEAD_D
            # clipped by the descriptor), so that the warpgroup goes on to its next tile while the
            # store runs; the buffer's previous store has to have read it first.
            o_buf = o_smem.index(ROLE)
            tma.store_wait(0)
            gl.thread_barrier()
            whole = o_buf.reshape([ROWS, tile_columns(HEAD_D)])
            if SPLIT == 0:
                whole.store(_normalized(o, l_safe).to(o_smem.dtype))
            else:
                whole.slice(0, SPLIT, 1).store(_normalized(o[0], l_safe).to(o_smem.dtype))
                whole.slice(SPLIT, REST, 1).store(_normalized(o[1], l_safe).to(o_smem.dtype))
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(o_desc, [b, h, row0, 0], o_buf)
        else:
            out_rows = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
            if SPLIT == 0:
                store_rows(out_rows, stride_om, row0, Sq, _normalized(o, l_safe), 0, HEAD_D)
            else:
                store_rows(out_rows, stride_om, row0, Sq, _normalized(o[0], l_safe), 0, HEAD_D)
                store_rows(out_rows, stride_om, row0, Sq, _normalized(o[1], l_safe), SPLIT,
                           HEAD_D)
        gl.store(LSE + bh.to(gl.int64) * Sq + qi, lse, mask=qi < Sq)

    @gluon.jit
    def _normalized(o, l_safe):
        """An accumulator (or part) over its rows' sums (1 for a dead row)."""
        return o / per_row(l_safe, o)

    @gluon.jit
    def key_blocks(LENGTHS, b, m0, Sq, Skv, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr):
        """The key range of the query rows [m0, m0 + BLOCK_M) of batch b: kv_len, off =
        Skv - Sq, how many key blocks to walk (at least 1: block 0 always runs, with
        index checks, so that rows that see no key at all come out dead) and how many of
        them every row sees whole."""
        off = Skv - Sq
        kv_len = Skv
        if HAS_LENGTHS:
            kv_len = gl.minimum(gl.load(LENGTHS + b).to(gl.int32), Skv)
        end = kv_len
        full_end = kv_len
        if CAUSAL:
            end = gl.minimum(end, m0 + BLOCK_M + off)
            full_end = gl.minimum(full_end, m0 + 1 + off)
        total = gl.maximum(gl.cdiv(gl.maximum(end, 0), BLOCK_N), 1)
        full_blocks = gl.minimum(gl.maximum(full_end, 0) // BLOCK_N, total)
        return kv_len, off, total, full_blocks

    @gluon.jit
    def release(ring, base, first, last, STAGES: gl.constexpr):
        """Lets the ring's key blocks first .. last-1 of a tile go unread. Each is waited
        for first: the arrival has to count towards the phase of that block's load, and
        the load is issued only after the slot's previous phase completed."""
        k_smem, v_smem, k_bars, v_bars, k_free, v_free = ring
        for j in range(first, last):
            at = base + j
            phase = (at // STAGES) & 1
            mbarrier.wait(k_bars.index(at % STAGES), phase)
            mbarrier.arrive(k_free.index(at % STAGES), count=1)
            mbarrier.wait(v_bars.index(at % STAGES), phase)
            mbarrier.arrive(v_free.index(at % STAGES), count=1)

    @gluon.jit
    def kv_ring(desc, STAGES: gl.constexpr, WARPGROUPS: gl.constexpr):
        """Shared memory for a ring of STAGES K and V boxes (desc's), and its mbarriers:
        ready (TMA bytes, one arrival) and free (one arrival per computing warpgroup)."""
        k_smem = gl.allocate_shared_memory(desc.dtype, [STAGES] + desc.block_shape,
                                           desc.layout)
        v_smem = gl.allocate_shared_memory(desc.dtype, [STAGES] + desc.block_shape,
                                           desc.layout)
        k_bars, k_free = barrier_pairs(STAGES, WARPGROUPS)
        v_bars, v_free = barrier_pairs(STAGES, WARPGROUPS)
        return k_smem, v_smem, k_bars, v_bars, k_free, v_free

    @gluon.jit
    def barrier_pairs(N: gl.constexpr, WARPGROUPS: gl.constexpr):
        """N ready mbarriers (one arrival: the expect's, then TMA's bytes) and N free
        ones (one arrival per computing warpgroup)."""
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        ready = gl.allocate_shared_memory(gl.int64, [N, 1], bar_layout)
        free = gl.allocate_shared_memory(gl.int64, [N, 1], bar_layout)
        for i in gl.static_range(N):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(free.index(i), count=WARPGROUPS)
        return ready, free

    @gluon.jit
    def _produce(COUNTER, LENGTHS, tiles, q_blocks, Hq, group, Sq, Skv, q_desc, k_desc,
                 v_desc, q_smem, q_bars, q_free, tile_smem, ring, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                 WARPGROUPS: gl.constexpr, Q_BUFFERS: gl.constexpr, HEAD_GROUP: gl.constexpr):
        """The loading warp: takes tiles from COUNTER until none is left. For each, once
        every warpgroup has let the next of Q_BUFFERS go: the tile's number (post_tile)
        and Q (one 64-row box per warpgroup) under one expect; then the tile's K and V
        blocks into the ring (load_kv_ring). Then posts `tiles`: nothing left."""
        BLOCK_M: gl.constexpr = 64 * WARPGROUPS
        done = 0
        base = 0
        # Taken as the loading warps get to them, tiles go out in order to whichever
        # program is free: a static share per program leaves some with more work where
        # tiles differ in length (causal: 0.78x at 16k, NOTES run 16).
        tile = gl.atomic_add(COUNTER, 1)
        while tile < tiles:
            b, h, kvh, bh, m0, kv_len, off, total, full_blocks = tile_of(
                tile, tiles, q_blocks, Hq, group, LENGTHS, Sq, Skv, BLOCK_M, BLOCK_N, CAUSAL,
                HAS_LENGTHS, HEAD_GROUP)
            q_slot = post_tile(tile, tile_smem, q_free, done, Q_BUFFERS)
            mbarrier.expect(q_bars.index(q_slot), WARPGROUPS * q_desc.block_type.nbytes)
            for i in gl.static_range(WARPGROUPS):
                tma.async_copy_global_to_shared(q_desc, [b, h, m0 + 64 * i, 0],
                                                q_bars.index(q_slot),
                                                q_smem.index(q_slot * WARPGROUPS + i))
            load_kv_ring(b, kvh, base, total, k_desc, v_desc, ring, BLOCK_N, STAGES, True)
            done += 1
            base += total
            tile = gl.atomic_add(COUNTER, 1)
        # The last program to take its empty tile sets COUNTER back to zero for the next
        # launch (tile_counter). Each program's last take comes before its count on
        # COUNTER + 1 (both acq_rel), and the last count comes after every other.
        if gl.atomic_add(COUNTER + 1, 1) == gl.num_programs(0) - 1:
            gl.atomic_xchg(COUNTER, 0)
            gl.atomic_xchg(COUNTER + 1, 0)
        q_slot = post_tile(tiles, tile_smem, q_free, done, Q_BUFFERS)
        mbarrier.arrive(q_bars.index(q_slot), count=1)

    @gluon.jit
    def post_tile(tile, tile_smem, q_free, done, Q_BUFFERS: gl.constexpr):
        """The loading warp's half of next_tile: once every warpgroup has let Q's buffer
        for the program's tile number `done` go, writes `tile` beside it and returns the
        buffer's index; the arrival on q_bars that follows publishes both."""
        q_slot = done % Q_BUFFERS
        # A fresh barrier counts as having completed the phase before its first, so the
        # first round over the buffers does not wait.
        mbarrier.wait(q_free.index(q_slot), ((done // Q_BUFFERS) & 1) ^ 1)
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        tile_smem.index(q_slot).store(gl.full([1], tile, gl.int32, layout))
        gl.thread_barrier()
        return q_slot

    @gluon.jit
    def next_tile(tile_smem, q_bars, done, Q_BUFFERS: gl.constexpr):
        """A computing warpgroup's tile number `done` (0, 1, ...), once the loading warp
        has posted it and its Q has arrived; `tiles` when none is left."""
        q_slot = done % Q_BUFFERS
        mbarrier.wait(q_bars.index(q_slot), (done // Q_BUFFERS) & 1)
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        return gl.max(tile_smem.index(q_slot).load(layout), 0)

    @gluon.jit
    def load_kv_ring(b, kvh, base, total, k_desc, v_desc, ring, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, V_BEHIND: gl.constexpr):
        """K and V of key blocks 0 .. total-1 of (batch b, kv head kvh), each into the
        ring's next slot (from ring position base on), in the order they are read:
        V_BEHIND, each block's V after the next block's K (the forward reads block j's V
        in the step that issues block j+1's Q K^T), else each block's K and V together
        (the dQ kernel reads both in one step). A V that waits for its slot no longer
        holds up the K behind it: at D=256 the forward ran 1.07-1.09x with it, at D=64
        and 128 the same (H200, NOTES run 61)."""
        k_smem, v_smem, k_bars, v_bars, k_free, v_free = ring
        LAG: gl.constexpr = 1 if V_BEHIND else 0
        for j in range(total + LAG):
            if j < total:
                refill(k_desc, k_smem, k_bars, k_free, base + j, [b, kvh, j * BLOCK_N, 0],
                       STAGES)
            if j >= LAG:
                refill(v_desc, v_smem, v_bars, v_free, base + j - LAG,
                       [b, kvh, (j - LAG) * BLOCK_N, 0], STAGES)

    @gluon.jit
    def refill(desc, smem, ready, free, at, coords, STAGES: gl.constexpr):
        """desc's box at coords into the slot of ring position `at`, once every computing
        warpgroup has let the slot go (free: one arrival each a phase)."""
        slot = at % STAGES
        # As with Q's buffers, the first round over the ring does not wait.
        mbarrier.wait(free.index(slot), ((at // STAGES) & 1) ^ 1)
        issue(desc, coords, ready.index(slot), smem.index(slot))

    @gluon.jit
    def _partition(ROLE: gl.constexpr, shared, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                   WARPGROUPS: gl.constexpr, Q_BUFFERS: gl.constexpr, O_TMA: gl.constexpr,
                   OWN_RANGES: gl.constexpr, HEAD_GROUP: gl.constexpr,
                   ALL_SEEN: gl.constexpr):
        """ROLE r < WARPGROUPS: warpgroup r's 64 rows of each tile (r = 0 is the default
        partition); ROLE WARPGROUPS: the loading warp. shared: what every partition
        takes."""
        (Out, LSE, LENGTHS, COUNTER, tiles, q_blocks, Hq, group, Sq, Skv, qk_scale,
         stride_ob, stride_oh, stride_om, q_desc, k_desc, v_desc, q_smem, q_bars, q_free,
         tile_smem, ring, o_desc, o_smem) = shared
        # A warpgroup's scores and its P operand, in registers: P is the A operand of a
        # product into its accumulator's (first part's) layout.
        s_layout: gl.constexpr = score_layout(BLOCK_N)
        p_layout: gl.constexpr = operand_layout(first_layout(HEAD_D))
        if ROLE < WARPGROUPS:
            _consume(ROLE, Out, LSE, LENGTHS, tiles, q_blocks, Hq, group, Sq, Skv, qk_scale,
                     stride_ob, stride_oh, stride_om, q_smem, q_bars, q_free, tile_smem, ring,
                     o_desc, o_smem, HEAD_D, BLOCK_N, STAGES, CAUSAL, HAS_LENGTHS,
                     WARPGROUPS, Q_BUFFERS, O_TMA, OWN_RANGES, HEAD_GROUP, ALL_SEEN, s_layout,
                     p_layout)
        else:
            _produce(COUNTER, LENGTHS, tiles, q_blocks, Hq, group, Sq, Skv, q_desc, k_desc,
                     v_desc, q_smem, q_bars, q_free, tile_smem, ring, BLOCK_N, STAGES, CAUSAL,
                     HAS_LENGTHS, WARPGROUPS, Q_BUFFERS, HEAD_GROUP)

    @gluon.jit
    def forward_kernel(q_desc, k_desc, v_desc, o_desc, Out, LSE, LENGTHS, COUNTER,
                       stride_ob, stride_oh, stride_om,
                       batch_heads, Hq, group, Sq, Skv, qk_scale,
                       HEAD_D: gl.constexpr, CAUSAL: gl.constexpr,
                       HAS_LENGTHS: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, WARPGROUPS: gl.constexpr,
                       Q_BUFFERS: gl.constexpr, O_TMA: gl.constexpr,
                       OWN_RANGES: gl.constexpr, HEAD_GROUP: gl.constexpr,
                       ALL_SEEN: gl.constexpr):
        """out (B, Hq, Sq, D) and lse (B * Hq * Sq, natural log), like fused_triton's
        forward, from TMA descriptors of q (B, Hq, Sq, D; boxes of 64 rows) and k, v (B,
        Hkv, Skv, D; boxes of BLOCK_N rows); out is stored through Out and its strides,
        or where O_TMA through o_desc (like q's). A tile is 64 * WARPGROUPS query rows of one
        (batch, query head). The grid is persistent, a program per multiprocessor, and
        each takes tile after tile from COUNTER (two int32, zero at launch, zero again
        when the kernel ends: tile_counter), so that its
        loading warp runs ahead into the next tile while the last one's blocks run.
        WARPGROUPS (2 or 3) warpgroups of 64 rows run apart, each in its own partition,
        and one more warp loads, so no CTA-wide barrier ties them together."""
        gl.static_assert((WARPGROUPS == 2) or (WARPGROUPS == 3), "2 or 3 warpgroups")
        dtype: gl.constexpr = q_desc.dtype
        q_blocks = gl.cdiv(Sq, 64 * WARPGROUPS)
        tiles = q_blocks * batch_heads
        q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS * WARPGROUPS] + q_desc.block_shape,
                                           q_desc.layout)
        q_bars, q_free = barrier_pairs(Q_BUFFERS, WARPGROUPS)
        # The tile number that goes with each Q buffer (post_tile, next_tile).
        tile_smem = gl.allocate_shared_memory(gl.int32, [Q_BUFFERS, 1],
                                              gl.SwizzledSharedLayout(1, 1, 1, [0]))
        ring = kv_ring(k_desc, STAGES, WARPGROUPS)
        # Where O_TMA: a 64-row box of out per warpgroup, for its TMA store. Without it,
        # q_smem stands in, unused, so that the kernel is the one measured without.
        o_smem = q_smem
        if O_TMA:
            o_smem = gl.allocate_shared_memory(dtype, [WARPGROUPS] + o_desc.block_shape,
                                               o_desc.layout)
        # What every partition takes (_partition unpacks it).
        shared = (Out, LSE, LENGTHS, COUNTER, tiles, q_blocks, Hq, group, Sq, Skv, qk_scale,
                  stride_ob, stride_oh, stride_om, q_desc, k_desc, v_desc, q_smem, q_bars,
                  q_free, tile_smem, ring, o_desc, o_smem)
        # Registers: the launch's maxnreg fills the register file with every warp at the
        # same count; setmaxnreg then moves them from the loading warp's warpgroup (24) to
        # the computing ones.
        args: gl.constexpr = (HEAD_D, BLOCK_N, STAGES, CAUSAL, HAS_LENGTHS, WARPGROUPS,
                              Q_BUFFERS, O_TMA, OWN_RANGES, HEAD_GROUP, ALL_SEEN)
        if WARPGROUPS == 2:
            gl.warp_specialize([
                (_partition, (0, shared) + args),
                (_partition, (1, shared) + args),
                (_partition, (2, shared) + args),
            ], [4, 1], [232, 24])
        else:
            gl.warp_specialize([
                (_partition, (0, shared) + args),
                (_partition, (1, shared) + args),
                (_partition, (2, shared) + args),
                (_partition, (3, shared) + args),
            ], [4, 4, 1], [160, 160, 24])


# Config tuples per head dim: the tile configs the GPU test checks and
# benchmarks/gluon_forward.py times; fused_triton runs six of them (NOTES runs 14, 16-18,
# 27, 59).
# Three warpgroups (192 query rows) at D=64 follow FlashAttention-3's tile there. O_TMA
# (out stored through shared memory by TMA) was 1.01-1.13x the same tile without it on an
# H200 (run 17); (128, 2, 2, 0) keeps the direct store tested. OWN_RANGES (each warpgroup
# walks the key blocks its own rows see, for causal D=64, where 192-row tiles end
# mid-block) was 1.01-1.05x (64, 3, 3, 1) at 4k-16k (run 18). At D=256 64-key blocks in
# two K/V slots, routed, spill a little (16 local-memory instructions at the computing
# warpgroups' 232 registers) and ran 1.07-1.10x the 32-key blocks in three slots at 4k,
# 1.00-1.05x at 256-1k (run 60); those build without spills and leave two Q buffers room
# (224 KB); with two slots they ran 0.72-0.87x the Triton forward (run 59). Each config is
# compiled by the GPU test in two types: fewer keep that test inside one call.
CONFIGS = {64: [(128, 2, 2, 0), (64, 3, 3, 1, 1), (128, 2, 3, 1), (128, 3, 3, 1)],
           128: [(128, 2, 2, 0), (128, 2, 2, 1), (64, 4, 2, 1)],
           256: [(64, 2, 2, 0), (32, 3, 2, 0)]}
# maxnreg at launch: 12 warps (2 computing warpgroups and the loading warp's, padded) at
# 168 registers, or 16 at 128, fill the 64K-register file.
_MAXNREG = {2: 168, 3: 128}
_SHARED_BYTES = 227 * 1024  # an sm_90 program's most


@functools.cache
def _box_layout(rows: int, columns: int, dtype: torch.dtype):
    """The shared-memory layout of a (1, 1, rows, columns) TMA box."""
    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, columns], element)


def describable(t: torch.Tensor) -> bool:
    """Whether launch can describe t (B, H, S, D) to TMA as it is, beyond the alignment
    the caller checks: no dimension broadcast (stride 0 over more than one index), as a
    descriptor's strides must be positive."""
    strides = t.stride()
    return 0 not in strides or all(stride > 0 or size == 1 for size, stride in
                                   zip(t.shape, strides, strict=True))


def describe(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A TMA descriptor of t (B, H, S, D) read in boxes of (1, 1, rows, head_block(D)),
    rows a power of two; a box's columns past D read as zeros. A dimension of size 1 is
    only ever read at index 0, so its stride, which torch leaves free (0, say), becomes
    one the encoder accepts.

    Built without TensorDescriptor's own checks, which cost ~4 us of host time each (on
    the CPU machine) and a launch takes four: what they check (16-byte base and strides,
    unit stride along D, positive sizes, a power-of-two box) is what the callers have
    checked before routing a call here (fused_triton._gluon_covers, describable; the
    empty call never reaches a kernel). The fields are those of the Triton releases the
    kernels are offered under (CHECKED_RELEASES)."""
    shape = list(t.shape)
    D = shape[3]
    strides = list(t.stride())
    if 1 in shape:  # the test first: the rewrite costs ~1.2 us, most calls need none
        strides = [stride if size > 1 else D
                   for size, stride in zip(shape, strides, strict=True)]
    desc = object.__new__(TensorDescriptor)
    desc.base = t
    desc.shape = shape
    desc.strides = strides
    columns = head_block(D)
    desc.block_shape = [1, 1, rows, columns]
    desc.layout = _box_layout(rows, columns, t.dtype)
    desc.padding = "zero"
    return desc


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (a persistent grid's size), looked up once."""
    return torch.cuda.get_device_properties(device).multi_processor_count


class Config(NamedTuple):
    """A tile config of the kernel; a plain tuple of its first three to five fields serves
    as one (CONFIGS, fused_triton's routing, gluon_forward.py's --config)."""

    block_n: int  # keys per block
    stages: int  # K/V ring slots
    warpgroups: int  # computing warpgroups of 64 query rows: 2 or 3
    o_tma: int = 0  # out stored through shared memory and TMA
    own_ranges: int = 0  # each warpgroup walks its own rows' key blocks only


def q_buffer_count(config: tuple[int, ...], head_dim: int, element_size: int) -> int:
    """How many Q buffers the kernel gets under config (Q_BUFFERS): two where both fit
    beside the K/V ring, so that the next tile's Q loads while this one's last blocks
    run, else one; ValueError where not even one fits."""
    block_n, stages, warpgroups, o_tma, _ = Config(*config)
    columns = head_block(head_dim)  # a box's
    q_bytes = warpgroups * 64 * columns * element_size  # as many for out's boxes (O_TMA)
    fixed = 2 * stages * block_n * columns * element_size + (q_bytes if o_tma else 0)
    room = _SHARED_BYTES - 1024  # the barriers, tile numbers and atomic's scratch
    if fixed + q_bytes > room:
        raise ValueError(f"config {config} does not fit in shared memory at D={head_dim}")
    return 2 if fixed + 2 * q_bytes <= room else 1


def every_key_seen(causal: bool, key_lengths: torch.Tensor | None, seq_kv: int,
                   block_n: int) -> bool:
    """Whether every query row sees every key, in whole blocks of block_n keys: no causal
    mask or key lengths, and seq_kv a positive multiple of block_n (with no keys, no row
    sees one). The kernel then builds no index checks (ALL_SEEN)."""
    return not causal and key_lengths is None and seq_kv > 0 and seq_kv % block_n == 0


def tile_counter(device: torch.device) -> torch.Tensor:
    """forward_kernel's COUNTER: two int32, zero. The kernel sets them back to zero as it
    ends, so one pair per (GPU, stream) serves every launch on that stream (they run one
    after another) with no fill kernel before each: torch.zeros cost ~9 us of host time
    alone and 54 us inside a forward+backward under torch.profiler on the H200's host
    (NOTES, run 30). A fresh pair where the stream is being captured into a CUDA graph,
    whose replays may run on another stream beside this one's launches, and off the GPU
    (benchmarks/gluon_sass.py builds the launch on CPU tensors)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(2, dtype=torch.int32, device=device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return stream_counter(index, torch._C._cuda_getCurrentRawStream(index))


# Bounded, so that a program that makes stream after stream does not keep a pair for each.
# Dropping a pair that launches still in flight use is safe: record_stream keeps the
# caching allocator from handing its memory out again before the work queued on the
# stream so far is done.
@functools.lru_cache(maxsize=64)
def stream_counter(index: int, stream: int) -> torch.Tensor:
    """tile_counter's pair for GPU index and the raw CUDA stream (cudaStream_t as int).

    Made on a thread of its own: torch.compile's CUDA graphs (mode="reduce-overhead") send
    what the calling thread allocates during their warm-up run to the graphs' memory pool,
    where a pair kept here would be a live allocation that no output accounts for
    (RuntimeError "Detected 1 tensor(s) in the cudagraph pool not tracked as outputs").
    """
    with concurrent.futures.ThreadPoolExecutor(1) as maker:
        pair, made = maker.submit(_zeroed_pair, index).result()
    user = torch.cuda.ExternalStream(stream, device=pair.device)
    user.wait_event(made)
    pair.record_stream(user)
    return pair


def _zeroed_pair(index: int) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Two int32 zeros on GPU index, filled on a stream of their own, and the event after
    the fill."""
    device = torch.device("cuda", index)
    with torch.cuda.stream(torch.cuda.Stream(device)):
        pair = torch.zeros(2, dtype=torch.int32, device=device)
        made = torch.cuda.Event()
        made.record()
    return pair, made


def run_kernel(kernel, grid: tuple[int, ...], args: tuple, constexprs: dict,
               options: dict) -> None:
    """kernel[grid](*args, **constexprs, **options): Triton's own launch path, the
    launches' default `launcher` (fused_triton passes its faster one)."""
    kernel[grid](*args, **constexprs, **options)


def launch(q, k, v, out, lse, key_lengths, causal: bool, scale: float,
           config: tuple[int, ...], head_group: int = 1, launcher=run_kernel) -> None:
    """Run the kernel on q (B, Hq, Sq, D), k, v (B, Hkv, Skv, D), writing out (like q) and
    lse (B, Hq, Sq, float32); the caller has checked that the call is one it covers.
    config: a Config, or a tuple of its fields in order. head_group: how many (batch,
    query head) pairs' tiles go out together (in_head_groups). launcher: called as
    run_kernel is."""
    block_n, stages, warpgroups, o_tma, own_ranges = Config(*config)
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    lengths = key_lengths if key_lengths is not None else lse
    tiles = -(-Sq // (64 * warpgroups)) * B * Hq
    q_buffers = q_buffer_count(config, D, q.element_size())
    counter = tile_counter(q.device)
    q_desc = describe(q, 64)
    # out's descriptor is read only where O_TMA; q's (the same box type) stands in
    # otherwise, so that the routed configs do not build one more per call.
    o_desc = describe(out, 64) if o_tma else q_desc
    launcher(forward_kernel, (min(tiles, multiprocessors(q.device)),), (
        q_desc, describe(k, block_n), describe(v, block_n), o_desc, out, lse, lengths,
        counter,
        out.stride(0), out.stride(1), out.stride(2),
        B * Hq, Hq, Hq // k.shape[1], Sq, Skv, scale * LOG2E,
    ), dict(HEAD_D=D, CAUSAL=causal, HAS_LENGTHS=key_lengths is not None,
            BLOCK_N=block_n, STAGES=stages, WARPGROUPS=warpgroups, Q_BUFFERS=q_buffers,
            O_TMA=bool(o_tma), OWN_RANGES=bool(own_ranges), HEAD_GROUP=head_group,
            ALL_SEEN=every_key_seen(causal, key_lengths, Skv, block_n)),
        {"num_warps": 4, "maxnreg": _MAXNREG[warpgroups]})

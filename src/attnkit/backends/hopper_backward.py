"""The `triton` backend's two backward kernels for Hopper, in Gluon (Triton's lower-level
language): the dQ kernel and the dK/dV kernel.

`fused_triton`'s backward runs two kernels, each one recomputing P: the dQ kernel (which
also writes delta = rowsum(out * dout)) and then the dK/dV kernel. On Hopper either can
be the one here instead. Both have the layout of `hopper_forward`'s forward: two
warpgroups of 64 rows, each in a partition of its own, and one loading warp filling a
ring of STAGES slots through TMA, so the next tile's loads run under this one's math.
Neither needs atomics, so both give the same bits on every run. Both read Q, K, V and dO
through descriptors built on the host (`hopper_forward.describe`); built in each program
on the GPU, as up to run 23, they cost the backward 2.4-4.5% (NOTES run 24).

The dQ kernel: one program per 128 query rows and (batch, query head) walks the key
blocks the rows can see, its loading warp bringing K and V (the forward's ring):

    S = Q K^T,  P = exp2(S * scale - lse),  dP = dO V^T,  dS = P (dP - delta),
    dQ += dS K

In a warpgroup, block j+1's S and dP are on the tensor cores while block j's
exponentials and dS run. On an H200 it ran 1.02-1.07x the Triton dQ kernel at D=128
(4k and 16k, causal or not) but 0.77x at D=64; the whole backward with it, 1.006-1.013x
from 4k at D=128 (NOTES runs 14, 22) and 0.99-1.02x at 1k-2k (run 26). At D=256 it
takes blocks of 32 keys (dQ alone is 128 registers a thread there): the backward ran
1.09-1.15x the one with the Triton dQ kernel (run 61).

The dK/dV kernel: one program per 128 keys and (batch, kv head) walks the query blocks
of every query head of the kv group, in order, so dK and dV need no atomics:

    S^T = K Q^T,  P^T = exp2(S^T * scale - lse),  dP^T = V dO^T,
    dV += P^T dO,  dS^T = P^T (dP^T - delta),  dK += dS^T Q

Its loading warp brings K and V once, then Q, dO, lse and delta of each step. In a
warpgroup, P^T's exponentials run while dP^T is on the tensor cores, and dS^T while dV's
product is. P^T and dS^T are the register operands of dV's and dK's products, as S^T's
result layout hands them over with no data moved. Until run 38 they went through shared
memory, and the shared-memory pipe was the busiest unit (ncu: 81% at D=128 causal 4k,
most of it the matmuls' operand reads); in registers the kernel ran 1.06-1.12x as fast at
D=128 and 1.12-1.15x at D=64 (H200). At D=64 K and V are register operands too, loaded
once (KV_REGS: 1.01-1.07x more; at D=128 they do not fit, and with dropout at D=64 they
cost 1.5%: NOTES run 39). On an H200 it now runs 1.26-1.28x the Triton dK/dV kernel at
D=128 (1k-16k, causal or not) and 1.17-1.33x at D=64 (NOTES runs 38, 39).

Heads wider than 128 take wide_dkdv_kernel: one program per 64 keys, as a warpgroup
cannot hold both dK and dV of 64 keys there (2 x 128 registers a thread at D=256). One
warpgroup holds dV and computes S^T and P^T, the other holds dK and computes dP^T and
dS^T from P^T, which it reads through shared memory; each issues half of a step's four
products. The whole backward with it ran 1.38-1.54x the Triton one at D=256 from 1k,
causal or not, and 1.17-1.29x at 256-512 (H200, NOTES run 60). With dropout the dV
warpgroup draws the mask and hands P^T over with the dropped scores negated, so that the
dK warpgroup reads the mask from their sign: 1.45-1.72x with the Triton dK/dV kernel's
backward at 512-4k (NOTES run 62).

Under a causal mask the programs start a group of heads at a time, each head's heaviest
block first (HEAD_GROUP). The kernels cover what `hopper_forward` covers: sm_90, fp16 or
bf16, D = Dv a multiple of 8 from 40 to 256 (tiles of 64, 128 or 256 columns, products
split where D is not a power of two: `hopper_forward.contract`, `accumulate`), a positive
scale, causal or not, key_lengths, grouped heads, dropout (`dropout_mask`'s mask, each
Philox call drawn once, where applied: `pairs_layout`); no window or mask tensor; tensors
that TMA can read. `fused_triton` routes each where it was faster (`_hopper_backward_fits`).
Gluon does not run under TRITON_INTERPRET: this file is tested on a GPU only (test_triton).
"""

from __future__ import annotations

from attnkit.backends import dropout_mask, hopper_forward

if hopper_forward.gluon is not None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma_wait,
    )

    from attnkit.backends.hopper_forward import (
        accumulate,
        accumulator,
        box,
        contract,
        first_layout,
        hide_unseen,
        hold,
        in_head_groups,
        key_blocks,
        kv_ring,
        load_kv_ring,
        operand_layout,
        product_parts,
        row_limit,
        score_layout,
        split_at,
        store_accumulator,
        tile_columns,
    )

    @gluon.jit
    def lse_log2(lse):
        """lse in log2 units; dead rows (-inf) and rows past Sq (read as +inf) get +inf,
        so that their p is exactly 0."""
        return gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634

    @gluon.constexpr_function
    def pairs_layout(columns, keys_first):
        """Where dropout's Philox calls are drawn for a warpgroup's (64, columns) matmul
        result (score_layout): a grid of (query pair, key group) for
        dropout_mask.rows_first, each call in one thread. keys_first false (S, queries on
        the result's rows): a (32, columns // 4) grid, each call in the thread that holds
        its 8 scores: the result's layout without the register bits the mask adds back
        (row bit 3, columns bits 0 and 3), so that the mask reaches score_layout with no
        data moved (convert_layout's assert_trivial checks it when compiled). keys_first
        (S^T, keys on its rows): a (columns // 2, 16) grid. A call's 8 scores lie in two
        threads there, lanes 4 apart, each with half of them; the call is drawn by the one
        whose lane bit 2 equals the query pair's bit 0, so that of a pair of such threads
        each draws one of the two calls they share, and convert_layout swaps the halves
        (one shuffle of lane ^ 4 per 4 scores) instead of each thread drawing both (7-13%
        fewer instructions; the dK/dV kernel with dropout 1.11-1.17x as fast, causal 4k on
        an H200, run 37)."""
        if keys_first:
            return gl.DistributedLinearLayout(
                reg_bases=[[8 << i, 0] for i in range((columns // 16).bit_length() - 1)],
                lane_bases=[[2, 0], [4, 0], [1, 0], [0, 1], [0, 2]], warp_bases=[[0, 4], [0, 8]],
                block_bases=[], shape=[columns // 2, 16])
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 4 << i] for i in range((columns // 16).bit_length() - 1)],
            lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]], warp_bases=[[8, 0], [16, 0]],
            block_bases=[], shape=[32, columns // 4])

    @gluon.jit
    def _hide_keys(st, kj, qi, kv_len, off, Sq, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr):
        """S^T (keys kj, queries qi) with the scores no query sees (keys at or past kv_len;
        causal: past the query's last key) set to -inf; the scale applied after is
        positive."""
        seen = gl.expand_dims(kj, 1) < kv_len
        if CAUSAL:
            seen = seen & (gl.expand_dims(kj, 1) <= gl.expand_dims(qi, 0) + off)
        else:
            # Always true, but it makes the mask per element, as causal's is. With the
            # per-key mask alone, dK and dV came out wrong, and different from run to
            # run, wherever a warpgroup took this step (H200, Triton 3.6); the PTX
            # and SASS looked right. Cause not found (NOTES run 20).
            seen = seen & (gl.expand_dims(qi, 0) < Sq + BLOCK_M)
        return gl.where(seen, st, float("-inf"))

    @gluon.jit
    def _sees_every_key(n0, m0, kv_len, off, CAUSAL: gl.constexpr):
        """Whether a step needs no index checks: every key of a warpgroup's 64 from n0
        below kv_len and (causal) seen by the step's first query row, m0."""
        whole = n0 + 64 <= kv_len
        if CAUSAL:
            whole = whole & (n0 + 63 <= m0 + off)
        return whole

    @gluon.jit
    def _keys_first_keep(seed, bh, m0, n0, Sq, Skv, drop_p, BLOCK_M: gl.constexpr,
                         s_layout: gl.constexpr):
        """Whether dropout keeps each score of S^T (64 keys from n0, query rows [m0, m0 +
        BLOCK_M) of (batch * query head) bh), in s_layout (score_layout(BLOCK_M)): drawn on
        pairs_layout's grid, then moved there."""
        pairs: gl.constexpr = pairs_layout(BLOCK_M, True)
        keep = dropout_mask.rows_first(
            seed, bh, gl.arange(0, BLOCK_M // 2, layout=gl.SliceLayout(1, pairs)),
            gl.arange(0, 16, layout=gl.SliceLayout(0, pairs)), m0, n0, Sq, Skv, drop_p,
            BLOCK_M, 64)
        return gl.convert_layout(gl.permute(keep, (1, 0)), s_layout)

    @gluon.jit
    def _dkdv_step(t, m0, n0, dk, dv, kj, kv_len, off, qk_scale, Sq, Skv, seed, bh, drop_p,
                   k_op, v_op, q_ring, do_ring, ready, free, rows_ring,
                   MASKED: gl.constexpr, CAUSAL: gl.constexpr, DROPOUT: gl.constexpr,
                   STAGES: gl.constexpr, BLOCK_M: gl.constexpr, s_layout: gl.constexpr,
                   HEAD_D: gl.constexpr, KV_REGS: gl.constexpr):
        """Step t of the walk: query rows [m0, m0 + BLOCK_M) of query head bh (batch *
        heads + head) against keys [n0, n0 + 64). S^T and dP^T issued (and dropout's mask
        drawn under them); P^T's exponentials under dP^T; dV's product, dS^T under it,
        dK's; all waited for before the slot goes back to the loading warp."""
        slot = t % STAGES
        qi = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        lse = rows_ring.index(slot).load(gl.SliceLayout(0, s_layout))
        q = box(q_ring, slot)
        do = box(do_ring, slot)
        # K and V in registers (KV_REGS) are read whole: S^T and dP^T do not split.
        CONTRACTED: gl.constexpr = tile_columns(HEAD_D) if KV_REGS else HEAD_D
        s_tok = contract(k_op, q, gl.zeros([64, BLOCK_M], gl.float32, s_layout), CONTRACTED,
                         True)
        dp_tok = contract(v_op, do, gl.zeros([64, BLOCK_M], gl.float32, s_layout), CONTRACTED,
                          True)
        if DROPOUT:
            keep = _keys_first_keep(seed, bh, m0, n0, Sq, Skv, drop_p, BLOCK_M, s_layout)
            inv = 1.0 / (1.0 - drop_p)
        s = warpgroup_mma_wait(product_parts(CONTRACTED), deps=[s_tok])
        if MASKED:
            s = _hide_keys(s, kj, qi, kv_len, off, Sq, CAUSAL, BLOCK_M)
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 0))
        # dV's product needs P^T only: issued before dP^T is waited for, it pins that wait
        # below every exponential (ptxas would move a free-standing wait up into the first
        # stall, NOTES run 14), and dS^T then runs under it.
        if DROPOUT:  # dV from the kept P^T, scaled; dS^T from P^T and the kept dP^T
            pt = gl.where(keep, p * inv, 0.0).to(q.dtype)
        else:
            pt = p.to(q.dtype)
        op_layout: gl.constexpr = operand_layout(first_layout(HEAD_D))
        pt = gl.convert_layout(pt, op_layout)
        dv_tok = accumulate(pt, do, dv, HEAD_D, True)
        dp = warpgroup_mma_wait(product_parts(HEAD_D), deps=[dp_tok])
        if DROPOUT:
            dp = gl.where(keep, dp * inv, 0.0)
        delta = rows_ring.index(STAGES + slot).load(gl.SliceLayout(0, s_layout))
        dst = gl.convert_layout((p * (dp - gl.expand_dims(delta, 0))).to(q.dtype), op_layout)
        dk_tok = accumulate(dst, q, dk, HEAD_D, True)
        if split_at(HEAD_D) == 0:
            dv, dk, _, _ = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, pt, dst])
        else:
            dv0, dv1, dk0, dk1, _, _ = warpgroup_mma_wait(
                0, deps=[dv_tok[0], dv_tok[1], dk_tok[0], dk_tok[1], pt, dst])
            dv = (dv0, dv1)
            dk = (dk0, dk1)
        hold(pt)
        hold(dst)
        mbarrier.arrive(free.index(slot), count=1)
        return dk, dv

    @gluon.jit
    def _dkdv_consume(DK, DV, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale, scale, group, Hq,
                      first_block, n_blocks, seed, drop_p, stride_dkb, stride_dkh, stride_dkn,
                      stride_dvb, stride_dvh, stride_dvn, k_smem, v_smem, kv_bar, q_ring, do_ring,
                      ready, free, rows_ring, HEAD_D: gl.constexpr,
                      BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                      DROPOUT: gl.constexpr, KV_REGS: gl.constexpr):
        """One warpgroup's 64 keys [n0, n0 + 64): dK and dV over the query blocks
        first_block.. of every query head of the group, stored (dK scaled). KV_REGS: K and
        V as S^T's and dP^T's register operands, loaded once, instead of read from shared
        memory on every step (16 registers a thread each at D=64; at D=128 they spill)."""
        seed = dropout_mask.seed_value(seed, DROPOUT)
        s_layout: gl.constexpr = score_layout(BLOCK_M)
        kj = n0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
        dk = accumulator(64, HEAD_D)
        dv = accumulator(64, HEAD_D)
        mbarrier.wait(kv_bar, 0)
        k_op, v_op = k_smem, v_smem  # S^T's and dP^T's A operands
        if KV_REGS:
            kv_layout: gl.constexpr = operand_layout(s_layout)
            k_op = k_smem.load(kv_layout)
            v_op = v_smem.load(kv_layout)
        for t in range(group * n_blocks):
            m0 = (first_block + t % n_blocks) * BLOCK_M
            bh = b * Hq + kvh * group + t // n_blocks
            if _sees_every_key(n0, m0, kv_len, off, CAUSAL):
                dk, dv = _dkdv_step(t, m0, n0, dk, dv, kj, kv_len, off, qk_scale, Sq, Skv, seed,
                                    bh, drop_p, k_op, v_op, q_ring, do_ring, ready, free,
                                    rows_ring, False, CAUSAL, DROPOUT, STAGES, BLOCK_M, s_layout,
                                    HEAD_D, KV_REGS)
            else:
                dk, dv = _dkdv_step(t, m0, n0, dk, dv, kj, kv_len, off, qk_scale, Sq, Skv, seed,
                                    bh, drop_p, k_op, v_op, q_ring, do_ring, ready, free,
                                    rows_ring, True, CAUSAL, DROPOUT, STAGES, BLOCK_M, s_layout,
                                    HEAD_D, KV_REGS)
        store_accumulator(DK + b * stride_dkb + kvh * stride_dkh, stride_dkn, n0, Skv, dk, scale,
                          HEAD_D)
        store_accumulator(DV + b * stride_dvb + kvh * stride_dvh, stride_dvn, n0, Skv, dv, 1.0,
                          HEAD_D)

    @gluon.jit
    def _dkdv_produce(LSE, DELTA, b, Hq, Sq, kvh, group, n0, first_block, n_blocks, k_desc, v_desc,
                      q_desc, do_desc, k_box, v_box, kv_bar, q_ring, do_ring, ready, free,
                      rows_ring, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        """The loading warp: K and V of the key block once, then for each step of the walk
        Q and dO into the ring, and lse (log2 units) and delta into rows_ring (stored
        before the arrival that the ring's TMA loads complete), once both warpgroups have
        let the slot go. The computing warpgroups read lse and delta from there because
        per-column pointers into LSE and DELTA took 32 registers a vector."""
        row_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
        b32 = b.to(gl.int32)  # TMA coordinates are 32-bit
        kvh32 = kvh.to(gl.int32)
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b32, kvh32, n0, 0], kv_bar, k_box)
        tma.async_copy_global_to_shared(v_desc, [b32, kvh32, n0, 0], kv_bar, v_box)
        for t in range(group * n_blocks):
            slot = t % STAGES
            mbarrier.wait(free.index(slot), ((t // STAGES) & 1) ^ 1)
            h = (kvh * group + t // n_blocks).to(gl.int32)
            m0 = (first_block + t % n_blocks) * BLOCK_M
            bar = ready.index(slot)
            qi = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
            row = (b * Hq + h) * Sq + qi
            rows_ring.index(slot).store(lse_log2(gl.load(LSE + row, mask=qi < Sq,
                                                         other=float("inf"))))
            rows_ring.index(STAGES + slot).store(gl.load(DELTA + row, mask=qi < Sq,
                                                         other=0.0))
            gl.thread_barrier()  # every lane's stores before the arrival that releases them
            mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b32, h, m0, 0], bar, q_ring.index(slot))
            tma.async_copy_global_to_shared(do_desc, [b32, h, m0, 0], bar, do_ring.index(slot))

    @gluon.jit
    def _dkdv_worker(ROLE: gl.constexpr, DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off,
                     qk_scale, scale, group, Hq, first_block, n_blocks, seed, drop_p, stride_dkb,
                     stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, k_desc, v_desc,
                     q_desc, do_desc, k_box, v_box, kv_bar, q_ring, do_ring, ready, free,
                     rows_ring, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr,
                     STAGES: gl.constexpr, CAUSAL: gl.constexpr, DROPOUT: gl.constexpr,
                     KV_REGS: gl.constexpr):
        """ROLE 0: the second warpgroup's keys; ROLE 1: the loading warp."""
        if ROLE == 0:
            _dkdv_consume(DK, DV, b, kvh, n0 + 64, Sq, Skv, kv_len, off, qk_scale, scale, group,
                          Hq, first_block, n_blocks, seed, drop_p, stride_dkb, stride_dkh,
                          stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          box(k_box, 0).slice(64, 64), box(v_box, 0).slice(64, 64), kv_bar,
                          q_ring, do_ring, ready, free, rows_ring, HEAD_D, BLOCK_M, STAGES,
                          CAUSAL, DROPOUT, KV_REGS)
        else:
            _dkdv_produce(LSE, DELTA, b, Hq, Sq, kvh, group, n0, first_block, n_blocks, k_desc,
                          v_desc, q_desc, do_desc, k_box.index(0), v_box.index(0), kv_bar, q_ring,
                          do_ring, ready, free, rows_ring, BLOCK_M, STAGES)

    @gluon.jit
    def _dkdv_program(LENGTHS, Hkv, Sq, Skv, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                      CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                      HEAD_GROUP: gl.constexpr):
        """This program's batch and kv head (int64) and first key n0 of a (key blocks of
        BLOCK_N, B * Hkv) grid; off = Skv - Sq, the batch's kv_len, and the query blocks of
        BLOCK_M that can see one of its keys: from first_block, n_blocks of them (0 where
        n0 is past kv_len)."""
        # The programs start HEAD_GROUP heads at a time, each one's first key block (under
        # a causal mask the one with the most queries to see) first. Head by head, the
        # grid's own order, the program ids serve as they are, as in the build checked in
        # run 20 (in_head_groups would divide a linear index back into them).
        if HEAD_GROUP == 1:
            n0 = gl.program_id(0) * BLOCK_N
            bh = gl.program_id(1)
        else:
            n_tiles = gl.num_programs(0)
            bh, block = hopper_forward.in_head_groups(
                gl.program_id(1) * n_tiles + gl.program_id(0), n_tiles, gl.num_programs(1),
                HEAD_GROUP)
            n0 = block * BLOCK_N
        b = (bh // Hkv).to(gl.int64)
        kvh = (bh % Hkv).to(gl.int64)
        off = Skv - Sq
        kv_len = Skv
        if HAS_LENGTHS:
            kv_len = gl.minimum(gl.load(LENGTHS + b).to(gl.int32), Skv)
        # The query blocks that can see a key of this block: from the one holding the
        # first query that sees key n0 (causal: n0 - off) to the last; none past kv_len.
        first_block = 0
        if CAUSAL:
            first_block = gl.maximum(n0 - off, 0) // BLOCK_M
        n_blocks = gl.maximum(gl.cdiv(Sq, BLOCK_M) - first_block, 0)
        n_blocks = gl.where(n0 < kv_len, n_blocks, 0)
        return b, kvh, n0, off, kv_len, first_block, n_blocks

    @gluon.jit
    def _dkdv_shared(q_desc, k_desc, v_desc, do_desc, BLOCK_M: gl.constexpr,
                     STAGES: gl.constexpr):
        """The dK/dV kernels' shared memory, mbarriers initialised: K's and V's boxes
        (their descriptors' block) and kv_bar, rings of STAGES Q and dO boxes with ready
        (TMA bytes) and free (one arrival per computing warpgroup) mbarriers, and
        rows_ring, lse of ring slot i at row i and delta at row STAGES + i."""
        dtype: gl.constexpr = q_desc.dtype
        k_box = gl.allocate_shared_memory(dtype, [1] + k_desc.block_shape, k_desc.layout)
        v_box = gl.allocate_shared_memory(dtype, [1] + v_desc.block_shape, v_desc.layout)
        q_ring = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_shape, q_desc.layout)
        do_ring = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_shape,
                                            do_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        ready, free = hopper_forward.barrier_pairs(STAGES, 2)
        rows_ring = gl.allocate_shared_memory(gl.float32, [2 * STAGES, BLOCK_M],
                                              gl.SwizzledSharedLayout(1, 1, 1, [0]))
        return k_box, v_box, q_ring, do_ring, kv_bar, ready, free, rows_ring

    # With group == 1 specialised as a constant (Triton's default for an int that is 1),
    # key blocks that take the index-checked step came out wrong or faulted (H200, Triton
    # 3.6; NOTES run 15); unspecialised, the same cases pass.
    # The dropout seed is drawn anew for every call: not specialised either (fused_triton's
    # _kernel says why).
    @gluon.jit(do_not_specialize=["group", "seed"])
    def dkdv_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, LENGTHS,
                    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                    Hq, Hkv, group, Sq, Skv, qk_scale, scale, seed, drop_p,
                    HEAD_D: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                    DROPOUT: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                    HEAD_GROUP: gl.constexpr, KV_REGS: gl.constexpr):
        """One program per (128 keys, batch * kv head); 4 warps + 4 + 1 (WS). The four
        descriptors (hopper_forward.describe): K and V read in boxes of 128 rows, Q and dO
        of BLOCK_M. seed, drop_p: dropout's (DROPOUT), seed an int or a pointer
        to one."""
        b, kvh, n0, off, kv_len, first_block, n_blocks = _dkdv_program(
            LENGTHS, Hkv, Sq, Skv, 128, BLOCK_M, CAUSAL, HAS_LENGTHS, HEAD_GROUP)
        k_box, v_box, q_ring, do_ring, kv_bar, ready, free, rows_ring = _dkdv_shared(
            q_desc, k_desc, v_desc, do_desc, BLOCK_M, STAGES)
        # 240 registers per computing thread leave the loading warp's warpgroup 24 of the
        # 64K; at BLOCK_M 64 and D=128 they need them all.
        gl.warp_specialize([
            (_dkdv_consume, (DK, DV, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale, scale, group,
                             Hq, first_block, n_blocks, seed, drop_p, stride_dkb, stride_dkh,
                             stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                             box(k_box, 0).slice(0, 64), box(v_box, 0).slice(0, 64), kv_bar,
                             q_ring, do_ring, ready, free, rows_ring, HEAD_D, BLOCK_M, STAGES,
                             CAUSAL, DROPOUT, KV_REGS)),
            (_dkdv_worker, (0, DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale,
                            scale, group, Hq, first_block, n_blocks, seed, drop_p, stride_dkb,
                            stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, k_desc,
                            v_desc, q_desc, do_desc, k_box, v_box, kv_bar, q_ring, do_ring, ready,
                            free, rows_ring, HEAD_D, BLOCK_M, STAGES, CAUSAL, DROPOUT,
                            KV_REGS)),
            (_dkdv_worker, (1, DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale,
                            scale, group, Hq, first_block, n_blocks, seed, drop_p, stride_dkb,
                            stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, k_desc,
                            v_desc, q_desc, do_desc, k_box, v_box, kv_bar, q_ring, do_ring, ready,
                            free, rows_ring, HEAD_D, BLOCK_M, STAGES, CAUSAL, DROPOUT,
                            KV_REGS)),
        ], [4, 1], [240, 24])

    @gluon.jit
    def _wide_issue(t, rows, a_op, ring, ready, rows_ring, STAGES: gl.constexpr,
                    BLOCK_M: gl.constexpr, s_layout: gl.constexpr, HEAD_D: gl.constexpr):
        """wide_dkdv_kernel's step t, once its slot is loaded: the slot, its row vector at
        rows_ring row rows + slot (lse at 0, delta at STAGES), and the token of a_op (64
        keys, D) times the slot's (BLOCK_M, D) box of ring transposed, issued: S^T (K, Q)
        or dP^T (V, dO)."""
        slot = t % STAGES
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        row = rows_ring.index(rows + slot).load(gl.SliceLayout(0, s_layout))
        tok = contract(a_op, box(ring, slot), gl.zeros([64, BLOCK_M], gl.float32, s_layout),
                       HEAD_D, True)
        return slot, row, tok

    @gluon.jit
    def _wide_scores(t, rows, a_op, ring, ready, rows_ring, STAGES: gl.constexpr,
                     BLOCK_M: gl.constexpr, s_layout: gl.constexpr, HEAD_D: gl.constexpr):
        """_wide_issue's product, waited for: the slot, its row vector and the product."""
        slot, row, tok = _wide_issue(t, rows, a_op, ring, ready, rows_ring, STAGES, BLOCK_M,
                                     s_layout, HEAD_D)
        return slot, row, warpgroup_mma_wait(0, deps=[tok])

    @gluon.jit
    def _wide_accumulate(x, b_op, acc, free, slot, HEAD_D: gl.constexpr):
        """acc += x b_op, x (64, BLOCK_M) in the 16-bit type taken as a register operand,
        waited for; then the step's ring slot goes back to the loading warp."""
        x = gl.convert_layout(x, operand_layout(first_layout(HEAD_D)))
        tok = accumulate(x, b_op, acc, HEAD_D, True)
        if split_at(HEAD_D) == 0:
            acc, _ = warpgroup_mma_wait(0, deps=[tok, x])
        else:
            first, second, _ = warpgroup_mma_wait(0, deps=[tok[0], tok[1], x])
            acc = (first, second)
        hold(x)
        mbarrier.arrive(free.index(slot), count=1)
        return acc

    @gluon.jit
    def _wide_dv_step(t, m0, n0, bh, dv, kj, kv_len, off, qk_scale, Sq, Skv, seed, drop_p,
                      k_op, q_ring, do_ring, ready, free, rows_ring, p_ring, p_ready, p_free,
                      MASKED: gl.constexpr, CAUSAL: gl.constexpr, DROPOUT: gl.constexpr,
                      STAGES: gl.constexpr, BLOCK_M: gl.constexpr, s_layout: gl.constexpr,
                      HEAD_D: gl.constexpr):
        """wide_dkdv_kernel's step t in the dV warpgroup: S^T and P^T of query rows [m0, m0
        + BLOCK_M) of (batch * query head) bh against its 64 keys from n0, P^T handed to the
        dK warpgroup through p_ring, then dV += P^T dO. With dropout, its mask is drawn
        under S^T; dV takes the kept P^T, scaled, and the dK warpgroup gets P^T with the
        dropped scores negated, from which it tells the mask (P^T >= 0) without drawing
        it again."""
        qi = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        slot, lse, s_tok = _wide_issue(t, 0, k_op, q_ring, ready, rows_ring, STAGES, BLOCK_M,
                                       s_layout, HEAD_D)
        if DROPOUT:
            keep = _keys_first_keep(seed, bh, m0, n0, Sq, Skv, drop_p, BLOCK_M, s_layout)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        if MASKED:
            s = _hide_keys(s, kj, qi, kv_len, off, Sq, CAUSAL, BLOCK_M)
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 0))
        # P^T in the 16-bit type, as dV's product takes it: dS^T from it differs from
        # dS^T from the float32 P^T by one rounding, below the one dS^T gets for its
        # product.
        if DROPOUT:
            handed = gl.where(keep, p, -p).to(k_op.dtype)
            pt = gl.where(keep, p * (1.0 / (1.0 - drop_p)), 0.0).to(k_op.dtype)
        else:
            pt = p.to(k_op.dtype)
            handed = pt
        held = t % 2
        mbarrier.wait(p_free.index(held), ((t // 2) & 1) ^ 1)  # the first round: no wait
        p_ring.index(held).store(handed)
        gl.thread_barrier()  # every thread's part stored before the arrival
        mbarrier.arrive(p_ready.index(held), count=1)
        return _wide_accumulate(pt, box(do_ring, slot), dv, free, slot, HEAD_D)

    @gluon.jit
    def _wide_dk_step(t, dk, drop_p, v_op, q_ring, do_ring, ready, free, rows_ring, p_ring,
                      p_ready, p_free, DROPOUT: gl.constexpr, STAGES: gl.constexpr,
                      BLOCK_M: gl.constexpr, s_layout: gl.constexpr, HEAD_D: gl.constexpr):
        """wide_dkdv_kernel's step t in the dK warpgroup: dP^T, then, with the dV
        warpgroup's P^T of the step (hidden scores are 0 there: no index checks here),
        dS^T = P^T (dP^T - delta) and dK += dS^T Q. With dropout, P^T's dropped scores
        come negated: dP^T is kept, and scaled, where P^T is not negative (a dropped 0
        reads as kept, and adds 0 all the same)."""
        slot, delta, dp = _wide_scores(t, STAGES, v_op, do_ring, ready, rows_ring, STAGES,
                                       BLOCK_M, s_layout, HEAD_D)
        held = t % 2
        mbarrier.wait(p_ready.index(held), (t // 2) & 1)
        pt = p_ring.index(held).load(s_layout).to(gl.float32)
        gl.thread_barrier()  # every thread's part read before the arrival
        mbarrier.arrive(p_free.index(held), count=1)
        if DROPOUT:
            dp = gl.where(pt >= 0.0, dp * (1.0 / (1.0 - drop_p)), 0.0)
            pt = gl.abs(pt)
        dst = (pt * (dp - gl.expand_dims(delta, 0))).to(v_op.dtype)
        return _wide_accumulate(dst, box(q_ring, slot), dk, free, slot, HEAD_D)

    @gluon.jit
    def _wide_dkdv_partition(ROLE: gl.constexpr, shared, HEAD_D: gl.constexpr,
                             BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                             CAUSAL: gl.constexpr, DROPOUT: gl.constexpr):
        """ROLE 0 (the default partition): the dV warpgroup; 1: the dK warpgroup; 2: the
        loading warp (dkdv_kernel's). shared: what every partition takes."""
        (DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale, scale, group, Hq,
         first_block, n_blocks, seed, drop_p, stride_dkb, stride_dkh, stride_dkn, stride_dvb,
         stride_dvh, stride_dvn, k_desc, v_desc, q_desc, do_desc, k_box, v_box, kv_bar, q_ring,
         do_ring, ready, free, rows_ring, p_ring, p_ready, p_free) = shared
        s_layout: gl.constexpr = score_layout(BLOCK_M)
        if ROLE == 2:
            _dkdv_produce(LSE, DELTA, b, Hq, Sq, kvh, group, n0, first_block, n_blocks, k_desc,
                          v_desc, q_desc, do_desc, k_box.index(0), v_box.index(0), kv_bar,
                          q_ring, do_ring, ready, free, rows_ring, BLOCK_M, STAGES)
        elif ROLE == 0:
            seed = dropout_mask.seed_value(seed, DROPOUT)
            kj = n0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
            dv = accumulator(64, HEAD_D)
            mbarrier.wait(kv_bar, 0)
            for t in range(group * n_blocks):
                m0 = (first_block + t % n_blocks) * BLOCK_M
                bh = b * Hq + kvh * group + t // n_blocks
                if _sees_every_key(n0, m0, kv_len, off, CAUSAL):
                    dv = _wide_dv_step(t, m0, n0, bh, dv, kj, kv_len, off, qk_scale, Sq, Skv,
                                       seed, drop_p, box(k_box, 0), q_ring, do_ring, ready,
                                       free, rows_ring, p_ring, p_ready, p_free, False, CAUSAL,
                                       DROPOUT, STAGES, BLOCK_M, s_layout, HEAD_D)
                else:
                    dv = _wide_dv_step(t, m0, n0, bh, dv, kj, kv_len, off, qk_scale, Sq, Skv,
                                       seed, drop_p, box(k_box, 0), q_ring, do_ring, ready,
                                       free, rows_ring, p_ring, p_ready, p_free, True, CAUSAL,
                                       DROPOUT, STAGES, BLOCK_M, s_layout, HEAD_D)
            store_accumulator(DV + b * stride_dvb + kvh * stride_dvh, stride_dvn, n0, Skv, dv,
                              1.0, HEAD_D)
        else:
            dk = accumulator(64, HEAD_D)
            mbarrier.wait(kv_bar, 0)
            for t in range(group * n_blocks):
                dk = _wide_dk_step(t, dk, drop_p, box(v_box, 0), q_ring, do_ring, ready, free,
                                   rows_ring, p_ring, p_ready, p_free, DROPOUT, STAGES,
                                   BLOCK_M, s_layout, HEAD_D)
            store_accumulator(DK + b * stride_dkb + kvh * stride_dkh, stride_dkn, n0, Skv, dk,
                              scale, HEAD_D)

    @gluon.jit(do_not_specialize=["group", "seed"])  # dkdv_kernel says why
    def wide_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, DK, DV, LENGTHS,
                         stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                         Hq, Hkv, group, Sq, Skv, qk_scale, scale, seed, drop_p,
                         HEAD_D: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                         DROPOUT: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                         HEAD_GROUP: gl.constexpr):
        """dkdv_kernel for heads wider than 128: one program per (64 keys,
        batch * kv head); 4 warps + 4 + 1 (WS). A warpgroup cannot hold both dK and dV of
        64 keys there (2 x 128 registers a thread at D=256), so one holds dV and computes
        S^T and P^T, the other holds dK and computes dP^T and dS^T, reading P^T from the
        first through shared memory (a ring of two). Each issues half of a step's four
        products. The descriptors (hopper_forward.describe): K and V read in boxes of 64
        rows, Q and dO of BLOCK_M. seed, drop_p: dropout's (DROPOUT), as
        dkdv_kernel's."""
        dtype: gl.constexpr = q_desc.dtype
        b, kvh, n0, off, kv_len, first_block, n_blocks = _dkdv_program(
            LENGTHS, Hkv, Sq, Skv, 64, BLOCK_M, CAUSAL, HAS_LENGTHS, HEAD_GROUP)
        k_box, v_box, q_ring, do_ring, kv_bar, ready, free, rows_ring = _dkdv_shared(
            q_desc, k_desc, v_desc, do_desc, BLOCK_M, STAGES)
        p_ring = gl.allocate_shared_memory(
            dtype, [2, 64, BLOCK_M], gl.NVMMASharedLayout.get_default_for([64, BLOCK_M], dtype))
        # one arrival each: the dV warpgroup's on p_ready, the dK warpgroup's on p_free
        p_ready, p_free = hopper_forward.barrier_pairs(2, 1)
        shared = (DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale, scale, group,
                  Hq, first_block, n_blocks, seed, drop_p, stride_dkb, stride_dkh, stride_dkn,
                  stride_dvb, stride_dvh, stride_dvn, k_desc, v_desc, q_desc, do_desc, k_box,
                  v_box, kv_bar, q_ring, do_ring, ready, free, rows_ring, p_ring, p_ready, p_free)
        args: gl.constexpr = (HEAD_D, BLOCK_M, STAGES, CAUSAL, DROPOUT)
        gl.warp_specialize([(_wide_dkdv_partition, (0, shared) + args),
                            (_wide_dkdv_partition, (1, shared) + args),
                            (_wide_dkdv_partition, (2, shared) + args)], [4, 1], [240, 24])

    @gluon.jit
    def _dq_step(j, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale, dropout, q_smem, do_smem,
                 k_smem, v_smem, k_bars, v_bars, k_free, v_free,
                 MASKED: gl.constexpr, CAUSAL: gl.constexpr, HAS_NEXT: gl.constexpr,
                 DROPOUT: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                 s_layout: gl.constexpr, ds_layout: gl.constexpr, HEAD_D: gl.constexpr):
        """Key block j, whose S and dP are in registers: dropout's mask applied to dP
        (DROPOUT), block j+1's S and dP issued (HAS_NEXT), block j's exponentials and dS
        run while they are on the tensor cores, then block j's dQ product; everything is
        waited for before the next step, since a product still in flight across the
        loop's back edge makes ptxas serialize them all (C7514). dropout: (seed, bh, row0,
        Sq, drop_p), the rows' 64 start at row0. Returns block j+1's S and dP, and dq."""
        slot = j % STAGES
        mbarrier.arrive(v_free.index(slot), count=1)  # dP, the one reader of V's slot, is done
        if DROPOUT:  # before the next S and dP take their registers
            seed, bh, row0, Sq, drop_p = dropout
            pairs: gl.constexpr = pairs_layout(BLOCK_N, False)
            keep = dropout_mask.rows_first(
                seed, bh, gl.arange(0, 32, layout=gl.SliceLayout(1, pairs)),
                gl.arange(0, BLOCK_N // 4, layout=gl.SliceLayout(0, pairs)), row0, j * BLOCK_N,
                Sq, Sq + off, drop_p, 64, BLOCK_N)
            keep = gl.convert_layout(keep, s_layout, assert_trivial=True)
            dp = gl.where(keep, dp * (1.0 / (1.0 - drop_p)), 0.0)
        if HAS_NEXT:
            nxt = (j + 1) % STAGES
            phase = ((j + 1) // STAGES) & 1
            # Each product gets zeros of its own: one set of registers read as two
            # accumulators also serializes them.
            mbarrier.wait(k_bars.index(nxt), phase)
            s_tok = contract(q_smem, box(k_smem, nxt), gl.zeros(s.shape, gl.float32, s_layout),
                             HEAD_D, True)
            mbarrier.wait(v_bars.index(nxt), phase)
            dp_tok = contract(do_smem, box(v_smem, nxt),
                              gl.zeros(s.shape, gl.float32, s_layout), HEAD_D, True)
        if MASKED:
            # hidden scores -inf before the one multiply-add (the scale is positive)
            kj = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = hide_unseen(s, kj, row_limit(qi, kv_len, off, CAUSAL))
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
        ds = gl.convert_layout((p * (dp - gl.expand_dims(delta, 1))).to(q_smem.dtype), ds_layout)
        dq_tok = accumulate(ds, box(k_smem, slot), dq, HEAD_D, True)
        if split_at(HEAD_D) == 0:
            if HAS_NEXT:
                dq, s, dp, _ = warpgroup_mma_wait(0, deps=[dq_tok, s_tok, dp_tok, ds])
            else:
                dq, _ = warpgroup_mma_wait(0, deps=[dq_tok, ds])
        else:
            if HAS_NEXT:
                dq0, dq1, s, dp, _ = warpgroup_mma_wait(0, deps=[dq_tok[0], dq_tok[1], s_tok,
                                                                 dp_tok, ds])
            else:
                dq0, dq1, _ = warpgroup_mma_wait(0, deps=[dq_tok[0], dq_tok[1], ds])
            dq = (dq0, dq1)
        hold(ds)
        mbarrier.arrive(k_free.index(slot), count=1)  # S and the dQ product read K's slot
        return s, dp, dq

    @gluon.jit
    def _dq_blocks(first, last, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale, dropout,
                   q_smem, do_smem, k_smem, v_smem, k_bars, v_bars, k_free, v_free,
                   MASKED: gl.constexpr, CAUSAL: gl.constexpr, DROPOUT: gl.constexpr,
                   STAGES: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                   ds_layout: gl.constexpr, HEAD_D: gl.constexpr):
        for j in range(first, last):
            s, dp, dq = _dq_step(j, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale, dropout,
                                 q_smem, do_smem, k_smem, v_smem, k_bars, v_bars, k_free, v_free,
                                 MASKED, CAUSAL, True, DROPOUT, STAGES, BLOCK_N, s_layout,
                                 ds_layout, HEAD_D)
        return s, dp, dq

    @gluon.jit
    def _dq_consume(Out, LSE, DELTA, DQ, b, h, bh, row0, Sq, kv_len, off, qk_scale, scale, total,
                    full_blocks, seed, drop_p, stride_ob, stride_oh, stride_om, stride_dqb,
                    stride_dqh, stride_dqm, q_smem, do_smem, k_smem, v_smem, q_bar, k_bars,
                    v_bars, k_free, v_free, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, CAUSAL: gl.constexpr, DROPOUT: gl.constexpr):
        """One warpgroup's 64 query rows [row0, row0 + 64): delta, then dq over every key
        block, stored scaled."""
        dropout = (dropout_mask.seed_value(seed, DROPOUT), bh, row0, Sq, drop_p)
        ROWS: gl.constexpr = 64
        s_layout: gl.constexpr = score_layout(BLOCK_N)
        ds_layout: gl.constexpr = operand_layout(first_layout(HEAD_D))
        rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        qi = row0 + gl.arange(0, ROWS, layout=rows_layout)
        row_ok = qi < Sq
        lse = lse_log2(gl.load(LSE + bh.to(gl.int64) * Sq + qi, mask=row_ok, other=float("inf")))

        mbarrier.wait(q_bar, 0)
        # delta = rowsum(O dO), in the layout the dO tile loads into, then stored for dK/dV.
        o_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        o_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, tile_columns(HEAD_D), layout=gl.SliceLayout(0, o_layout))
        o = gl.load(Out + b * stride_ob + h * stride_oh + gl.expand_dims(o_rows, 1) * stride_om
                    + gl.expand_dims(cols, 0),
                    mask=gl.expand_dims(o_rows < Sq, 1) & gl.expand_dims(cols < HEAD_D, 0),
                    other=0.0)
        do = do_smem.load(o_layout)
        delta = gl.sum(o.to(gl.float32) * do.to(gl.float32), 1)
        gl.store(DELTA + bh.to(gl.int64) * Sq + o_rows, delta, mask=o_rows < Sq)
        delta = gl.convert_layout(delta, rows_layout)

        dq = accumulator(ROWS, HEAD_D)
        mbarrier.wait(k_bars.index(0), 0)
        s_tok = contract(q_smem, box(k_smem, 0), gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout),
                         HEAD_D, True)
        mbarrier.wait(v_bars.index(0), 0)
        dp_tok = contract(do_smem, box(v_smem, 0),
                          gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), HEAD_D, True)
        s, dp = warpgroup_mma_wait(0, deps=[s_tok, dp_tok])
        # Blocks every row sees first, then the rest with index checks; the last block
        # apart, as it issues no next S and dP.
        split = gl.minimum(full_blocks, total - 1)
        s, dp, dq = _dq_blocks(0, split, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale,
                               dropout, q_smem, do_smem, k_smem, v_smem, k_bars, v_bars, k_free,
                               v_free, False, CAUSAL, DROPOUT, STAGES, BLOCK_N, s_layout,
                               ds_layout, HEAD_D)
        s, dp, dq = _dq_blocks(split, total - 1, s, dp, dq, lse, delta, qi, kv_len, off,
                               qk_scale, dropout, q_smem, do_smem, k_smem, v_smem, k_bars, v_bars,
                               k_free, v_free, True, CAUSAL, DROPOUT, STAGES, BLOCK_N, s_layout,
                               ds_layout, HEAD_D)
        s, dp, dq = _dq_step(total - 1, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale,
                             dropout, q_smem, do_smem, k_smem, v_smem, k_bars, v_bars, k_free,
                             v_free, True, CAUSAL, False, DROPOUT, STAGES, BLOCK_N, s_layout,
                             ds_layout, HEAD_D)
        store_accumulator(DQ + b * stride_dqb + h * stride_dqh, stride_dqm, row0, Sq, dq, scale,
                          HEAD_D)

    @gluon.jit
    def _dq_worker(ROLE: gl.constexpr, Out, LSE, DELTA, DQ, b, h, kvh, bh, m0, Sq, kv_len, off,
                   qk_scale, scale, total, full_blocks, seed, drop_p, stride_ob, stride_oh,
                   stride_om, stride_dqb, stride_dqh, stride_dqm, q_desc, do_desc, k_desc, v_desc,
                   q_box, do_box, k_smem, v_smem, q_bar, k_bars, v_bars, k_free, v_free,
                   HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   CAUSAL: gl.constexpr, DROPOUT: gl.constexpr):
        """ROLE 0: the second warpgroup's rows; ROLE 1: the loading warp (Q and dO on one
        barrier, then the K/V ring)."""
        if ROLE == 0:
            _dq_consume(Out, LSE, DELTA, DQ, b, h, bh, m0 + 64, Sq, kv_len, off, qk_scale, scale,
                        total, full_blocks, seed, drop_p, stride_ob, stride_oh, stride_om,
                        stride_dqb, stride_dqh, stride_dqm, box(q_box, 0).slice(64, 64),
                        box(do_box, 0).slice(64, 64), k_smem, v_smem, q_bar, k_bars, v_bars,
                        k_free, v_free, HEAD_D, BLOCK_N, STAGES, CAUSAL, DROPOUT)
        else:
            b32 = b.to(gl.int32)  # TMA coordinates are 32-bit
            h32 = h.to(gl.int32)
            mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b32, h32, m0, 0], q_bar, q_box.index(0))
            tma.async_copy_global_to_shared(do_desc, [b32, h32, m0, 0], q_bar, do_box.index(0))
            load_kv_ring(b32, kvh.to(gl.int32), 0, total, k_desc, v_desc,
                         (k_smem, v_smem, k_bars, v_bars, k_free, v_free), BLOCK_N, STAGES,
                         False)

    @gluon.jit
    def _dq_program(Hq, group, CAUSAL: gl.constexpr, HEAD_GROUP: gl.constexpr):
        """This program's query block and (batch * query head) of a (query blocks, B * Hq)
        grid, with its batch, head and kv head (int64); in the order of fused_triton's dQ
        kernel: HEAD_GROUP heads at a time, causal ones' later query blocks (more keys) first."""
        n_tiles = gl.num_programs(0)
        bh, pid_m = in_head_groups(gl.program_id(1) * n_tiles + gl.program_id(0), n_tiles,
                                   gl.num_programs(1), HEAD_GROUP)
        if CAUSAL:
            pid_m = n_tiles - 1 - pid_m
        b = (bh // Hq).to(gl.int64)
        h = (bh % Hq).to(gl.int64)
        return pid_m, bh, b, h, h // group

    @gluon.jit(do_not_specialize=["seed"])
    def dq_kernel(q_desc, k_desc, v_desc, Out, do_desc, LSE, DELTA, DQ, LENGTHS,
                  stride_ob, stride_oh, stride_om, stride_dqb, stride_dqh, stride_dqm,
                  Hq, group, Sq, Skv, qk_scale, scale, seed, drop_p,
                  HEAD_D: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                  DROPOUT: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  HEAD_GROUP: gl.constexpr):
        """One program per (128 query rows, batch * query head); 4 warps + 4 + 1 (WS). The
        four descriptors: (B, H, S, D) read in boxes of (1, 1, 128, D) (Q, dO) and (1, 1,
        BLOCK_N, D) (K, V: the forward's ring, kv_ring and load_kv_ring). seed, drop_p:
        as dkdv_kernel's."""
        BLOCK_M: gl.constexpr = 128
        pid_m, bh, b, h, kvh = _dq_program(Hq, group, CAUSAL, HEAD_GROUP)
        m0 = pid_m * BLOCK_M
        kv_len, off, total, full_blocks = key_blocks(LENGTHS, b, m0, Sq, Skv, BLOCK_M, BLOCK_N,
                                                     CAUSAL, HAS_LENGTHS)
        q_box = gl.allocate_shared_memory(q_desc.dtype, [1] + q_desc.block_shape,
                                          q_desc.layout)
        do_box = gl.allocate_shared_memory(do_desc.dtype, [1] + do_desc.block_shape,
                                           do_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        k_smem, v_smem, k_bars, v_bars, k_free, v_free = kv_ring(k_desc, STAGES, 2)
        gl.warp_specialize([
            (_dq_consume, (Out, LSE, DELTA, DQ, b, h, bh, m0, Sq, kv_len, off, qk_scale, scale,
                           total, full_blocks, seed, drop_p, stride_ob, stride_oh, stride_om,
                           stride_dqb, stride_dqh, stride_dqm, box(q_box, 0).slice(0, 64),
                           box(do_box, 0).slice(0, 64), k_smem, v_smem, q_bar, k_bars, v_bars,
                           k_free, v_free, HEAD_D, BLOCK_N, STAGES, CAUSAL, DROPOUT)),
            (_dq_worker, (0, Out, LSE, DELTA, DQ, b, h, kvh, bh, m0, Sq, kv_len, off, qk_scale,
                          scale, total, full_blocks, seed, drop_p, stride_ob, stride_oh,
                          stride_om, stride_dqb, stride_dqh, stride_dqm, q_desc, do_desc, k_desc,
                          v_desc, q_box, do_box, k_smem, v_smem, q_bar, k_bars, v_bars, k_free,
                          v_free, HEAD_D, BLOCK_N, STAGES, CAUSAL, DROPOUT)),
            (_dq_worker, (1, Out, LSE, DELTA, DQ, b, h, kvh, bh, m0, Sq, kv_len, off, qk_scale,
                          scale, total, full_blocks, seed, drop_p, stride_ob, stride_oh,
                          stride_om, stride_dqb, stride_dqh, stride_dqm, q_desc, do_desc, k_desc,
                          v_desc, q_box, do_box, k_smem, v_smem, q_bar, k_bars, v_bars, k_free,
                          v_free, HEAD_D, BLOCK_N, STAGES, CAUSAL, DROPOUT)),
        ], [4, 1], [232, 24])


# The dK/dV kernels' config by tile head dim (hopper_forward.head_block), checked and
# timed on an H200: (BLOCK_M, STAGES, KV_REGS) for dkdv_kernel (NOTES runs 20, 38, 39),
# (BLOCK_M, STAGES) for wide_dkdv_kernel (D=256). (32, 3) was 0.83-0.96x (64, 2) (run 20,
# P^T and dS^T through shared memory then); (32, 4) and (64, 3) gave wrong dK/dV before
# the mask was made per element, and (64, 3) at D=64 still does, without dropout (run 38).
# KV_REGS at D=64 was 1.01-1.07x without it (run 39); at D=128 K and V do not fit in
# registers. At D=256 (64, 2) takes 214 KB of shared memory; the backward with it ran
# 1.38-1.54x the Triton one, with (32, 2) 1.19-1.34x; (32, 3) computed wrong dK and dV
# wherever a step took the index checks, as dkdv_kernel's (64, 3) does at D=64 (NOTES runs
# 43, 60).
DKDV_CONFIG = {64: (64, 2, 1), 128: (64, 2, 0), 256: (64, 2)}
# With dropout: at D=128 (64, 2) spills (265 local-memory instructions: the mask on top of
# S^T, dP^T, dK and dV in registers) and (32, 2) does not (benchmarks/gluon_sass.py
# --dropout); at D=64 KV_REGS is spill-free with dropout too, but 0.985x without it
# (dropout_seed.py --pieces, run 39). At D=256 (64, 2) builds 25-27 local-memory
# instructions causal (none without) and ran 1.45-1.72x the Triton dK/dV kernel's backward
# at 512-4k, dropout 0.1; (32, 2), spill-free, 1.34-1.62x (NOTES run 62).
DKDV_DROPOUT_CONFIG = {64: (64, 2, 0), 128: (32, 2, 0), 256: (64, 2)}
# (BLOCK_N, STAGES): the dQ kernel's config by tile head dim. On an H200 at D=128 (64, 2) was
# 0.78-0.82x (64, 3); 128-key blocks spill and serialize the matmuls (NOTES runs 14, 22).
# At D=256 64-key blocks spill (379 local-memory instructions: dQ is 128 registers a
# thread) and 32-key ones do not; the backward ran 1.09-1.15x the Triton dQ kernel's with
# (32, 3) (230 KB of shared memory), 0.96-1.01x with (32, 2) (NOTES run 61).
DQ_CONFIG = {64: (64, 3), 128: (64, 3), 256: (32, 3)}


def launch_dkdv(q, k, v, dout, lse, delta, dk, dv, key_lengths, causal: bool, scale: float,
                seed=0, dropout_p: float = 0.0, config: tuple[int, ...] | None = None,
                head_group: int = 1, launcher=hopper_forward.run_kernel) -> None:
    """Write dk, dv (shaped like k, v (B, Hkv, Skv, D)) for q (B, Hq, Sq, D), dout (like
    q), lse and delta (B, Hq, Sq) float32 (delta = rowsum(out * dout), from the dQ
    kernel). The caller has checked that the call is one this kernel covers
    (fused_triton._hopper_backward_fits). seed: dropout's, as the forward took it (an
    int, or an int64 tensor on the call's device); dropout_p > 0 drops. config: (BLOCK_M,
    STAGES[, KV_REGS]) (KV_REGS as _dkdv_consume takes it, 0 if left out), None for the
    DKDV_CONFIG (DKDV_DROPOUT_CONFIG with dropout) at the tiles' head dim, head_block(D).
    Tiles wider than 128 take wide_dkdv_kernel, config (BLOCK_M, STAGES). head_group: how
    many (batch, kv head) pairs' programs start together, each one's first key block
    first. launcher: called as hopper_forward.run_kernel is."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    columns = hopper_forward.head_block(D)  # the configs are by the tiles' head dim
    lengths = key_lengths if key_lengths is not None else lse
    descriptor = hopper_forward.describe
    if config is None:
        config = (DKDV_DROPOUT_CONFIG if dropout_p > 0.0 else DKDV_CONFIG)[columns]
    if columns > 128:  # 64 keys a program
        block_m, stages = config
        kernel, keys, switches = wide_dkdv_kernel, 64, {}
    else:
        block_m, stages, *kv_regs = config
        kernel, keys = dkdv_kernel, 128
        switches = dict(KV_REGS=bool(kv_regs and kv_regs[0]))
    launcher(kernel, (-(-Skv // keys), B * Hkv), (
        descriptor(q, block_m), descriptor(k, keys), descriptor(v, keys),
        descriptor(dout, block_m), lse, delta, dk, dv, lengths,
        *dk.stride()[:3], *dv.stride()[:3],
        Hq, Hkv, Hq // Hkv, Sq, Skv, scale * hopper_forward.LOG2E, scale, seed, dropout_p,
    ), dict(HEAD_D=D, CAUSAL=causal, HAS_LENGTHS=key_lengths is not None,
            DROPOUT=dropout_p > 0.0, BLOCK_M=block_m, STAGES=stages, HEAD_GROUP=head_group,
            **switches),
        {"num_warps": 4, "maxnreg": 168})


def launch_dq(q, k, v, out, dout, lse, delta, dq, key_lengths, causal: bool, scale: float,
              seed=0, dropout_p: float = 0.0, config: tuple[int, int] | None = None,
              head_group: int = 1, launcher=hopper_forward.run_kernel) -> None:
    """Write dq (like q (B, Hq, Sq, D)) and delta (B, Hq, Sq) float32 = rowsum(out * dout)
    for the dK/dV kernel, from k, v (B, Hkv, Skv, D), out and dout (like q) and lse (B, Hq,
    Sq) float32. out, dq: unit stride along D. The caller has checked that the call is one
    this kernel covers (fused_triton._hopper_backward_fits). seed, dropout_p: as
    launch_dkdv's. config: (BLOCK_N, STAGES), None for DQ_CONFIG at head_block(D).
    head_group: how many (batch, query head) pairs' programs start together, causal ones'
    last query block first. launcher: called as hopper_forward.run_kernel is."""
    B, Hq, Sq, D = q.shape
    block_n, stages = DQ_CONFIG[hopper_forward.head_block(D)] if config is None else config
    lengths = key_lengths if key_lengths is not None else lse
    descriptor = hopper_forward.describe
    launcher(dq_kernel, (-(-Sq // 128), B * Hq), (
        descriptor(q, 128), descriptor(k, block_n), descriptor(v, block_n), out,
        descriptor(dout, 128), lse, delta, dq, lengths, *out.stride()[:3], *dq.stride()[:3],
        Hq, Hq // k.shape[1], Sq, k.shape[2], scale * hopper_forward.LOG2E, scale, seed,
        dropout_p,
    ), dict(HEAD_D=D, CAUSAL=causal, HAS_LENGTHS=key_lengths is not None,
            DROPOUT=dropout_p > 0.0, BLOCK_N=block_n, STAGES=stages, HEAD_GROUP=head_group),
        {"num_warps": 4, "maxnreg": 168})

"""The `triton` backend's forward for Hopper, in Gluon (Triton's lower-level language).

The Triton-language forward in `fused_triton` waits for each matmul right after issuing
it, so a warpgroup's softmax never runs while its own tensor-core work does (NOTES, run
10, `wgmma_waits.py`). Here the waits are explicit. Each key block's step (`_step`) takes
block j's row max, issues block j-1's P V, runs block j's exponentials while P V is on
the tensor cores, issues block j+1's Q K^T and only then waits (FlashAttention-3's
intra-warpgroup overlap; NOTES, run 14, says why in that order). K and V tiles arrive
through TMA into a ring of STAGES slots.

The kernel is warp-specialized: a program's query rows are two warpgroups of 64 (three,
192 rows, in two D=64 configs, after FlashAttention-3's tile there), each in its own
partition, and one more partition of one warp does the loading, so nothing ties the
warpgroups together: while one runs its softmax another's matmuls can run. (A version
whose computing warps also refilled the ring was slower on the H100, as Gluon puts a
CTA barrier before each copy and that kept the warpgroups in lockstep: NOTES run 14; it
is in git history up to 3280f9e.)

It covers the common case only, and `fused_triton` keeps the rest: an sm_90 GPU, fp16 or
bf16, D = Dv in (64, 128), a positive scale, causal or not, key_lengths, grouped heads;
no window, mask tensor or dropout; tensors that TMA can read. Gluon does not run under
TRITON_INTERPRET, so this file is tested on a GPU only (tests/test_triton.py).
"""

from __future__ import annotations

import re

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # an older Triton: `available` says so, nothing below is compiled
    gluon = None


# Gluon is experimental and its API moves between Triton releases (by 3.9 the TMA copy
# this file calls is gone, renamed async_load); the kernels here were written and checked
# on a GPU under Triton 3.6, so that is the only release they are offered on.
CHECKED_RELEASES = ((3, 6),)


def available() -> bool:
    """Whether this Triton is a release the kernels were checked under, with Gluon's
    Hopper operations."""
    if gluon is None:
        return False
    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return found is not None and (int(found[1]), int(found[2])) in CHECKED_RELEASES


if gluon is not None:

    @gluon.jit
    def issue(desc, row, bar, dest):
        mbarrier.expect(bar, desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [row, 0], bar, dest)

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
    def visible(qi, kj, kv_len, off, CAUSAL: gl.constexpr):
        """(rows, keys) bool: query qi sees key kj (key_lengths, and causal aligned to the
        bottom right, off = Skv - Sq)."""
        seen = gl.expand_dims(kj, 0) < kv_len
        if CAUSAL:
            seen = seen & (gl.expand_dims(kj, 0) <= gl.expand_dims(qi, 1) + off)
        return seen

    @gluon.jit
    def _row_max(s, m_i, qi, kj, kv_len, off, qk_scale,
                 MASKED: gl.constexpr, CAUSAL: gl.constexpr):
        """Block scores s (raw Q K^T) -> the scores to exponentiate (hidden ones -inf, in
        log2 units where MASKED; raw otherwise) and the new running max (log2 units)."""
        if MASKED:
            s = gl.where(visible(qi, kj, kv_len, off, CAUSAL), s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
        else:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        return s, m_new

    @gluon.jit
    def _exp(s, m_i, m_new, qk_scale, MASKED: gl.constexpr):
        """p = exp2 of the scores against the new max, and alpha, what the old running
        sums are scaled by."""
        if MASKED:
            # A row that has seen only hidden keys keeps max -inf; shifting by 0 keeps
            # exp2 at 0.
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s - gl.expand_dims(m_safe, 1))
        else:
            # Every key is visible: scale and shift share one multiply-add per score.
            m_safe = m_new
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_safe, 1))
        return p, gl.exp2(m_i - m_safe)

    @gluon.jit
    def _step(j, nxt, s, o, p_op, m_i, l_i, q_smem, k_smem, v_smem, k_bars, v_bars,
              k_free, v_free, qi, kv_len, off, qk_scale,
              MASKED: gl.constexpr, CAUSAL: gl.constexpr, HAS_PREV: gl.constexpr,
              HAS_NEXT: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
              s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
              LEAN: gl.constexpr):
        """Key block j, whose raw scores s are in registers: its softmax runs while block
        j-1's P V (HAS_PREV) is on the tensor cores; then block nxt's Q K^T is issued
        (HAS_NEXT) and its scores are what this returns, with o, block j's p as the P V
        operand, and the running max and sum.

        The order is what keeps the overlap: ptxas fills a stall with a matmul wait
        wherever one is free to move, so P V is issued after the row max (whose
        shuffles would be that stall) and waited for after the next Q K^T is issued,
        which has to follow the exponentials that read the score registers it reuses."""
        kj = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s, m_new = _row_max(s, m_i, qi, kj, kv_len, off, qk_scale, MASKED, CAUSAL)
        if HAS_PREV:
            v_slot = (j - 1) % STAGES
            mbarrier.wait(v_bars.index(v_slot), ((j - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_op, v_smem.index(v_slot), o, is_async=True)
        p, alpha = _exp(s, m_i, m_new, qk_scale, MASKED)
        l_i = l_i * alpha + gl.sum(p, 1)
        p_next = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        if LEAN:
            # Fewer registers live at once: P V(j-1) is waited for before Q K^T(j+1) is
            # issued, so that its scores can take p_op's registers. p_next among the
            # wait's operands keeps the wait below the exponentials.
            if HAS_PREV:
                o, _, p_next = warpgroup_mma_wait(0, deps=[o_tok, p_op, p_next])
                hold(p_op)
        if HAS_NEXT:
            k_slot = nxt % STAGES
            mbarrier.wait(k_bars.index(k_slot), (nxt // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(k_slot).permute((1, 0)),
                                  gl.zeros(s.shape, gl.float32, s_layout), use_acc=False,
                                  is_async=True)
        if not LEAN:
            if HAS_PREV:
                if HAS_NEXT:
                    o, _ = warpgroup_mma_wait(1, deps=[o_tok, p_op])
                else:
                    o, _ = warpgroup_mma_wait(0, deps=[o_tok, p_op])
                hold(p_op)
        o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        if HAS_NEXT:
            s = warpgroup_mma_wait(0, deps=[s_tok])
        # The matmuls that read these slots are done: tell the loading warp.
        if HAS_NEXT:
            mbarrier.arrive(k_free.index(k_slot), count=1)
        if HAS_PREV:
            mbarrier.arrive(v_free.index(v_slot), count=1)
        return s, o, p_next, m_new, l_i

    @gluon.jit
    def _blocks(first, last, s, o, p_op, m_i, l_i, q_smem, k_smem, v_smem, k_bars, v_bars,
                k_free, v_free, qi, kv_len, off, qk_scale,
                MASKED: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                BLOCK_N: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                p_layout: gl.constexpr, LEAN: gl.constexpr):
        """_step over key blocks [first, last), each followed by another."""
        for j in range(first, last):
            s, o, p_op, m_i, l_i = _step(j, j + 1, s, o, p_op, m_i, l_i, q_smem, k_smem,
                                         v_smem, k_bars, v_bars, k_free, v_free, qi, kv_len,
                                         off, qk_scale, MASKED, CAUSAL, True, True, STAGES,
                                         BLOCK_N, s_layout, o_layout, p_layout, LEAN)
        return s, o, p_op, m_i, l_i

    @gluon.jit
    def _consume(Out, LSE, b, h, bh, row0, Sq, kv_len, off, qk_scale, total, full_blocks,
                 stride_ob, stride_oh, stride_om, q_smem, k_smem, v_smem, q_bar, k_bars,
                 v_bars, k_free, v_free, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, CAUSAL: gl.constexpr, WARPGROUPS: gl.constexpr):
        """One warpgroup's rows [row0, row0 + 64) of one (batch, head): every key block in
        turn (_step), then out and lse stored."""
        ROWS: gl.constexpr = 64
        # Three warpgroups get 160 registers each, too few for _step's usual order.
        LEAN: gl.constexpr = WARPGROUPS == 3
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        qi = row0 + gl.arange(0, ROWS, layout=row_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([ROWS], gl.float32, row_layout)
        o = gl.zeros([ROWS, HEAD_D], gl.float32, o_layout)
        p_op = gl.zeros([ROWS, BLOCK_N], dtype, p_layout)

        # Block 0's Q K^T alone, then block 0 (index checks: it may be partly hidden, or
        # wholly), which issues block 1's (or, for a single block, block 0's again).
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                          gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False)
        mbarrier.arrive(k_free.index(0), count=1)
        s, o, p_op, m_i, l_i = _step(0, gl.minimum(1, total - 1), s, o, p_op, m_i, l_i,
                                     q_smem, k_smem, v_smem, k_bars, v_bars, k_free, v_free,
                                     qi, kv_len, off, qk_scale, True, CAUSAL, False, True,
                                     STAGES, BLOCK_N, s_layout, o_layout, p_layout, LEAN)
        # Blocks 1 .. total-2, those every row sees first; the last block apart, as it
        # issues no next Q K^T.
        split = gl.maximum(gl.minimum(full_blocks, total - 1), 1)
        s, o, p_op, m_i, l_i = _blocks(1, split, s, o, p_op, m_i, l_i, q_smem, k_smem,
                                       v_smem, k_bars, v_bars, k_free, v_free, qi, kv_len,
                                       off, qk_scale, False, CAUSAL, STAGES, BLOCK_N,
                                       s_layout, o_layout, p_layout, LEAN)
        s, o, p_op, m_i, l_i = _blocks(split, total - 1, s, o, p_op, m_i, l_i, q_smem,
                                       k_smem, v_smem, k_bars, v_bars, k_free, v_free, qi,
                                       kv_len, off, qk_scale, True, CAUSAL, STAGES, BLOCK_N,
                                       s_layout, o_layout, p_layout, LEAN)
        if total > 1:
            s, o, p_op, m_i, l_i = _step(total - 1, total - 1, s, o, p_op, m_i, l_i, q_smem,
                                         k_smem, v_smem, k_bars, v_bars, k_free, v_free, qi,
                                         kv_len, off, qk_scale, True, CAUSAL, True, False,
                                         STAGES, BLOCK_N, s_layout, o_layout, p_layout, LEAN)
        # The last block's P V.
        last = total - 1
        mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
        o = warpgroup_mma(p_op, v_smem.index(last % STAGES), o)

        # A row that saw no key: l = 0, out = 0, lse = -inf.
        dead = l_i == 0.0
        lse = gl.where(dead, float("-inf"),
                       (m_i + gl.log2(gl.where(dead, 1.0, l_i))) * 0.6931471805599453)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        l_o = gl.convert_layout(gl.where(dead, 1.0, l_i), o_rows)
        out = o / gl.expand_dims(l_o, 1)
        rows = row0 + gl.arange(0, ROWS, layout=o_rows)
        cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = (Out + b * stride_ob + h * stride_oh
                  + gl.expand_dims(rows, 1) * stride_om + gl.expand_dims(cols, 0))
        gl.store(o_ptrs, out.to(dtype),
                 mask=gl.expand_dims(rows < Sq, 1) & gl.expand_dims(cols < HEAD_D, 0))
        gl.store(LSE + bh.to(gl.int64) * Sq + qi, lse, mask=qi < Sq)

    @gluon.jit
    def program(Hq, group, CAUSAL: gl.constexpr):
        """This program's query block and (batch * query head) of a (query blocks, B * Hq)
        grid, with its batch, head and kv head (int64)."""
        pid_m = gl.program_id(0)
        if CAUSAL:  # later query blocks see more keys: start them first
            pid_m = gl.num_programs(0) - 1 - pid_m
        bh = gl.program_id(1)
        b = (bh // Hq).to(gl.int64)
        h = (bh % Hq).to(gl.int64)
        return pid_m, bh, b, h, h // group

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
    def kv_ring(dtype: gl.constexpr, layout: gl.constexpr, STAGES: gl.constexpr,
                BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, WARPGROUPS: gl.constexpr):
        """Shared memory for a ring of STAGES K and V tiles, and its mbarriers: ready
        (TMA bytes, one arrival) and free (one arrival per computing warpgroup)."""
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], layout)
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
            mbarrier.init(k_free.index(i), count=WARPGROUPS)
            mbarrier.init(v_free.index(i), count=WARPGROUPS)
        return k_smem, v_smem, k_bars, v_bars, k_free, v_free

    @gluon.jit
    def _produce(m0, total, q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bars,
                 v_bars, k_free, v_free, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 WARPGROUPS: gl.constexpr):
        """The loading warp: Q, then the K/V ring (load_kv_ring)."""
        # Q in boxes of q_desc's rows, under one expect (each expect is an arrival too).
        BOX: gl.constexpr = q_desc.block_type.shape[0]
        BOXES: gl.constexpr = 64 * WARPGROUPS // BOX
        mbarrier.expect(q_bar, BOXES * q_desc.block_type.nbytes)
        for i in gl.static_range(BOXES):
            tma.async_copy_global_to_shared(q_desc, [m0 + BOX * i, 0], q_bar,
                                            q_smem.slice(BOX * i, BOX))
        load_kv_ring(total, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, k_free, v_free,
                     BLOCK_N, STAGES)

    @gluon.jit
    def load_kv_ring(total, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, k_free, v_free,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """K and V of key blocks 0 .. total-1, each into the ring's next slot once every
        computing warpgroup has let it go (k_free / v_free, one arrival each a phase)."""
        for j in range(total):
            slot = j % STAGES
            # A fresh barrier counts as having completed the phase before its first, so
            # the first round over the ring does not wait.
            free_phase = ((j // STAGES) & 1) ^ 1
            mbarrier.wait(k_free.index(slot), free_phase)
            issue(k_desc, j * BLOCK_N, k_bars.index(slot), k_smem.index(slot))
            mbarrier.wait(v_free.index(slot), free_phase)
            issue(v_desc, j * BLOCK_N, v_bars.index(slot), v_smem.index(slot))

    @gluon.jit
    def _partition(ROLE: gl.constexpr, shared, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, WARPGROUPS: gl.constexpr):
        """ROLE r < WARPGROUPS: warpgroup r's 64 rows (r = 0 is the default partition);
        ROLE WARPGROUPS: the loading warp. shared: what every partition takes."""
        (Out, LSE, b, h, bh, m0, Sq, kv_len, off, qk_scale, total, full_blocks, stride_ob,
         stride_oh, stride_om, q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bars,
         v_bars, k_free, v_free) = shared
        if ROLE < WARPGROUPS:
            row: gl.constexpr = 64 * ROLE
            _consume(Out, LSE, b, h, bh, m0 + row, Sq, kv_len, off, qk_scale, total,
                     full_blocks, stride_ob, stride_oh, stride_om, q_smem.slice(row, 64),
                     k_smem, v_smem, q_bar, k_bars, v_bars, k_free, v_free, HEAD_D, BLOCK_N,
                     STAGES, CAUSAL, WARPGROUPS)
        else:
            _produce(m0, total, q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar,
                     k_bars, v_bars, k_free, v_free, BLOCK_N, STAGES, WARPGROUPS)

    @gluon.jit
    def forward_kernel(Q, K, V, Out, LSE, LENGTHS,
                       stride_qb, stride_qh, stride_qm,
                       stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn,
                       stride_ob, stride_oh, stride_om,
                       Hq, group, Sq, Skv, qk_scale,
                       HEAD_D: gl.constexpr, CAUSAL: gl.constexpr,
                       HAS_LENGTHS: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, WARPGROUPS: gl.constexpr):
        """One program per (64 * WARPGROUPS queries, batch * query head): out (B, Hq, Sq,
        D) and lse (B * Hq * Sq, natural log) for the rows of its block, like
        fused_triton's forward. WARPGROUPS (2 or 3) warpgroups of 64 rows run apart,
        each in its own partition, and one more warp loads the tiles, so no CTA-wide
        barrier ties them together."""
        gl.static_assert((WARPGROUPS == 2) or (WARPGROUPS == 3), "2 or 3 warpgroups")
        BLOCK_M: gl.constexpr = 64 * WARPGROUPS
        dtype: gl.constexpr = Q.dtype.element_ty
        # Shared-memory shapes are powers of 2: 192 rows of Q come in as three 64-row
        # boxes into a 256-row buffer.
        Q_BOX: gl.constexpr = BLOCK_M if WARPGROUPS == 2 else 64
        Q_ROWS: gl.constexpr = BLOCK_M if WARPGROUPS == 2 else 256
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_BOX, HEAD_D], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D],
                                                                        dtype)
        pid_m, bh, b, h, kvh = program(Hq, group, CAUSAL)
        q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [Sq, HEAD_D],
                                            [stride_qm, 1], [Q_BOX, HEAD_D], q_layout)
        k_desc = tma.make_tensor_descriptor(K + b * stride_kb + kvh * stride_kh,
                                            [Skv, HEAD_D], [stride_kn, 1],
                                            [BLOCK_N, HEAD_D], kv_layout)
        v_desc = tma.make_tensor_descriptor(V + b * stride_vb + kvh * stride_vh,
                                            [Skv, HEAD_D], [stride_vn, 1],
                                            [BLOCK_N, HEAD_D], kv_layout)

        m0 = pid_m * BLOCK_M
        kv_len, off, total, full_blocks = key_blocks(LENGTHS, b, m0, Sq, Skv, BLOCK_M,
                                                     BLOCK_N, CAUSAL, HAS_LENGTHS)
        q_smem = gl.allocate_shared_memory(dtype, [Q_ROWS, HEAD_D], q_layout)
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        q_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
        mbarrier.init(q_bar, count=1)
        k_smem, v_smem, k_bars, v_bars, k_free, v_free = kv_ring(dtype, kv_layout, STAGES,
                                                                 BLOCK_N, HEAD_D, WARPGROUPS)
        # What every partition takes (_partition unpacks it).
        shared = (Out, LSE, b, h, bh, m0, Sq, kv_len, off, qk_scale, total, full_blocks,
                  stride_ob, stride_oh, stride_om, q_desc, k_desc, v_desc, q_smem, k_smem,
                  v_smem, q_bar, k_bars, v_bars, k_free, v_free)
        # Registers: the launch's maxnreg fills the register file with every warp at the
        # same count; setmaxnreg then moves them from the loading warp's warpgroup (24) to
        # the computing ones.
        if WARPGROUPS == 2:
            gl.warp_specialize([
                (_partition, (0, shared, HEAD_D, BLOCK_N, STAGES, CAUSAL, WARPGROUPS)),
                (_partition, (1, shared, HEAD_D, BLOCK_N, STAGES, CAUSAL, WARPGROUPS)),
                (_partition, (2, shared, HEAD_D, BLOCK_N, STAGES, CAUSAL, WARPGROUPS)),
            ], [4, 1], [232, 24])
        else:
            gl.warp_specialize([
                (_partition, (0, shared, HEAD_D, BLOCK_N, STAGES, CAUSAL, WARPGROUPS)),
                (_partition, (1, shared, HEAD_D, BLOCK_N, STAGES, CAUSAL, WARPGROUPS)),
                (_partition, (2, shared, HEAD_D, BLOCK_N, STAGES, CAUSAL, WARPGROUPS)),
                (_partition, (3, shared, HEAD_D, BLOCK_N, STAGES, CAUSAL, WARPGROUPS)),
            ], [4, 4, 1], [160, 160, 24])


# (BLOCK_N, STAGES, WARPGROUPS) per head dim: the tile configs the GPU test checks and
# benchmarks/gluon_forward.py times; fused_triton runs (128, 2, 2) (NOTES run 14). Three
# warpgroups (192 query rows) at D=64 follow FlashAttention-3's tile there; not yet run
# on a GPU (NOTES run 15).
CONFIGS = {64: [(128, 2, 2), (128, 3, 2), (128, 2, 3), (64, 3, 3)],
           128: [(128, 2, 2), (128, 3, 2)]}
# maxnreg at launch: 12 warps (2 computing warpgroups and the loading warp's, padded) at
# 168 registers, or 16 at 128, fill the 64K-register file.
_MAXNREG = {2: 168, 3: 128}


def launch(q, k, v, out, lse, key_lengths, causal: bool, scale: float,
           config: tuple[int, int, int]) -> None:
    """Run the kernel on q (B, Hq, Sq, D), k, v (B, Hkv, Skv, D), writing out (like q) and
    lse (B, Hq, Sq, float32); the caller has checked that the call is one it covers.
    config: (BLOCK_N, STAGES, WARPGROUPS)."""
    block_n, stages, warpgroups = config
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    lengths = key_lengths if key_lengths is not None else lse
    grid = (-(-Sq // (64 * warpgroups)), B * Hq)
    forward_kernel[grid](
        q, k, v, out, lse, lengths,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // k.shape[1], Sq, Skv, scale * 1.4426950408889634,
        HEAD_D=D, CAUSAL=causal, HAS_LENGTHS=key_lengths is not None,
        BLOCK_N=block_n, STAGES=stages, WARPGROUPS=warpgroups, num_warps=4,
        maxnreg=_MAXNREG[warpgroups])

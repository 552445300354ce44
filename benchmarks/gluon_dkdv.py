"""Experiment, not wired in: the backward's dK/dV kernel in Gluon. Run 15 (H200): correct
at (32, 3) but 0.90-0.98x the Triton kernel at D=128 and 0.73x at D=64; (32, 2) still
faults (an illegal address on the first case), cause not found (NOTES, run 15). Run 19
added P_SMEM, which lets BLOCK_M 64 fit in registers. Run 20 (H200): (64, 2, 1) passes
every check once the key mask is per element, and runs 1.02-1.19x the Triton kernel;
(64, 2, 0) still gives wrong dK/dV on a partial key block, cause not found (NOTES run 20).

    PYTHONPATH=src python benchmarks/gluon_dkdv.py [--out DIR] [--rounds 3]
        [--shape B,H,S,D,CAUSAL ...] [--config BLOCK_M,STAGES[,P_SMEM] ...] [--check-only]

fused_triton's dK/dV kernel (one program per key block and (batch, kv head): over the
query blocks of every query head of the group, S^T = K Q^T, P^T = exp2(S^T - lse),
dP^T = V dO^T, dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q; deterministic)
rebuilt with hopper_forward's WS layout: 128 keys as two warpgroups of 64 in partitions
of their own, and a loading warp that brings K and V once, then Q and dO of each query
block into a ring. Q and dO are read through (heads, queries, D) descriptors, so that a
kv group's query heads need no descriptor of their own. In a warpgroup, P^T's
exponentials run while dP^T is on the tensor cores; everything is waited for before the
next query block (a product in flight across the loop's back edge serializes them all,
NOTES run 14).

Checked against fused_triton's dk, dv (and the oracle's) on awkward shapes first; then
fused_triton's dK/dV kernel (autotuned) and each config are timed alone in turns. The
delta both read comes from fused_triton's dQ kernel. Writes DIR/gluon_dkdv.json.
"""

from __future__ import annotations

import torch
from gluon_dq import inputs, lse_log2, triton_dq
from gluon_forward import (  # beside this script
    experiment_parser,
    record,
    run_experiment,
    time_against_triton,
)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from attnkit import attention
from attnkit.backends import fused_triton as ft
from attnkit.backends.hopper_forward import hold, score_layout
from attnkit.verify import rel_err

LOG2E = 1.4426950408889634


@gluon.jit
def _dkdv_step(t, m0, head, dk, dv, kj, kv_len, off, qk_scale, LSE, DELTA, lse_base, Sq,
               k_smem, v_smem, q_ring, do_ring, ready, free, pt_buf, dst_buf, rows_ring,
               MASKED: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
               BLOCK_M: gl.constexpr, s_layout: gl.constexpr, op_layout: gl.constexpr,
               P_SMEM: gl.constexpr):
    """Step t of the walk: the query rows [m0, m0 + BLOCK_M) of the group's query head
    `head`. S^T and dP^T issued; P^T's exponentials under dP^T; dV's product, dS^T under
    it, dK's; all waited for before the slot goes back to the loading warp. P_SMEM: P^T
    and dS^T reach their products through shared memory (pt_buf, dst_buf) instead of
    registers, so that neither stays in registers while its product runs (BLOCK_M 64
    did not fit otherwise, NOTES run 15); and lse (in log2 units) and delta come from
    rows_ring, where the loading warp put them beside Q and dO: per-column pointers into
    LSE and DELTA took 32 registers a vector."""
    KEYS: gl.constexpr = 64
    slot = t % STAGES
    qi = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    if not P_SMEM:
        row = lse_base + head * Sq + qi
        lse = lse_log2(gl.load(LSE + row, mask=qi < Sq, other=float("inf")))
        delta = gl.load(DELTA + row, mask=qi < Sq, other=0.0)
    mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
    if P_SMEM:
        lse = rows_ring.index(slot).load(gl.SliceLayout(0, s_layout))
    q = q_ring.index(slot).reshape([BLOCK_M, q_ring.shape[3]])  # the (1, BLOCK_M, D) box
    do = do_ring.index(slot).reshape([BLOCK_M, do_ring.shape[3]])
    s_tok = warpgroup_mma(k_smem, q.permute((1, 0)),
                          gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                          use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(v_smem, do.permute((1, 0)),
                           gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                           use_acc=False, is_async=True)
    s = warpgroup_mma_wait(1, deps=[s_tok])
    if MASKED:
        seen = gl.expand_dims(kj, 1) < kv_len
        if CAUSAL:
            seen = seen & (gl.expand_dims(kj, 1) <= gl.expand_dims(qi, 0) + off)
        else:
            # Always true, but it makes the mask per element, as causal's is. With the
            # per-key mask alone, (64, 2, 1) gave wrong and run-to-run different dK/dV
            # wherever a warpgroup took this step (Skv not a multiple of 128, key
            # lengths); its PTX and SASS looked right. Cause not found (NOTES run 20).
            seen = seen & (gl.expand_dims(qi, 0) < Sq + BLOCK_M)
        s = gl.where(seen, s * qk_scale, float("-inf"))
        p = gl.exp2(s - gl.expand_dims(lse, 0))
    else:
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 0))
    # dV's product needs P^T only: issued before dP^T is waited for, it pins that wait
    # below every exponential (ptxas would move a free-standing wait up into the first
    # stall, NOTES run 14), and dS^T then runs under it.
    if P_SMEM:
        pt_buf.store(p.to(q.dtype))
        fence_async_shared()
        gl.thread_barrier()
        dv_tok = warpgroup_mma(pt_buf, do, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=[dp_tok])
        delta = rows_ring.index(STAGES + slot).load(gl.SliceLayout(0, s_layout))
        dst_buf.store((p * (dp - gl.expand_dims(delta, 0))).to(q.dtype))
        fence_async_shared()
        gl.thread_barrier()
        dk_tok = warpgroup_mma(dst_buf, q, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok])
    else:
        p_op = gl.convert_layout(p.to(q.dtype), op_layout)
        dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=[dp_tok])
        ds_op = gl.convert_layout((p * (dp - gl.expand_dims(delta, 0))).to(q.dtype),
                                  op_layout)
        dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
        dv, dk, _, _ = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, p_op, ds_op])
        hold(p_op)
        hold(ds_op)
    mbarrier.arrive(free.index(slot), count=1)
    return dk, dv


@gluon.jit
def _dkdv_consume(DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale, scale,
                  group, Hq, first_block, n_blocks, stride_dkb, stride_dkh, stride_dkn,
                  stride_dvb, stride_dvh, stride_dvn, k_smem, v_smem, kv_bar, q_ring, do_ring,
                  ready, free, pt_buf, dst_buf, rows_ring, HEAD_D: gl.constexpr,
                  BLOCK_M: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL: gl.constexpr, P_SMEM: gl.constexpr):
    """One warpgroup's 64 keys [n0, n0 + 64): dK and dV over the query blocks
    first_block.. of every query head of the group, stored (dK scaled). pt_buf, dst_buf:
    the warpgroup's own (64, BLOCK_M) buffers for P^T and dS^T (P_SMEM)."""
    KEYS: gl.constexpr = 64
    s_layout: gl.constexpr = score_layout(BLOCK_M)
    d_layout: gl.constexpr = score_layout(HEAD_D)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout,
                                                  k_width=2)
    kj = n0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([KEYS, HEAD_D], gl.float32, d_layout)
    dv = gl.zeros([KEYS, HEAD_D], gl.float32, d_layout)
    lse_base = (b * Hq + kvh * group) * Sq
    mbarrier.wait(kv_bar, 0)
    for t in range(group * n_blocks):
        head = t // n_blocks
        m0 = (first_block + t % n_blocks) * BLOCK_M
        # Every key of the warpgroup below kv_len and (causal) seen by the block's first
        # query: no index checks.
        whole = n0 + KEYS <= kv_len
        if CAUSAL:
            whole = whole & (n0 + KEYS - 1 <= m0 + off)
        if whole:
            dk, dv = _dkdv_step(t, m0, head, dk, dv, kj, kv_len, off, qk_scale, LSE, DELTA,
                                lse_base, Sq, k_smem, v_smem, q_ring, do_ring, ready, free,
                                pt_buf, dst_buf, rows_ring, False, CAUSAL, STAGES, BLOCK_M,
                                s_layout, op_layout, P_SMEM)
        else:
            dk, dv = _dkdv_step(t, m0, head, dk, dv, kj, kv_len, off, qk_scale, LSE, DELTA,
                                lse_base, Sq, k_smem, v_smem, q_ring, do_ring, ready, free,
                                pt_buf, dst_buf, rows_ring, True, CAUSAL, STAGES, BLOCK_M,
                                s_layout, op_layout, P_SMEM)
    rows = n0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, d_layout))
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, d_layout))
    ok = gl.expand_dims(rows < Skv, 1) & gl.expand_dims(cols < HEAD_D, 0)
    gl.store(DK + b * stride_dkb + kvh * stride_dkh + gl.expand_dims(rows, 1) * stride_dkn
             + gl.expand_dims(cols, 0), (dk * scale).to(k_smem.dtype), mask=ok)
    gl.store(DV + b * stride_dvb + kvh * stride_dvh + gl.expand_dims(rows, 1) * stride_dvn
             + gl.expand_dims(cols, 0), dv.to(k_smem.dtype), mask=ok)


@gluon.jit
def _dkdv_produce(LSE, DELTA, b, Hq, Sq, kvh, group, n0, first_block, n_blocks, k_desc,
                  v_desc, q_desc, do_desc, k_smem, v_smem, kv_bar, q_ring, do_ring, ready,
                  free, rows_ring, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                  P_SMEM: gl.constexpr):
    """The loading warp: K and V of the key block once, then Q and dO of each step of the
    walk into the ring, once both warpgroups have let the slot go; with P_SMEM, the
    step's lse (log2 units) and delta too, stored before the arrival that the ring's
    TMA loads complete."""
    row_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [n0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [n0, 0], kv_bar, v_smem)
    for t in range(group * n_blocks):
        slot = t % STAGES
        mbarrier.wait(free.index(slot), ((t // STAGES) & 1) ^ 1)
        h = (kvh * group + t // n_blocks).to(gl.int32)  # TMA coordinates are 32-bit
        m0 = (first_block + t % n_blocks) * BLOCK_M
        bar = ready.index(slot)
        if P_SMEM:
            qi = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
            row = (b * Hq + h) * Sq + qi
            rows_ring.index(slot).store(lse_log2(gl.load(LSE + row, mask=qi < Sq,
                                                         other=float("inf"))))
            rows_ring.index(STAGES + slot).store(gl.load(DELTA + row, mask=qi < Sq,
                                                         other=0.0))
            gl.thread_barrier()  # every lane's stores before the arrival that releases them
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [h, m0, 0], bar, q_ring.index(slot))
        tma.async_copy_global_to_shared(do_desc, [h, m0, 0], bar, do_ring.index(slot))


@gluon.jit
def _dkdv_worker(ROLE: gl.constexpr, DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off,
                 qk_scale, scale, group, Hq, first_block, n_blocks, stride_dkb, stride_dkh,
                 stride_dkn, stride_dvb, stride_dvh, stride_dvn, k_desc, v_desc, q_desc,
                 do_desc, k_smem, v_smem, kv_bar, q_ring, do_ring, ready, free, pt_smem,
                 dst_smem, rows_ring, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr,
                 STAGES: gl.constexpr, CAUSAL: gl.constexpr, P_SMEM: gl.constexpr):
    """ROLE 0: the second warpgroup's keys; ROLE 1: the loading warp."""
    if ROLE == 0:
        _dkdv_consume(DK, DV, LSE, DELTA, b, kvh, n0 + 64, Sq, Skv, kv_len, off, qk_scale,
                      scale, group, Hq, first_block, n_blocks, stride_dkb, stride_dkh,
                      stride_dkn, stride_dvb, stride_dvh, stride_dvn, k_smem.slice(64, 64),
                      v_smem.slice(64, 64), kv_bar, q_ring, do_ring, ready, free,
                      pt_smem.index(1), dst_smem.index(1), rows_ring, HEAD_D, BLOCK_M, STAGES,
                      CAUSAL, P_SMEM)
    else:
        _dkdv_produce(LSE, DELTA, b, Hq, Sq, kvh, group, n0, first_block, n_blocks, k_desc,
                      v_desc, q_desc, do_desc, k_smem, v_smem, kv_bar, q_ring, do_ring, ready,
                      free, rows_ring, BLOCK_M, STAGES, P_SMEM)


# With group == 1 specialised as a constant (Triton's default for an int that is 1), key
# blocks that take the index-checked step came out wrong or faulted (H200, Triton 3.6;
# NOTES run 15); unspecialised, the same cases pass.
@gluon.jit(do_not_specialize=["group"])
def dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, LENGTHS,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                Hq, Hkv, group, Sq, Skv, qk_scale, scale,
                HEAD_D: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
                BLOCK_M: gl.constexpr, STAGES: gl.constexpr, P_SMEM: gl.constexpr):
    """One program per (128 keys, batch * kv head); 4 warps + 4 + 1 (WS)."""
    BLOCK_N: gl.constexpr = 128
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, BLOCK_M, HEAD_D], dtype)
    n0 = gl.program_id(0) * BLOCK_N
    bh = gl.program_id(1)
    b = (bh // Hkv).to(gl.int64)
    kvh = (bh % Hkv).to(gl.int64)
    k_desc = tma.make_tensor_descriptor(K + b * stride_kb + kvh * stride_kh, [Skv, HEAD_D],
                                        [stride_kn, 1], [BLOCK_N, HEAD_D], kv_layout)
    v_desc = tma.make_tensor_descriptor(V + b * stride_vb + kvh * stride_vh, [Skv, HEAD_D],
                                        [stride_vn, 1], [BLOCK_N, HEAD_D], kv_layout)
    # (heads, queries, D) over the batch's query heads: a kv group's heads share them.
    q_desc = tma.make_tensor_descriptor(Q + b * stride_qb, [Hq, Sq, HEAD_D],
                                        [stride_qh, stride_qm, 1], [1, BLOCK_M, HEAD_D],
                                        q_layout)
    do_desc = tma.make_tensor_descriptor(DO + b * stride_dob, [Hq, Sq, HEAD_D],
                                         [stride_doh, stride_dom, 1], [1, BLOCK_M, HEAD_D],
                                         q_layout)
    off = Skv - Sq
    kv_len = Skv
    if HAS_LENGTHS:
        kv_len = gl.minimum(gl.load(LENGTHS + b).to(gl.int32), Skv)
    # The query blocks that can see a key of this block: from the one holding the first
    # query that sees key n0 (causal: n0 - off) to the last; none past kv_len.
    first_block = 0
    if CAUSAL:
        first_block = gl.maximum(n0 - off, 0) // BLOCK_M
    n_blocks = gl.maximum(gl.cdiv(Sq, BLOCK_M) - first_block, 0)
    n_blocks = gl.where(n0 < kv_len, n_blocks, 0)

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_D], kv_layout)
    q_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_D], q_layout)
    do_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_D], q_layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    # P^T and dS^T of each computing warpgroup (P_SMEM; one row otherwise, unused).
    pt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_M], dtype)
    pt_rows: gl.constexpr = 64 if P_SMEM else 1
    pt_smem = gl.allocate_shared_memory(dtype, [2, pt_rows, BLOCK_M], pt_layout)
    dst_smem = gl.allocate_shared_memory(dtype, [2, pt_rows, BLOCK_M], pt_layout)
    # lse of ring slot i at row i, delta at row STAGES + i (P_SMEM)
    rows_ring = gl.allocate_shared_memory(gl.float32, [2 * STAGES, BLOCK_M],
                                          gl.SwizzledSharedLayout(1, 1, 1, [0]))
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=2)  # one arrival per computing warpgroup
    # Registers per computing thread: 240 leaves the loading warp's warpgroup 24 of the
    # 64K; BLOCK_M 64 with P_SMEM needs them all (4 bytes of spills causal, 176 full at
    # D=128, against 232's 44 and 204).
    REGISTERS: gl.constexpr = 240 if P_SMEM else 232
    gl.warp_specialize([
        (_dkdv_consume, (DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale,
                         scale, group, Hq, first_block, n_blocks, stride_dkb, stride_dkh,
                         stride_dkn, stride_dvb, stride_dvh, stride_dvn, k_smem.slice(0, 64),
                         v_smem.slice(0, 64), kv_bar, q_ring, do_ring, ready, free,
                         pt_smem.index(0), dst_smem.index(0), rows_ring, HEAD_D, BLOCK_M,
                         STAGES, CAUSAL, P_SMEM)),
        (_dkdv_worker, (0, DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale,
                        scale, group, Hq, first_block, n_blocks, stride_dkb, stride_dkh,
                        stride_dkn, stride_dvb, stride_dvh, stride_dvn, k_desc, v_desc,
                        q_desc, do_desc, k_smem, v_smem, kv_bar, q_ring, do_ring, ready,
                        free, pt_smem, dst_smem, rows_ring, HEAD_D, BLOCK_M, STAGES, CAUSAL,
                        P_SMEM)),
        (_dkdv_worker, (1, DK, DV, LSE, DELTA, b, kvh, n0, Sq, Skv, kv_len, off, qk_scale,
                        scale, group, Hq, first_block, n_blocks, stride_dkb, stride_dkh,
                        stride_dkn, stride_dvb, stride_dvh, stride_dvn, k_desc, v_desc,
                        q_desc, do_desc, k_smem, v_smem, kv_bar, q_ring, do_ring, ready,
                        free, pt_smem, dst_smem, rows_ring, HEAD_D, BLOCK_M, STAGES, CAUSAL,
                        P_SMEM)),
    ], [4, 1], [REGISTERS, 24])


def gluon_dkdv(call, lse, dout, delta, config=(64, 2, 1)):
    """dk, dv for `call` through dkdv_kernel (delta: rowsum(O dO), from a dQ kernel).
    config: (BLOCK_M, STAGES[, P_SMEM])."""
    block_m, stages, p_smem = (*config, 0)[:3]
    q, k, v = call.q, call.k, call.v
    B, Hq, Sq, D = q.shape
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    lengths = call.key_lengths if call.key_lengths is not None else lse
    ft._ensure_allocator()
    dkdv_kernel[(-(-call.seq_kv // 128), B * call.heads_kv)](
        q, k, v, dout, lse, delta, dk, dv, lengths,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3],
        Hq, call.heads_kv, call.group, Sq, call.seq_kv, call.scale * LOG2E, call.scale,
        HEAD_D=D, CAUSAL=call.causal, HAS_LENGTHS=call.key_lengths is not None,
        BLOCK_M=block_m, STAGES=stages, P_SMEM=bool(p_smem), num_warps=4, maxnreg=168)
    return dk, dv


def triton_dkdv(call, lse, dout, delta):
    """fused_triton's dK/dV kernel alone, launched as _backward launches it: dk, dv."""
    _, dk, dv = ft._empty_grads(call.q, call.k, call.v)
    ft._launch_dkdv(call, ft._backward_shared(call, 0, lse, dout), lse, dout, delta, dk, dv)
    return dk, dv


# (B, Hq, Hkv, Sq, Skv, D, causal, key lengths)
CASES = [
    (2, 4, 2, 1000, 1000, 128, True, None),
    (2, 4, 4, 1000, 1000, 64, False, None),
    (1, 2, 2, 17, 1000, 128, True, None),  # 17 queries against 1000 keys
    (2, 2, 2, 700, 300, 128, False, [0, 255]),  # batch 0: every key hidden
    (2, 4, 1, 700, 700, 64, True, [700, 333]),
]
SHAPES = [(4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (1, 16, 16384, 128, False),
          (1, 16, 16384, 128, True), (4, 32, 4096, 64, False)]


def _inputs(*case):
    """gluon_dq.inputs (a call, the Triton forward's out and lse, a random dO), without
    out, and with the delta of the Triton dQ kernel."""
    call, out, lse, dout = inputs(*case)
    _, delta = triton_dq(call, out, lse, dout)
    return call, lse, dout, delta


def check(configs) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for case in CASES:
        call, lse, dout, delta = _inputs(*case, gen)
        want_dk, want_dv = triton_dkdv(call, lse, dout, delta)
        k64, v64 = (t.double().requires_grad_() for t in (call.k, call.v))
        ref = attention(call.q.double(), k64, v64, causal=call.causal,
                        key_lengths=call.key_lengths, impl="reference")
        oracle_dk, oracle_dv = torch.autograd.grad(ref, (k64, v64), dout.double())
        for config in configs:
            dk, dv = gluon_dkdv(call, lse, dout, delta, config)
            torch.cuda.synchronize()
            errs = {"dk_vs_triton": rel_err(dk, want_dk), "dv_vs_triton": rel_err(dv, want_dv),
                    "dk_vs_oracle": rel_err(dk, oracle_dk), "dv_vs_oracle": rel_err(dv, oracle_dv)}
            ok = errs["dk_vs_oracle"] < 1e-2 and errs["dv_vs_oracle"] < 1e-2
            record(rows, case, config, errs, ok)
    return rows


def time_shape(shape, configs, rounds: int) -> dict:
    return time_against_triton(shape, configs, rounds, _inputs, triton_dkdv, gluon_dkdv, 4,
                               " (dK/dV kernel alone)")


def main() -> None:
    args = experiment_parser(__doc__, 3, "BLOCK_M,STAGES[,P_SMEM]").parse_args()
    configs = args.config or [(64, 2, 1)]
    run_experiment(args, "gluon_dkdv", configs, check, time_shape, SHAPES)


if __name__ == "__main__":
    main()

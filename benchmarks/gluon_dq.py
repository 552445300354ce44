"""Experiment, not wired in: the backward's dQ kernel in Gluon (NOTES, run 14, has its run).

    PYTHONPATH=src python benchmarks/gluon_dq.py [--out DIR] [--rounds 3]
        [--shape B,H,S,D,CAUSAL ...] [--config BLOCK_N,STAGES ...] [--check-only]

fused_triton's dQ kernel (one program per query block: S = Q K^T, P = exp2(S - lse),
dP = dO V^T, dS = P (dP - delta), dQ += dS K over the key blocks, and delta = rowsum(O dO)
stored for the dK/dV kernel) rebuilt like hopper_forward's forward: two warpgroups of
64 query rows in partitions of their own and a loading warp that fills a K/V ring. In a
warpgroup, block j+1's S and dP are issued first, block j's exponentials and dS run
while they are on the tensor cores, then block j's dQ product. Compiled for sm_90 under
Triton 3.6 (no spills at BLOCK_N = 64; 128 spills and serializes the matmuls, C7512).

First every config is checked against fused_triton's dq and delta and the float64 oracle's
dq on awkward shapes (any failure stops the run); then on each shape fused_triton's dQ
kernel (autotuned) and each Gluon config are timed alone with do_bench in turns, `--rounds`
times, on random bf16 data. Writes DIR/gluon_dq.json. Covers what hopper_forward covers:
bf16/fp16, D = Dv, no mask tensor, window or dropout, a positive scale.
"""

from __future__ import annotations

import torch
from gluon_forward import (  # beside this script
    experiment_parser,
    record,
    run_experiment,
    time_against_triton,
    triton_forward,
)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from attnkit import attention
from attnkit.backends import fused_triton as ft
from attnkit.backends.hopper_backward import lse_log2
from attnkit.backends.hopper_forward import (
    box,
    hold,
    in_head_groups,
    key_blocks,
    kv_ring,
    load_kv_ring,
    score_layout,
    visible,
)
from attnkit.call import make_call
from attnkit.verify import rel_err

LOG2E = 1.4426950408889634


@gluon.jit
def _dq_step(j, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale, q_smem, do_smem,
             k_smem, v_smem, k_bars, v_bars, k_free, v_free,
             MASKED: gl.constexpr, CAUSAL: gl.constexpr, HAS_NEXT: gl.constexpr,
             STAGES: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
             ds_layout: gl.constexpr):
    """Key block j, whose S and dP are in registers: block j+1's S and dP are issued
    (HAS_NEXT), block j's exponentials and dS run while they are on the tensor cores,
    then block j's dQ product; everything is waited for before the next step, since a
    product still in flight across the loop's back edge makes ptxas serialize them all
    (C7514). Returns block j+1's S and dP, and dq."""
    slot = j % STAGES
    mbarrier.arrive(v_free.index(slot), count=1)  # dP, the one reader of V's slot, is done
    if HAS_NEXT:
        nxt = (j + 1) % STAGES
        phase = ((j + 1) // STAGES) & 1
        # Each product gets zeros of its own: one set of registers read as two
        # accumulators also serializes them.
        mbarrier.wait(k_bars.index(nxt), phase)
        s_tok = warpgroup_mma(q_smem, box(k_smem, nxt).permute((1, 0)),
                              gl.zeros(s.shape, gl.float32, s_layout), use_acc=False,
                              is_async=True)
        mbarrier.wait(v_bars.index(nxt), phase)
        dp_tok = warpgroup_mma(do_smem, box(v_smem, nxt).permute((1, 0)),
                               gl.zeros(s.shape, gl.float32, s_layout), use_acc=False,
                               is_async=True)
    if MASKED:
        kj = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(visible(qi, kj, kv_len, off, CAUSAL), s * qk_scale, float("-inf"))
        p = gl.exp2(s - gl.expand_dims(lse, 1))
    else:
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
    ds = gl.convert_layout((p * (dp - gl.expand_dims(delta, 1))).to(q_smem.dtype), ds_layout)
    dq_tok = warpgroup_mma(ds, box(k_smem, slot), dq, is_async=True)
    if HAS_NEXT:
        dq, s, dp, _ = warpgroup_mma_wait(0, deps=[dq_tok, s_tok, dp_tok, ds])
    else:
        dq, _ = warpgroup_mma_wait(0, deps=[dq_tok, ds])
    hold(ds)
    mbarrier.arrive(k_free.index(slot), count=1)  # S and the dQ product read K's slot
    return s, dp, dq


@gluon.jit
def _dq_blocks(first, last, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale, q_smem,
               do_smem, k_smem, v_smem, k_bars, v_bars, k_free, v_free,
               MASKED: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
               BLOCK_N: gl.constexpr, s_layout: gl.constexpr, ds_layout: gl.constexpr):
    for j in range(first, last):
        s, dp, dq = _dq_step(j, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale, q_smem,
                             do_smem, k_smem, v_smem, k_bars, v_bars, k_free, v_free, MASKED,
                             CAUSAL, True, STAGES, BLOCK_N, s_layout, ds_layout)
    return s, dp, dq


@gluon.jit
def _dq_consume(Out, LSE, DELTA, DQ, b, h, bh, row0, Sq, kv_len, off, qk_scale, scale, total,
                full_blocks, stride_ob, stride_oh, stride_om, stride_dqb, stride_dqh,
                stride_dqm, q_smem, do_smem, k_smem, v_smem, q_bar, k_bars, v_bars, k_free,
                v_free, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                CAUSAL: gl.constexpr):
    """One warpgroup's 64 query rows [row0, row0 + 64): delta, then dq over every key
    block, stored scaled."""
    ROWS: gl.constexpr = 64
    s_layout: gl.constexpr = score_layout(BLOCK_N)
    d_layout: gl.constexpr = score_layout(HEAD_D)
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout,
                                                  k_width=2)
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    qi = row0 + gl.arange(0, ROWS, layout=rows_layout)
    row_ok = qi < Sq
    lse = lse_log2(gl.load(LSE + bh.to(gl.int64) * Sq + qi, mask=row_ok, other=float("inf")))

    mbarrier.wait(q_bar, 0)
    # delta = rowsum(O dO), in the layout the dO tile loads into, then stored for dK/dV.
    o_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    o_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    o = gl.load(Out + b * stride_ob + h * stride_oh + gl.expand_dims(o_rows, 1) * stride_om
                + gl.expand_dims(cols, 0), mask=gl.expand_dims(o_rows < Sq, 1), other=0.0)
    do = do_smem.load(o_layout)
    delta = gl.sum(o.to(gl.float32) * do.to(gl.float32), 1)
    gl.store(DELTA + bh.to(gl.int64) * Sq + o_rows, delta, mask=o_rows < Sq)
    delta = gl.convert_layout(delta, rows_layout)

    dq = gl.zeros([ROWS, HEAD_D], gl.float32, d_layout)
    mbarrier.wait(k_bars.index(0), 0)
    s_tok = warpgroup_mma(q_smem, box(k_smem, 0).permute((1, 0)),
                          gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False,
                          is_async=True)
    mbarrier.wait(v_bars.index(0), 0)
    dp_tok = warpgroup_mma(do_smem, box(v_smem, 0).permute((1, 0)),
                           gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False,
                           is_async=True)
    s, dp = warpgroup_mma_wait(0, deps=[s_tok, dp_tok])
    # Blocks every row sees first, then the rest with index checks; the last block
    # apart, as it issues no next S and dP.
    split = gl.minimum(full_blocks, total - 1)
    s, dp, dq = _dq_blocks(0, split, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale,
                           q_smem, do_smem, k_smem, v_smem, k_bars, v_bars, k_free, v_free,
                           False, CAUSAL, STAGES, BLOCK_N, s_layout, ds_layout)
    s, dp, dq = _dq_blocks(split, total - 1, s, dp, dq, lse, delta, qi, kv_len, off,
                           qk_scale, q_smem, do_smem, k_smem, v_smem, k_bars, v_bars, k_free,
                           v_free, True, CAUSAL, STAGES, BLOCK_N, s_layout, ds_layout)
    s, dp, dq = _dq_step(total - 1, s, dp, dq, lse, delta, qi, kv_len, off, qk_scale,
                         q_smem, do_smem, k_smem, v_smem, k_bars, v_bars, k_free, v_free,
                         True, CAUSAL, False, STAGES, BLOCK_N, s_layout, ds_layout)

    d_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, d_layout))
    d_cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, d_layout))
    gl.store(DQ + b * stride_dqb + h * stride_dqh + gl.expand_dims(d_rows, 1) * stride_dqm
             + gl.expand_dims(d_cols, 0), (dq * scale).to(q_smem.dtype),
             mask=gl.expand_dims(d_rows < Sq, 1) & gl.expand_dims(d_cols < HEAD_D, 0))


@gluon.jit
def _dq_worker(ROLE: gl.constexpr, Out, LSE, DELTA, DQ, b, h, bh, m0, Sq, kv_len, off,
               qk_scale, scale, total, full_blocks, stride_ob, stride_oh, stride_om,
               stride_dqb, stride_dqh, stride_dqm, q_desc, do_desc, k_desc, v_desc, q_smem,
               do_smem, k_smem, v_smem, q_bar, k_bars, v_bars, k_free, v_free,
               HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               CAUSAL: gl.constexpr):
    """ROLE 0: the second warpgroup's rows; ROLE 1: the loading warp (Q and dO on one
    barrier, then the K/V ring)."""
    if ROLE == 0:
        _dq_consume(Out, LSE, DELTA, DQ, b, h, bh, m0 + 64, Sq, kv_len, off, qk_scale, scale,
                    total, full_blocks, stride_ob, stride_oh, stride_om, stride_dqb,
                    stride_dqh, stride_dqm, q_smem.slice(64, 64), do_smem.slice(64, 64),
                    k_smem, v_smem, q_bar, k_bars, v_bars, k_free, v_free, HEAD_D, BLOCK_N,
                    STAGES, CAUSAL)
    else:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [m0, 0], q_bar, q_smem)
        tma.async_copy_global_to_shared(do_desc, [m0, 0], q_bar, do_smem)
        # The forward's loader, on this program's (1, 1, Skv, D) K and V: coordinates 0, 0
        load_kv_ring(0, 0, 0, total, k_desc, v_desc,
                     (k_smem, v_smem, k_bars, v_bars, k_free, v_free), BLOCK_N, STAGES)


@gluon.jit
def _program(Hq, group, CAUSAL: gl.constexpr, HEAD_GROUP: gl.constexpr):
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


@gluon.jit
def dq_kernel(Q, K, V, Out, DO, LSE, DELTA, DQ, LENGTHS,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
              Hq, group, Sq, Skv, qk_scale, scale,
              HEAD_D: gl.constexpr, CAUSAL: gl.constexpr, HAS_LENGTHS: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HEAD_GROUP: gl.constexpr):
    """One program per (128 query rows, batch * query head); 4 warps + 4 + 1 (WS)."""
    BLOCK_M: gl.constexpr = 128
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, HEAD_D],
                                                                    dtype)
    pid_m, bh, b, h, kvh = _program(Hq, group, CAUSAL, HEAD_GROUP)
    q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [Sq, HEAD_D],
                                        [stride_qm, 1], [BLOCK_M, HEAD_D], q_layout)
    do_desc = tma.make_tensor_descriptor(DO + b * stride_dob + h * stride_doh, [Sq, HEAD_D],
                                         [stride_dom, 1], [BLOCK_M, HEAD_D], q_layout)
    # K and V as (1, 1, Skv, D) boxes of (1, 1, BLOCK_N, D), the forward's ring's shape
    # (kv_ring, load_kv_ring); the size-1 dimensions' strides are never stepped.
    k_desc = tma.make_tensor_descriptor(K + b * stride_kb + kvh * stride_kh,
                                        [1, 1, Skv, HEAD_D], [stride_kn, stride_kn, stride_kn, 1],
                                        [1, 1, BLOCK_N, HEAD_D], kv_layout)
    v_desc = tma.make_tensor_descriptor(V + b * stride_vb + kvh * stride_vh,
                                        [1, 1, Skv, HEAD_D], [stride_vn, stride_vn, stride_vn, 1],
                                        [1, 1, BLOCK_N, HEAD_D], kv_layout)
    m0 = pid_m * BLOCK_M
    kv_len, off, total, full_blocks = key_blocks(LENGTHS, b, m0, Sq, Skv, BLOCK_M, BLOCK_N,
                                                 CAUSAL, HAS_LENGTHS)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], q_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    k_smem, v_smem, k_bars, v_bars, k_free, v_free = kv_ring(k_desc, STAGES, 2)
    gl.warp_specialize([
        (_dq_consume, (Out, LSE, DELTA, DQ, b, h, bh, m0, Sq, kv_len, off, qk_scale, scale,
                       total, full_blocks, stride_ob, stride_oh, stride_om, stride_dqb,
                       stride_dqh, stride_dqm, q_smem.slice(0, 64), do_smem.slice(0, 64),
                       k_smem, v_smem, q_bar, k_bars, v_bars, k_free, v_free, HEAD_D,
                       BLOCK_N, STAGES, CAUSAL)),
        (_dq_worker, (0, Out, LSE, DELTA, DQ, b, h, bh, m0, Sq, kv_len, off, qk_scale, scale,
                      total, full_blocks, stride_ob, stride_oh, stride_om, stride_dqb,
                      stride_dqh, stride_dqm, q_desc, do_desc, k_desc, v_desc, q_smem,
                      do_smem, k_smem, v_smem, q_bar, k_bars, v_bars, k_free, v_free, HEAD_D,
                      BLOCK_N, STAGES, CAUSAL)),
        (_dq_worker, (1, Out, LSE, DELTA, DQ, b, h, bh, m0, Sq, kv_len, off, qk_scale, scale,
                      total, full_blocks, stride_ob, stride_oh, stride_om, stride_dqb,
                      stride_dqh, stride_dqm, q_desc, do_desc, k_desc, v_desc, q_smem,
                      do_smem, k_smem, v_smem, q_bar, k_bars, v_bars, k_free, v_free, HEAD_D,
                      BLOCK_N, STAGES, CAUSAL)),
    ], [4, 1], [232, 24])


def gluon_dq(call, out, lse, dout, config=(64, 3)):
    """dq and delta (B, Hq, Sq float32) for `call` through dq_kernel."""
    block_n, stages = config
    q, k, v = call.q, call.k, call.v
    B, Hq, Sq, D = q.shape
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    delta = torch.empty_like(lse)
    lengths = call.key_lengths if call.key_lengths is not None else lse
    ft._ensure_allocator()
    dq_kernel[(-(-Sq // 128), B * Hq)](
        q, k, v, out, dout, lse, delta, dq, lengths,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *dout.stride()[:3], *dq.stride()[:3],
        Hq, call.group, Sq, call.seq_kv, call.scale * LOG2E, call.scale,
        HEAD_D=D, CAUSAL=call.causal, HAS_LENGTHS=call.key_lengths is not None,
        BLOCK_N=block_n, STAGES=stages, HEAD_GROUP=ft._meta(call, 0)[1]["HEAD_GROUP"],
        num_warps=4, maxnreg=168)
    return dq, delta


def triton_dq(call, out, lse, dout):
    """fused_triton's dQ kernel alone, launched as _backward launches it: dq, delta."""
    delta = torch.empty_like(lse)
    dq, _, _ = ft._empty_grads(call.q, call.k, call.v)
    ft._launch_dq(call, ft._backward_shared(call, 0, lse, dout), out, lse, dout, delta, dq)
    return dq, delta


# (B, Hq, Hkv, Sq, Skv, D, causal, key lengths)
CASES = [
    (2, 4, 2, 1000, 1000, 128, True, None),
    (2, 4, 4, 1000, 1000, 64, False, None),
    (1, 2, 2, 1000, 17, 128, True, None),  # rows before the first key see nothing
    (2, 2, 2, 300, 700, 128, False, [0, 555]),  # batch 0 sees no key
    (2, 2, 1, 700, 700, 64, True, [700, 333]),
]
SHAPES = [(4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (1, 16, 16384, 128, False),
          (1, 16, 16384, 128, True), (4, 32, 4096, 64, False)]


def inputs(b, hq, hkv, sq, skv, d, causal, lengths, gen):
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, hkv, skv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
    call = make_call(q, k, v, causal=causal, key_lengths=key_lengths)
    out, lse = triton_forward(call)
    return call, out, lse, torch.randn_like(out)


def check(configs) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for case in CASES:
        call, out, lse, dout = inputs(*case, gen)
        want_dq, want_delta = triton_dq(call, out, lse, dout)
        q64 = call.q.double().requires_grad_()
        ref = attention(q64, call.k.double(), call.v.double(), causal=call.causal,
                        key_lengths=call.key_lengths, impl="reference")
        (oracle_dq,) = torch.autograd.grad(ref, q64, dout.double())
        for config in configs:
            dq, delta = gluon_dq(call, out, lse, dout, config)
            torch.cuda.synchronize()
            errs = {"dq_vs_triton": rel_err(dq, want_dq), "dq_vs_oracle": rel_err(dq, oracle_dq),
                    "delta_vs_triton": rel_err(delta, want_delta)}
            ok = errs["dq_vs_oracle"] < 1e-2 and errs["delta_vs_triton"] < 1e-4
            record(rows, case, config, errs, ok)
    return rows


def time_shape(shape, configs, rounds: int) -> dict:
    return time_against_triton(shape, configs, rounds, inputs, triton_dq, gluon_dq, 3,
                               " (dQ kernel alone)")


def main() -> None:
    args = experiment_parser(__doc__, 3, "BLOCK_N,STAGES").parse_args()
    configs = args.config or [(64, 3), (64, 2)]
    run_experiment(args, "gluon_dq", configs, check, time_shape, SHAPES)


if __name__ == "__main__":
    main()

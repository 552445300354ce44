"""Checks and times hopper_backward's dQ kernel (the Gluon one) against fused_triton's.

    PYTHONPATH=src python benchmarks/gluon_dq.py [--out DIR] [--rounds 3]
        [--shape B,H,S,D,CAUSAL ...] [--config BLOCK_N,STAGES ...] [--check-only]
        [--head-dim 64|128|256]

First every config is checked against fused_triton's dq and delta and the float64 oracle's
dq on awkward shapes, and against a second launch bit for bit (any failure stops the
run); then on each shape fused_triton's dQ kernel (autotuned) and each Gluon config are
timed alone with do_bench in turns, `--rounds` times, on random bf16 data. Writes
DIR/gluon_dq.json.

History: run 14 wrote it (H100: 1.03-1.06x the Triton dQ kernel), runs 15-21 kept it in
step with hopper_forward's helpers, run 22 (H200: 1.02-1.07x at D=128, 0.77x at D=64)
moved the kernel into hopper_backward and routed it at D=128 (NOTES); run 61 routed it at
D=256 on 32-key blocks.
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

from attnkit import attention
from attnkit.backends import fused_triton as ft
from attnkit.backends import hopper_backward
from attnkit.call import make_call
from attnkit.verify import rel_err


def gluon_dq(call, out, lse, dout, config=None):
    """dq and delta (B, Hq, Sq float32) for `call` through hopper_backward's dQ kernel.
    config: (BLOCK_N, STAGES), None for the head dim's DQ_CONFIG."""
    dq = torch.empty_like(call.q, memory_format=torch.contiguous_format)
    delta = torch.empty_like(lse)
    hopper_backward.launch_dq(call.q, call.k, call.v, out, dout, lse, delta, dq,
                              call.key_lengths, call.causal, call.scale, config=config,
                              head_group=ft._meta(call, 0)[1]["HEAD_GROUP"])  # as _backward
    return dq, delta


def triton_dq(call, out, lse, dout):
    """fused_triton's dQ kernel alone, launched as _backward launches it: dq, delta."""
    delta = torch.empty_like(lse)
    dq, _, _ = ft._empty_grads(call.q, call.k, call.v)
    shared = ft._backward_shared(call, ft._meta(call, 0), lse, dout)
    ft._launch_dq(call, shared, out, lse, dout, delta, dq)
    return dq, delta


# (B, Hq, Hkv, Sq, Skv, D, causal, key lengths)
CASES = [
    (2, 4, 2, 1000, 1000, 128, True, None),
    (2, 4, 4, 1000, 1000, 64, False, None),
    (1, 2, 2, 1000, 17, 128, True, None),  # rows before the first key see nothing
    (2, 2, 2, 300, 700, 128, False, [0, 555]),  # batch 0 sees no key
    (2, 2, 1, 700, 700, 64, True, [700, 333]),
    (2, 4, 2, 1000, 1000, 256, True, None),
    (2, 2, 2, 300, 700, 256, False, [0, 555]),
]
SHAPES = [(4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (1, 16, 16384, 128, False),
          (1, 16, 16384, 128, True), (4, 32, 4096, 64, False), (2, 16, 4096, 256, False),
          (2, 16, 4096, 256, True)]


def inputs(b, hq, hkv, sq, skv, d, causal, lengths, gen):
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, hkv, skv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
    call = make_call(q, k, v, causal=causal, key_lengths=key_lengths)
    out, lse = triton_forward(call)
    return call, out, lse, torch.randn_like(out)


def check(configs, head_dim: int | None = None) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for case in CASES:
        if head_dim is not None and case[5] != head_dim:
            continue
        call, out, lse, dout = inputs(*case, gen)
        want_dq, want_delta = triton_dq(call, out, lse, dout)
        q64 = call.q.double().requires_grad_()
        ref = attention(q64, call.k.double(), call.v.double(), causal=call.causal,
                        key_lengths=call.key_lengths, impl="reference")
        (oracle_dq,) = torch.autograd.grad(ref, q64, dout.double())
        for config in configs:
            dq, delta = gluon_dq(call, out, lse, dout, config)
            again, _ = gluon_dq(call, out, lse, dout, config)
            torch.cuda.synchronize()
            errs = {"dq_vs_triton": rel_err(dq, want_dq), "dq_vs_oracle": rel_err(dq, oracle_dq),
                    "delta_vs_triton": rel_err(delta, want_delta),
                    "same_bits_twice": torch.equal(dq, again)}
            ok = (errs["dq_vs_oracle"] < 1e-2 and errs["delta_vs_triton"] < 1e-4
                  and errs["same_bits_twice"])
            record(rows, case, config, errs, ok)
    return rows


def time_shape(shape, configs, rounds: int) -> dict:
    return time_against_triton(shape, configs, rounds, inputs, triton_dq, gluon_dq, 3,
                               " (dQ kernel alone)")


def main() -> None:
    args = experiment_parser(__doc__, 3, "BLOCK_N,STAGES", head_dim=True).parse_args()
    configs = args.config or [None]  # each head dim's DQ_CONFIG
    run_experiment(args, "gluon_dq", configs, check, time_shape, SHAPES)


if __name__ == "__main__":
    main()

"""The backward with dq added by TMA reduce-adds from the dK/dV kernel, against the default.

    PYTHONPATH=src python benchmarks/triton_dq_reduce.py [--out DIR] [--budget S]

The default backward (deterministic) runs two kernels: dQ (3 matmuls per block pair) and
dK/dV (4), 7 where the math needs 5. `_backward(..., dq_reduce=True)` runs the dK/dV
kernel alone, which also computes dS K and adds it into a float32 dq through the copy
engine's bulk reduce-add (`tensor_descriptor.atomic_add`, PTX cp.reduce.async.bulk):
5 matmuls, but the adds land in any order, so dq is not bit-reproducible. Run 6 did the
same with per-element atomics and was 3-17% slower (NOTES). Hopper GPUs only.

First checks dq, dk, dv of both against the float64 oracle on small odd shapes (causal,
grouped heads, key lengths), then times the backward alone per shape: the default with
the tiles `_SWEPT` keeps at D=128 (dK/dV (64, 64, 4, 2), dQ (128, 64, 8, 3)) and the
reduce mode under two dK/dV tiles, in turns, medians of 3. Writes
DIR/triton_dq_reduce.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from triton.testing import do_bench

from attnkit import attention
from attnkit.backends import fused_triton as ft
from attnkit.bench import attention_flops
from attnkit.call import make_call
from attnkit.verify import rel_err

START = time.time()
DEFAULT = ((64, 64, 4, 2), (128, 64, 8, 3))  # (dK/dV, dQ) tiles of the default backward
REDUCE_TILES = [(64, 64, 4, 2), (64, 128, 8, 3)]
# One fixed forward tile (the one picked at D=128 from 4k on), so that a cold machine
# compiles a handful of kernels, not the autotuner's lists.
FORWARD = (128, 128, 8, 3)
# (batch, q heads, kv heads, seq, head dim, causal, key lengths)
CHECKS = [(2, 8, 2, 1000, 128, True, True), (1, 2, 1, 17, 80, False, False)]
SHAPES = [(4, 16, 16, 4096, 128, False, False), (2, 16, 16, 8192, 128, True, False),
          (1, 16, 16, 16384, 128, False, False), (4, 32, 32, 4096, 64, False, False)]


def inputs(b, hq, hkv, s, d, causal, lengths, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, dout = (torch.randn((b, hq, s, d), device="cuda", dtype=torch.bfloat16,
                           generator=gen) for _ in range(2))
    k, v = (torch.randn((b, hkv, s, d), device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    key_lengths = None
    if lengths:  # the last batch sees every key, the others part of them
        key_lengths = torch.randint(s // 2, s + 1, (b,), device="cuda", generator=gen)
        key_lengths[-1] = s
    return q, k, v, dout, key_lengths


def check(shape) -> dict:
    b, hq, hkv, s, d, causal, lengths = shape
    q, k, v, dout, key_lengths = inputs(*shape)
    call = make_call(q, k, v, causal=causal, key_lengths=key_lengths)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = attention(*ref, causal=causal, key_lengths=key_lengths, impl="reference")
    ref_grads = torch.autograd.grad(ref_out, ref, dout.double())
    out, lse = ft._forward(call, 0, FORWARD)
    row = {"shape": list(shape)}
    for name, reduce, tiles in (("default", False, DEFAULT),
                                ("reduce", True, (REDUCE_TILES[0], None))):
        grads = ft._backward(call, 0, out, lse, dout, tiles, dq_reduce=reduce)
        row[name] = [rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    ok = all(e < 1e-2 for e in row["default"] + row["reduce"])
    row["ok"] = ok
    print(f"check {shape}: dq dk dv rel err default "
          + " ".join(f"{e:.1e}" for e in row["default"]) + ", reduce "
          + " ".join(f"{e:.1e}" for e in row["reduce"]) + ("" if ok else "  WRONG"),
          flush=True)
    return row


def time_ms(fn) -> float | None:
    try:
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    except Exception as exc:  # out of shared memory, say
        print(f"    failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None


def timings(shape, rounds: int = 3) -> dict:
    b, hq, hkv, s, d, causal, lengths = shape
    q, k, v, dout, key_lengths = inputs(*shape)
    call = make_call(q, k, v, causal=causal, key_lengths=key_lengths)
    out, lse = ft._forward(call, 0, FORWARD)
    runs = {"default": lambda: ft._backward(call, 0, out, lse, dout, DEFAULT)}
    for tiles in REDUCE_TILES:
        runs[f"reduce {tiles}"] = (lambda t=tiles: ft._backward(
            call, 0, out, lse, dout, (t, None), dq_reduce=True))
    fwd = time_ms(lambda: ft._forward(call, 0, FORWARD))
    samples: dict[str, list] = {name: [] for name in runs}
    for _ in range(rounds):  # in turns: the GPU's clock drifts hit every mode alike
        for name, fn in runs.items():
            samples[name].append(time_ms(fn))
    flops = attention_flops(b, hq, s, s, d, causal)
    row = {"shape": list(shape), "fwd_ms": fwd, "flops_fwd": flops, "bwd_ms": {},
           "samples": samples}
    print(f"{shape}: forward {fwd:.3f} ms", flush=True)
    for name, times in samples.items():
        ms = None if None in times else statistics.median(times)
        row["bwd_ms"][name] = ms
        if ms is not None:
            total = 3.5 * flops / ((fwd + ms) * 1e-3) / 1e12
            print(f"  {name:24s} backward {ms:7.3f} ms ({2.5 * flops / ms / 1e9:4.0f} "
                  f"TFLOP/s), fwd+bwd {total:4.0f} TFLOP/s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write DIR/triton_dq_reduce.json")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds: shapes not started by then are skipped")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "checks": [], "timings": []}

    def save():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "triton_dq_reduce.json"), "w") as f:
                json.dump(result, f, indent=1)

    for shape in CHECKS:
        result["checks"].append(check(shape))
        save()
    for shape in SHAPES:
        if time.time() - START > args.budget:
            print(f"budget spent: {shape} and later skipped")
            break
        result["timings"].append(timings(shape))
        save()


if __name__ == "__main__":
    main()

"""Where `triton`'s forward+backward time goes in the `core` bench, on a GPU.

    PYTHONPATH=src python benchmarks/fwd_bwd_gap.py [--out DIR] [--shape B,H,S,D,CAUSAL]

`attnkit bench --preset core` times attention() plus torch.autograd.grad; at D=128 that
came out about 10% above the forward and backward kernels timed on their own
(benchmarks/NOTES.md, run 8). For each shape this times, with triton.testing.do_bench
(median, random bf16 data):
  kernels   fused_triton._forward then ._backward, called directly
  autograd  attention(impl="triton") and torch.autograd.grad, as the bench does
and profiles both with torch.profiler: the GPU time of each kernel per iteration, the
GPU time of all kernels against the wall time, and the host's time per iteration.
Kernels as long as on their own with a longer wall time mean the GPU waits (on the host
or a sync); longer kernels mean the GPU itself runs them slower there. flex gets the
same autograd timing and profile beside it. Writes DIR/fwd_bwd_gap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch
import triton
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from attnkit import attention
from attnkit.backends import fused_triton as ft
from attnkit.call import make_call

SHAPES = [(4, 16, 4096, 128, False), (2, 16, 8192, 128, False), (4, 16, 4096, 128, True)]
PROFILED_ITERATIONS = 20


def autograd_step(q, k, v, dout, causal: bool, impl: str):
    def step():
        out = attention(q, k, v, causal=causal, impl=impl)
        torch.autograd.grad(out, (q, k, v), dout)
    return step


def profiled(step) -> dict:
    """Per iteration: GPU ms by kernel, all kernels' GPU ms, the wall ms, and the host ms
    of the loop before it waits for the GPU (far below the GPU's unless the host blocks)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        host_start = time.perf_counter()
        for _ in range(PROFILED_ITERATIONS):
            step()
        host_ms = (time.perf_counter() - host_start) * 1e3 / PROFILED_ITERATIONS
        end.record()
        torch.cuda.synchronize()
    by_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[event.name[:60]] += event.device_time / 1e3 / PROFILED_ITERATIONS
    return {"wall_ms": start.elapsed_time(end) / PROFILED_ITERATIONS, "host_ms": host_ms,
            "gpu_ms": sum(by_kernel.values()),
            "kernels_ms": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1]))}


def measure(shape: tuple[int, int, int, int, bool]) -> dict:
    b, h, s, d, causal = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn((b, h, s, d), device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    call = make_call(q, k, v, causal=causal)
    out, lse = ft._forward(call, 0)

    def kernels():
        o, m = ft._forward(call, 0)
        ft._backward(call, 0, o, m, dout)

    for t in (q, k, v):
        t.requires_grad_(True)
    result = {
        "shape": {"batch": b, "heads": h, "seq": s, "head_dim": d, "causal": causal},
        "forward_kernel_ms": do_bench(lambda: ft._forward(call, 0), return_mode="median"),
        "backward_kernels_ms": do_bench(lambda: ft._backward(call, 0, out, lse, dout),
                                        return_mode="median"),
        "kernels_ms": do_bench(kernels, return_mode="median"),
        "kernels_profile": profiled(kernels),
    }
    for impl in ("triton", "flex"):
        step = autograd_step(q, k, v, dout, causal, impl)
        step()  # compile / tune outside the timing
        result[impl] = {"autograd_ms": do_bench(step, return_mode="median"),
                        "profile": profiled(step)}
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shape", action="append", default=[],
                        metavar="BATCH,HEADS,SEQ,HEAD_DIM,CAUSAL")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] or SHAPES
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__,
              "shapes": [measure((b, h, s, d, bool(c))) for b, h, s, d, c in shapes]}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fwd_bwd_gap.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

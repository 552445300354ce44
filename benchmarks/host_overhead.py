"""Host time per attention call on a GPU: what a call costs when its GPU work is tiny.

    PYTHONPATH=src python benchmarks/host_overhead.py [--out DIR] [--shape B,H,S,D]

At small sizes `triton.testing.do_bench` times from one launch to the next, so a call
whose Python takes longer than its kernels is timed at its host cost. This launches
many calls on a tiny input (B=1, H=2, S=64, D=64, bf16: microseconds of GPU work) with
one synchronize at the end, so the time per call is the host's: validation, dispatch,
Triton's launcher, autograd. Prints a table and writes DIR/host_overhead.json.
--shape times another input instead: on Hopper, 1,2,4096,128 takes the Gluon kernels
with still little GPU work (tens of us), so that their launches' host time shows.

--ab-fast-launch times triton twice in the same process, trials alternating, with
fused_triton's direct launch of compiled kernels on and off (`_FAST_LAUNCH`): host noise
between processes on the H100 host is larger than the difference (NOTES, run 6).

--engine times the autograd engine alone on the same tensor: a backward through a C++ op
(x * 1) against one through a Python autograd.Function that does the same, to tell how
much of triton's host time any Python backward pays on this device.

--profile IMPL also runs IMPL's forward+backward under cProfile and writes where the host
time goes to DIR/host_profile_IMPL.txt (the functions with the most time of their own,
and the most time in all).
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
import triton

from attnkit import attention

IMPLS = ("sdpa", "triton", "flex")


def per_call_us(fn, calls: int = 300, trials: int = 5) -> float:
    for _ in range(20):  # compile, autotune, allocator warm-up
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def calls(q, k, v, grad, impl: str, causal: bool):
    """The forward (no autograd) and forward+backward calls that get timed."""
    def forward():
        with torch.no_grad():
            attention(q, k, v, causal=causal, impl=impl)

    def forward_backward():
        out = attention(q, k, v, causal=causal, impl=impl)
        torch.autograd.grad(out, (q, k, v), grad)

    return forward, forward_backward


def fast_launch_ab(q, k, v, grad, rounds: int = 7) -> list[dict]:
    """triton's host time per call with fused_triton._FAST_LAUNCH on and off, the two
    alternating over `rounds` so that drifts of the host hit both alike; medians."""
    from attnkit.backends import fused_triton

    saved, rows = fused_triton._FAST_LAUNCH, []
    try:
        for causal in (False, True):
            times = {(fast, part): [] for fast in (True, False) for part in ("fwd", "fwd_bwd")}
            for _ in range(rounds):
                for fast in (True, False):
                    fused_triton._FAST_LAUNCH = fast
                    for part, fn in zip(("fwd", "fwd_bwd"), calls(q, k, v, grad, "triton", causal),
                                        strict=True):
                        times[fast, part].append(per_call_us(fn, calls=200, trials=2))
            for fast in (True, False):
                row = {"impl": "triton" if fast else "triton (Triton's launch path)",
                       "causal": causal, "rounds": rounds,
                       "fwd_us": statistics.median(times[fast, "fwd"]),
                       "fwd_bwd_us": statistics.median(times[fast, "fwd_bwd"])}
                rows.append(row)
                print(f"{row['impl']:30s} {'causal' if causal else 'full  '} forward "
                      f"{row['fwd_us']:6.1f} us  forward+backward {row['fwd_bwd_us']:6.1f} us "
                      f"(median of {rounds} alternating rounds)", flush=True)
    finally:
        fused_triton._FAST_LAUNCH = saved
    return rows


class _PythonScale(torch.autograd.Function):
    """x * 1 with a Python backward: what the autograd engine pays for any Python node."""

    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        return grad


def engine_rows(x, grad) -> list[dict]:
    """fwd+bwd host time of x * 1 through a C++ node and through a Python node."""
    rows = []
    for name, op in (("engine: C++ node", lambda t: t * 1),
                     ("engine: Python node", _PythonScale.apply)):
        def forward_backward(op=op):
            torch.autograd.grad(op(x), x, grad)

        rows.append({"impl": name, "causal": None, "fwd_us": None,
                     "fwd_bwd_us": per_call_us(forward_backward)})
        print(f"{name:22s} forward+backward {rows[-1]['fwd_bwd_us']:6.1f} us", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), metavar="IMPL",
                        help=f"implementations to time (default: {' '.join(IMPLS)})")
    parser.add_argument("--ab-fast-launch", action="store_true",
                        help="triton with and without its direct launch, trials alternating")
    parser.add_argument("--engine", action="store_true",
                        help="also time the autograd engine alone: a C++ against a Python node")
    parser.add_argument("--profile", action="append", default=[], metavar="IMPL",
                        help="profile IMPL's forward+backward (repeatable)")
    parser.add_argument("--shape", default="1,2,64,64", metavar="B,H,S,D",
                        help="the input's shape (default 1,2,64,64)")
    args = parser.parse_args()
    b, h, s, d = map(int, args.shape.split(","))
    shape = f"b{b} h{h} s{s} d{d} bfloat16"
    q, k, v, grad = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rows = []
    for impl in args.impls:
        for causal in (False, True):
            forward, forward_backward = calls(q, k, v, grad, impl, causal)
            row = {"impl": impl, "causal": causal, "fwd_us": per_call_us(forward),
                   "fwd_bwd_us": per_call_us(forward_backward)}
            rows.append(row)
            print(f"{impl:7s} {'causal' if causal else 'full  '} forward {row['fwd_us']:6.1f} us"
                  f"  forward+backward {row['fwd_bwd_us']:6.1f} us", flush=True)
    if args.ab_fast_launch:
        rows += fast_launch_ab(q, k, v, grad)
    if args.engine:
        rows += engine_rows(q, grad)
    for impl in args.profile:
        _, forward_backward = calls(q, k, v, grad, impl, causal=False)
        per_call_us(forward_backward, calls=10, trials=1)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            forward_backward()
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        with open(os.path.join(args.out, f"host_profile_{impl}.txt"), "w") as f:
            f.write(f"200 calls of forward+backward, {shape}\n{text.getvalue()}")
        print(text.getvalue()[:6000])
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "shape": shape, "rows": rows}
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

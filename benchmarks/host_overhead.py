"""Host time per attention call on a GPU: what a call costs when its GPU work is tiny.

    PYTHONPATH=src python benchmarks/host_overhead.py [--out DIR]

At small sizes `triton.testing.do_bench` times from one launch to the next, so a call
whose Python takes longer than its kernels is timed at its host cost. This launches
many calls on a tiny input (B=1, H=2, S=64, D=64, bf16: microseconds of GPU work) with
one synchronize at the end, so the time per call is the host's: validation, dispatch,
Triton's launcher, autograd. Prints a table and writes DIR/host_overhead.json.

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
import time

import torch
import triton

from attnkit import attention

IMPLS = ("sdpa", "triton", "flex")
SHAPE = "b1 h2 s64 d64 bfloat16"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), metavar="IMPL",
                        help=f"implementations to time (default: {' '.join(IMPLS)})")
    parser.add_argument("--profile", action="append", default=[], metavar="IMPL",
                        help="profile IMPL's forward+backward (repeatable)")
    args = parser.parse_args()
    q, k, v, grad = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
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
            f.write(f"200 calls of forward+backward, {SHAPE}\n{text.getvalue()}")
        print(text.getvalue()[:6000])
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "shape": SHAPE, "rows": rows}
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

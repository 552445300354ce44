"""Host time per attention call on a GPU: what a call costs when its GPU work is tiny.

    PYTHONPATH=src python benchmarks/host_overhead.py [--out DIR]

At small sizes `triton.testing.do_bench` times from one launch to the next, so a call
whose Python takes longer than its kernels is timed at its host cost. This launches
many calls on a tiny input (B=1, H=2, S=64, D=64, bf16: microseconds of GPU work) with
one synchronize at the end, so the time per call is the host's: validation, dispatch,
Triton's launcher, autograd. Prints a table and writes DIR/host_overhead.json.
"""

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    q, k, v, grad = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rows = []
    for impl in IMPLS:
        for causal in (False, True):
            def forward(impl=impl, causal=causal):
                with torch.no_grad():
                    attention(q, k, v, causal=causal, impl=impl)

            def forward_backward(impl=impl, causal=causal):
                out = attention(q, k, v, causal=causal, impl=impl)
                torch.autograd.grad(out, (q, k, v), grad)

            row = {"impl": impl, "causal": causal, "fwd_us": per_call_us(forward),
                   "fwd_bwd_us": per_call_us(forward_backward)}
            rows.append(row)
            print(f"{impl:7s} {'causal' if causal else 'full  '} forward {row['fwd_us']:6.1f} us"
                  f"  forward+backward {row['fwd_bwd_us']:6.1f} us", flush=True)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "shape": "b1 h2 s64 d64 bfloat16", "rows": rows}
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
